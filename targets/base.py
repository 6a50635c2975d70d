"""What the pipeline hands a target and what it gets back. numpy only."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np


class TargetError(RuntimeError):
    """A runtime failed to compile or run an artifact; the CLI reports it with exit 3."""

    exit_code = 3


class TargetUnavailable(TargetError):
    """The runtime this target needs is not installed (message says what to pip install)."""


class OptionError(TargetError):
    """A ``--option TARGET.KEY=VALUE`` the target does not take: bad input (exit 2), found before any work."""

    exit_code = 2


def check_threads_option(target: str, options: dict) -> None:
    threads = options.get("threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise OptionError(f"--option {target}.threads={threads}: give a whole number of threads, at least 1")


@dataclass(frozen=True)
class CompileJob:
    """Everything a target compiles from. Targets never import ``edgeres``.

    ``onnx_fp32``: the BN-folded fp32 reference ONNX (input ``input``, NCHW float32, dynamic batch).
    ``calibration``: a callable returning an iterator of NCHW float32 batches (the same images for
    every target); ``ranges``: activation ranges {onnx tensor name: (lo, hi)} computed once.
    ``keras_model``: a callable building the same network in Keras (NHWC) for the TFLite target.
    """

    onnx_fp32: Path
    out_dir: Path
    precision: str
    calibration: Callable[[], Iterable[np.ndarray]] | None = None
    ranges: dict | None = None
    qdq_onnx: Path | None = None
    keras_model: Callable[[], object] | None = None
    options: dict = field(default_factory=dict)
    preprocess: dict | None = None  # calibration.Preprocess.to_dict(): mean/std/size/layout of the input
    labels: tuple | None = None
    estimator: str | None = None  # the activation range estimator the ranges came from (calibration.estimators)


@dataclass(frozen=True)
class Artifact:
    """One compiled artifact; ``files`` are relative to the bundle, the first is the one to load."""

    target: str
    precision: str
    files: tuple[str, ...]
    engine: str
    input_layout: str = "NCHW"
    input_dtype: str = "float32"
    options: dict = field(default_factory=dict)
    tool_versions: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def file(self) -> str:
        return self.files[0]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["files"] = list(self.files)
        d["notes"] = list(self.notes)
        d["file"] = self.file
        return d


class Runner:
    """Runs one artifact on NCHW float32 batches and returns float32 logits (N×classes)."""

    input_layout = "NCHW"
    path: Path | None = None  # the artifact file, for messages

    def __call__(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError
