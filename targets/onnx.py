"""ONNX target run by onnxruntime: fp32 (the reference), fp16 and int8 QDQ."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from targets.base import Artifact, CompileJob, Runner, TargetError, TargetUnavailable

PRECISIONS = ("fp32", "fp16", "int8")


def available() -> str:
    try:
        import onnxruntime
    except ImportError:
        raise TargetUnavailable("onnxruntime is not installed; pip install 'edgeres[onnx]'") from None
    return onnxruntime.__version__


def compile(job: CompileJob) -> Artifact:  # noqa: A001 - the target interface's verb
    available()
    if job.precision != "fp32":
        raise TargetError(f"onnx: precision {job.precision} is not implemented yet")
    rel = Path("onnx") / "model.fp32.onnx"
    (job.out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(job.onnx_fp32, job.out_dir / rel)
    return Artifact("onnx", "fp32", (str(rel),), engine="torch.onnx.export + onnxslim", tool_versions=_versions())


def _versions() -> dict:
    import onnx
    import onnxruntime

    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


class OnnxRunner(Runner):
    def __init__(self, path: str | Path, threads: int | None = None):
        available()
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise TargetError(f"{path}: onnxruntime cannot load it ({str(e).splitlines()[0][:200]})") from None
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x.astype(np.float32, copy=False)})[0]


def load_runner(path: str | Path, threads: int | None = None) -> OnnxRunner:
    return OnnxRunner(path, threads)
