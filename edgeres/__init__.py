"""edgeres: prune, quantise and compile trained ResNets for edge devices.

Importing this package is cheap: torch, tensorflow, openvino and onnxruntime are imported only
inside the functions that need them.

onnxruntime (1.29 and later, on Linux and macOS too) reports usage to Microsoft and keeps a device ID and an
event store under ``~/.cache/Microsoft`` unless ``ORT_DISABLE_TELEMETRY=1``: an edgeres process, and every
process it starts, sets it unless the user has set it either way (``targets/runners/onnxruntime_runner.py``
does the same for the standalone runners). OpenVINO's reports: ``openvino_by_consent``.
"""

import os

__version__ = "0.1.0"

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # read when onnxruntime starts: see above

from edgeres.errors import EdgeResError, InputError, TargetError  # noqa: E402

__all__ = ["EdgeResError", "InputError", "TargetError", "__version__"]
