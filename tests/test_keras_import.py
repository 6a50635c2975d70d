"""Keras input (issue 12): a Keras ResNet v1 (keras.applications layout) with a Flatten/Dense or a
global-pooling head maps to a spec + torch weights, converts to every target matching Keras' own
outputs, and prunes; anything else is refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

SIZE = 32


def keras_resnet_v1(keras, head: str, *, widths=(4, 8), blocks=(2, 1), classes=10, seed=0, size=SIZE):
    """A tiny ResNet built exactly like keras.applications.resnet (block1 / stack1), random weights
    and BatchNorm statistics, with ``head`` "flatten" (Flatten → Dense relu → Dropout → Dense softmax),
    "gap" (GlobalAveragePooling2D → Dense logits) or "max" (GlobalMaxPooling2D → Dense softmax)."""
    L = keras.layers
    rng = np.random.default_rng(seed)

    def bn(name):
        return L.BatchNormalization(axis=3, epsilon=1.001e-5, name=name)

    def block1(x, filters, stride, conv_shortcut, name):
        if conv_shortcut:
            shortcut = bn(name + "_0_bn")(L.Conv2D(4 * filters, 1, strides=stride, name=name + "_0_conv")(x))
        else:
            shortcut = x
        x = L.Activation("relu")(bn(name + "_1_bn")(L.Conv2D(filters, 1, strides=stride, name=name + "_1_conv")(x)))
        x = L.Activation("relu")(bn(name + "_2_bn")(L.Conv2D(filters, 3, padding="SAME", name=name + "_2_conv")(x)))
        x = bn(name + "_3_bn")(L.Conv2D(4 * filters, 1, name=name + "_3_conv")(x))
        return L.Activation("relu", name=name + "_out")(L.Add(name=name + "_add")([shortcut, x]))

    inputs = keras.Input((size, size, 3))
    x = L.ZeroPadding2D(((3, 3), (3, 3)), name="conv1_pad")(inputs)
    x = L.Activation("relu")(bn("conv1_bn")(L.Conv2D(8, 7, strides=2, name="conv1_conv")(x)))
    x = L.MaxPooling2D(3, strides=2, name="pool1_pool")(L.ZeroPadding2D(((1, 1), (1, 1)), name="pool1_pad")(x))
    for s, (filters, n) in enumerate(zip(widths, blocks)):
        x = block1(x, filters, 1 if s == 0 else 2, True, f"conv{s + 2}_block1")
        for b in range(2, n + 1):
            x = block1(x, filters, 1, False, f"conv{s + 2}_block{b}")
    base = keras.Model(inputs, x, name="resnet_base")
    if head == "flatten":  # the classic transfer-learning head, around the base as a nested model
        model = keras.Sequential([keras.Input((size, size, 3)), base, L.Flatten(), L.Dense(16, activation="relu"),
                                  L.Dropout(0.5), L.Dense(classes, activation="softmax")])
    else:
        pool = L.GlobalAveragePooling2D() if head == "gap" else L.GlobalMaxPooling2D()
        top = L.Dense(classes, activation=None if head == "gap" else "softmax")
        model = keras.Model(inputs, top(pool(x)))
    randomize(model, rng)
    return model


def randomize(model, rng):
    """Non-trivial BN statistics and biases, so a wrong fold or permutation shows in the outputs."""
    for layer in model.layers:
        if hasattr(layer, "layers"):
            randomize(layer, rng)
            continue
        w = layer.get_weights()
        if type(layer).__name__ == "BatchNormalization":
            c = w[0].shape[0]
            layer.set_weights([0.5 + rng.random(c), 0.2 * rng.standard_normal(c), 0.2 * rng.standard_normal(c),
                               0.5 + rng.random(c)])
        elif type(layer).__name__ in ("Conv2D", "Dense") and len(w) == 2:
            layer.set_weights([w[0], 0.1 * rng.standard_normal(w[1].shape)])


def inputs_nhwc(n=4, seed=1, size=SIZE):
    """Preprocessed-range inputs (caffe mode: roughly ±128)."""
    return (40 * np.random.default_rng(seed).standard_normal((n, size, size, 3))).astype(np.float32)


def rel_err(got, ref):
    """Relative output error; on log-probabilities for softmax outputs (probabilities hide logit errors)."""
    if np.allclose(ref.sum(1), 1, atol=1e-4) and ref.min() >= 0:
        keep = (ref > 1e-6) & (got > 1e-6)
        got, ref = np.log(np.where(keep, got, 1)), np.log(np.where(keep, ref, 1))
    return float(np.abs(got - ref).max() / max(1.0, np.abs(ref).max()))


@pytest.fixture(scope="module")
def keras3():
    return pytest.importorskip("keras", minversion="3")


@pytest.fixture(scope="module")
def saved(keras3, tmp_path_factory):
    """{(head, suffix): path} of the tiny models saved by keras 3, plus the Keras outputs on inputs_nhwc()."""
    d = tmp_path_factory.mktemp("keras")
    out = {}
    for head in ("flatten", "gap"):
        model = keras_resnet_v1(keras3, head)
        for suffix in (".keras", ".h5"):
            model.save(d / f"{head}{suffix}")
            out[head, suffix] = d / f"{head}{suffix}"
        out[head, "outputs"] = np.asarray(model(inputs_nhwc(), training=False))
    return out


@pytest.fixture(scope="module")
def npz32(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "images32.npz"
    np.savez(path, x=rng.integers(0, 256, (48, SIZE, SIZE, 3), dtype=np.uint8), y=rng.integers(0, 10, 48))
    return path


def torch_outputs(loaded, x_nhwc):
    import torch

    with torch.no_grad():
        return loaded.to_torch()(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy())).numpy()


# -- mapping ------------------------------------------------------------------------------------------

def test_keras_resnet_with_flatten_head_maps_to_a_v1_bottleneck_spec(saved):
    from edgeres.sources.loading import load_model
    from edgeres.model.zoo import Head

    loaded = load_model(saved["flatten", ".keras"])
    spec = loaded.spec
    assert (spec.stem, spec.block, spec.stride_on, spec.shortcut) == ("imagenet", "bottleneck", "1x1", "projection")
    assert (spec.layers, spec.stem_width, spec.stage_widths) == ((2, 1), 8, (16, 32))
    assert spec.head_layers == Head("flatten", ((16, "relu"),), softmax=True)
    assert spec.num_classes == 10 and spec.input_size == SIZE and loaded.format == "keras"
    assert rel_err(torch_outputs(loaded, inputs_nhwc()), saved["flatten", "outputs"]) <= 1e-4


def test_keras_gap_head_maps_to_the_default_head(saved):
    from edgeres.sources.loading import load_model
    from edgeres.model.zoo import Head

    loaded = load_model(saved["gap", ".h5"])
    assert loaded.spec.head_layers == Head()
    assert rel_err(torch_outputs(loaded, inputs_nhwc()), saved["gap", "outputs"]) <= 1e-4


def test_h5_and_keras_files_give_the_same_model(saved):
    from edgeres.sources.loading import load_model

    a, b = load_model(saved["flatten", ".keras"]), load_model(saved["flatten", ".h5"])
    assert a.spec == b.spec
    assert all(np.array_equal(a.state_dict[k].numpy(), b.state_dict[k].numpy()) for k in a.state_dict)


def test_keras_preprocessing_is_caffe_mode_in_the_spec(saved):
    from edgeres.sources.loading import load_model

    pre = load_model(saved["gap", ".keras"]).spec.preprocess
    assert (pre.channel_order, pre.scale, pre.std) == ("BGR", 1.0, (1.0, 1.0, 1.0))
    assert pre.mean == (103.939, 116.779, 123.68)
    img = np.full((1, SIZE, SIZE, 3), (10, 20, 30), np.uint8)  # R, G, B
    assert np.allclose(pre(img)[0, :, 0, 0], (30 - 103.939, 20 - 116.779, 10 - 123.68))


def test_global_max_pool_head_and_tf_keras_saved_model_map(keras3, tmp_path):
    tf_keras = pytest.importorskip("tf_keras")
    from edgeres.sources.loading import load_model

    model = keras_resnet_v1(tf_keras, "max", seed=3)
    model.save(tmp_path / "savedmodel")  # tf_keras: a SavedModel folder
    loaded = load_model(tmp_path / "savedmodel")
    assert loaded.spec.head_layers.pool == "max" and loaded.spec.head_layers.softmax
    assert rel_err(torch_outputs(loaded, inputs_nhwc()), np.asarray(model(inputs_nhwc(), training=False))) <= 1e-4


def test_arch_flag_must_agree_with_the_keras_model(saved):
    from edgeres.errors import InputError
    from edgeres.sources.loading import load_model

    with pytest.raises(InputError, match="not resnet50; omit --arch"):
        load_model(saved["gap", ".keras"], "resnet50")



def test_a_big_keras_model_maps_in_a_child_process_to_the_same_spec_and_weights(saved, monkeypatch, tmp_path):
    """Above ``KERAS_CHILD_BYTES`` (set to 0 here) the mapping runs in another process (TensorFlow stays out
    of the converting one): the same spec and tensors as mapping here, and its refusals as the same one line."""
    import torch

    from edgeres.errors import InputError
    from edgeres.sources import loading

    here = loading.load_model(saved["gap", ".keras"])
    monkeypatch.setattr(loading, "KERAS_CHILD_BYTES", 0)
    monkeypatch.setattr(loading, "map_keras_here", None)  # a mapping in this process would fail
    child = loading.load_model(saved["gap", ".keras"])
    assert child.spec == here.spec and child.sha256 == here.sha256
    assert list(child.state_dict) == list(here.state_dict)
    assert all(torch.equal(child.state_dict[k], v) and child.state_dict[k].dtype == v.dtype
               for k, v in here.state_dict.items())
    broken = tmp_path / "broken.keras"  # refused before TensorFlow loads: a cheap second child
    broken.write_bytes(b"not a zip")
    with pytest.raises(InputError, match="broken.keras.*re-save"):
        loading.load_model(broken)

# -- conversion ---------------------------------------------------------------------------------------

def test_flatten_head_converts_to_every_target_matching_keras(saved, npz32, tmp_path, cli):
    from edgeres.targets import get_target

    out = tmp_path / "bundle"
    r = cli("convert", saved["flatten", ".keras"], "--calib", npz32, "--targets", "onnx,openvino,tflite",
            "--precision", "fp32,int8", "--out", out, "--no-bench")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["format"] == "keras"
    assert manifest["arch"]["head_layers"] == {"pool": "flatten", "hidden": [[16, "relu"]], "softmax": True}
    assert manifest["preprocess"]["channel_order"] == "BGR"
    x = inputs_nhwc()
    ref = saved["flatten", "outputs"]
    for a in manifest["artifacts"]:
        assert a["status"] == "ok", a
        got = get_target(a["target"]).load_runner(out / a["files"][0])(x.transpose(0, 3, 1, 2).copy())
        assert got.shape == ref.shape and np.isfinite(got).all()
        if a["precision"] == "fp32":
            assert rel_err(got, ref) <= 1e-4, a["target"]
        else:  # int8 runs and still outputs a distribution
            assert np.allclose(got.sum(1), 1, atol=0.05), a["target"]


def test_gap_head_converts_fp32_matching_keras(saved, tmp_path, cli):
    from edgeres.targets import get_target

    out = tmp_path / "bundle"
    r = cli("convert", saved["gap", ".h5"], "--targets", "onnx,openvino,tflite", "--precision", "fp32",
            "--out", out, "--no-bench")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert "head_layers" not in manifest["arch"]  # the default head is recorded as before
    x = inputs_nhwc()
    for a in manifest["artifacts"]:
        got = get_target(a["target"]).load_runner(out / a["files"][0])(x.transpose(0, 3, 1, 2).copy())
        assert rel_err(got, saved["gap", "outputs"]) <= 1e-4, a["target"]


def test_flatten_head_prunes_with_the_dense_inputs_shrinking(saved):
    from edgeres.sources.loading import load_model
    from edgeres.compress.prune import PruneConfig, prune

    loaded = load_model(saved["flatten", ".keras"])
    outcome = prune(loaded.to_torch(), loaded.spec, PruneConfig(ratio=0.3, round_to=1))  # checks the rebuild itself
    spec = outcome.spec
    assert spec.stage_widths == (11, 22) and spec.head_layers == loaded.spec.head_layers
    assert outcome.state_dict["hidden.0.weight"].shape == (16, 22 * spec.feature_size**2)


# -- refusals -----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_keras_resnet50v2_maps_to_a_pre_activation_spec_exactly(keras3):
    """Issue 38 item 7 (refused before): the real ResNet50V2 at 32² maps to the zoo's pre-activation layout
    with Keras' own parameter count, tf-mode preprocessing, and the rebuilt torch model reproduces Keras."""
    from edgeres.model.zoo import ZOO, Head
    from edgeres.sources.keras_import import map_keras, verify_mapping

    model = keras3.applications.ResNet50V2(weights=None, input_shape=(SIZE, SIZE, 3), classes=3)
    randomize(model, np.random.default_rng(0))
    spec, sd = map_keras(model, "ResNet50V2")
    zoo = ZOO["resnet50v2"]
    assert spec.preact and spec.name == "resnet50v2-keras"
    assert (spec.layers, spec.stage_widths, spec.inner_widths) == (zoo.layers, zoo.stage_widths, zoo.inner_widths)
    assert spec.head_layers == Head("avg", (), True)
    assert spec.cost()["params"] == sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    pre = spec.preprocess
    assert (pre.size, pre.scale, pre.mean, pre.std, pre.channel_order) == (SIZE, 1 / 127.5, (1.0,) * 3, (1.0,) * 3, "RGB")
    assert verify_mapping(model, "ResNet50V2", spec, sd) <= 1e-4


