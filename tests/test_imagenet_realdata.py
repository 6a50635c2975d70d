"""The real ImageNet Keras ResNet-50 on real photos (``../shared/data/imagenet``): converted once to every target
in int8 and fp32 from the JPEG folders with the default preprocessing, ``--labels classes.tsv`` and ``<wnid>/``
folders, evaluated on the 400 dev photos. One conversion (module fixture) serves every test here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli, run_cli_process
from tests.imagenet_data import ensure_resnet50, imagenet_dir

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

MIN_FP32_TOP1 = 88.5  # shorter side 256 + centre crop 224: 88.50 % (bicubic 89.50 %); a straight resize 78.75 %
MIN_INT8_AGREEMENT = 96.0


@pytest.fixture(scope="module")
def imagenet():
    data = imagenet_dir()
    if data is None:
        pytest.skip("the ImageNet photos are not at ../shared/data/imagenet (needs ../shared beside the repo)")
    model, why = ensure_resnet50()
    if model is None:
        pytest.skip(why)
    return data, model


@pytest.fixture(scope="module")
def converted(imagenet, tmp_path_factory):
    """(bundle, convert's stderr): the three targets in int8 and fp32, evaluated on dev (with the check)."""
    data, model = imagenet
    out = tmp_path_factory.mktemp("imagenet") / "bundle"
    r = run_cli_process("convert", model, "--calib", data / "calib", "--eval", data / "dev", "--labels", data / "classes.tsv",
                "--targets", "onnx,openvino,tflite", "--precision", "int8,fp32", "--no-bench", "--jobs", "0",
                "--out", out, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stderr


def _eval(bundle: Path) -> dict:
    return json.loads((bundle / "eval.json").read_text())


def test_default_preprocessing_is_the_imagenet_crop_and_keeps_fp32_top1_on_every_target(converted):
    bundle, _ = converted
    manifest = json.loads((bundle / "manifest.json").read_text())
    pre = manifest["preprocess"]
    assert (pre["resize_mode"], pre["resize"], pre["size"], pre["filter"], pre["antialias"]) == \
        ("shorter_side_crop", 256, 224, "bilinear", True)
    ev = _eval(bundle)
    assert ev["images"] == 400
    assert ev["reference"]["top1"] >= MIN_FP32_TOP1, ev["reference"]
    fp32 = [a for a in ev["artifacts"] if a["precision"] == "fp32"]
    assert {a["target"] for a in fp32} == {"onnx", "openvino", "tflite"}
    for a in fp32:
        assert a["top1"] >= MIN_FP32_TOP1 and a["agreement_pct"] == 100.0, a


def test_every_int8_artifact_agrees_with_fp32_on_at_least_96_percent(converted):
    bundle, _ = converted
    int8 = [a for a in _eval(bundle)["artifacts"] if a["precision"] == "int8"]
    assert {a["target"] for a in int8} == {"onnx", "openvino", "tflite"}
    for a in int8:
        assert a["agreement_pct"] >= MIN_INT8_AGREEMENT, a


def keras_top1(model: str, pixels: str) -> list[int]:
    """Keras' own top-1 of the model on NHWC float pixels (an ``.npy``), 16 at a time through one traced
    ``tf.function`` of its call (measured on one core: 39 ms an image; called eagerly 56-59 ms, 100 ms in batches
    of 50); run in a fresh process (Keras keeps gigabytes of heap after an ImageNet-size model has run)."""
    import keras
    import tensorflow as tf

    x = np.load(pixels)
    net = keras.models.load_model(model, compile=False)
    forward = tf.function(lambda batch: net(batch, training=False), autograph=False)
    return [int(i) for b in range(0, len(x), 16) for i in np.asarray(forward(tf.constant(x[b:b + 16]))).argmax(1)]


def test_the_fp32_reference_agrees_with_keras_fed_the_same_pixels(imagenet, converted, tmp_path):
    """Keras' top-1 on the pixels the bundle's preprocessing gives equals the top-1 that convert's eval recorded
    for the fp32 reference on each photo (eval.json, in the photos' order); with every fp32 artifact at 100 %
    agreement with the reference (above), all of them agree with Keras."""
    from edgeres.calibration import Preprocess, open_dataset
    from edgeres.measure.paired import unpack_classes
    from tests.fresh_process import call_in_fresh_process

    data, model = imagenet
    bundle, _ = converted
    manifest = json.loads((bundle / "manifest.json").read_text())
    pre = Preprocess.from_dict(manifest["preprocess"]).with_layout("NHWC")
    ev = _eval(bundle)
    ours = unpack_classes(ev["reference"]["top1_classes"], ev["images"])
    pixels = np.concatenate([x for x, _ in open_dataset(data / "dev").batches(pre, 50)])
    np.save(tmp_path / "pixels.npy", pixels)
    theirs = call_in_fresh_process(keras_top1, model, tmp_path / "pixels.npy")
    assert len(theirs) == len(ours) == 400 and np.array_equal(ours, np.asarray(theirs))


def test_labels_and_wnid_folders_give_the_names_and_indices_of_classes_tsv(imagenet, converted):
    data, _ = imagenet
    bundle, _ = converted
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["labels"][:3] == ["tench", "goldfish", "great_white_shark"] and len(manifest["labels"]) == 1000
    assert manifest["arch"]["label_keys"][0] == ["n01440764"]
    photo = next((data / "dev" / "n01443537").glob("*.JPEG"))  # a goldfish
    r = run_cli("predict", bundle, photo, "--json", "--top", "1")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["predictions"][0]["top"][0]["label"] == "goldfish"


def test_the_preprocessing_check_shows_the_straight_resize_ten_points_below(converted):
    """Measured: crop bilinear (recorded) 88.50 %, crop bicubic 89.50 % on all 400 photos; direct bilinear 75.00 %,
    direct nearest 73.44 %, RGB 74.22 % on the first 128 (recorded 89.06 % there: more than 5 pp below, stopped;
    over all 400 direct bilinear scores 78.75 %), the other mean/std sets 0 % on the first 64. The warning is
    printed exactly when the gap exceeds 1 pp."""
    bundle, stderr = converted
    check = json.loads((bundle / "preprocess_check.json").read_text())
    rows = {r["convention"]: r["top1"] for r in check["conventions"]}
    assert check["images"] == 400 and check["recorded_top1"] == _eval(bundle)["reference"]["top1"]
    direct = next(r for r in check["conventions"] if r["preprocess"]["resize_mode"] == "direct"
                  and r["preprocess"]["filter"] == "bilinear")
    assert direct["top1"] <= check["recorded_top1"] - 5, rows
    assert check["gap_pp"] <= 1.5, rows  # the recorded crop is (about) the best convention
    warned = "preprocessing: the recorded convention" in stderr
    assert warned == (check["gap_pp"] > 1.0 and check["significant"]), (rows, stderr[-2000:])
