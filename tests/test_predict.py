"""``edgeres predict``: image files in, top-k labels out, through one artifact's runtime and no torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from edgeres import cli
from tests.conftest import ROOT, make_images

runner = CliRunner()


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    """Six 16×16 PNGs and the uint8 pixels they hold."""
    x, _ = make_images(6, 16, seed=3)
    folder = tmp_path_factory.mktemp("pngs")
    for i, img in enumerate(x):
        Image.fromarray(img).save(folder / f"img{i}.png")
    return folder, x


def _predict(*args):
    r = runner.invoke(cli.app, ["predict", *map(str, args)])
    return r


@pytest.mark.parametrize("target", ["onnx", "openvino", "tflite"])
def test_predict_top1_is_the_artifacts_argmax_on_the_decoded_pixels(app_bundle, pngs, target):
    from edgeres.calibration import Preprocess
    from edgeres.targets import get_target

    folder, x = pngs
    r = _predict(app_bundle, folder, "--target", target, "--precision", "fp32", "--top", "3", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["artifact"] == {"target": target, "precision": "fp32", "file": doc["artifact"]["file"]}
    manifest = json.loads((app_bundle / "manifest.json").read_text())
    ref = get_target("onnx").load_runner(app_bundle / manifest["reference"]["file"])
    expected = ref(Preprocess.from_dict(manifest["preprocess"])(x)).argmax(1)
    assert [p["file"] for p in doc["predictions"]] == [str(folder / f"img{i}.png") for i in range(6)]
    assert [p["top"][0]["index"] for p in doc["predictions"]] == expected.tolist()
    for p in doc["predictions"]:
        assert len(p["top"]) == 3 and p["top"][0]["label"] == manifest["labels"][p["top"][0]["index"]]
        scores = [t["score"] for t in p["top"]]
        assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0001


def test_predict_prints_one_line_per_image_with_labels_and_scores(app_bundle, pngs):
    folder, _ = pngs
    r = _predict(app_bundle, folder / "img0.png", folder / "img1.png", "--top", "2")
    assert r.exit_code == 0, r.output
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{folder / 'img0.png'}: ") and lines[0].count(",") == 1


@pytest.mark.parametrize("target", ["onnx", "openvino", "tflite"])
def test_predict_imports_no_torch(app_bundle, pngs, target):
    folder, _ = pngs
    code = ("import sys, cli\n"
            "try:\n    cli.app(sys.argv[1:], standalone_mode=False)\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in ('torch', 'tensorflow') if m in sys.modules)\n"
            "print('HEAVY=' + ','.join(heavy))")
    r = subprocess.run([sys.executable, "-c", code, "predict", str(app_bundle), str(folder), "--target", target,
                        "--json"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert '"predictions"' in r.stdout and r.stdout.strip().endswith("HEAVY="), r.stdout[-300:]


def test_unreadable_files_are_named_skipped_and_counted(app_bundle, pngs, tmp_path):
    folder, _ = pngs
    bad = tmp_path / "broken.png"
    bad.write_text("not an image")
    r = _predict(app_bundle, folder / "img0.png", bad, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert len(doc["predictions"]) == 1 and doc["skipped"][0]["file"] == str(bad)
    assert f"{bad}: cannot be read as an image" in r.stderr and "skipped 1 of 2" in r.stderr


def test_no_readable_image_exits_2(app_bundle, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    r = _predict(app_bundle, bad)
    assert r.exit_code == 2 and "edgeres: error: none of the 1 input file(s) could be read" in r.stderr


@pytest.mark.parametrize("args, expect", [
    (["--target", "nosuch"], "has no nosuch artifact; it has onnx fp32"),
    (["--precision", "fp16"], "has no fp16 artifact"),
    (["--top", "0"], "--top 0: give a positive number"),
])
def test_bad_flags_are_one_line_exit_2(app_bundle, pngs, args, expect):
    folder, _ = pngs
    r = _predict(app_bundle, folder, *args)
    assert r.exit_code == 2 and expect in r.stderr and r.stdout == ""


def test_a_missing_input_is_refused_before_any_work(app_bundle, tmp_path):
    r = _predict(app_bundle, tmp_path / "nothere.png")
    assert r.exit_code == 2 and "nothere.png: no such image file or folder" in r.stderr


def test_images_are_resized_as_the_manifest_says(tmp_path):
    from edgeres.calibration import Preprocess
    from edgeres.calibration.readers import read_image

    img = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    pre = Preprocess(size=16, resize=20)
    np.testing.assert_array_equal(pre(read_image(str(tmp_path / "a.png"))[None]), pre(img[None]))


def test_a_missing_runtime_names_the_pip_package(app_bundle, pngs):
    folder, _ = pngs
    code = ("import sys; sys.modules['onnxruntime'] = None\nfrom edgeres import cli\n"
            "cli.app(sys.argv[1:])")
    r = subprocess.run([sys.executable, "-c", code, "predict", str(app_bundle), str(folder), "--target", "onnx"],
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 3 and "onnxruntime is not installed; pip install" in r.stderr, r.stderr


# -- photos as phones store them: EXIF orientation, special files, size, formats, terminal output ----

IMAGENET_DEV = ROOT.parent / "shared" / "data" / "imagenet" / "dev"
# the stored pixels of each EXIF orientation: Pillow's exif_transpose undoes exactly this transpose
STORED_AS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
             5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
             8: Image.Transpose.ROTATE_270}


def dev_photos(count: int) -> list:
    """The first ``count`` ImageNet dev photos (one per class folder), or skip where ../shared is absent."""
    photos = sorted(IMAGENET_DEV.glob("*/*.JPEG"))[:count]
    if len(photos) < count:
        pytest.skip(f"ImageNet dev photos not found at {IMAGENET_DEV} (needs ../shared beside the repo)")
    return photos


def exif_rotated_copies(photos, folder, suffix: str = ".png") -> dict:
    """{orientation: [files]}: each photo's upright pixels stored transposed, with the EXIF Orientation tag
    that makes the upright view the original (as a phone held sideways stores it); 1 is the upright copy."""
    folder.mkdir(parents=True, exist_ok=True)
    copies: dict[int, list] = {}
    for photo in photos:
        with Image.open(photo) as im:
            upright = im.convert("RGB")
        for orientation in (1, *STORED_AS):
            exif = Image.Exif()
            exif[0x0112] = orientation
            stored = upright if orientation == 1 else upright.transpose(STORED_AS[orientation])
            path = folder / f"{photo.stem}-o{orientation}{suffix}"
            stored.save(path, exif=exif, **({"quality": 95} if suffix == ".jpg" else {}))
            copies.setdefault(orientation, []).append(path)
    return copies


def edited_bundle(app_bundle, where, **manifest_changes):
    """A copy of the session bundle with manifest keys replaced (the artifacts are unchanged)."""
    import shutil

    out = where / "bundle"
    shutil.copytree(app_bundle, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.update(manifest_changes)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


@pytest.fixture(scope="module")
def photo_bundle(app_bundle, tmp_path_factory):
    """The session bundle taking photos of any size: shorter side to 18, centre crop 16."""
    manifest = json.loads((app_bundle / "manifest.json").read_text())
    return edited_bundle(app_bundle, tmp_path_factory.mktemp("photo_bundle"),
                         preprocess={**manifest["preprocess"], "resize": 18})


def _scores(doc: dict) -> dict:
    """{file name: [(index, score) for every class]} of a predict/classify --json document."""
    return {Path(p["file"]).name: [(t["index"], t["score"]) for t in p["top"]] for p in doc["predictions"]}


def test_exif_rotated_photos_get_the_upright_photos_whole_output(photo_bundle, tmp_path):
    """Lossless (PNG) copies in all eight orientations: every class score equals the upright copy's."""
    copies = exif_rotated_copies(dev_photos(4), tmp_path / "rotated")
    (tmp_path / "untagged").mkdir()
    for f in copies[6]:  # the stored pixels without the tag: what a reader that ignores EXIF sees
        with Image.open(f) as im:
            im.save(tmp_path / "untagged" / f"untagged-{f.name}")
    r = _predict(photo_bundle, tmp_path / "rotated", tmp_path / "untagged", "--target", "onnx", "--precision", "fp32",
                 "--top", "10", "--json")
    assert r.exit_code == 0, r.output
    scores = _scores(json.loads(r.stdout))
    assert len(scores) == 4 * 8 + 4
    for orientation, files in copies.items():
        for upright, rotated in zip(copies[1], files):
            assert scores[rotated.name] == scores[upright.name], (orientation, rotated.name)
    # the test means something: the stored pixels alone give other outputs
    assert all(scores[f"untagged-{f.name}"] != scores[u.name] for f, u in zip(copies[6], copies[1]))


