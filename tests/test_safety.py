"""Bad input and faults, table-driven: every case exits 2 or 3 with ONE line naming the cause, runs
nothing it was handed, and leaves no partial artifact behind."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from edgeres import cli
from tests.conftest import make_images

runner = CliRunner()


@dataclass(frozen=True)
class Case:
    """One bad input: ``make(tmp, env)`` builds files and returns the CLI args; ``expect`` is in the line."""

    id: str
    make: Callable[[Path, dict], list]
    expect: str
    code: int = 2


# -- builders for bad files -------------------------------------------------------------------

def _ckpt(env):
    return str(env["checkpoint"])


def _npz(env):
    return str(env["npz"])


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _npz_file(path: Path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


def _torch_save(path: Path, obj) -> str:
    import torch

    torch.save(obj, path)
    return str(path)


class _RunsCode:
    """A pickle payload that would create a marker file if it were ever executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle_with_code(tmp: Path, env) -> str:
    with open(tmp / "evil.pt", "wb") as f:
        pickle.dump({"state_dict": {"conv1.weight": _RunsCode(env["marker"])}}, f, protocol=2)
    return str(tmp / "evil.pt")


def _bad_state_dict(tmp, mutate) -> str:
    import torch

    from edgeres.sources.loading import load_model

    sd = {k: v.clone() for k, v in load_model(ENV["checkpoint"]).state_dict.items()}
    mutate(sd, torch)
    return _torch_save(tmp / "bad_weights.pt", sd)


def _plain_resnet20(tmp: Path) -> str:
    from edgeres.model.torch_model import build_torch
    from edgeres.model.zoo import ZOO

    return _torch_save(tmp / "r20.pt", build_torch(ZOO["resnet20"]).state_dict())


