"""A client that reads only the TFLite Metadata (MediaPipe Tasks' ImageClassifier) classifies real CIFAR
images with the bundle's .tflite as ``edgeres predict`` does."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_cli

IMAGES = 200


@pytest.fixture(scope="module")
def resnet20_tflite(cifar, tmp_path_factory):
    out = tmp_path_factory.mktemp("mp") / "bundle"
    r = run_cli("convert", cifar / "resnet20.th", "--calib", cifar / "cifar10_calib.npz", "--calib-images", "100",
                "--targets", "tflite", "--precision", "fp32,int8", "--out", out, "--no-bench")
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def dev_pngs(cifar, tmp_path_factory):
    """200 CIFAR dev images spread over the classes, as PNG files."""
    with np.load(cifar / "cifar10_dev.npz") as dev:
        x = dev["x"]  # an npz member is read (here: inflated) at each access
    folder = tmp_path_factory.mktemp("dev_png")
    for i in np.linspace(0, len(x) - 1, IMAGES).round().astype(int):
        Image.fromarray(x[i]).save(folder / f"{i:04d}.png")
    return folder


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_mediapipe_image_classifier_agrees_with_predict(resnet20_tflite, dev_pngs, precision):
    pytest.importorskip("mediapipe", reason="MediaPipe Tasks is in the dev extra: pip install 'edgeres[dev]'")
    import mediapipe as mp
    from mediapipe.tasks import python as mp_tasks
    from mediapipe.tasks.python import vision

    r = run_cli("predict", resnet20_tflite, dev_pngs, "--target", "tflite", "--precision", precision, "--top", "1",
                "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    ours = {p["file"]: p["top"][0]["label"] for p in json.loads(r.stdout)["predictions"]}
    assert len(ours) == IMAGES

    model = resnet20_tflite / "tflite" / f"model.{precision}.tflite"
    options = vision.ImageClassifierOptions(base_options=mp_tasks.BaseOptions(model_asset_path=str(model)),
                                            max_results=1)
    with vision.ImageClassifier.create_from_options(options) as classifier:
        theirs = {f: classifier.classify(mp.Image.create_from_file(f)).classifications[0].categories[0].category_name
                  for f in ours}
    same = sum(ours[f] == theirs[f] for f in ours)
    assert same >= 0.99 * IMAGES, f"MediaPipe agrees with predict on {same}/{IMAGES}"
    labels = json.loads((resnet20_tflite / "manifest.json").read_text())["labels"]
    assert set(theirs.values()) <= set(labels) and len(set(theirs.values())) >= 8  # names from labels.txt
