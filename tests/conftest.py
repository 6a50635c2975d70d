"""Shared fixtures: a tiny random ResNet, tiny image sets, the real CIFAR data (realdata) and a CLI runner.

How to keep a test fast (issue 37):

- ``run_cli(*args)`` / the ``cli`` fixture run ``edgeres ARGS`` in this process (typer's CliRunner; the same as
  ``run_cli_here``) and return a CompletedProcess; a ``convert`` without ``--jobs`` then gets ``--jobs 0``.
  ``run_cli_process`` starts a fresh interpreter (~4 s of imports): for tests where the process itself is under
  test (signals, kill, worker death, the console script, a runtime's fd-level log output) and for conversions of
  ImageNet-size models, whose heap (gigabytes, kept by TensorFlow/Keras) must not stay in the test worker.
  ``tests/fresh_process.call_in_fresh_process(func, ...)`` runs a test module's function in a fresh interpreter
  for the same reason (e.g. Keras' own predictions of an ImageNet-size model).
- Bundles: never convert what a session bundle already holds. ``app_bundle`` is the tiny model for
  onnx,openvino,tflite × fp32,int8 (``--calib tiny_npz``); ``onnx_bundle`` is ONNX fp32 only;
  ``golden_bundle(targets, precisions, quant="fast")`` (a session fixture returning a function) builds any other
  combination of the tiny checkpoint once per session, shared by pytest-xdist workers under a file lock. All are
  READ-ONLY: a test that writes into a bundle copies it first, ``copy_bundle(src, tmp_path / "b")``.
- A module's own CliRunner helper passes its argv through ``in_process_argv`` (the same ``--jobs 0``);
  ``tests/forked_cli.run_forked`` runs the CLI in a process of its own under a memory limit or timeout, forked from
  a warm helper (no fresh interpreter's imports).
- ``make test`` runs pytest-xdist (``-n logical --maxprocesses 4 --dist loadscope --no-loadscope-reorder``): a
  module's tests (and module fixtures) stay on one worker, ``SLOW_FIRST`` below sends the slowest modules out
  first, and each worker runs on its own share of the cores (``_cores_of_this_worker``) and freezes the runtimes'
  objects out of the garbage collector's way (``pytest_sessionstart``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path


def _cores_of_this_worker() -> None:
    """Under pytest-xdist, each worker (and every process it starts) runs on its own share of the cores.

    Runtimes size their thread pools by the cores a process may use (``targets.base.cpu_threads``, torch, OpenMP);
    two workers each running two threads on two cores slowed torch 4.7x (ResNet-32, 100 images: 1.50 s with two
    threads beside another worker, 0.32 s with one). Done before numpy (OpenBLAS) and any runtime is imported."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or count < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    i = int(worker[2:]) % count
    share = [c for j, c in enumerate(cores) if j % count == i]
    if share and len(share) < len(cores):
        os.sched_setaffinity(0, share)


_cores_of_this_worker()

import numpy as np  # noqa: E402 - after the cores are chosen
import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR = ROOT.parent / "shared" / "data" / "cifar10"
sys.path.insert(0, str(ROOT))
# edgeres' own stages: what a runtime's module (edgeres.targets.*) must run without; it may import edgeres'
# light face (edgeres, edgeres.errors), edgeres.targets and edgeres.calibration only
EDGERES_STAGES = tuple(sorted(
    f"edgeres.{p.stem}" for p in (ROOT / "edgeres").iterdir()
    if not p.is_symlink() and p.name != "__pycache__" and (p.is_dir() or (p.suffix == ".py" and p.stem not in ("__init__", "errors")))))


def tiny_spec():
    """A 3-stage CIFAR-style ResNet-8 at 16×16 input: builds and runs in milliseconds."""
    from edgeres.calibration import Preprocess
    from edgeres.model.zoo import get_spec

    spec = get_spec("resnet20")
    return replace(spec, name="resnet8-tiny", layers=(1, 1, 1), stem_width=8, stage_widths=(8, 16, 32),
                   inner_widths=(((8,),), ((16,),), ((32,),)), preprocess=Preprocess(size=16))


