"""Shared fixtures: a tiny random ResNet, tiny image sets, the real CIFAR data (realdata) and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

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
def tiny_checkpoint(tmp_path_factory, tiny_model):
    """An edgeres checkpoint (spec + weights) of the tiny model."""
    from edgeres.sources.loading import save_checkpoint

    spec, model = tiny_model
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, spec, model.state_dict())
    return path


def make_images(n: int, size: int, seed: int = 0, classes: int = 10):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), rng.integers(0, classes, n).astype(np.int64)


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory):
    x, y = make_images(64, 16)
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, x=x, y=y)
    return path


@pytest.fixture(scope="session")
def cifar():
    """The real CIFAR-10 data and checkpoints in ../shared (tests using it are marked realdata)."""
    if not (SHARED_CIFAR / "cifar10_dev.npz").exists():
        pytest.skip(f"real CIFAR-10 data not found at {SHARED_CIFAR} (needs ../shared beside the repo)")
    return SHARED_CIFAR


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 900):
    """Run ``edgeres ARGS`` in a fresh interpreter; returns the CompletedProcess (text)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "edgeres.cli", *map(str, args)], cwd=cwd or ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session")
def app_bundle(tmp_path_factory, tiny_checkpoint, tiny_npz):
    """A bundle of the tiny model for every target in fp32 and int8 (what predict and export-app read)."""
    out = tmp_path_factory.mktemp("app") / "bundle"
    r = run_cli("convert", tiny_checkpoint, "--calib", tiny_npz, "--targets", "onnx,openvino,tflite",
                "--precision", "fp32,int8", "--out", out, "--no-bench")
    assert r.returncode == 0, r.stderr
    return out
