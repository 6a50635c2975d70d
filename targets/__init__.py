"""One module per runtime. Each target module declares ``INFO`` (a ``TargetInfo``: name, suffixes,
pip distribution, precisions, what it compiles from, its options) and imports its runtime only
inside functions. It offers:

``available() -> str``            the runtime version, or raise ``TargetUnavailable`` with the pip fix
``compile(job: CompileJob) -> Artifact``   write the artifact(s) into ``job.out_dir``
``load_runner(path, threads=None) -> Runner``   run an artifact: ``runner(x_nchw_float32) -> logits``

Adding a runtime is one new module here named in ``BUILTIN`` (or ``register``-ed by a plugin);
everything else — doctor, the CLI's help and option checks, the pipeline, bench, the budget — reads
the records.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from edgeres.targets.base import (ANY_PRECISION, KERAS, QDQ_ONNX, REFERENCE_ONNX, TORCH_EXPORT, Artifact, CompileJob, OptionError, TargetError, TargetInfo, TargetOption,
                          TargetUnavailable)

BUILTIN = ("onnx", "openvino", "tflite", "executorch")
_modules: dict[str, ModuleType] = {}


def register(module: ModuleType) -> TargetInfo:
    """Add a target module (with ``INFO``, ``compile``, ``load_runner``, ``available``) to the table."""
    info = module.INFO
    if not isinstance(info, TargetInfo) or not isinstance(info.sources, dict) or not info.sources:
        raise TypeError(f"{module.__name__}: INFO must be a TargetInfo naming the model sources it compiles from")
    _modules[info.name] = module
    return info


def _load_builtins() -> None:
    for name in BUILTIN:
        if name not in _modules:
            register(importlib.import_module(f"edgeres.targets.{name}"))


def infos() -> dict[str, TargetInfo]:
    """Every known target's record, by name, built-ins first."""
    _load_builtins()
    return {name: m.INFO for name, m in _modules.items()}


def names() -> tuple[str, ...]:
    return tuple(infos())


def get_info(name: str) -> TargetInfo:
    known = infos()
    if name not in known:
        raise TargetError(f"unknown target {name!r}; choose from {', '.join(known)}")
    return known[name]


def get_target(name: str) -> ModuleType:
    """The target module ``name`` (imports no runtime)."""
    get_info(name)
    return _modules[name]


def shipping_target(source: str) -> str | None:
    """The target whose int8 artifact is ``source`` itself (``compile_here``: its compile only adds metadata
    to the file the int8 stage made), e.g. the ONNX target for the QDQ model; None when no target is."""
    return next((i.name for i in infos().values() if i.compile_here and i.consumes == source), None)


def info_for_file(path: str) -> TargetInfo | None:
    """The target whose artifacts end like ``path`` (None when no target makes such files)."""
    return next((i for i in infos().values() if any(str(path).endswith(s) for s in i.suffixes)), None)


def companion_files(path: str) -> list[str]:
    """The files an artifact needs beside it (an OpenVINO IR's ``.bin`` next to its ``.xml``)."""
    info = info_for_file(path)
    if info is None:
        return []
    suffix = next(s for s in info.suffixes if str(path).endswith(s))
    return [str(path)[: -len(suffix)] + c for c in info.companions]


__all__ = ["ANY_PRECISION", "Artifact", "CompileJob", "OptionError", "KERAS", "QDQ_ONNX", "REFERENCE_ONNX", "TORCH_EXPORT", "TargetError", "TargetInfo", "TargetOption",
           "TargetUnavailable", "companion_files", "get_info", "get_target", "info_for_file", "infos", "names", "register", "shipping_target"]