def _truncated(src: Path, dst: Path) -> str:
    data = src.read_bytes()
    return _write(dst, data[: len(data) // 2])


def _folder(tmp: Path, images: dict[str, bytes | np.ndarray]) -> str:
    root = tmp / "folder"
    for name, content in images.items():
        (root / "cls").mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            (root / "cls" / name).write_bytes(content)
        else:
            Image.fromarray(content).save(root / "cls" / name)
    root.mkdir(exist_ok=True)
    return str(root)


ENV: dict = {}
CONVERT = ["convert", "--targets", "onnx", "--precision", "int8"]

MODEL_CASES = [
    Case("model-missing", lambda t, e: [str(t / "nothing.pt")], "no such file"),
    Case("model-is-folder", lambda t, e: [str(t)], "is a folder|no manifest.json"),
    Case("model-empty", lambda t, e: [_write(t / "empty.pt", b"")], "file is empty"),
    Case("model-truncated", lambda t, e: [_truncated(e["checkpoint"], t / "cut.pt")], "corrupt or truncated"),
    Case("model-garbage", lambda t, e: [_write(t / "junk.pt", os.urandom(4096))], "bad"),
    Case("model-text", lambda t, e: [_write(t / "notes.pth", b"just some text\n" * 40)], "notes.pth"),
    Case("model-pickle-code", lambda t, e: [_pickle_with_code(t, e)], "refused"),
    Case("model-nan", lambda t, e: [_bad_state_dict(t, lambda sd, torch: sd["conv1.weight"].view(-1).__setitem__(0, float("nan")))], "NaN or Inf"),
    Case("model-inf", lambda t, e: [_bad_state_dict(t, lambda sd, torch: sd["linear.weight"].view(-1).__setitem__(3, float("inf")))], "NaN or Inf"),
    Case("model-negative-bn-variance", lambda t, e: [_bad_state_dict(t, lambda sd, torch: sd["bn1.running_var"].view(-1).__setitem__(0, -1.0))], "running variance below zero"),
    Case("model-misshaped", lambda t, e: [_bad_state_dict(t, lambda sd, torch: sd.__setitem__("linear.bias", torch.zeros(7)))], "mis-shaped"),
    Case("model-missing-key", lambda t, e: [_bad_state_dict(t, lambda sd, torch: sd.pop("layer2.0.bn1.running_var"))], "missing"),
    Case("model-not-resnet", lambda t, e: [_torch_save(t / "mlp.pt", {"fc1.weight": __import__("torch").zeros(4, 4)})], "does not look like a ResNet"),
    Case("model-list", lambda t, e: [_torch_save(t / "list.pt", [1, 2, 3])], "not a state_dict"),
    Case("model-no-tensors", lambda t, e: [_torch_save(t / "meta.pt", {"epoch": 3})], "contains no tensors"),
    Case("model-unknown-suffix", lambda t, e: [_write(t / "model.bin2", b"x")], "unknown model format"),
    Case("model-wrong-arch", lambda t, e: [_plain_resnet20(t), "--arch", "resnet50"], "weights do not fit --arch resnet50"),
    Case("model-unknown-arch", lambda t, e: [_ckpt(e), "--arch", "resnet19"], "unknown architecture"),
]

DATA_CASES = [
    Case("data-missing", lambda t, e: [str(t / "none.npz")], "no such file"),
    Case("data-empty", lambda t, e: [_npz_file(t / "e.npz", x=np.zeros((0, 16, 16, 3), np.uint8), y=np.zeros(0, np.int64))], "no images"),
    Case("data-wrong-size", lambda t, e: [_npz_file(t / "s.npz", x=make_images(12, 20)[0], y=np.zeros(12, np.int64))], "20×20 but the model expects 16×16"),
    Case("data-gray", lambda t, e: [_npz_file(t / "g.npz", x=np.zeros((12, 16, 16, 1), np.uint8), y=np.zeros(12, np.int64))], "1 channel"),
    Case("data-rgba", lambda t, e: [_npz_file(t / "a.npz", x=np.zeros((12, 16, 16, 4), np.uint8), y=np.zeros(12, np.int64))], "4 channel"),
    Case("data-float", lambda t, e: [_npz_file(t / "f.npz", x=np.zeros((12, 16, 16, 3), np.float32), y=np.zeros(12, np.int64))], "uint8"),
    Case("data-nan", lambda t, e: [_npz_file(t / "n.npz", x=np.full((12, 16, 16, 3), np.nan, np.float32), y=np.zeros(12, np.int64))], "NaN or Inf"),
    Case("data-3d", lambda t, e: [_npz_file(t / "d3.npz", x=np.zeros((12, 16, 16), np.uint8), y=np.zeros(12, np.int64))], r"N×H×W×3"),
    Case("data-no-x", lambda t, e: [_npz_file(t / "nox.npz", images=make_images(4, 16)[0])], "no array 'x'"),
    Case("data-truncated", lambda t, e: [_truncated(e["npz"], t / "cut.npz")], "cannot be read"),
    Case("data-not-npz", lambda t, e: [_write(t / "data.csv", b"1,2,3\n")], "not an .npz"),
    Case("data-labels-short", lambda t, e: [_npz_file(t / "ls.npz", x=make_images(12, 16)[0], y=np.zeros(5, np.int64))], "one integer label per image"),
    Case("data-labels-float", lambda t, e: [_npz_file(t / "lf.npz", x=make_images(12, 16)[0], y=np.zeros(12, np.float32))], "labels must be integers"),
    Case("data-empty-folder", lambda t, e: [_folder(t, {})], "holds no images"),
    Case("data-corrupt-image", lambda t, e: [_folder(t, {f"{i}.png": b"\x89PNG broken" for i in range(12)})], "cannot be read as an image"),
    Case("data-folder-wrong-size", lambda t, e: [_folder(t, {f"{i}.png": np.zeros((9, 9, 3), np.uint8) for i in range(12)})], "9×9 but the model expects 16×16"),
]

# labels that name classes the model does not have: only meaningful where accuracy is computed
CALIB_ONLY_CASES = [
    Case("calib-one-image", lambda t, e: [_npz_file(t / "one.npz", x=make_images(1, 16)[0], y=np.zeros(1, np.int64))], "at least 10 are needed"),
    Case("calib-nine-images", lambda t, e: [_npz_file(t / "nine.npz", x=make_images(9, 16)[0])], "at least 10 are needed"),
]


@pytest.mark.parametrize("case", CALIB_ONLY_CASES, ids=lambda c: c.id)
def test_too_few_calibration_images(env, tmp_path, case):
    data = case.make(tmp_path, env)[0]
    out = tmp_path / "bundle"
    code, _, stderr = _invoke([*CONVERT, env["checkpoint"], "--calib", data, "--out", out])
    _assert_one_line(code, stderr, case, named=Path(data).name)
    assert not out.exists()


LABEL_CASES = [
    Case("labels-out-of-range", lambda t, e: [_npz_file(t / "lr.npz", x=make_images(12, 16)[0], y=np.full(12, 42, np.int64))], "classes"),
    Case("labels-negative", lambda t, e: [_npz_file(t / "ln.npz", x=make_images(12, 16)[0], y=np.full(12, -1, np.int64))], "classes"),
    Case("labels-absent", lambda t, e: [_npz_file(t / "nl.npz", x=make_images(12, 16)[0])], "has no labels"),
]

NAME_CASES = [
    Case("unknown-target", lambda t, e: ["--targets", "coreml"], "unknown target 'coreml'"),
    Case("unknown-precision", lambda t, e: ["--precision", "int4"], "'int4' is not made"),
    Case("unknown-device", lambda t, e: ["--device", "toaster"], "unknown profile 'toaster'"),
    Case("unknown-estimator", lambda t, e: ["--estimator", "vibes"], "unknown 'vibes'"),
    Case("bad-option", lambda t, e: ["--option", "onnx-reduce_range"], "TARGET.KEY=VALUE"),
    Case("bad-option-target", lambda t, e: ["--option", "coreml.x=1"], "TARGET.KEY=VALUE"),
    Case("zero-calib-images", lambda t, e: ["--calib-images", "0"], "at least 1"),
    Case("zero-threads", lambda t, e: ["--threads", "0"], "at least 1"),
    Case("int8-without-calib", lambda t, e: ["--no-calib"], "int8 needs calibration"),
]


def _readonly_dir(tmp: Path) -> str:
    """A read-only file system (root ignores permission bits, so chmod alone proves nothing)."""
    ro = tmp / "ro"
    ro.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], capture_output=True, text=True)
    if r.returncode != 0:
        if os.geteuid() == 0:
            pytest.skip(f"cannot mount a read-only tmpfs and root ignores chmod: {r.stderr.strip()}")
        ro.chmod(0o555)
    return str(ro / "bundle")