def test_stride_2_same_padding_is_refused_in_one_line(keras3, tmp_path, cli):
    L = keras3.layers
    inputs = keras3.Input((SIZE, SIZE, 3))
    x = L.Activation("relu")(L.Conv2D(8, 7, strides=2, padding="same", name="stem")(inputs))
    model = keras3.Model(inputs, L.Dense(10)(L.GlobalAveragePooling2D()(x)))
    model.save(tmp_path / "same.keras")
    r = cli("inspect", tmp_path / "same.keras")
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Conv2D stem" in lines[0] and "'same' padding" in lines[0], r.stderr


def test_non_resnet_is_refused_with_what_failed(keras3, tmp_path):
    from edgeres.errors import InputError
    from edgeres.sources.loading import load_model

    L = keras3.layers
    model = keras3.Sequential([keras3.Input((SIZE, SIZE, 3)), L.Conv2D(8, 3, padding="same"), L.Activation("relu"),
                               L.Conv2D(8, 3, padding="same"), L.Flatten(), L.Dense(10)])
    model.save(tmp_path / "cnn.keras")
    with pytest.raises(InputError, match=r"found Flatten flatten\w*, expected ReLU or Add in a residual block"):
        load_model(tmp_path / "cnn.keras")


def test_lambda_layer_is_refused_before_loading(keras3, tmp_path):
    from edgeres.errors import InputError
    from edgeres.sources.loading import load_model

    inputs = keras3.Input((SIZE, SIZE, 3))
    model = keras3.Model(inputs, keras3.layers.Lambda(lambda t: t * 2)(inputs))
    model.save(tmp_path / "lambda.keras")
    with pytest.raises(InputError, match="Lambda layer.*nothing was executed"):
        load_model(tmp_path / "lambda.keras")