def test_exif_rotated_phone_jpegs_get_the_upright_photos_output(photo_bundle, tmp_path):
    """JPEG copies, as phones store them: re-encoding moves the scores a little (< 1e-3 here), ignoring the
    tag moves them more than that on every photo, so every class score within 1e-3 is the upright output."""
    copies = exif_rotated_copies(dev_photos(6), tmp_path / "rotated", suffix=".jpg")
    (tmp_path / "untagged").mkdir()
    for f in copies[6] + copies[8]:
        with Image.open(f) as im:
            im.save(tmp_path / "untagged" / f"untagged-{f.stem}.png")
    r = _predict(photo_bundle, tmp_path / "rotated", tmp_path / "untagged", "--target", "onnx", "--precision", "fp32",
                 "--top", "10", "--json")
    assert r.exit_code == 0, r.output
    scores = {name: np.array([s for _, s in sorted(top)]) for name, top in _scores(json.loads(r.stdout)).items()}
    for orientation, files in copies.items():
        for upright, rotated in zip(copies[1], files):
            assert np.abs(scores[rotated.name] - scores[upright.name]).max() < 1e-3, (orientation, rotated.name)
    for upright, rotated in zip(copies[1] * 2, copies[6] + copies[8]):
        assert np.abs(scores[f"untagged-{rotated.stem}.png"] - scores[upright.name]).max() > 1e-3, rotated.name


