"""``edgeres export-app``: a Python app that runs in a venv with numpy + Pillow + one runtime and agrees with
``predict``; Android/iOS code whose constants are the manifest's; the --out rules of convert."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from edgeres import cli
from tests.conftest import make_images
from tests.test_predict import photo_bundle  # noqa: F401  (a fixture: the session bundle taking any photo size)

runner = CliRunner()


def _export(*args):
    return runner.invoke(cli.app, ["export-app", *map(str, args)])


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    x, _ = make_images(12, 16, seed=5)
    folder = tmp_path_factory.mktemp("app_pngs")
    for i, img in enumerate(x):
        Image.fromarray(img).save(folder / f"p{i:02d}.png")
    return folder


@pytest.fixture(scope="session")
def clean_venv(tmp_path_factory):
    """A plain venv (no system site-packages) per requirements.txt, made once per session: pip installs
    exactly what the exported app asks for, from the configured package indexes."""
    made: dict[str, Path] = {}

    def venv_for(requirements: Path) -> Path:
        key = requirements.read_text()
        if key not in made:
            where = tmp_path_factory.mktemp("venv")
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "venv", str(where)], check=True, timeout=300)
            python = where / "bin" / "python"
            r = subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(requirements)],
                               capture_output=True, text=True, timeout=900)
            assert r.returncode == 0, f"pip install -r {requirements} failed: {r.stderr[-2000:]}"
            print(f"venv for {key.split()[-1]}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            made[key] = python
        return made[key]
    return venv_for


def _installed(python: Path) -> set[str]:
    r = subprocess.run([str(python), "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True,
                       env={"PATH": "/usr/bin:/bin"})  # the venv's own (a PYTHONPATH would list its folders' dists)
    return {p["name"].lower() for p in json.loads(r.stdout)}


@pytest.mark.slow
@pytest.mark.parametrize("target, dist", [("onnx", "onnxruntime"), ("tflite", "ai-edge-litert")])
def test_python_app_in_a_fresh_venv_agrees_with_predict(app_bundle, pngs, clean_venv, tmp_path, target, dist):
    out = tmp_path / "app"
    r = _export(app_bundle, "--kind", "python", "--target", target, "--out", out)
    assert r.exit_code == 0, r.output
    manifest = json.loads((app_bundle / "manifest.json").read_text())
    artifact = next(a for a in manifest["artifacts"] if a["target"] == target and a["precision"] == "int8")
    assert f"{dist}=={artifact['tool_versions'][dist]}" in (out / "requirements.txt").read_text().splitlines()
    python = clean_venv(out / "requirements.txt")
    installed = _installed(python)
    assert dist in installed and not {"torch", "edgeres", "tensorflow", "onnx"} & installed

    theirs = subprocess.run([str(python), str(out / "classify.py"), str(pngs), "--top", "3", "--json"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin:/bin"})
    assert theirs.returncode == 0, theirs.stderr[-2000:]
    ours = runner.invoke(cli.app, ["predict", str(app_bundle), str(pngs), "--target", target, "--precision", "int8",
                                   "--top", "3", "--json"])
    assert ours.exit_code == 0, ours.output
    a, b = json.loads(theirs.stdout)["predictions"], json.loads(ours.stdout)["predictions"]
    assert [p["file"] for p in a] == [p["file"] for p in b] and len(a) == 12
    for p, q in zip(a, b):
        assert [t["index"] for t in p["top"]] == [t["index"] for t in q["top"]], p["file"]
        assert [t["label"] for t in p["top"]] == [t["label"] for t in q["top"]]
        assert max(abs(s["score"] - t["score"]) for s, t in zip(p["top"], q["top"])) < 1e-3
    no_camera = subprocess.run([str(python), str(out / "classify.py"), "--camera", "0"], capture_output=True, text=True,
                               timeout=300, env={"PATH": "/usr/bin:/bin"})
    assert no_camera.returncode != 0 and "--camera needs OpenCV: pip install opencv-python" in no_camera.stderr


def _constants(text: str, swift: bool) -> dict:
    pattern = (r"static let (\w+)(?:: [\w\[\]]+)? = (.+)" if swift else r"(?:const )?val (\w+) = (.+)")
    block = text[text.index("ModelConfig {"):text.index("\n}\n", text.index("ModelConfig {"))]
    out = {}
    for name, value in re.findall(pattern, block):
        value = value.strip()
        if value.startswith("floatArrayOf(") or value.startswith("["):
            out[name] = [float(v.rstrip("f")) for v in re.findall(r"[-0-9.e]+f?", value.split("(", 1)[-1])]
        elif value in ("true", "false"):
            out[name] = value == "true"
        elif value.startswith('"'):
            out[name] = json.loads(value)
        else:
            out[name] = float(value.rstrip("f")) if "." in value else int(value)
    return out


@pytest.mark.parametrize("kind, target", [("android", "tflite"), ("android", "onnx"), ("ios", "tflite"), ("ios", "onnx")])
def test_mobile_code_constants_equal_the_manifest(app_bundle, tmp_path, kind, target):
    from edgeres.targets import get_target

    out = tmp_path / "app"
    r = _export(app_bundle, "--kind", kind, "--target", target, "--precision", "fp32", "--out", out)
    assert r.exit_code == 0, r.output
    manifest = json.loads((app_bundle / "manifest.json").read_text())
    artifact = next(a for a in manifest["artifacts"] if a["target"] == target and a["precision"] == "fp32")
    source = out / ("ImageClassifier.kt" if kind == "android" else "ImageClassifier.swift")
    c = _constants(source.read_text(), swift=kind == "ios")
    pre = manifest["preprocess"]
    assert c["INPUT_SIZE"] == pre["size"] and c["RESIZE"] == (pre["resize"] or 0)
    assert c["RESIZE_MODE"] == pre["resize_mode"] and c["BGR"] == (pre["channel_order"] == "BGR")
    assert c["RESIZE_FILTER"] == pre["filter"] and c["ANTIALIAS"] == pre["antialias"]
    assert c["MEAN"] == pytest.approx(pre["mean"]) and c["STD"] == pytest.approx(pre["std"])
    assert c["SCALE"] == pytest.approx(pre["scale"]) and c["NUM_CLASSES"] == manifest["arch"]["num_classes"]
    loaded = get_target(target).load_runner(app_bundle / artifact["file"])
    assert (c["INPUT_NAME"], c["OUTPUT_NAME"]) == loaded.io_names()
    assert c["OUTPUT_PROBABILITIES"] is bool((manifest["arch"].get("head_layers") or {}).get("softmax"))
    assert c["TAKES_PIXELS"] == loaded.takes_pixels and c["INPUT_LAYOUT"] == artifact["input_layout"]
    assert (out / c["MODEL_FILE"]).is_file() and (out / c["LABELS_FILE"]).read_text().splitlines() == manifest["labels"]
    assert "Not compiled here" in (out / "README.md").read_text()


def test_mobile_kinds_refuse_a_runtime_without_a_mobile_build(app_bundle, tmp_path):
    r = _export(app_bundle, "--kind", "android", "--target", "openvino", "--out", tmp_path / "app")
    assert r.exit_code == 2 and "--kind android runs onnx, tflite artifacts" in r.stderr
    assert not (tmp_path / "app").exists()


def _app_behind_a_link(d: Path, app_bundle) -> None:
    assert _export(app_bundle, "--kind", "python", "--target", "onnx", "--out", d / "real").exit_code == 0
    (d / "out").symlink_to(d / "real")


@pytest.mark.parametrize("make, expect, force", [
    (lambda d, b: (d / "out").write_text("x"), "exists and is a file", False),
    (lambda d, b: ((d / "out").mkdir(), (d / "out" / "mine.txt").write_text("keep")), "is not an app made by export-app",
     False),
    # issue 33: a dangling link was an internal error (exit 1); a link to an app was replaced, leaving .old links
    (lambda d, b: (d / "out").symlink_to(d / "gone"), "is a symbolic link (to {d}/gone, which does not exist)", False),
    (_app_behind_a_link, "is a symbolic link (to {d}/real); export-app never replaces a link", True),
], ids=["file", "foreign-folder", "dangling-link", "link-to-an-app"])
def test_out_rules_are_those_of_convert(app_bundle, tmp_path, make, expect, force):
    make(tmp_path, app_bundle)
    before = {p.name: (p.is_symlink(), p.stat().st_mtime_ns if p.exists() else None) for p in tmp_path.iterdir()}
    r = _export(app_bundle, "--kind", "python", "--out", tmp_path / "out", *(["--force"] if force else []))
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and expect.format(d=tmp_path) in lines[0], r.stderr
    after = {p.name: (p.is_symlink(), p.stat().st_mtime_ns if p.exists() else None) for p in tmp_path.iterdir()}
    assert after == before  # nothing replaced, no staging, .old or lock left beside it


def test_an_app_is_replaced_only_with_force_and_whole(app_bundle, tmp_path):
    out = tmp_path / "app"
    assert _export(app_bundle, "--kind", "python", "--target", "onnx", "--out", out).exit_code == 0
    again = _export(app_bundle, "--kind", "python", "--target", "openvino", "--out", out)
    assert again.exit_code == 2 and "pass --force" in again.stderr
    assert _export(app_bundle, "--kind", "python", "--target", "openvino", "--out", out, "--force").exit_code == 0
    app = json.loads((out / "app.json").read_text())
    assert app["target"] == "openvino" and sorted(p.name for p in out.iterdir()) == app["files"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging or lock left behind


def test_bad_kind_is_refused_before_any_work(app_bundle, tmp_path):
    r = _export(app_bundle, "--kind", "web", "--out", tmp_path / "app")
    assert r.exit_code == 2 and "--kind 'web': choose one of python, android, ios" in r.stderr
    assert not (tmp_path / "app").exists()


# -- the app decodes files by edgeres' own rule: modes, EXIF orientation, special files, huge headers ----

def _app(bundle, where, target="onnx"):
    """Export a Python app of ``bundle`` and import its classify.py (in this interpreter: numpy, Pillow and
    the runtime are all it uses)."""
    import importlib.util

    out = where / "app"
    r = _export(bundle, "--kind", "python", "--target", target, "--precision", "fp32", "--out", out)
    assert r.exit_code == 0, r.output
    spec = importlib.util.spec_from_file_location(f"classify_{abs(hash(str(out)))}", out / "classify.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return out, module


def _classify_json(app, capsys, *args) -> dict:
    capsys.readouterr()
    code = app.main(["--json", *map(str, args)])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


@pytest.fixture(scope="module")
def kinds_app(app_bundle, tmp_path_factory):
    return _app(app_bundle, tmp_path_factory.mktemp("kinds_app"))


def test_the_app_carries_edgeres_decoding_code_verbatim(kinds_app):
    import edgeres.calibration.image_file

    out, _ = kinds_app
    module = Path(edgeres.calibration.image_file.__file__).read_text(encoding="utf-8")
    code = module[module.index("\nimport os\n"):]  # after the docstring and the __future__ import
    assert code in (out / "classify.py").read_text(encoding="utf-8")
    script = (out / "classify.py").read_text(encoding="utf-8")
    assert "from edgeres" not in script and "from calibration" not in script


def test_every_pixel_mode_gives_the_app_and_edgeres_identical_arrays(kinds_app, tmp_path):
    from edgeres.calibration.readers import read_image
    from tests.test_readers import image_kinds

    _, app = kinds_app
    for name, (path, expected) in image_kinds(tmp_path).items():
        ours, theirs = read_image(str(path)), app.decode_image(str(path))
        assert theirs.dtype == np.uint8 and np.array_equal(theirs, ours), name
        assert np.array_equal(ours, expected), name


def test_every_pixel_mode_gets_predicts_scores_in_the_app(app_bundle, kinds_app, tmp_path, capsys):
    """Before: 16-bit greyscale was clipped to white by the app's convert("RGB"), another class."""
    from tests.test_readers import image_kinds

    _, app = kinds_app
    image_kinds(tmp_path / "kinds")
    theirs = _classify_json(app, capsys, tmp_path / "kinds", "--top", "10")["predictions"]
    ours = runner.invoke(cli.app, ["predict", str(app_bundle), str(tmp_path / "kinds"), "--target", "onnx",
                                   "--precision", "fp32", "--top", "10", "--json"])
    assert ours.exit_code == 0, ours.output
    ours = json.loads(ours.stdout)["predictions"]
    assert [p["file"] for p in theirs] == [p["file"] for p in ours] and len(ours) == 14
    for p, q in zip(theirs, ours):
        assert p["top"] == q["top"], p["file"]


