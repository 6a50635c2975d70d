"""Data that exhausted memory or gave silently wrong results, float flags that were NaN, and `prune`
replacing its own input — table-driven like tests/test_safety.py, every payload generated here."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import struct
import zipfile
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import make_images
from tests.test_safety import CONVERT, Case, _assert_one_line, _invoke, _no_partial, _RunsCode, env  # noqa: F401

# -- builders: npz payloads -------------------------------------------------------------------------

def _npy_header(shape: tuple, descr: str = "|u1") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _zip_one_member(path: Path, name: str, compressed: bytes, size: int, crc: int) -> None:
    """A zip with one deflated member written by hand, so its data can be any deflate stream."""
    raw = name.encode()
    local = struct.pack("<4sHHHHHLLLHH", b"PK\x03\x04", 20, 0, zipfile.ZIP_DEFLATED, 0, 0x21, crc,
                        len(compressed), size, len(raw), 0) + raw
    central = struct.pack("<4sHHHHHHLLLHHHHHLL", b"PK\x01\x02", 20, 20, 0, zipfile.ZIP_DEFLATED, 0, 0x21, crc,
                          len(compressed), size, len(raw), 0, 0, 0, 0, 0, 0) + raw
    end = struct.pack("<4sHHHHLLH", b"PK\x05\x06", 0, 0, 1, 1, len(central), len(local) + len(compressed), 0)
    path.write_bytes(local + compressed + central + end)


def _deflate_bomb(tmp: Path, images: int = 4_166_656) -> str:
    """An honest npz: x is `images`×16×16×3 zeros (3.2 GB), deflated into ~3 MB.

    After a full flush deflate starts afresh, so one compressed block of zeros can be repeated."""
    header = _npy_header((images, 16, 16, 3))
    chunk = bytes(768 * 1024)  # 1024 images
    assert images % 1024 == 0
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = co.compress(header) + co.flush(zlib.Z_FULL_FLUSH)
    block = co.compress(chunk) + co.flush(zlib.Z_FULL_FLUSH)
    crc = zlib.crc32(header)
    for _ in range(images // 1024):
        crc = zlib.crc32(chunk, crc)
    compressed = head + block * (images // 1024) + co.flush()
    path = tmp / "bomb.npz"
    _zip_one_member(path, "x.npy", compressed, len(header) + images * 768, crc)
    return str(path)


def _lying_npz(tmp: Path) -> str:
    """An uncompressed x whose header declares 10⁹ images but holds 64 bytes."""
    path = tmp / "lies.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x.npy", _npy_header((10**9, 16, 16, 3)) + bytes(64))
        zf.writestr("y.npy", _npy_header((10**9,), "<i8") + bytes(64))
    return str(path)


def _object_npz(tmp: Path, env) -> str:
    """x is an object array holding a pickle payload that would create the marker if unpickled."""
    x = np.empty(12, dtype=object)
    x[0] = _RunsCode(env["marker"])
    path = tmp / "objects.npz"
    np.savez(path, x=x, y=np.zeros(12, np.int64))
    return str(path)


def _npz(tmp: Path, name: str, **arrays) -> str:
    np.savez(tmp / name, **arrays)
    return str(tmp / name)


# -- builders: image folders ------------------------------------------------------------------------

def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that declares width×height RGB but holds one row: Pillow reads the size from IHDR alone."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">L", len(data)) + kind + data + struct.pack(">L", zlib.crc32(kind + data))

    ihdr = struct.pack(">LLBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(1 + 3 * width)))
                     + chunk(b"IEND", b""))


def _image_folder(tmp: Path, classes: dict[str, list[np.ndarray]], name: str = "folder") -> str:
    root = tmp / name
    for cls, images in classes.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            Image.fromarray(img).save(root / cls / f"{i}.png")
    return str(root)


def _huge_png_folder(tmp: Path, width: int, height: int) -> str:
    (tmp / "folder" / "cat").mkdir(parents=True)
    _png_header_only(tmp / "folder" / "cat" / "0.png", width, height)
    for i in range(1, 12):
        Image.fromarray(make_images(1, 16, seed=i)[0][0]).save(tmp / "folder" / "cat" / f"{i}.png")
    return str(tmp / "folder")


def _folder_with(tmp: Path, make_first) -> str:
    """A class folder whose 0.png is made by ``make_first(path)`` beside 11 good images."""
    (tmp / "folder" / "cat").mkdir(parents=True)
    make_first(tmp / "folder" / "cat" / "0.png")
    for i in range(1, 12):
        Image.fromarray(make_images(1, 16, seed=i)[0][0]).save(tmp / "folder" / "cat" / f"{i}.png")
    return str(tmp / "folder")


def _eps_content(path: Path) -> None:
    path.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n%%EOF\n")


def _images(n: int, size: int = 16, seed: int = 0) -> list[np.ndarray]:
    return list(make_images(n, size, seed)[0])


# -- bad data: each refused with one line naming the file, before anything is allocated or written ---

DATA_CASES = [
    Case("npz-deflate-bomb", lambda t, e: [_deflate_bomb(t)], r"declares 4166656×16×16×3 uint8 \(3\.0 GiB\).*memory"),
    Case("npz-header-lies", lambda t, e: [_lying_npz(t)], "declares 1000000000×16×16×3 uint8.*corrupt or truncated"),
    Case("npz-object-array", lambda t, e: [_object_npz(t, e)], "object arrays are refused.*pickle.*np.savez"),
    Case("npz-channels-first", lambda t, e: [_npz(t, "nchw.npz", x=np.zeros((12, 3, 16, 16), np.uint8), y=np.zeros(12, np.int64))],
         r"channels-first.*np\.transpose\(x, \(0, 2, 3, 1\)\)"),
    Case("png-decompression-bomb", lambda t, e: [_huge_png_folder(t, 20000, 20000)], "0.png: image is too large.*megapixels"),
    Case("png-over-the-pixel-cap", lambda t, e: [_huge_png_folder(t, 10000, 10000)], "0.png: image is 10000×10000 pixels.*megapixels"),
    Case("png-one-pixel-high-89-megapixels", lambda t, e: [_huge_png_folder(t, 89_000_000, 1)],
         "0.png: image is 89000000×1 pixels; a side above 65535 pixels is refused"),
    Case("png-strip-60-to-1", lambda t, e: [_huge_png_folder(t, 60_000, 1_000)],
         "0.png: image is 60000×1000 pixels, its longer side more than 50 times its shorter"),
    Case("fifo-named-png", lambda t, e: [_folder_with(t, os.mkfifo)], r"0.png: is a FIFO \(named pipe\), not an image file"),
    Case("eps-named-png", lambda t, e: [_folder_with(t, _eps_content)],
         "0.png: cannot be read as an image: its content is not JPEG, PNG, BMP, WebP, TIFF or GIF"),
    Case("folder-wrong-size-names-a-real-fix", lambda t, e: [_image_folder(t, {"cat": _images(12, 9)})],
         r"9×9 but the model expects 16×16.*give 16×16 images"),
]


@pytest.mark.parametrize("role", ["calib", "eval-data", "eval-bundle"])
@pytest.mark.parametrize("case", DATA_CASES, ids=lambda c: c.id)
def test_bad_data_is_refused_before_it_is_decoded(env, tmp_path, case, role, onnx_bundle):
    env["marker"] = tmp_path / "payload-ran"
    data = case.make(tmp_path, env)[0]
    out = tmp_path / "bundle"
    args = {"calib": [*CONVERT, env["checkpoint"], "--calib", data, "--out", out],
            "eval-data": ["eval", env["checkpoint"], "--data", data],
            "eval-bundle": ["eval", onnx_bundle, "--data", data]}[role]
    with _fails_instead_of_hanging(120):  # a FIFO blocked the reader in open() forever
        code, _, stderr = _invoke(args)
    _assert_one_line(code, stderr, case, named=Path(data).name)
    assert not env["marker"].exists(), "the pickle payload ran"
    assert not out.exists()
    _no_partial(tmp_path)


@contextlib.contextmanager
def _fails_instead_of_hanging(seconds: int):
    """A blocking system call (opening a FIFO) ends in TimeoutError after ``seconds``, not never."""
    def hung(*_):
        raise TimeoutError(f"still waiting after {seconds} s")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_uncompressed_npz_is_memory_mapped_not_read(tmp_path):
    """np.savez output is read in place: a large uncompressed x costs no memory until batches are read."""
    from edgeres.calibration import open_dataset

    x, y = make_images(40, 16)
    ds = open_dataset(_npz(tmp_path, "d.npz", x=x, y=y))
    assert isinstance(ds._array, np.memmap)
    assert np.array_equal(ds.read(np.arange(40)), x) and type(ds.read(np.arange(2))) is np.ndarray


def test_16_bit_png_is_scaled_to_8_bits_not_clipped(tmp_path):
    values = np.array([[0, 0x00FF, 0x1234, 0x7FFF], [0x8000, 0xABCD, 0xFF00, 0xFFFF]], np.uint16)
    (tmp_path / "d" / "cat").mkdir(parents=True)
    Image.fromarray(values).save(tmp_path / "d" / "cat" / "deep.png")
    with Image.open(tmp_path / "d" / "cat" / "deep.png") as im:
        assert im.mode.startswith("I"), im.mode  # really a 16-bit greyscale PNG
    from edgeres.calibration import open_dataset

    rgb = open_dataset(tmp_path / "d").read(np.arange(1))[0]
    assert rgb.shape == (2, 4, 3) and rgb.dtype == np.uint8
    assert (rgb == (values >> 8).astype(np.uint8)[..., None]).all(), rgb[..., 0]


# -- class folders are matched to the model's labels by name ---------------------------------------

def _always_predicts(tmp: Path, env, class_index: int, *, labels: bool = True) -> str:
    """The tiny model with its classifier forced to one class (CIFAR-10 labels: 3 is "cat")."""
    import torch

    from edgeres.sources.loading import load_model, save_checkpoint

    loaded = load_model(env["checkpoint"])
    sd = {k: v.clone() for k, v in loaded.state_dict.items()}
    sd["linear.weight"].zero_()
    sd["linear.bias"].copy_(torch.nn.functional.one_hot(torch.tensor(class_index), sd["linear.bias"].numel()) * 100.0)
    spec = loaded.spec if labels else replace(loaded.spec, labels=None)
    path = tmp / f"always{class_index}{'' if labels else '-nolabels'}.pt"
    save_checkpoint(path, spec, sd)
    return str(path)


@pytest.fixture(scope="module")
def cat_model(env, tmp_path_factory):
    return _always_predicts(tmp_path_factory.mktemp("cat"), env, 3)


@pytest.fixture(scope="module")
def cat_bundle(cat_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("catbundle") / "b"
    code, _, stderr = _invoke(["convert", cat_model, "--targets", "onnx", "--precision", "fp32", "--out", out, "--no-bench"])
    assert code == 0, stderr
    return str(out)


FOLDER_TOP1 = [  # class folders → top-1 of a model that always says "cat" (class 3)
    ({"cat": 4}, 100.0),
    ({"CAT": 4}, 100.0),
    ({"3": 4}, 100.0),
    ({"cat": 4, "dog": 4}, 50.0),
    ({"airplane": 4, "cat": 4}, 50.0),
    ({"3": 2, "cat": 2, "truck": 4}, 50.0),
]


@pytest.mark.parametrize("where", ["eval-model", "eval-bundle"])
@pytest.mark.parametrize("folders,top1", FOLDER_TOP1, ids=lambda v: "+".join(v) if isinstance(v, dict) else str(v))
def test_class_folders_are_numbered_by_the_models_labels(tmp_path, cat_model, cat_bundle, folders, top1, where):
    data = _image_folder(tmp_path, {name: _images(n, seed=i) for i, (name, n) in enumerate(folders.items())})
    code, stdout, stderr = _invoke(["eval", cat_model if where == "eval-model" else cat_bundle, "--data", data, "--json"])
    assert code == 0, stderr
    result = json.loads(stdout)
    got = result["top1"] if where == "eval-model" else result["reference"]["top1"]
    assert got == top1
    if where == "eval-bundle":
        assert [a["top1"] for a in result["artifacts"]] == [top1]


def test_without_model_labels_numeric_folders_are_indices(env, tmp_path):
    model = _always_predicts(tmp_path, env, 3, labels=False)
    data = _image_folder(tmp_path, {"3": _images(4), "7": _images(4, seed=1)})
    code, stdout, stderr = _invoke(["eval", model, "--data", data, "--json"])
    assert code == 0, stderr
    assert json.loads(stdout)["top1"] == 50.0


def test_without_model_labels_named_folders_keep_sorted_order_and_say_so(env, tmp_path):
    model = _always_predicts(tmp_path, env, 1, labels=False)
    data = _image_folder(tmp_path, {"zebra": _images(4), "apple": _images(4, seed=1)})
    code, stdout, stderr = _invoke(["eval", model, "--data", data, "--json"])
    assert code == 0, stderr
    assert json.loads(stdout)["top1"] == 50.0  # apple=0, zebra=1
    said = " ".join(stderr.split())  # rich wraps log lines at the terminal width
    assert "sorted order (apple=0, zebra=1)" in said, stderr


UNKNOWN_FOLDER_CASES = [
    Case("folder-names-no-label", lambda t, e: [_image_folder(t, {"cat": _images(6), "kitten": _images(6, seed=1)})],
         r"kitten: class folder names none of the model's labels \(airplane, automobile, bird, cat, deer, dog"),
    Case("folder-index-out-of-range", lambda t, e: [_image_folder(t, {"3": _images(6), "12": _images(6, seed=1)})],
         r"12: class folder names none of the model's labels .*class index 0\.\.9"),
]


@pytest.mark.parametrize("role", ["eval-model", "eval-bundle", "convert-eval", "prune-eval"])
@pytest.mark.parametrize("case", UNKNOWN_FOLDER_CASES, ids=lambda c: c.id)
def test_a_class_folder_that_names_no_label_is_refused(env, tmp_path, case, role, onnx_bundle):
    data = case.make(tmp_path, env)[0]
    out = tmp_path / "bundle"
    pruned = tmp_path / "pruned.pt"
    args = {"eval-model": ["eval", env["checkpoint"], "--data", data],
            "eval-bundle": ["eval", onnx_bundle, "--data", data],
            "convert-eval": [*CONVERT, env["checkpoint"], "--calib", env["npz"], "--eval", data, "--out", out],
            "prune-eval": ["prune", env["checkpoint"], "--ratio", "0.3", "--eval", data, "--out", pruned]}[role]
    code, _, stderr = _invoke(args)
    _assert_one_line(code, stderr, case)
    assert not out.exists() and not pruned.exists()


# -- non-finite outputs are an error, never an accuracy ----------------------------------------------

def _negative_running_var(tmp: Path, env) -> str:
    """Finite weights whose activations overflow float32 (a negative BatchNorm variance, the other way to
    NaN, is refused at load: tests/test_safety.py)."""
    from edgeres.sources.loading import load_model, save_checkpoint

    loaded = load_model(env["checkpoint"])
    sd = {k: (v * 1e30 if k.endswith(".weight") and v.ndim == 4 else v) for k, v in loaded.state_dict.items()}
    save_checkpoint(tmp / "negvar.pt", loaded.spec, sd)
    return str(tmp / "negvar.pt")


def _negative_var_bundle(tmp: Path, env) -> str:
    out = tmp / "negvar-bundle"
    code, _, stderr = _invoke(["convert", _negative_running_var(tmp, env), "--targets", "onnx", "--precision", "fp32",
                               "--out", out, "--no-bench"])
    assert code == 0, stderr
    return str(out)


NAN_CASES = [
    Case("eval-model-negative-running-var", lambda t, e: [_negative_running_var(t, e)], "negvar.pt: gives NaN or Inf outputs"),
    Case("eval-bundle-negative-running-var", lambda t, e: [_negative_var_bundle(t, e)],
         "negvar-bundle/model.fp32.onnx: gives NaN or Inf outputs"),
]


@pytest.mark.parametrize("case", NAN_CASES, ids=lambda c: c.id)
def test_nan_logits_are_an_error_not_an_accuracy(env, tmp_path, case):
    model = case.make(tmp_path, env)[0]
    code, stdout, stderr = _invoke(["eval", model, "--data", env["npz"]])
    _assert_one_line(code, stderr, case)
    assert "top-1" not in stdout
    assert not (Path(model) / "eval.json").exists()


def test_an_artifact_with_nan_outputs_is_a_failed_row_and_no_bare_nan_is_stored(env, tmp_path, app_bundle, monkeypatch):
    import shutil

    import edgeres.targets.onnx
    from edgeres.bundle import REFERENCE_FILE

    bundle = tmp_path / "b"
    shutil.copytree(app_bundle, bundle)  # its ONNX int8 (its ONNX fp32 is the reference file: eval reuses that run)
    real = edgeres.targets.onnx.load_runner

    def nan_artifacts(path, threads=None):
        runner = real(path, threads)
        if Path(path).name == REFERENCE_FILE and Path(path).parent == bundle:
            return runner
        return lambda x: np.full((len(x), 10), np.nan, np.float32)

    monkeypatch.setattr(edgeres.targets.onnx, "load_runner", nan_artifacts)
    code, stdout, stderr = _invoke(["eval", bundle, "--data", env["npz"], "--json"])
    assert code == 0, stderr
    row = next(a for a in json.loads(stdout)["artifacts"] if (a["target"], a["precision"]) == ("onnx", "int8"))
    assert row["status"] == "failed" and "NaN or Inf outputs" in row["error"], row
    stored = (bundle / "eval.json").read_text()
    json.loads(stored, parse_constant=lambda c: pytest.fail(f"bare {c} in eval.json"))


# -- float flags must be finite; training that diverges writes nothing --------------------------------

def _prune_args(t: Path, e, *extra) -> list:
    return ["prune", e["checkpoint"], "--ratio", "0.3", "--finetune-data", e["npz"], "--out", t / "pruned.pt", *extra]


FLOAT_FLAG_CASES = [
    Case("accuracy-budget-nan", lambda t, e: [*CONVERT, e["checkpoint"], "--calib", e["npz"], "--eval", e["npz"],
                                              "--out", t / "bundle", "--accuracy-budget", "nan"], "--accuracy-budget.*finite"),
    Case("accuracy-budget-inf", lambda t, e: [*CONVERT, e["checkpoint"], "--calib", e["npz"], "--eval", e["npz"],
                                              "--out", t / "bundle", "--accuracy-budget", "inf"], "--accuracy-budget.*finite"),
    Case("prune-lr-nan", lambda t, e: _prune_args(t, e, "--epochs", "1", "--lr", "nan"), "--lr nan: must be a finite"),
    Case("prune-lr-inf", lambda t, e: _prune_args(t, e, "--epochs", "1", "--lr", "inf"), "--lr inf: must be a finite"),
    Case("prune-training-diverges", lambda t, e: _prune_args(t, e, "--epochs", "2", "--batch-size", "16", "--lr", "1e30"),
         r"fine-tuning diverged in epoch \d at --lr 1e\+30.*nothing was written"),
    Case("demo-train-seconds-nan", lambda t, e: ["demo", "--out", t / "demo", "--train-seconds", "nan"],
         "--train-seconds nan: must be a finite"),
]


@pytest.mark.parametrize("case", FLOAT_FLAG_CASES, ids=lambda c: c.id)
def test_non_finite_float_flags_and_diverged_training_write_nothing(env, tmp_path, case):
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, stderr = _invoke(case.make(tmp_path, env))
    _assert_one_line(code, stderr, case)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    _no_partial(tmp_path)


# -- prune never replaces its input, and replaces another file only with --force ---------------------

def _copy_of_input(t: Path, e) -> Path:
    src = t / "src.th"
    src.write_bytes(Path(e["checkpoint"]).read_bytes())
    return src


def _hard_link(t: Path, e) -> Path:
    os.link(_copy_of_input(t, e), t / "alias.pt")
    return t / "alias.pt"


def _symlink(t: Path, e) -> Path:
    (t / "link.pt").symlink_to(_copy_of_input(t, e))
    return t / "link.pt"


def _other_file(t: Path, e) -> Path:
    _copy_of_input(t, e)
    (t / "taken.pt").write_bytes(b"someone else's checkpoint")
    return t / "taken.pt"


PRUNE_OUT_CASES = [  # make(tmp, env) -> the --out path; the input is always tmp/src.th
    Case("out-is-the-input", lambda t, e: [_copy_of_input(t, e)], "is the input model"),
    Case("out-is-the-input-with-force", lambda t, e: [_copy_of_input(t, e), "--force"], "is the input model"),
    Case("out-is-the-input-spelled-differently", lambda t, e: [t / "." / ".." / t.name / _copy_of_input(t, e).name, "--force"],
         "is the input model"),
    Case("out-is-a-hard-link-to-the-input", lambda t, e: [_hard_link(t, e), "--force"], "is the input model"),
    Case("out-is-a-symlink-to-the-input", lambda t, e: [_symlink(t, e), "--force"], "is the input model"),
    Case("out-exists", lambda t, e: [_other_file(t, e)], "already exists.*--force"),
]


@pytest.mark.parametrize("case", PRUNE_OUT_CASES, ids=lambda c: c.id)
def test_prune_does_not_overwrite(env, tmp_path, case):
    out, *extra = case.make(tmp_path, env)
    files = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    code, _, stderr = _invoke(["prune", tmp_path / "src.th", "--ratio", "0.3", "--out", out, *extra])
    _assert_one_line(code, stderr, case, named=Path(out).name)
    assert {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == files
    _no_partial(tmp_path)


def test_prune_force_replaces_another_file(env, tmp_path):
    from edgeres.sources.loading import load_model

    out = _other_file(tmp_path, env)
    code, _, stderr = _invoke(["prune", tmp_path / "src.th", "--ratio", "0.3", "--out", out, "--force"])
    assert code == 0, stderr
    assert load_model(out).extra["pruning"]["stage_widths_after"]
    assert (tmp_path / "src.th").read_bytes() == Path(env["checkpoint"]).read_bytes()
    _no_partial(tmp_path)


def test_bomb_builder_is_an_honest_npz(tmp_path):
    """The deflate bomb above is a valid zip whose x really decompresses to zeros (checked at a small size)."""
    path = _deflate_bomb(tmp_path, images=2048)
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
        x = np.lib.format.read_array(zf.open("x.npy"))
    assert x.shape == (2048, 16, 16, 3) and not x.any()
    assert os.path.getsize(path) < 10_000