def test_a_fifo_given_by_name_is_refused_without_waiting_for_a_writer(app_bundle, pngs, tmp_path):
    folder, _ = pngs
    os.mkfifo(tmp_path / "camera.png")
    r = subprocess.run([sys.executable, "-m", "edgeres.cli", "predict", str(app_bundle), str(folder / "img0.png"),
                        str(tmp_path / "camera.png")], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, timeout=120)  # before: blocked in open() forever
    assert r.returncode == 2 and r.stdout == "", r.stderr
    assert r.stderr.strip() == (f"edgeres: error: {tmp_path / 'camera.png'}: is not a regular file (a FIFO, device or "
                                "socket); give image files or a folder of images")


def _fake_ghostscript(tmp_path, monkeypatch) -> Path:
    """Point Pillow's EPS decoder at a 'gs' that leaves a marker: it shows whether Ghostscript would run."""
    from PIL import EpsImagePlugin

    marker, gs = tmp_path / "ghostscript-ran", tmp_path / "gs"
    gs.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    gs.chmod(0o755)
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", str(gs))
    return marker


def _eps(path: Path) -> Path:
    path.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nnewpath 0 0 moveto 16 16 lineto stroke\n"
                    "showpage\n%%EOF\n")
    return path


def test_eps_content_named_png_never_reaches_ghostscript(app_bundle, pngs, tmp_path, monkeypatch):
    folder, _ = pngs
    marker = _fake_ghostscript(tmp_path, monkeypatch)
    eps = _eps(tmp_path / "drawing.png")
    r = _predict(app_bundle, folder / "img0.png", eps, "--json")
    assert r.exit_code == 0, r.output
    assert not marker.exists(), "Pillow handed the file to Ghostscript"
    assert json.loads(r.stdout)["skipped"][0]["file"] == str(eps)
    assert f"{eps}: cannot be read as an image: its content is not JPEG, PNG, BMP, WebP, TIFF or GIF" in r.stderr


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG declaring width×height RGB but holding one row of pixels: only a reader that decodes before it
    checks the size gets past the header (and then fails on the missing rows, differently)."""
    from tests.test_safety_data import _png_header_only

    _png_header_only(path, width, height)
    return path


@pytest.mark.parametrize("width, height, expect", [
    (1, 89_000_000, "image is 1×89000000 pixels; a side above 65535 pixels is refused"),
    (89_000_000, 1, "image is 89000000×1 pixels; a side above 65535 pixels is refused"),
    (60_000, 1_000, "image is 60000×1000 pixels, its longer side more than 50 times its shorter"),
    (100_000, 100_000, "image is too large to decode"),
    (10_000, 10_000, "image is 10000×10000 pixels; images above 89 megapixels are refused"),
])
def test_a_declared_size_is_refused_before_decoding(app_bundle, pngs, tmp_path, width, height, expect):
    folder, _ = pngs
    big = png_header_only(tmp_path / "big.png", width, height)
    r = _predict(app_bundle, folder / "img0.png", big, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["skipped"] == [{"file": str(big), "reason": json.loads(r.stdout)["skipped"][0]["reason"]}]
    assert f"{big}: {expect}" in r.stderr, r.stderr


ESC = "\x1b[2J\x1b[31m"  # clear the screen, turn red
CONTROL_TEXT = [ESC, "\r", "\x07", "\u202e", "\x9b", "\u2028", "\n"]


@pytest.fixture(scope="module")
def hostile(app_bundle, tmp_path_factory):
    """A bundle whose folder name and labels carry terminal control sequences, and an image whose name does."""
    where = tmp_path_factory.mktemp("hostile") / f"b{ESC}"
    where.mkdir()
    labels = [f"cat{CONTROL_TEXT[i % len(CONTROL_TEXT)]}{i}" for i in range(10)]
    bundle = edited_bundle(app_bundle, where, labels=labels)
    image = where / f"photo{ESC}\u202e.png"
    Image.fromarray(make_images(1, 16, seed=9)[0][0]).save(image)
    Image.fromarray(make_images(1, 16, seed=9)[0][0]).save(where / "caf\udce9.png")  # bytes caf\xe9: not UTF-8
    return bundle, image, labels


TERMINAL_CASES = [  # (id, args from (bundle, image)): text output escapes every control character
    ("predict", lambda b, i: ["predict", b, i, "--top", "10"]),
    ("predict-skipped-file", lambda b, i: ["predict", b, i, _eps(i.with_name(f"x{ESC}.png")), "--top", "10"]),
    ("predict-missing-file", lambda b, i: ["predict", b, i.with_name(f"gone{ESC}.png")]),
    ("inspect-bundle", lambda b, i: ["inspect", b]),
    ("report", lambda b, i: ["report", b]),
    ("eval-missing-data", lambda b, i: ["eval", b, "--data", i.with_name(f"data{ESC}.npz")]),
    ("predict-undecodable-file-name", lambda b, i: ["predict", b, i.with_name("caf\udce9.png")]),
]


@pytest.mark.parametrize("case", TERMINAL_CASES, ids=lambda c: c[0])
def test_terminal_output_escapes_control_characters(hostile, case):
    bundle, image, _ = hostile
    r = runner.invoke(cli.app, [str(a) for a in case[1](bundle, image)])
    assert r.exit_code in (0, 2), r.output
    for stream in (r.stdout, r.stderr):
        assert not [c for c in stream if c in "\x1b\r\x07\u202e\x9b\u2028"], stream
    assert "\\x1b[2J" in r.stdout + r.stderr


def test_predict_text_shows_labels_escaped_and_json_keeps_them_exact(hostile):
    bundle, image, labels = hostile
    text = _predict(bundle, image, "--top", "10")
    assert text.exit_code == 0, text.output
    line, = text.stdout.splitlines()
    assert line.startswith(str(image).replace("\x1b", "\\x1b").replace("\u202e", "\\u202e") + ": ")
    assert "cat\\x1b[2J\\x1b[31m0" in line and "cat\\n6" in line and "cat\\u2028" in line
    doc = json.loads(_predict(bundle, image, "--top", "10", "--json").stdout)
    assert doc["predictions"][0]["file"] == str(image)
    assert sorted(t["label"] for t in doc["predictions"][0]["top"]) == sorted(labels)
