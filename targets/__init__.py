"""One module per runtime. Each target module imports its runtime only inside functions and offers:

``available() -> str``            the runtime version, or raise ``TargetUnavailable`` with the pip fix
``PRECISIONS``                    precisions it can produce
``check_options(options)``        refuse unknown ``--option`` keys or values (``OptionError``), no runtime needed
``compile(job: CompileJob) -> Artifact``   write the artifact(s) into ``job.out_dir``
``load_runner(path, threads=None) -> Runner``   run an artifact: ``runner(x_nchw_float32) -> logits``
"""

from __future__ import annotations

import importlib

from targets.base import Artifact, CompileJob, OptionError, TargetError, TargetUnavailable

TARGETS = ("onnx", "openvino", "tflite")
RUNTIME_PACKAGES = {"onnx": "onnxruntime", "openvino": "openvino", "tflite": "ai-edge-litert"}


def get_target(name: str):
    """The target module ``name`` (imports no runtime)."""
    if name not in TARGETS:
        raise TargetError(f"unknown target {name!r}; choose from {', '.join(TARGETS)}")
    return importlib.import_module(f"targets.{name}")


__all__ = ["Artifact", "CompileJob", "OptionError", "TARGETS", "RUNTIME_PACKAGES", "TargetError", "TargetUnavailable", "get_target"]