OUT_CASES = [
    Case("out-is-file", lambda t, e: [_write(t / "taken", b"x")], "is a file"),
    Case("out-foreign-dir", lambda t, e: [str(_foreign(t))], "not an edgeres bundle"),
    Case("out-missing-parent", lambda t, e: [str(t / "no" / "such" / "dir")], "does not exist"),
    Case("out-readonly-parent", lambda t, e: [_readonly_dir(t)], "permission denied|read-only"),
]


def _foreign(tmp: Path) -> Path:
    d = tmp / "photos"
    d.mkdir()
    (d / "holiday.jpg").write_bytes(b"precious")
    return d


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_checkpoint, tiny_npz):
    ENV.update(checkpoint=Path(tiny_checkpoint), npz=Path(tiny_npz))
    return ENV


def _invoke(args):
    result = runner.invoke(cli.app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def _assert_one_line(code, stderr, case: Case, named: str | None = None):
    lines = [line for line in stderr.strip().splitlines() if line.startswith("edgeres: error:")]
    assert code == case.code, stderr
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert re.search(case.expect, lines[0]), lines[0]
    if named:
        assert named in lines[0], lines[0]


def _no_partial(root: Path):
    leftovers = [p.name for p in root.rglob(".*partial*")] + [p.name for p in root.rglob("*.tmp*")]
    assert not leftovers, leftovers


@pytest.mark.parametrize("command", ["inspect", "eval", "convert"])
@pytest.mark.parametrize("case", MODEL_CASES, ids=lambda c: c.id)
def test_bad_model(env, tmp_path, case, command):
    env["marker"] = tmp_path / "payload-ran"
    model_args = case.make(tmp_path, env)
    out = tmp_path / "bundle"
    args = {"inspect": ["inspect", *model_args],
            "eval": ["eval", *model_args, "--data", env["npz"]],
            "convert": [*CONVERT, *model_args, "--calib", env["npz"], "--out", out]}[command]
    code, _, stderr = _invoke(args)
    _assert_one_line(code, stderr, case, named=Path(model_args[0]).name if "arch" not in case.id else None)
    assert not env["marker"].exists(), "the pickle payload ran"
    assert not out.exists()
    _no_partial(tmp_path)


@pytest.mark.parametrize("role", ["calib", "eval-data", "eval-bundle"])
@pytest.mark.parametrize("case", DATA_CASES, ids=lambda c: c.id)
def test_bad_data(env, tmp_path, case, role, onnx_bundle):
    data = case.make(tmp_path, env)[0]
    out = tmp_path / "bundle"
    args = {"calib": [*CONVERT, env["checkpoint"], "--calib", data, "--out", out],
            "eval-data": ["eval", env["checkpoint"], "--data", data],
            "eval-bundle": ["eval", onnx_bundle, "--data", data]}[role]
    code, _, stderr = _invoke(args)
    _assert_one_line(code, stderr, case, named=Path(data).name)
    assert not out.exists()
    _no_partial(tmp_path)


@pytest.mark.parametrize("role", ["convert-eval", "eval-model", "eval-bundle"])
@pytest.mark.parametrize("case", LABEL_CASES, ids=lambda c: c.id)
def test_labels_that_do_not_match_the_model(env, tmp_path, case, role, onnx_bundle):
    data = case.make(tmp_path, env)[0]
    out = tmp_path / "bundle"
    args = {"convert-eval": [*CONVERT, env["checkpoint"], "--calib", env["npz"], "--eval", data, "--out", out],
            "eval-model": ["eval", env["checkpoint"], "--data", data],
            "eval-bundle": ["eval", onnx_bundle, "--data", data]}[role]
    code, _, stderr = _invoke(args)
    _assert_one_line(code, stderr, case, named=Path(data).name)
    assert not out.exists()


@pytest.mark.parametrize("case", NAME_CASES, ids=lambda c: c.id)
def test_bad_names_and_flags(env, tmp_path, case):
    extra = case.make(tmp_path, env)
    calib = [] if extra == ["--no-calib"] else ["--calib", env["npz"]]
    extra = [] if extra == ["--no-calib"] else extra
    out = tmp_path / "bundle"
    args = ["convert", env["checkpoint"], *calib, "--out", out, *(["--targets", "onnx"] if "--targets" not in extra else []),
            *extra]
    code, _, stderr = _invoke(args)
    _assert_one_line(code, stderr, case)
    assert not out.exists()
    _no_partial(tmp_path)


@pytest.mark.parametrize("case", OUT_CASES, ids=lambda c: c.id)
def test_bad_output_dir(env, tmp_path, case):
    out = case.make(tmp_path, env)[0]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, _, stderr = _invoke(["convert", env["checkpoint"], "--targets", "onnx", "--precision", "fp32", "--out", out])
    try:
        _assert_one_line(code, stderr, case, named=Path(out).name)
        assert sorted(p.name for p in tmp_path.rglob("*")) == before
    finally:
        ro = tmp_path / "ro"
        if ro.exists():
            subprocess.run(["umount", str(ro)], capture_output=True)
            ro.chmod(0o755)


def test_existing_bundle_is_kept_without_force(env, tmp_path, onnx_bundle):
    out = tmp_path / "b"
    shutil.copytree(onnx_bundle, out)
    manifest = (out / "manifest.json").read_text()
    # other settings than the bundle's (more precisions alone would grow it: tests/test_grow.py)
    code, _, stderr = _invoke(["convert", env["checkpoint"], "--targets", "onnx", "--precision", "fp16,fp32",
                               "--estimator", "minmax", "--out", out])
    _assert_one_line(code, stderr, Case("exists", None, "already holds a bundle made with another --estimator"))
    assert (out / "manifest.json").read_text() == manifest


# -- damaged bundles: eval / inspect / bench / report refuse them ------------------------------

def _tamper(bundle: Path, how: str) -> str:
    manifest = json.loads((bundle / "manifest.json").read_text())
    artifact = bundle / manifest["artifacts"][0]["file"]
    if how == "no-manifest":
        (bundle / "manifest.json").unlink()
        return "no manifest.json"
    if how == "manifest-garbage":
        (bundle / "manifest.json").write_text("{not json")
        return "cannot be parsed"
    if how == "manifest-foreign":
        (bundle / "manifest.json").write_text(json.dumps({"format": "other"}))
        return "not an edgeres manifest"
    if how == "manifest-future":
        manifest["format_version"] = 99
        (bundle / "manifest.json").write_text(json.dumps(manifest))
        return "newer than this edgeres"
    if how == "artifact-deleted":
        artifact.unlink()
        return "missing"
    if how == "artifact-truncated":
        artifact.write_bytes(artifact.read_bytes()[:100])
        return "size or sha256 differs"
    if how == "artifact-flipped-byte":
        data = bytearray(artifact.read_bytes())
        data[len(data) // 2] ^= 0xFF
        artifact.write_bytes(bytes(data))
        return "size or sha256 differs"
    if how == "reference-deleted":
        (bundle / "model.fp32.onnx").unlink()
        return "missing"
    raise AssertionError(how)


BUNDLE_FAULTS = ["no-manifest", "manifest-garbage", "manifest-foreign", "manifest-future", "artifact-deleted",
                 "artifact-truncated", "artifact-flipped-byte", "reference-deleted"]


@pytest.mark.parametrize("command", ["eval", "inspect"])
@pytest.mark.parametrize("fault", BUNDLE_FAULTS)
def test_damaged_bundle_is_refused(env, tmp_path, onnx_bundle, fault, command):
    bundle = tmp_path / "b"
    shutil.copytree(onnx_bundle, bundle)
    expect = _tamper(bundle, fault)
    args = {"eval": ["eval", bundle, "--data", env["npz"]], "inspect": ["inspect", bundle]}[command]
    code, _, stderr = _invoke(args)
    _assert_one_line(code, stderr, Case(fault, None, expect))


# -- disk full and kill -9 ---------------------------------------------------------------------

@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill up (needs root/CAP_SYS_ADMIN): {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_disk_full_gives_one_line_and_no_partial_bundle(tmp_path, small_fs):
    import torch

    from edgeres.model.torch_model import build_torch
    from edgeres.model.zoo import ZOO

    model = tmp_path / "r20.pt"  # 1.1 MB of fp32 ONNX does not fit in 600 kB
    torch.save(build_torch(ZOO["resnet20"]).state_dict(), model)
    out = small_fs / "bundle"
    code, _, stderr = _invoke(["convert", model, "--targets", "onnx", "--precision", "fp32", "--out", out])
    assert code in (2, 3), stderr
    lines = [line for line in stderr.splitlines() if line.startswith("edgeres: error:")]
    assert len(lines) == 1 and "No space left on device" in lines[0] and str(out) in lines[0], stderr
    assert list(small_fs.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_9_during_convert_never_leaves_an_acceptable_partial_bundle(env, tmp_path, seed):
    import random
    import sys
    import time

    from edgeres.bundle import read_manifest
    from edgeres.errors import InputError
    from tests.conftest import ROOT

    out = tmp_path / "bundle"
    args = [sys.executable, "-m", "edgeres.cli", "convert", str(env["checkpoint"]), "--targets", "onnx",
            "--precision", "fp32", "--out", str(out), "--no-bench"]
    proc = subprocess.Popen(args, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(random.Random(seed).uniform(0.5, 6.0))
    proc.kill()
    proc.wait()
    if out.exists():  # the rename is the last step: if it happened the bundle is complete
        read_manifest(out)
    else:
        with pytest.raises(InputError):
            read_manifest(out)
    leftovers = list(tmp_path.glob(".bundle.partial-*"))
    assert all(not (p / "manifest.json").exists() or p == out for p in leftovers)
    # the same command finishes the job (resuming finished steps) and gives a valid bundle
    code, _, stderr = _invoke(["convert", env["checkpoint"], "--targets", "onnx", "--precision", "fp32", "--out", out,
                               "--no-bench"])
    assert code == 0, stderr
    read_manifest(out)
    assert not list(tmp_path.glob(".bundle.partial-*"))