def test_exif_rotated_dev_photos_get_the_upright_output_in_the_app(photo_bundle, tmp_path, capsys):
    from tests.test_predict import dev_photos, exif_rotated_copies

    _, app = _app(photo_bundle, tmp_path)
    copies = exif_rotated_copies(dev_photos(3), tmp_path / "rotated")
    doc = _classify_json(app, capsys, tmp_path / "rotated", "--top", "10")
    scores = {Path(p["file"]).name: p["top"] for p in doc["predictions"]}
    ours = runner.invoke(cli.app, ["predict", str(photo_bundle), str(tmp_path / "rotated"), "--target", "onnx",
                                   "--precision", "fp32", "--top", "10", "--json"])
    predicted = {Path(p["file"]).name: p["top"] for p in json.loads(ours.stdout)["predictions"]}
    for orientation, files in copies.items():
        for upright, rotated in zip(copies[1], files):
            assert scores[rotated.name] == scores[upright.name], (orientation, rotated.name)
            assert scores[rotated.name] == predicted[rotated.name]


def test_the_apps_terminal_escaping_is_edgeres(kinds_app):
    from edgeres.tables import printable

    _, app = kinds_app
    for text in ["plain", "tab\there", "\x1b[2J", "bell\x07", "\u202eevil", "\udcff", "line\u2028sep", "日本\u3000語",
                 "👨\u200d👩\u200d👧", "\x9b31m", "crlf\r\n"]:
        assert app.printable(text) == printable(text), repr(text)
    assert printable("a\x1b[2Jb\u202e") == "a\\x1b[2Jb\\u202e"


