"""What the pipeline hands a target and what it gets back. numpy only."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
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


def first_line(e: BaseException, limit: int = 200, *, with_type: bool = False) -> str:
    """The first line of an error's text (its class name when it has none), for one-line messages."""
    lines = str(e).strip().splitlines()
    text = lines[0][:limit] if lines else ""
    if with_type or not text:
        return f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text


def sha256_stream(f) -> str:
    """sha256 of an open binary file, read from where it stands in 1 MiB chunks."""
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return sha256_stream(f)


# release_memory runs a full collection only when the process, with its free heap given back, still holds this much
# more than after its last one: a step that leaves garbage in reference cycles (a Keras or TensorFlow graph of an
# ImageNet-size model: GBs) is collected as before, while after a small model's step a full collection with the
# runtimes loaded (0.25-0.33 s each) cost more than it gave back: 17 of them were 5.4 s of a CIFAR ResNet-20's 27.5 s
# three-target conversion (cProfile; 24.7 -> 19.8 s of CPU without them). The automatic collections still run.
COLLECT_WHEN_GROWN_BY = 256 << 20
_held_after_collection = [None]  # this process's resident bytes after its last full collection here


def release_memory() -> None:
    """Give the freed heap back to the system (glibc keeps it otherwise), so a process's RSS after a big step is
    what it still uses, and collect garbage first when what is still held has grown by ``COLLECT_WHEN_GROWN_BY``
    since the last collection here (or when the resident size cannot be read)."""
    import gc

    _trim()
    held = resident_bytes()
    last = _held_after_collection[0]
    if held is None or last is None or held - last >= COLLECT_WHEN_GROWN_BY:
        gc.collect()
        _trim()
        _held_after_collection[0] = resident_bytes()
    elif held < last:
        _held_after_collection[0] = held


def _trim() -> None:
    import sys

    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def resident_bytes() -> int | None:
    """This process's resident set size (Linux), else None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


# automatic collections: (700, 10, 10) allocations / collections by default; a converting process allocates
# millions of graph objects, and each full collection scanned the runtimes' ~0.5 M objects again
GC_THRESHOLDS = (50_000, 20, 20)


def rarer_collections() -> None:
    """First thing in an edgeres process (the CLI, a compile worker, the eval and Keras-mapping children): the
    automatic collections at ``GC_THRESHOLDS``. Importing a runtime makes hundreds of thousands of objects, and
    at the default thresholds the collector scans them again and again on the way: `import tensorflow` took
    4.5 s of CPU on one core, 3.8 s with these (three runs each). Garbage is collected as before, only less often."""
    import gc

    gc.set_threshold(*GC_THRESHOLDS)


def settle_heap() -> None:
    """At the start of a step in a long-lived process (a Ray worker, which runs one sweep step after another):
    collect, then move every object still alive — the runtimes imported by earlier steps, the process's own
    state — out of the collector's sight, and make automatic collections rarer. Measured in a sweep's Ray
    workers: a full collection scanned TensorFlow's, torch's and OpenVINO's objects each time, 27-42 % of the
    workers' CPU. Only where nothing of a finished step is alive: an object frozen here that later becomes cyclic
    garbage is never collected (reference counting still frees the rest)."""
    import gc

    gc.collect()
    gc.freeze()
    rarer_collections()


def cpu_threads() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent goes (kill -9 included): for the child processes edgeres
    starts (compile workers, the Keras mapping process), so none runs on after the command. Elsewhere a no-op."""
    import sys

    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass


@contextlib.contextmanager
def atomic_path(path: Path):
    """A temporary name beside ``path`` to write to: renamed over ``path`` when the block ends well
    (if anything was written), removed otherwise, so a reader never sees half a file. Shared by the
    targets and edgeres (this is the lowest module both import)."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")  # the suffix stays: writers pick formats by it
    try:
        yield tmp
        if tmp.exists():
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):  # a read-only file system refuses even this; then nothing is there
            tmp.unlink(missing_ok=True)


# keys of the metadata every artifact carries in its runtime's own format (see CompileJob.model_metadata)
METADATA_PREFIX = "edgeres."
LABELS_FILE = "labels.txt"  # one class name a line, in the bundle and as the .tflite's associated file
QDQ_RECORD_KEY = "edgeres.quantization"  # a QDQ ONNX's metadata entry: the int8 recipe it was written with


def qdq_record(path: str | Path) -> dict:
    """The int8 recipe the int8 stage stored in a QDQ ONNX (empty if it was made elsewhere)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == QDQ_RECORD_KEY:
            return json.loads(prop.value)
    return {}


