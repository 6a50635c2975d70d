"""Preprocessing as the model was trained: Pillow's antialiased bilinear resize (torchvision's
Resize + CenterCrop, or Keras' direct resize), recorded in the manifest, overridable with --preprocess."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from edgeres.calibration import DataError, Preprocess
from tests.conftest import run_cli, run_cli_process
from tests.test_safety import Case, _assert_one_line, _invoke, _no_partial, env, runner  # noqa: F401
from tests.test_safety_flags import _convert, no_work  # noqa: F401


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A random-ish H×W×3 uint8 image: smooth colour gradients plus noise, so aliasing shows."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([127 + 100 * np.sin(xx / (17 + 9 * c) + yy / (23 + 5 * c) + c) for c in range(3)], -1)
    return np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)


def torchvision_pil(img: np.ndarray, shorter: int, crop: int) -> np.ndarray:
    """torchvision's PIL path written out: Resize(shorter) (long side truncated) then CenterCrop(crop)."""
    h, w = img.shape[:2]
    nh, nw = (shorter, int(shorter * w / h)) if h <= w else (int(shorter * h / w), shorter)
    resized = Image.fromarray(img).resize((nw, nh), Image.BILINEAR)
    top, left = int(round((nh - crop) / 2.0)), int(round((nw - crop) / 2.0))
    return np.asarray(resized.crop((left, top, left + crop, top + crop)))


def normalise(x: np.ndarray, pre: Preprocess) -> np.ndarray:
    x = x.astype(np.float32) * np.float32(pre.scale)
    return ((x - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)).transpose(2, 0, 1)


# -- resizing -------------------------------------------------------------------------------------------

def test_zoo_imagenet_preprocess_equals_pil_resize_and_centre_crop_within_1_255():
    from edgeres.model.zoo import get_spec

    pre = get_spec("resnet50").preprocess
    assert (pre.resize_mode, pre.resize, pre.size) == ("shorter_side_crop", 256, 224)
    img = photo(1000, 750)
    ref = torchvision_pil(img, 256, 224)
    got_pixels = pre.geometry(img[None])[0].astype(int)
    assert np.abs(got_pixels - ref).max() <= 1
    got = pre(img[None])[0]
    pixel_error = np.abs(got - normalise(ref, pre)) * np.asarray(pre.std, np.float32)[:, None, None]
    assert pixel_error.max() <= 1 / 255 + 1e-6


def test_direct_mode_equals_pil_resize_to_size_by_size():
    pre = Preprocess(size=224, resize_mode="direct")
    img = photo(1000, 750, seed=1)
    ref = np.asarray(Image.fromarray(img).resize((224, 224), Image.BILINEAR))
    assert np.abs(pre.geometry(img[None])[0].astype(int) - ref).max() <= 1
    assert np.abs(pre(img[None])[0] - normalise(ref, pre)).max() * max(pre.std) <= 1 / 255 + 1e-6


def test_direct_mode_takes_images_of_the_input_size_unchanged():
    img = photo(224, 224)[None]
    assert np.array_equal(Preprocess(size=224, resize_mode="direct").geometry(img), img)


def test_downscaling_antialiases_unlike_point_sampling():
    """A one-pixel checkerboard halved becomes mid grey, not a copy of every other pixel."""
    board = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
    img = np.repeat(board[:, :, None], 3, -1)[None]
    out = Preprocess(size=32, resize_mode="direct").geometry(img)
    assert np.abs(out.astype(int) - 128).max() <= 4  # corners see a little less of the board


# -- the record -----------------------------------------------------------------------------------------

def test_resize_mode_round_trips_through_the_manifest_dict():
    pre = Preprocess(size=224, resize_mode="direct", channel_order="BGR")
    assert pre.to_dict()["resize_mode"] == "direct"
    assert Preprocess.from_dict(json.loads(json.dumps(pre.to_dict()))) == pre


