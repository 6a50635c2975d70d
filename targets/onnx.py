"""ONNX target run by onnxruntime: fp32 (the reference), fp16 and int8 QDQ.

int8 compiles from the QDQ ONNX that the int8 stage (``edgeres.int8``) writes once per conversion
from the shared ranges with this runtime's recipe (``INFO.int8_recipe``); ``compile`` ships that file
with the app metadata added.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from edgeres.targets.base import (ANY_PRECISION, QDQ_ONNX, REFERENCE_ONNX, Artifact, CompileJob, Runner, TargetError,
                                  TargetInfo, TargetUnavailable, atomic_path, first_line, qdq_record, x86_u8s8_recipe)
from edgeres.targets.runners.onnxruntime_runner import OnnxRuntimeRunner

PRECISIONS = ("fp32", "fp16", "int8")
INFO = TargetInfo(
    name="onnx", title="ONNX (onnxruntime)", suffixes=(".onnx",), dist="onnxruntime", runtime="onnxruntime",
    precisions=PRECISIONS, sources={"int8": QDQ_ONNX, ANY_PRECISION: REFERENCE_ONNX}, tools=("onnx",), int8_recipe=x86_u8s8_recipe,
    budget_tunes=("estimator", "float_nodes"),
    compile_here=True,
)


def available() -> str:
    try:
        import onnxruntime
    except ImportError:
        raise TargetUnavailable("onnxruntime is not installed; pip install 'edgeres[onnx]'") from None
    return onnxruntime.__version__


# ---------------------------------------------------------------------------------------------
# compile


def compile(job: CompileJob) -> Artifact:  # noqa: A001 - the target interface's verb
    """Write ``onnx/model.<precision>.onnx`` carrying the app metadata (labels, preprocessing) in its
    ``metadata_props``, so onnxruntime's ``get_modelmeta()`` tells an app what it needs."""
    available()
    import onnx

    if job.precision not in PRECISIONS:
        raise TargetError(f"onnx: precision {job.precision!r} is not one of {', '.join(PRECISIONS)}")
    rel = Path("onnx") / f"model.{job.precision}.onnx"
    dest = job.out_dir / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    qdq = Path(job.source(QDQ_ONNX)) if job.precision == "int8" else None
    if qdq is not None and not qdq.exists():
        raise TargetError("onnx int8: no QDQ model was made; int8 needs --calib images")
    if job.precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(onnx.load(str(job.onnx_fp32)), keep_io_types=True)
    else:
        model = onnx.load(str(qdq if qdq is not None else job.onnx_fp32))
    metadata = job.model_metadata(layout="NCHW", dtype="float32")
    if job.precision == "fp32" and _has_metadata(model, metadata):
        shutil.copyfile(job.onnx_fp32, dest)  # byte-identical to the reference, so bench runs it once
    else:
        add_metadata(model, metadata)
        _save_atomic(model, dest)
    if job.precision != "fp32":
        _check_runs(dest)
    if job.precision == "fp32":
        return Artifact("onnx", "fp32", (str(rel),), engine="torch.onnx.export + onnxslim",
                        tool_versions=_versions())
    if job.precision == "fp16":
        return Artifact("onnx", "fp16", (str(rel),), engine="onnxruntime.transformers.float16 (float32 I/O)",
                        options={"keep_io_types": True}, tool_versions=_versions())
    record = qdq_record(dest)
    return Artifact("onnx", "int8", (str(rel),), engine=record.get("engine", "QDQ ONNX"),
                    options={k: v for k, v in record.items() if k != "engine"}, tool_versions=_versions())


def _has_metadata(model, values: dict[str, str]) -> bool:
    props = {p.key: p.value for p in model.metadata_props}
    return all(props.get(k) == v for k, v in values.items())


def stamp_metadata(path: str | Path, values: dict[str, str]) -> None:
    """Write ``values`` into an ONNX file's ``metadata_props`` (the pipeline's fp32 reference)."""
    import onnx

    model = onnx.load(str(path))
    add_metadata(model, values)
    _save_atomic(model, Path(path))


def add_metadata(model, values: dict[str, str]) -> None:
    """Set ``values`` in an ONNX model's ``metadata_props`` (replacing entries of the same key)."""
    keep = [(p.key, p.value) for p in model.metadata_props if p.key not in values]
    del model.metadata_props[:]
    for key, value in [*keep, *values.items()]:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def _check_runs(path: Path) -> None:
    """Fail now (exit 3) rather than at eval time if onnxruntime cannot run the artifact."""
    runner = OnnxRunner(path)
    shape = [d if isinstance(d, int) else 1 for d in runner.session.get_inputs()[0].shape]
    out = runner(np.zeros(shape, np.float32))
    if not np.isfinite(out).all():
        raise TargetError(f"{path}: onnxruntime gives non-finite outputs on a zero image")


def _save_atomic(model, path: Path) -> None:
    import onnx

    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))


def _versions() -> dict:
    import onnx
    import onnxruntime

    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


# ---------------------------------------------------------------------------------------------
# run


class OnnxRunner(OnnxRuntimeRunner, Runner):
    """``targets.runners.onnxruntime_runner`` with this target's errors."""

    def __init__(self, path: str | Path, threads: int | None = None):
        available()
        try:
            super().__init__(str(path), threads)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise TargetError(f"{path}: onnxruntime cannot load it ({first_line(e)})") from None
        self.path = Path(path)  # named when its outputs are unusable (edgeres.measure.evaluate)


def load_runner(path: str | Path, threads: int | None = None) -> OnnxRunner:
    return OnnxRunner(path, threads)
