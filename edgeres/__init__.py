"""edgeres: prune, quantise and compile trained ResNets for edge devices.

Importing this package is cheap: torch, tensorflow, openvino and onnxruntime are imported only
inside the functions that need them.
"""

__version__ = "0.1.0"

from edgeres.errors import EdgeResError, InputError, TargetError  # noqa: E402

__all__ = ["EdgeResError", "InputError", "TargetError", "__version__"]