@pytest.mark.parametrize("name,content", [("bad.keras", b"PK\x03\x04 truncated"), ("bad.h5", b"\x89HDF\r\n junk")])
def test_corrupt_keras_file_exits_2_with_one_line(tmp_path, cli, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    r = cli("inspect", path)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and name in lines[0] and "re-save" in lines[0]


def test_weights_only_h5_is_refused_with_the_fix(keras3, saved, tmp_path):
    from edgeres.errors import InputError
    from edgeres.sources.loading import load_model

    model = keras3.saving.load_model(saved["gap", ".keras"])
    model.save_weights(tmp_path / "only.weights.h5")
    with pytest.raises(InputError, match=r"weights only .*model.save\('model.keras'\)"):
        load_model(tmp_path / "only.weights.h5")


# -- keras.applications ResNet50 itself -----------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("include_top", [False, True])
def test_keras_applications_resnet50_maps_exactly(keras3, include_top):
    from edgeres.sources.keras_import import map_keras, verify_mapping
    from edgeres.model.zoo import Head, get_spec

    L = keras3.layers
    if include_top:  # the stock head: avg_pool + Dense(1000, softmax)
        model = keras3.applications.ResNet50(weights=None, include_top=True)
    else:
        base = keras3.applications.ResNet50(weights=None, include_top=False, input_shape=(224, 224, 3))
        model = keras3.Sequential([base, L.Flatten(), L.Dense(256, activation="relu"), L.Dropout(0.5),
                                   L.Dense(10, activation="softmax")])
    randomize(model, np.random.default_rng(0))
    spec, sd = map_keras(model, "ResNet50")
    zoo = get_spec("resnet50")
    assert (spec.layers, spec.stage_widths, spec.inner_widths) == (zoo.layers, zoo.stage_widths, zoo.inner_widths)
    assert spec.stride_on == "1x1" and spec.input_size == 224
    assert spec.head_layers == (Head("avg", (), True) if include_top else Head("flatten", ((256, "relu"),), True))
    assert verify_mapping(model, "ResNet50", spec, sd) <= 1e-4


def test_head_cost_counts_every_parameter(saved):
    from edgeres.sources.loading import load_model

    loaded = load_model(saved["flatten", ".keras"])
    model = loaded.to_torch()
    assert loaded.spec.cost()["params"] == sum(p.numel() for p in model.parameters())


def test_default_head_is_not_recorded_so_older_specs_read_back_unchanged():
    from edgeres.model.zoo import ZOO, ResNetSpec

    for spec in ZOO.values():
        d = spec.to_dict()
        assert "head_layers" not in d and ResNetSpec.from_dict(d) == spec


def test_a_keras_head_round_trips_through_the_spec_record():
    from dataclasses import replace

    from edgeres.model.zoo import Head, ResNetSpec, get_spec

    spec = replace(get_spec("resnet50"), head_layers=Head("flatten", ((256, "relu"), (64, "linear")), True))
    assert ResNetSpec.from_dict(spec.to_dict()) == spec
    assert spec.head_in_features == 2048 * 7 * 7
