"""``edgeres predict``: image files in, top-k labels out, through one artifact's runtime and no torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import cli
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
    from calibration import Preprocess
    from targets import get_target

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
    from calibration import Preprocess
    from calibration.readers import read_image

    img = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    pre = Preprocess(size=16, resize=20)
    np.testing.assert_array_equal(pre(read_image(str(tmp_path / "a.png"))[None]), pre(img[None]))


def test_a_missing_runtime_names_the_pip_package(app_bundle, pngs):
    folder, _ = pngs
    code = ("import sys; sys.modules['onnxruntime'] = None\nimport cli\n"
            "cli.app(sys.argv[1:])")
    r = subprocess.run([sys.executable, "-c", code, "predict", str(app_bundle), str(folder), "--target", "onnx"],
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 3 and "onnxruntime is not installed; pip install" in r.stderr, r.stderr