def _run_app(out: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(out / "classify.py"), *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=out)


def test_the_app_refuses_a_fifo_without_waiting(kinds_app, pngs, tmp_path):
    out, _ = kinds_app
    import os

    os.mkfifo(tmp_path / "pipe.png")
    r = _run_app(out, pngs / "p00.png", tmp_path / "pipe.png")  # before: blocked in open() until the timeout
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stdout == ""
    assert r.stderr.strip() == f"classify: error: {tmp_path / 'pipe.png'}: is not a regular file; give image files or folders"


@pytest.mark.parametrize("width, height, expect", [
    (100_000, 100_000, "image is too large to decode"),
    (1, 89_000_000, "image is 1×89000000 pixels; a side above 65535 pixels is refused"),
])
def test_the_app_refuses_a_huge_declared_size_in_one_line(kinds_app, tmp_path, width, height, expect):
    from tests.test_predict import png_header_only

    out, _ = kinds_app
    big = png_header_only(tmp_path / "big.png", width, height)
    r = _run_app(out, big)  # before: a DecompressionBombError traceback
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"classify: warning: {big}: {expect}" in r.stderr


@pytest.mark.parametrize("kind, target", [("android", "tflite"), ("android", "onnx"), ("ios", "tflite"), ("ios", "onnx")])
def test_mobile_code_says_it_takes_upright_images_where_it_classifies(app_bundle, tmp_path, kind, target):
    out = tmp_path / "app"
    assert _export(app_bundle, "--kind", kind, "--target", target, "--precision", "fp32", "--out", out).exit_code == 0
    code = (out / ("ImageClassifier.kt" if kind == "android" else "ImageClassifier.swift")).read_text()
    signature = "fun classify(bitmap: Bitmap" if kind == "android" else "func classify(_ image: CGImage"
    above = code[:code.index(signature)].rsplit("\n\n", 1)[-1]  # the comment block right above classify
    before = " ".join(above.replace("//", " ").split())
    assert "UPRIGHT IMAGES ONLY" in before and "EXIF orientation" in before
    assert ("ExifInterface" if kind == "android" else "imageOrientation") in before
    readme = (out / "README.md").read_text()
    assert "**Give it upright images.**" in readme and "EXIF orientation" in readme


def test_python_readme_says_how_images_are_decoded(kinds_app):
    out, _ = kinds_app
    readme = (out / "README.md").read_text()
    assert "EXIF\norientation a phone camera writes is applied" in readme and "a FIFO or device is refused" in readme


def test_every_android_runtime_fills_its_input_with_the_one_shared_function():
    """LiteRT, onnxruntime and ExecuTorch (a target's own MOBILE code) call ``Pixels.input``, which the shared
    Kotlin holds once: the pixel loop is written in one place (the code is not compiled here: no Android SDK)."""
    from edgeres.app import mobile

    pre = {"size": 16, "resize": 18, "resize_mode": "shorter_side_crop", "filter": "bilinear", "antialias": True,
           "scale": 1 / 255, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "channel_order": "RGB"}
    runtimes = mobile.kind_runtimes("android")
    assert {"litert", "onnxruntime", "executorch"} <= set(runtimes)
    for runtime in runtimes:
        config = {"runtime": runtime, "model": "model.bin", "labels": "labels.txt", "num_classes": 10,
                  "preprocess": pre, "input": {"layout": "NCHW", "dtype": "float32", "pixels": False, "name": "x"},
                  "output": {"name": "y", "probabilities": False}}
        artifact = {"target": runtime, "precision": "fp32", "tool_versions": {"executorch": "1.5.1"}}
        code = mobile.generate("android", config, artifact)["ImageClassifier.kt"]
        classifier = code[code.index("class ImageClassifier"):code.index("\n}\n", code.index("class ImageClassifier"))]
        assert "Pixels.input(" in classifier and "getPixels" not in classifier and "shr 16" not in classifier, runtime
        assert code.count("object Pixels") == 1 and code.count("getPixels") == 1 and code.count("shr 16") == 1, runtime
        for name in ("INPUT_LAYOUT", "TAKES_PIXELS", "INPUT_DTYPE", "BGR", "SCALE", "MEAN", "STD"):
            assert f"ModelConfig.{name}" in code[code.index("object Pixels"):], (runtime, name)



@pytest.mark.parametrize("kind", ["android", "ios"])
def test_mobile_code_is_not_made_for_an_input_it_cannot_feed(tmp_path_factory, tmp_path, tiny_model, kind):
    """The handmade bundle's LiteRT model takes int8 (tflite.io=int8): the mobile code writes float32 or uint8
    pixels, so it would hand the interpreter the wrong bytes. One line naming the file and the fix, exit 2,
    nothing written (was: the code was generated); the python app runs it through the runner."""
    from tests.handmade_bundle import shared_bundle

    bundle = shared_bundle(tmp_path_factory, tiny_model)
    r = _export(bundle, "--kind", kind, "--target", "tflite", "--out", tmp_path / "app")
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    (line,) = [line for line in r.stderr.splitlines() if line.strip()]
    assert "model.int8.tflite: takes int8 normalised values" in line and "--option tflite.io=float" in line
    assert not (tmp_path / "app").exists()
    assert _export(bundle, "--kind", "python", "--target", "tflite", "--out", tmp_path / "py").exit_code == 0