@pytest.fixture(scope="session")
def tiny_model():
    import torch

    from edgeres.model.torch_model import build_torch, randomize_bn

    torch.manual_seed(0)
    spec = tiny_spec()
    return spec, randomize_bn(build_torch(spec))


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory):
    """A folder every xdist worker of this run sees (the base temp itself without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def build_once(shared: Path, name: str, build) -> Path:
    """``shared/name``, made by ``build(path)`` by whichever worker gets there first (under a file lock);
    the others wait and reuse it. ``build`` writes exactly ``path`` (a file or a folder)."""
    from filelock import FileLock

    path = shared / "golden" / name
    done = path.with_name(path.name + ".done")
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not done.exists():
            if path.is_dir():  # a build that failed half-way in an earlier worker
                shutil.rmtree(path)
            build(path)
            done.touch()
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(shared_dir, tiny_model):
    """An edgeres checkpoint (spec + weights) of the tiny model (one file for every worker: bundles record it)."""
    from edgeres.sources.loading import save_checkpoint

    spec, model = tiny_model
    return build_once(shared_dir, "tiny.pt", lambda path: save_checkpoint(path, spec, model.state_dict()))


def make_images(n: int, size: int, seed: int = 0, classes: int = 10):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), rng.integers(0, classes, n).astype(np.int64)


@pytest.fixture(scope="session")
def tiny_npz(shared_dir):
    def build(path):
        x, y = make_images(64, 16)
        np.savez(path, x=x, y=y)

    return build_once(shared_dir, "tiny.npz", build)


@pytest.fixture(scope="session")
def cifar():
    """The real CIFAR-10 data and checkpoints in ../shared (tests using it are marked realdata)."""
    if not (SHARED_CIFAR / "cifar10_dev.npz").exists():
        pytest.skip(f"real CIFAR-10 data not found at {SHARED_CIFAR} (needs ../shared beside the repo)")
    return SHARED_CIFAR


def run_cli_process(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 900):
    """Run ``edgeres ARGS`` in a fresh interpreter (the process under test, or an ImageNet-size conversion whose
    heap must not stay in the test worker); returns the CompletedProcess (text)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "edgeres.cli", *map(str, args)], cwd=cwd or ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def sigint_at_default() -> None:
    """``preexec_fn`` for a child that a test interrupts with SIGINT: a shell that starts pytest in the
    background (``make test &``, a CI script's job) ignores SIGINT for it, every child inherits the ignore
    and Python then never raises KeyboardInterrupt; a terminal's foreground job, where Ctrl-C comes from,
    has SIGINT at its default."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def in_process_argv(args) -> list[str]:
    """``edgeres ARGS`` as strings, with ``--jobs 0`` added to a ``convert`` that does not choose: compiled in this
    process, not in worker processes that each import their runtime anew (~4 s each; tests/test_convert_workers.py
    is where the workers are under test)."""
    argv = [str(a) for a in args]
    if "convert" in argv[:2] and "--jobs" not in argv:
        argv += ["--jobs", "0"]
    return argv


def run_cli_here(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int | None = None):
    """Run ``edgeres ARGS`` in this process (CliRunner); returns a CompletedProcess (text) like ``run_cli``.

    ``convert`` without ``--jobs`` compiles in this process (``--jobs 0``). ``timeout`` is accepted for the
    signature's sake and not enforced in process (pytest's own limits apply)."""
    from typer.testing import CliRunner

    from edgeres import cli as edgeres_cli

    argv = in_process_argv(args)
    before = Path.cwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        r = CliRunner().invoke(edgeres_cli.app, argv, env=env, prog_name="edgeres")
    finally:
        os.chdir(before)
    stderr = r.stderr
    if r.exception is not None and not isinstance(r.exception, SystemExit):  # a bug escaped the CLI's handler
        import traceback

        stderr += "".join(traceback.format_exception(r.exception))
    return subprocess.CompletedProcess(["edgeres", *argv], r.exit_code, r.stdout, stderr)


run_cli = run_cli_here  # the default: in this process


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session")
def golden_bundle(shared_dir, tiny_checkpoint, tiny_npz):
    """``golden_bundle(targets, precisions, quant="fast")``: the tiny checkpoint converted (``--calib tiny_npz``
    when int8 is asked for, ``--no-bench``), once per session for every worker. Read-only: copy before writing."""
    def get(targets: str, precisions: str, quant: str = "fast") -> Path:
        def build(out):
            calib = ["--calib", tiny_npz] if "int8" in precisions.split(",") else []
            preset = [] if quant == "fast" else ["--quant", quant]  # the default stays unsaid, as a user runs it
            r = run_cli("convert", tiny_checkpoint, *calib, "--targets", targets, "--precision", precisions, *preset,
                        "--out", out, "--no-bench")
            assert r.returncode == 0, r.stderr

        return build_once(shared_dir, f"bundle-{targets}-{precisions}-{quant}".replace(",", "+"), build)

    return get


@pytest.fixture(scope="session")
def app_bundle(golden_bundle):
    """A bundle of the tiny model for every target in fp32 and int8 (what predict and export-app read)."""
    return golden_bundle("onnx,openvino,tflite", "fp32,int8")


@pytest.fixture(scope="session")
def onnx_bundle(golden_bundle):
    """The tiny model as ONNX fp32 only (no calibration): what the safety tests tamper with (on a copy)."""
    return golden_bundle("onnx", "fp32")


# Modules whose tests take longest (benchmarks/results/test_durations_*.txt), sent to the xdist workers first
# so that none of them is left as the tail; the rest keep their file order.
SLOW_FIRST = (
    "test_imagenet_realdata.py", "test_sweep.py", "test_prune.py", "test_source_formats.py", "test_cli_foundation.py",
    "test_arm64.py", "test_preprocess.py", "test_executorch.py", "test_convert_workers.py", "test_safety_models.py",
    "test_tflite.py", "test_results.py", "test_quant_finetune.py", "test_keras_import.py", "test_safety_bundles.py",
    "test_grow.py", "test_onnx_import.py", "test_openvino_target.py", "test_app_mediapipe.py", "test_budget.py",
    "test_export_app.py",
)


# Imported by every worker before its first test, then frozen (below). Most tests reach several of them.
RUNTIMES = ("torch", "onnx", "onnxruntime", "openvino", "tensorflow", "tf_keras", "keras")


def _freezing(config) -> bool:
    controller = config.getoption("dist", "no") != "no" and not os.environ.get("PYTEST_XDIST_WORKER")
    return not controller and os.environ.get("EDGERES_TEST_FREEZE", "1") != "0"  # the xdist controller runs no test


def pytest_sessionstart(session):
    """Import the runtimes (in a pytest-xdist worker), then move every object alive now (their modules, classes
    and functions: 0.56 M) into the collector's permanent generation. A full collection in a process holding
    TensorFlow and torch scanned them all each time: 0.4-0.9 s per collection, and edgeres collects after each big
    step (converting a tiny model to TFLite triggered 12); test_tflite, test_openvino_target and test_safety_models
    took 128 s of CPU before, 111 s frozen. Objects created by tests are collected as before, by edgeres' own
    collections after each big step and by the automatic ones, made rarer (``targets.base.GC_THRESHOLDS``: 7466
    automatic collections took 6.6 s of 160 s in four converting modules, 216 took 2.9 s). This is edgeres' own
    ``settle_heap``, which a sweep's Ray workers run before each step. ``EDGERES_TEST_FREEZE=0`` leaves the
    collector alone."""
    import importlib

    from edgeres.targets.base import settle_heap

    if not _freezing(session.config):
        return
    if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test`: every worker reaches them (`pytest FILE`: as needed)
        from edgeres.targets.tflite import native_stderr_quiet

        with native_stderr_quiet():  # TensorFlow's start-up lines, as edgeres holds them back
            for name in RUNTIMES:
                try:
                    importlib.import_module(name)
                except ImportError:  # a runtime that is not installed: its tests skip with their reason
                    pass
    settle_heap()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """After a module's last test (its module fixtures gone): collect, then freeze what is still alive, so the
    modules it imported on the way (TensorFlow's converter, torch.export, ...) are not scanned again by every
    later collection either."""
    yield
    if nextitem is not None and nextitem.module is not item.module and _freezing(item.config):
        from edgeres.targets.base import settle_heap

        settle_heap()


def pytest_collection_modifyitems(config, items):
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # a plain run keeps the file order
        return
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order within each rank