# Model sources a target compiles from (TargetInfo.sources, by precision). The pipeline materialises each
# as files once per conversion (edgeres/convert/model_sources.py, an open registry: a plugin may add its
# own) and hands the target what the files open to in CompileJob.sources. The built-in ones:
REFERENCE_ONNX = "reference_onnx"  # the fp32 reference ONNX (BN folded, dynamic batch): a Path
QDQ_ONNX = "qdq_onnx"  # the QDQ int8 ONNX the int8 stage writes from the shared ranges: a Path
KERAS = "keras"  # the network rebuilt in Keras from its spec + weights: a callable that builds it
# the network rebuilt in torch from its spec + weights: a callable giving its ``torch.export`` program (batch 1)
TORCH_EXPORT = "torch_export"
ANY_PRECISION = "*"  # TargetInfo.sources key for every precision not named


@dataclass(frozen=True)
class TargetOption:
    """One ``--option TARGET.NAME=VALUE``: its type, default, allowed values and help."""

    name: str
    kind: type  # bool, int, float, str or list (a comma list of names)
    default: object
    help: str
    choices: tuple = ()

    def parse(self, target: str, value):
        """The checked value of ``--option target.name=value`` (raises ``OptionError`` naming it)."""
        flag = f"--option {target}.{self.name}={value}"
        if self.kind is bool:
            if not isinstance(value, bool):
                raise OptionError(f"{flag}: choose true or false")
            return value
        if self.kind is list:
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
                raise OptionError(f"{flag}: give names separated by commas")
            return [v for v in items if v]
        if self.kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise OptionError(f"{flag}: give a number")
            return self.kind(value)
        text = str(value)
        if self.choices:
            match = next((c for c in self.choices if c.lower() == text.lower()), None)
            if match is None:
                raise OptionError(f"{flag}: choose one of {', '.join(self.choices)}")
            return match
        return text


@dataclass(frozen=True)
class TargetInfo:
    """Everything the rest of edgeres knows about one runtime; declared as ``INFO`` in its module.

    ``runtime`` names its runner class in ``targets/runners`` (``RUNNERS`` in the standalone benchmark
    runner, which carries those modules), so a device needs only that script, numpy and ``dist``.
    ``int8_recipe`` says what its int8 kernels need.
    """

    name: str
    title: str
    suffixes: tuple[str, ...]
    dist: str
    runtime: str
    precisions: tuple[str, ...]
    sources: dict  # precision (or ANY_PRECISION) -> the model source its compile reads (see above)
    options: tuple[TargetOption, ...] = ()
    tools: tuple[str, ...] = ()  # further distributions its compile uses (shown by doctor)
    companions: tuple[str, ...] = ()  # suffixes of files an artifact needs beside it (an IR's .bin)
    # what its int8 kernels need on a CPU: (cpu) -> (activation type, reduce_range, reason); the int8
    # stage (edgeres.int8) makes its recipe from it, with the user's --option int8.* on top
    int8_recipe: Callable | None = None
    # what --accuracy-budget may change to bring its int8 within budget: "estimator" (another range
    # estimator), "float_nodes" (the most sensitive layers kept in float)
    budget_tunes: tuple[str, ...] = ()
    compile_here: bool = False  # its compile is a copy of what the int8 stage made: no worker process for it
    # distributions its runtime imports beside ``dist`` on a device (ExecuTorch's Python runtime: torch);
    # an exported app's requirements pin them too
    runtime_needs: tuple[str, ...] = ()

    def source_for(self, precision: str) -> str:
        """The model source a ``precision`` compile reads."""
        return self.sources.get(precision, self.sources.get(ANY_PRECISION, REFERENCE_ONNX))

    @property
    def consumes(self) -> str:
        """What its int8 compiles from (the weight grid and recipe of that source apply)."""
        return self.source_for("int8")

    def option(self, name: str) -> TargetOption:
        for o in self.options:
            if o.name == name:
                return o
        known = ", ".join(f"{self.name}.{o.name}" for o in self.options) or "none"
        raise OptionError(f"--option: unknown option {self.name}.{name}; {self.name} takes {known}")

    def check_options(self, options: dict) -> dict:
        """``options`` with each value checked against its declaration (unknown names refused); needs
        no runtime, so the pipeline calls it before any work and each compile calls it again."""
        return {k: self.option(k).parse(self.name, v) for k, v in options.items()}