def test_a_manifest_without_resize_mode_reads_as_shorter_side_crop():
    old = {"size": 224, "resize": 256, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert Preprocess.from_dict(old).resize_mode == "shorter_side_crop"


def test_unknown_resize_mode_is_refused():
    with pytest.raises(DataError, match="resize mode 'stretch'"):
        Preprocess(size=224, resize_mode="stretch")


def test_bundle_schema_accepts_resize_mode_and_refuses_unknown_modes():
    from edgeres.bundle import _preprocess_problem

    good = Preprocess(size=224, resize_mode="direct").to_dict()
    assert _preprocess_problem(good, "preprocess") is None
    assert "resize_mode 'stretch'" in _preprocess_problem({**good, "resize_mode": "stretch"}, "preprocess")
    old = {k: v for k, v in Preprocess(size=224, resize=256).to_dict().items() if k != "resize_mode"}
    assert _preprocess_problem(old, "preprocess") is None


def test_keras_imagenet_models_are_evaluated_as_imagenet_shorter_side_256_then_crop_224():
    """A straight resize to 224² cost the real Keras ResNet-50 ten points top-1 on the ImageNet dev photos."""
    from edgeres.model.zoo import IMAGENET_PREPROCESS
    from edgeres.sources.keras_import import keras_caffe_preprocess

    pre = keras_caffe_preprocess(224)
    assert (pre.resize_mode, pre.resize, pre.size, pre.channel_order) == ("shorter_side_crop", 256, 224, "BGR")
    assert (pre.filter, pre.antialias) == ("bilinear", True)
    assert (IMAGENET_PREPROCESS.resize_mode, IMAGENET_PREPROCESS.resize) == ("shorter_side_crop", 256)


def test_keras_cifar_models_take_their_32_pixel_images_unchanged():
    from edgeres.sources.keras_import import keras_caffe_preprocess

    pre = keras_caffe_preprocess(32, imagenet=False)
    img = photo(32, 32)
    assert (pre.resize_mode, pre.resize) == ("direct", None)
    assert np.array_equal(pre.geometry(img[None])[0], img)


# -- filter and antialiasing ----------------------------------------------------------------------------

@pytest.mark.parametrize("name,pil", [("bilinear", Image.BILINEAR), ("bicubic", Image.BICUBIC), ("nearest", Image.NEAREST)])
def test_filter_is_pillows_filter_of_that_name(name, pil):
    img = photo(500, 375)
    pre = Preprocess(size=224, resize=256, filter=name)
    resized = np.asarray(Image.fromarray(img).resize((341, 256), pil))
    top, left = 16, int(round((341 - 224) / 2.0))
    assert np.array_equal(pre.geometry(img[None])[0], resized[top:top + 224, left:left + 224])


def test_without_antialiasing_downscaling_samples_pixel_centres_as_plain_bilinear():
    """A 2× downscale without antialiasing is the mean of each 2×2 block (the sample sits between four pixels);
    with it Pillow's wider filter also weighs the neighbours."""
    img = photo(64, 64)
    blocks = img.reshape(32, 2, 32, 2, 3).astype(np.float32).mean((1, 3))
    plain = Preprocess(size=32, resize_mode="direct", antialias=False).geometry(img[None])[0].astype(np.float32)
    smooth = Preprocess(size=32, resize_mode="direct").geometry(img[None])[0].astype(np.float32)
    assert np.abs(plain - blocks).max() <= 1
    assert np.abs(smooth - blocks).max() > 5


def test_filter_and_antialias_are_recorded_and_described():
    pre = Preprocess(size=224, resize=256, filter="bicubic", antialias=False)
    assert Preprocess.from_dict(pre.to_dict()) == pre
    assert pre.to_dict()["filter"] == "bicubic" and pre.to_dict()["antialias"] is False
    assert "shorter side to 256, centre crop 224×224 (bicubic, not antialiased)" in pre.describe()
    old = {k: v for k, v in pre.to_dict().items() if k not in ("filter", "antialias")}
    assert (Preprocess.from_dict(old).filter, Preprocess.from_dict(old).antialias) == ("bilinear", True)


@pytest.mark.parametrize("pre", [Preprocess(size=224, resize=256, filter="bicubic"),
                                 Preprocess(size=224, resize=256, antialias=False),
                                 Preprocess(size=224, resize_mode="direct", filter="nearest"),
                                 Preprocess(size=224, resize=256)], ids=lambda p: p.describe().split(";")[0])
def test_exported_python_app_resizes_exactly_as_edgeres(pre):
    import importlib.util

    from edgeres.app import classify_template

    spec = importlib.util.spec_from_file_location("classify_copy", classify_template.__file__)
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    app.CONFIG["preprocess"] = pre.to_dict()
    for img in (photo(500, 375, seed=1), photo(300, 641, seed=2)):
        assert np.array_equal(app.geometry(img), pre.geometry(img[None])[0])


def test_unknown_filter_is_refused():
    with pytest.raises(DataError, match="filter 'lanczos' is not one of bilinear, bicubic, nearest"):
        Preprocess(size=224, resize=256, filter="lanczos")


# -- --preprocess ---------------------------------------------------------------------------------------

def test_preprocess_flag_parses_keys_and_three_number_lists():
    from edgeres.convert.config import parse_preprocess_override

    got = parse_preprocess_override("resize=256,crop=224,mode=shorter_side_crop,mean=1,2,3,std=4,5,6")
    assert got == {"resize": 256, "crop": 224, "mode": "shorter_side_crop", "mean": [1.0, 2.0, 3.0],
                   "std": [4.0, 5.0, 6.0]}


def test_preprocess_flag_reads_a_json_file(tmp_path):
    from edgeres.convert.config import parse_preprocess_override

    path = tmp_path / "pre.json"
    path.write_text(json.dumps({"mode": "direct", "crop": 224, "std": [1, 1, 1]}))
    assert parse_preprocess_override(str(path)) == {"mode": "direct", "crop": 224, "std": [1.0, 1.0, 1.0]}


def test_preprocess_flag_sets_filter_antialias_and_channel_order():
    from edgeres.convert.config import apply_preprocess_override, parse_preprocess_override
    from edgeres.model.zoo import IMAGENET_PREPROCESS

    got = parse_preprocess_override("resize=256,crop=224,filter=bicubic,antialias=false,order=bgr")
    assert got == {"resize": 256, "crop": 224, "filter": "bicubic", "antialias": False, "order": "BGR"}
    pre = apply_preprocess_override(IMAGENET_PREPROCESS, got)
    assert (pre.filter, pre.antialias, pre.channel_order, pre.resize) == ("bicubic", False, "BGR", 256)


def test_override_replaces_only_the_keys_given():
    from edgeres.convert.config import apply_preprocess_override
    from edgeres.model.zoo import IMAGENET_PREPROCESS

    direct = apply_preprocess_override(IMAGENET_PREPROCESS, {"mode": "direct"})
    assert (direct.resize_mode, direct.resize, direct.mean) == ("direct", None, IMAGENET_PREPROCESS.mean)
    wider = apply_preprocess_override(IMAGENET_PREPROCESS, {"resize": 288, "mean": [0.5, 0.5, 0.5]})
    assert (wider.resize, wider.mean, wider.std) == (288, (0.5, 0.5, 0.5), IMAGENET_PREPROCESS.std)


def _pre(value: str):
    return lambda t, e: _convert(t, e, "--preprocess", value)


PREPROCESS_CASES = [
    Case("unknown-key", _pre("resize=256,colour=1"), "--preprocess: unknown key 'colour'; the keys are resize"),
    Case("negative-size", _pre("resize=-256"), "--preprocess resize=-256 is not a whole number of pixels"),
    Case("zero-crop", _pre("crop=0"), "--preprocess crop=0 is not a whole number of pixels"),
    Case("crop-over-resize", _pre("resize=200,crop=224"), "crop=224 is larger than resize=200; .*resize at least crop"),
    Case("nan-mean", _pre("mean=0.5,nan,0.5"), "--preprocess mean=0.5,nan,0.5 is not finite"),
    Case("two-means", _pre("mean=0.5,0.5"), "--preprocess mean=.* is not three numbers"),
    Case("zero-std", _pre("std=0.2,0,0.2"), "--preprocess std=0.2,0.0,0.2 has a value that is not positive"),
    Case("bad-mode", _pre("mode=stretch"), "--preprocess mode='stretch' is not a resize mode; mode is one of "
                                           "shorter_side_crop, direct"),
    Case("direct-with-resize", _pre("mode=direct,resize=256"), "resize=256 with mode=direct: .*leave resize out"),
    Case("not-key-value", _pre("256"), "expected KEY=VALUE pairs"),
    Case("bad-filter", _pre("filter=lanczos"), "--preprocess filter='lanczos' is not a resize filter; filter is one of "
                                               "bilinear, bicubic, nearest"),
    Case("bad-antialias", _pre("antialias=maybe"), "--preprocess antialias='maybe': not a number; antialias is true or false"),
    Case("bad-order", _pre("order=GBR"), "--preprocess order='GBR' is not a channel order; order is RGB, BGR or L"),
    Case("word-size", _pre("resize=big"), "--preprocess resize='big': not a number"),
    Case("missing-json", _pre("nowhere.json"), "--preprocess nowhere.json: cannot read it as JSON"),
]


@pytest.mark.parametrize("case", PREPROCESS_CASES, ids=lambda c: c.id)
def test_bad_preprocess_flag_is_refused_in_one_line_before_any_work(env, tmp_path, no_work, case):
    code, _, stderr = _invoke(case.make(tmp_path, env))
    _assert_one_line(code, stderr, case)
    assert not (tmp_path / "bundle").exists()
    _no_partial(tmp_path)


def test_crop_other_than_the_models_input_size_is_refused_naming_the_size(env, tmp_path):
    code, _, stderr = _invoke(_convert(tmp_path, env, "--preprocess", "crop=224"))
    _assert_one_line(code, stderr, Case("crop", None, "crop=224: the model takes 16×16 inputs \\(its edgeres checkpoint records that size\\); give crop=16"))
    assert not (tmp_path / "bundle").exists()


def test_override_is_recorded_in_the_manifest_and_shown_by_inspect(env, tmp_path):
    out = tmp_path / "bundle"
    r = run_cli("convert", env["checkpoint"], "--targets", "onnx", "--precision", "fp32", "--no-bench",
                "--preprocess", "mode=direct,mean=0.5,0.5,0.5", "--out", out)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["preprocess"]["resize_mode"] == "direct" and manifest["preprocess"]["mean"] == [0.5] * 3
    assert manifest["arch"]["preprocess"] == manifest["preprocess"]
    assert manifest["config"]["preprocess"] == {"mode": "direct", "mean": [0.5, 0.5, 0.5]}
    shown = run_cli("inspect", out)
    assert "direct resize to 16×16 (bilinear, antialiased); RGB" in shown.stdout and "mean 0.5,0.5,0.5" in shown.stdout, shown.stdout
    model = run_cli("inspect", env["checkpoint"])
    assert "16×16 as is (no resize)" in model.stdout, model.stdout


# -- Keras' convention end to end -----------------------------------------------------------------------

def keras_like_images(n: int, size: int, seed: int) -> np.ndarray:
    """Varied uint8 images: coarse random colour fields upscaled, plus noise."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        coarse = rng.integers(0, 256, (int(rng.integers(2, 9)),) * 2 + (3,), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR)).astype(np.float32)
        out.append(np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8))
    return np.stack(out)


def spread_logits(keras, model, x, target_std: float = 3.0) -> np.ndarray:
    """Rescale the head's two Dense kernels so that, on ``x``, about half the hidden units are active and
    the logits spread over a few units: a random network's top-1 is otherwise one class for every image.
    Returns Keras' features of ``x`` (the head's input, float32), which the rescaling leaves as they are."""
    hidden, last = model.layers[-2], model.layers[-1]
    features = keras.Model(model.inputs, hidden.input)
    f32 = np.concatenate([np.asarray(features(x[i:i + 16], training=False)) for i in range(0, len(x), 16)])
    f = f32.astype(np.float64)
    w = hidden.get_weights()[0] / ((f @ hidden.get_weights()[0]).std() + 1e-12)
    b = -np.median(f @ w, axis=0)
    hidden.set_weights([w.astype(np.float32), b.astype(np.float32)])
    h = np.maximum(f @ w + b, 0)
    w2 = last.get_weights()[0]
    last.set_weights([(w2 * target_std / ((h @ w2).std() + 1e-12)).astype(np.float32), np.zeros(w2.shape[1], np.float32)])
    return f32


# What edgeres assumes for a Keras ImageNet model (checked against the manifest below): shorter side 256, crop 224
KERAS_GEOMETRY = Preprocess(size=224, resize=256, resize_mode="shorter_side_crop", filter="bilinear", antialias=True)


def make_keras_flatten_resnet50(folder: str) -> tuple[list[int], list[int]]:
    """``folder/resnet50.keras``: Keras' ResNet50 with a Flatten + Dense head, random weights spread so its top-1
    varies over ``keras_like_images(64, 224, 0)``; returns that top-1, and Keras' own top-1 (its caffe
    preprocessing) on those images brought to ``KERAS_GEOMETRY``. Run in a fresh process (Keras keeps the heap of
    an ImageNet-size model)."""
    import keras

    from tests.test_keras_import import randomize

    L = keras.layers
    base = keras.applications.ResNet50(weights=None, include_top=False, input_shape=(224, 224, 3))
    model = keras.Sequential([keras.Input((224, 224, 3)), base, L.Flatten(), L.Dense(256, activation="relu"),
                              L.Dense(10, activation="softmax")])
    randomize(model, np.random.default_rng(0))
    caffe = keras.applications.resnet.preprocess_input(keras_like_images(64, 224, seed=0).astype(np.float32))
    features = spread_logits(keras, model, caffe)
    model.save(f"{folder}/resnet50.keras")
    cropped = keras.applications.resnet.preprocess_input(
        KERAS_GEOMETRY.geometry(keras_like_images(64, 224, seed=0)).astype(np.float32))
    # on the caffe images: Keras' own head layers on the features Keras computed above (the backbone is
    # unchanged by the rescaling), not a second pass of the whole ResNet-50
    head = model.layers[-1](model.layers[-2](features))
    return (np.asarray(head).argmax(1).tolist(),
            np.asarray(model.predict(cropped, batch_size=16, verbose=0)).argmax(1).tolist())


@pytest.mark.slow
def test_keras_resnet50_flatten_head_artifacts_agree_with_keras_fed_the_same_pixels(tmp_path):
    from importlib.metadata import PackageNotFoundError, version

    try:
        if not version("keras").startswith("3"):
            pytest.skip(f"needs Keras 3 (installed: {version('keras')})")
    except PackageNotFoundError:
        pytest.skip("needs Keras 3 (pip install 'edgeres[tflite]')")
    from edgeres.targets import get_target
    from tests.fresh_process import call_in_fresh_process

    keras_top1, keras_crop_top1 = call_in_fresh_process(make_keras_flatten_resnet50, tmp_path)
    assert len(set(keras_top1)) >= 5, f"Keras' top-1 must vary for agreement to mean anything: {set(keras_top1)}"

    out = tmp_path / "bundle"
    # a process of its own (an ImageNet-size heap), compiling in it: a worker process would import TensorFlow again
    r = run_cli_process("convert", tmp_path / "resnet50.keras", "--targets", "onnx,openvino,tflite",
                        "--precision", "fp32", "--no-bench", "--jobs", "0", "--out", out)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    pre = Preprocess.from_dict(manifest["preprocess"]).with_layout("NCHW")
    assert (pre.resize_mode, pre.resize) == ("shorter_side_crop", 256)
    geometry = ("resize_mode", "resize", "size", "filter", "antialias")
    assert [getattr(pre, k) for k in geometry] == [getattr(KERAS_GEOMETRY, k) for k in geometry]  # Keras saw these pixels
    keras_top1 = np.asarray(keras_crop_top1)
    images = keras_like_images(64, 224, seed=0)
    x = pre(images)
    for a in manifest["artifacts"]:
        assert a["status"] == "ok", a
        run = get_target(a["target"]).load_runner(out / a["files"][0])
        top1 = np.concatenate([np.asarray(run(x[i:i + 8])).argmax(1) for i in range(0, len(x), 8)])
        agreement = float((top1 == keras_top1).mean())
        print(f"{a['target']} fp32 agrees with Keras fed the same pixels on {agreement:.1%} of 64 images")
        assert agreement >= 0.984, (a["target"], agreement)