@dataclass(frozen=True)
class CompileJob:
    """Everything a target compiles from. Targets never import ``edgeres``.

    ``onnx_fp32``: the BN-folded fp32 reference ONNX (input ``input``, NCHW float32, dynamic batch).
    ``sources``: {source name: what its files open to} for the sources this compile reads (``TargetInfo
    .sources``): a Path for file sources, a builder for the Keras network. What crosses into a worker
    process is only the sources' files, opened there.
    ``calibration``: a callable returning an iterator of NCHW float32 batches (the same images for
    every target, read from one file in a worker).
    """

    onnx_fp32: Path
    out_dir: Path
    precision: str
    sources: dict = field(default_factory=dict)
    calibration: Callable[[], Iterable[np.ndarray]] | None = None
    options: dict = field(default_factory=dict)
    preprocess: dict | None = None  # calibration.Preprocess.to_dict(): mean/std/size/layout of the input
    labels: tuple | None = None
    estimator: str | None = None  # the activation range estimator the ranges came from (calibration.estimators)
    # calibration.matching.ReferenceActivations from --quant finetune: its tuned ranges replace the
    # estimator's on every tensor of the target's own graph that holds one of its activations
    tuned_activations: object | None = None
    # the shared ranges once, for a target with a graph of its own (TFLite): a file of the fp32 reference's
    # activations on a few calibration images with the int8 stage's ranges (``calibration.matching.save``),
    # whose tensors the target matches by value; it may appear only after the compile starts (a compile
    # started beside the int8 stage waits for it). A file holding only "unavailable" means: no shared ranges.
    reference_activations: str | None = None
    producer_version: str | None = None  # edgeres' version, written into the artifact's own metadata
    source_sha256: str | None = None  # sha256 of the model file the user converted
    num_classes: int | None = None

    def source(self, name: str):
        """What source ``name`` opened to; a TargetError when the pipeline did not provide it."""
        if name not in self.sources:
            raise TargetError(f"the pipeline gave no {name} source for a {self.precision} compile "
                              f"(it gave: {', '.join(self.sources) or 'none'})")
        return self.sources[name]

    def label_names(self) -> list[str]:
        """The class names; their indices "0".."N-1" when the model has none."""
        if self.labels is not None:
            return [str(v) for v in self.labels]
        return [str(i) for i in range(self.num_classes or 0)]

    def model_metadata(self, *, layout: str, dtype: str) -> dict[str, str]:
        """``app_metadata`` of this job's model for an artifact whose input is ``layout`` / ``dtype``."""
        return app_metadata(self.label_names(), self.preprocess, layout=layout, dtype=dtype,
                            version=self.producer_version, source_sha256=self.source_sha256)


WAIT_NOTE_S = 5.0  # a compile waiting this long for the shared ranges says so


def shared_reference(job: "CompileJob"):
    """The int8 stage's reference activations (``calibration.matching.ReferenceActivations``), the reason
    there are none (str), or None when the job names no file: what a target with a graph of its own matches
    its tensors to by value. A compile started beside the int8 stage waits for the file (the parent stops
    it if the stage fails; a worker dies with its parent)."""
    import sys
    import time

    from edgeres.calibration import matching

    if not job.reference_activations:
        return None
    path, t0, said = Path(job.reference_activations), time.monotonic(), False
    while not path.exists():
        if not said and time.monotonic() - t0 > WAIT_NOTE_S:
            print("waiting for the shared ranges of the int8 stage…", file=sys.stderr, flush=True)
            said = True
        time.sleep(0.2)
    try:
        return matching.load(path)
    except (OSError, ValueError, KeyError) as e:
        return f"{path.name} is unreadable: {e}"


def x86_u8s8_recipe(cpu) -> tuple[str, bool, str]:
    """The int8 recipe of CPU runtimes whose x86 kernels multiply uint8 activations by int8 weights
    (onnxruntime's MLAS, OpenVINO's CPU plugin): without VNNI those kernels multiply-add pairs into
    int16 (vpmaddubsw), which saturates with full-range per-channel weights, so weights get 7 bits
    (``reduce_range``; NNCF's "overflow fix" is the same remedy); with VNNI (vpdpbusd accumulates into
    int32) full 8-bit weights are safe. ARM kernels prefer S8S8."""
    if cpu.arch == "arm":
        return "int8", False, "ARM: S8S8 kernels"
    if cpu.vnni:
        return "uint8", False, "x86 with VNNI: U8S8 accumulates in int32"
    return "uint8", True, "x86 without VNNI: U8S8 saturates int16, 7-bit weights"


def app_metadata(labels: list[str], preprocess: dict | None, *, layout: str, dtype: str, version: str | None,
                 source_sha256: str | None) -> dict[str, str]:
    """What an app needs to use an artifact, as text key → value, for the runtime's own metadata (ONNX
    ``metadata_props``, OpenVINO ``rt_info``): labels, preprocessing for its input (``layout``, ``dtype``),
    the producer's version and the source model's sha256."""
    preprocess = dict(preprocess or {})
    if preprocess:
        preprocess["layout"] = layout
    values = {"labels": json.dumps([str(v) for v in labels]), "preprocess": json.dumps(preprocess or None),
              "input": json.dumps({"layout": layout, "dtype": dtype}),
              "version": version or "", "source_sha256": source_sha256 or ""}
    return {f"{METADATA_PREFIX}{k}": v for k, v in values.items()}


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
    # the artifact itself takes pixel values 0..255 (its normalisation inside); __call__ still takes NCHW float32
    takes_pixels = False

    def io_names(self) -> tuple[str, str]:
        """The artifact's input and output tensor names (what an app binds to)."""
        return ("input", "output")

    def __call__(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError
