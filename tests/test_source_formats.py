"""Issue 38: the ResNets users hold, one row per source format. Each row makes a model file the way its
framework writes it (random weights, tiny widths, few classes), then: ``inspect`` reads it, ``convert``
builds int8 + fp32 for every target from one shared conversion, and every fp32 artifact reproduces the
source framework's own output on the same pixels (top-1 agreement 100 %).

Where the framework does not install beside our torch (torchvision, timm), the row's reference is that
framework's module written out here from its source (the same layers, the same state_dict keys).
With ``EDGERES_SOURCE_TABLE=FILE`` each row's result is appended to FILE as a JSON line:
``scripts/source_table.py`` turns them into the docs' table of inputs."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.conftest import in_process_argv, make_images

TARGETS = ("onnx", "openvino", "tflite")
IMAGES = 16  # pixels the fp32 agreement is checked on (also the calibration set)


# --- the sources' own modules, written from their source ------------------------------------------

def torchvision_resnet(layers, planes=8, *, block="bottleneck", groups=1, width_per_group=64, num_classes=4,
                       in_channels=3, resnet_d=False):
    """torchvision ``models/resnet.py``'s ResNet, as it builds ResNeXt (``width = int(planes *
    width_per_group / 64) * groups``; the 3×3 conv grouped), random weights and BatchNorm statistics.
    ``planes``: the stem's width (torchvision: 64); ``in_channels``: 1 for a greyscale model (its
    conv1 replaced, as users fine-tune one). ``resnet_d``: timm's ResNet-D as its ``resnet.py`` builds
    it (``stem_type="deep"``, ``avg_down=True``; timm does not install beside our torch): a stem of three
    3×3 convs (planes/2, planes/2, planes; the first /2) in ``conv1.0/.3/.6`` with BNs ``conv1.1/.4``, and
    shortcuts ``AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)`` → 1×1 conv → BN."""
    import torch
    from torch import nn

    from edgeres.model.torch_model import randomize_bn

    class BasicBlock(nn.Module):
        expansion = 1

        def __init__(self, inplanes, planes_, stride, downsample):
            super().__init__()
            self.conv1 = nn.Conv2d(inplanes, planes_, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes_)
            self.conv2 = nn.Conv2d(planes_, planes_, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes_)
            self.relu = nn.ReLU()
            self.downsample = downsample

        def forward(self, x):
            out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
            return self.relu(out + (x if self.downsample is None else self.downsample(x)))

    class Bottleneck(nn.Module):
        expansion = 4

        def __init__(self, inplanes, planes_, stride, downsample):
            super().__init__()
            width = int(planes_ * (width_per_group / 64.0)) * groups
            self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
            self.bn2 = nn.BatchNorm2d(width)
            self.conv3 = nn.Conv2d(width, planes_ * 4, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(planes_ * 4)
            self.relu = nn.ReLU()
            self.downsample = downsample

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            return self.relu(out + (x if self.downsample is None else self.downsample(x)))

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            if resnet_d:
                half = planes // 2
                self.conv1 = nn.Sequential(
                    nn.Conv2d(in_channels, half, 3, 2, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(),
                    nn.Conv2d(half, half, 3, 1, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(),
                    nn.Conv2d(half, planes, 3, 1, 1, bias=False))
            else:
                self.conv1 = nn.Conv2d(in_channels, planes, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.relu = nn.ReLU()
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            inplanes, kind = planes, BasicBlock if block == "basic" else Bottleneck
            for s, n in enumerate(layers):
                p, stride, blocks = planes * 2**s, 1 if s == 0 else 2, []
                out = p * kind.expansion
                for b in range(n):
                    down = None
                    if b == 0 and (stride != 1 or inplanes != out) and resnet_d:
                        pool = nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False) if stride != 1 else nn.Identity()
                        down = nn.Sequential(pool, nn.Conv2d(inplanes, out, 1, bias=False), nn.BatchNorm2d(out))
                    elif b == 0 and (stride != 1 or inplanes != out):
                        down = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))
                    blocks.append(kind(inplanes, p, stride if b == 0 else 1, down))
                    inplanes = out
                setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(inplanes, num_classes)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            for s in range(len(layers)):
                x = getattr(self, f"layer{s + 1}")(x)
            return self.fc(torch.flatten(self.avgpool(x), 1))

    torch.manual_seed(0)
    return randomize_bn(ResNet(), seed=1).eval()


def torch_reference(model) -> Callable[[np.ndarray], np.ndarray]:
    import torch

    def run(x_nchw: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x_nchw)).numpy()

    return run


# --- the rows -------------------------------------------------------------------------------------

@dataclass
class Made:
    """A model file as its framework wrote it, and that framework's logits on network inputs."""

    path: Path
    reference: Callable[[np.ndarray], np.ndarray]  # preprocessed N×C×H×W float32 → logits
    convert_args: tuple[str, ...] = ()
    expect: dict = field(default_factory=dict)  # what inspect must read off the file
    expect_preprocess: dict = field(default_factory=dict)  # what the manifest's preprocessing must hold
    # the framework's whole pipeline, its own preprocessing included: uint8 N×H×W×3 RGB → logits
    pipeline: Callable[[np.ndarray], np.ndarray] | None = None


def make_resnext(tmp: Path) -> Made:
    import torch

    model = torchvision_resnet((1, 1, 1, 1), groups=4, width_per_group=32)
    path = tmp / "resnext.pth"
    torch.save(model.state_dict(), path)
    return Made(path, torch_reference(model), expect={"groups": 4, "num_classes": 4})


def make_greyscale_at_64(tmp: Path) -> Made:
    """A greyscale (1-channel) 2-class ResNet-18 layout trained at 64²: a state_dict has no input size,
    so the user gives it; the resize keeps 224/256, floored as timm does (64 · 256 / 224 = 73.1 → 73)."""
    import torch

    model = torchvision_resnet((2, 2, 2, 2), block="basic", num_classes=2, in_channels=1)
    path = tmp / "xray_resnet18.pth"
    torch.save(model.state_dict(), path)
    return Made(path, torch_reference(model), ("--preprocess", "crop=64"),
                expect={"in_channels": 1, "num_classes": 2},
                expect_preprocess={"size": 64, "resize": 73, "channel_order": "L", "mean": [0.449], "std": [0.226]})


def make_timm_resnet26d(tmp: Path) -> Made:
    """timm's ``resnet26d`` layout (deep stem, average-pool shortcuts), at 40² so the pools meet odd sides
    (5 → 3 → 2: ceil mode, padding not counted)."""
    import torch

    model = torchvision_resnet((2, 2, 2, 2), resnet_d=True)
    path = tmp / "resnet26d.pth"
    torch.save({"state_dict": model.state_dict()}, path)
    return Made(path, torch_reference(model), ("--preprocess", "crop=40"), expect={"arch": "resnet26d-custom"},
                expect_preprocess={"size": 40, "resize": 45, "filter": "bicubic"})


def make_resnext_onnx(tmp: Path) -> Made:
    """A ResNeXt exported by torch.onnx.export at 32² (its grouped convs are ONNX Conv group=4)."""
    import warnings

    import torch

    model = torchvision_resnet((1, 1, 1, 1), groups=4, width_per_group=32)
    path = tmp / "resnext.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, 32, 32),), str(path), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}}, opset_version=17, dynamo=False)
    return Made(path, torch_reference(model), expect={"groups": 4}, expect_preprocess={"size": 32, "resize": 36})


def hf_resnet(folder: Path, *, layer_type="bottleneck", num_labels=3, edge=32):
    """A ResNetForImageClassification saved by the real transformers (random weights, small config)
    with the ConvNeXt image processor ResNet checkpoints ship (shortest edge, crop_pct, bicubic)."""
    import torch
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

    from edgeres.model.torch_model import randomize_bn

    names = ["tabby", "tench", "eel", "ibis"][:num_labels]
    cfg = ResNetConfig(embedding_size=8, hidden_sizes=[16, 32, 64, 64], depths=[1, 1, 1, 1], layer_type=layer_type,
                       num_labels=num_labels, id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    torch.manual_seed(0)
    model = randomize_bn(ResNetForImageClassification(cfg), seed=1).eval()
    model.save_pretrained(folder)
    processor = ConvNextImageProcessor(size={"shortest_edge": edge}, crop_pct=0.875, image_mean=[0.485, 0.456, 0.406],
                                       image_std=[0.229, 0.224, 0.225])  # as microsoft/resnet-50 ships it
    processor.save_pretrained(folder)

    def reference(x):
        with torch.no_grad():
            return model(pixel_values=torch.from_numpy(x)).logits.numpy()

    def pipeline(images):
        x = processor(images=list(images), return_tensors="np")["pixel_values"].astype(np.float32)
        return reference(x)

    return model, reference, pipeline, names


def make_hf(tmp: Path) -> Made:
    folder = tmp / "hf-resnet"
    _, reference, pipeline, names = hf_resnet(folder)
    return Made(folder, reference, expect={"num_classes": 3, "labels": names},
                expect_preprocess={"size": 32, "resize": 36, "filter": "bicubic", "antialias": True,
                                   "mean": [0.485, 0.456, 0.406]},
                pipeline=pipeline)


def make_keras_resnet_v2(tmp: Path) -> Made:
    """A pre-activation ResNet saved by Keras 3, built by the code that builds ResNet50V2/101V2/152V2
    (``resnet.ResNet(stack_fn, preact=True, use_bias=True)`` over ``stack_residual_blocks_v2``, whose last
    stack does not stride) at tiny widths and 32², random weights and BN statistics; its own pipeline is
    ``resnet_v2.preprocess_input`` (tf mode) on the same crops."""
    import keras
    from keras.applications.resnet_v2 import preprocess_input
    from keras.src.applications import resnet  # ResNet50V2's builder: the public functions fix the widths

    from tests.test_keras_import import randomize

    def stack_fn(x):
        x = resnet.stack_residual_blocks_v2(x, 4, 2, name="conv2")
        x = resnet.stack_residual_blocks_v2(x, 8, 2, name="conv3")
        return resnet.stack_residual_blocks_v2(x, 16, 2, stride1=1, name="conv4")

    model = resnet.ResNet(stack_fn, True, True, name="resnet_v2_tiny", weights=None, input_shape=(32, 32, 3), classes=3)
    randomize(model, np.random.default_rng(0))
    path = tmp / "resnet_v2.keras"
    model.save(path)

    def reference(x_nchw):
        return np.asarray(model(x_nchw.transpose(0, 2, 3, 1), training=False))

    def pipeline(images):
        from edgeres.model.zoo import KERAS_TF_PREPROCESS

        crops = replace(KERAS_TF_PREPROCESS, size=32, resize=37).geometry(images).astype(np.float32)
        return np.asarray(model(preprocess_input(crops), training=False))

    return Made(path, reference, expect={"arch": "resnet20v2-keras", "preact": True, "num_classes": 3},
                expect_preprocess={"size": 32, "resize": 37, "scale": 1 / 127.5, "mean": [1.0] * 3, "std": [1.0] * 3,
                                   "channel_order": "RGB"},
                pipeline=pipeline)


@dataclass(frozen=True)
class Row:
    source: str  # the row's name in the docs' table
    read: str  # what edgeres reads from the file
    preprocess: str  # the preprocessing it records (read, or assumed where the file has none)
    make: Callable[[Path], Made]
    targets: tuple[str, ...] = TARGETS  # converted int8 + fp32, each fp32 artifact checked against the source


TORCHVISION_PREPROCESS = ("assumed: torchvision's ImageNet convention (shorter side 256, centre crop 224, bilinear "
                          "antialiased, ImageNet mean/std); `--preprocess` sets it")


ROWS = {
    "torchvision-resnext": Row("torchvision ResNeXt (`resnext50_32x4d` layout) `.pth`",
                               "groups and widths from the weight shapes", TORCHVISION_PREPROCESS, make_resnext),
    "torchvision-greyscale": Row("torchvision-layout greyscale ResNet-18 (1 input channel) `.pth`, `--preprocess crop=64`",
                                 "input channels from conv1; the input size as given",
                                 "assumed: Pillow `convert(\"L\")` before the resize, mean 0.449 / std 0.226; the resize "
                                 "keeps 224/256 floored (64 → 73)", make_greyscale_at_64),
    "onnx-resnext": Row("ONNX export of a ResNeXt (`torch.onnx.export`, opset 17)",
                        "the graph mapped back to spec + weights (grouped Conv nodes included), then run beside it",
                        "assumed: torchvision's ImageNet convention scaled to the graph's input size (32 → 36, floored)",
                        make_resnext_onnx),
    "timm-resnet-d": Row("timm ResNet-D (`resnet26d`/`resnet50d` layout: deep stem, average-pool shortcut) `.pth`",
                         "deep stem and shortcut kind from the keys; widths from the shapes",
                         "assumed: timm's for those weights (shorter side floor(size / 0.875), centre crop, Pillow "
                         "bicubic, ImageNet mean/std)", make_timm_resnet26d),
    "huggingface": Row("Hugging Face `ResNetForImageClassification` folder (`save_pretrained`: config.json + "
                       "model.safetensors or pytorch_model.bin)",
                       "widths and depths from the weights; class names from `id2label`; preprocessing from "
                       "`preprocessor_config.json`",
                       "read: shorter side `int(shortest_edge / crop_pct)`, centre crop, Pillow bicubic, rescale, "
                       "mean/std (HF's processor output matched on the test's pixels)", make_hf),
    "keras-resnet-v2": Row("Keras pre-activation ResNet (`ResNet50V2`/`101V2`/`152V2` layout) `.keras`/`.h5`",
                           "the layer graph mapped to a pre-activation spec + weights (BN before each block, conv "
                           "biases, post BN), then run beside it",
                           "assumed: `keras.applications.resnet_v2.preprocess_input` (RGB, x / 127.5 − 1), shorter "
                           "side size·256/224 + centre crop (the ImageNet evaluation convention)",
                           make_keras_resnet_v2, (*TARGETS, "executorch")),
}


# --- one shared conversion per row ----------------------------------------------------------------

runner = CliRunner()


def invoke(*args):
    r = runner.invoke(__import__("edgeres.cli", fromlist=["app"]).app, in_process_argv(args))
    return r.exit_code, r.stdout, r.stderr


@dataclass
class Converted:
    row: Row
    made: Made
    inspect: dict
    bundle: Path
    manifest: dict
    pixels: np.ndarray


@pytest.fixture(scope="module", params=list(ROWS))
def converted(request, tmp_path_factory) -> Converted:
    row = ROWS[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    made = row.make(tmp)
    code, out, err = invoke("inspect", made.path, "--json")
    assert code == 0, err
    info = json.loads(out)
    x, y = make_images(IMAGES, 40, seed=3, classes=2)
    np.savez(tmp / "pixels.npz", x=x, y=y)
    bundle = tmp / "bundle"
    code, _, err = invoke("convert", made.path, "--calib", tmp / "pixels.npz", "--targets", ",".join(row.targets),
                          "--precision", "fp32,int8", "--no-bench", "--out", bundle, *made.convert_args)
    assert code == 0, err
    return Converted(row, made, info, bundle, json.loads((bundle / "manifest.json").read_text()), x)


def _artifact_outputs(c: Converted) -> dict:
    from edgeres.calibration.preprocess import Preprocess
    from edgeres.targets import get_target

    pre = Preprocess.from_dict(c.manifest["preprocess"]).with_layout("NCHW")
    x = pre(c.pixels)
    out = {"reference": c.made.reference(x)}
    for a in c.manifest["artifacts"]:
        assert a["status"] == "ok", a
        out[a["target"], a["precision"]] = get_target(a["target"]).load_runner(c.bundle / a["files"][0])(x)
    return out


def test_inspect_reads_the_architecture_off_the_file(converted):
    for key, value in converted.made.expect.items():
        assert converted.inspect[key] == value, key


def test_the_manifest_records_the_preprocessing_read_or_given(converted):
    for key, value in converted.made.expect_preprocess.items():
        assert converted.manifest["preprocess"][key] == value, key


def test_the_python_app_prepares_an_image_as_the_bundle_does(converted):
    """What the exported app computes from a photo is what calibration and eval computed (greyscale too)."""
    from edgeres.app import classify_template as app
    from edgeres.calibration.preprocess import Preprocess

    pre = Preprocess.from_dict(converted.manifest["preprocess"])
    app.CONFIG.update(preprocess=converted.manifest["preprocess"], input={"pixels": False, "layout": "NCHW", "dtype": "float32"})
    photo = make_images(1, 97, seed=5)[0][0][:, :80]  # not square, larger than the input
    np.testing.assert_array_equal(app.model_input(app.geometry(photo)), pre.with_layout("NCHW")(photo[None]))


def test_every_target_converts_int8_and_fp32(converted):
    built = {(a["target"], a["precision"]): a["status"] for a in converted.manifest["artifacts"]}
    assert built == {(t, p): "ok" for t in converted.row.targets for p in ("fp32", "int8")}


def test_fp32_artifacts_reproduce_the_source_framework_on_the_same_pixels(converted):
    outputs = _artifact_outputs(converted)
    ref = outputs.pop("reference")
    assert ref.std(0).max() > 0  # the random model tells the images apart
    result = {"row": converted.row.source, "read": converted.row.read, "preprocess": converted.row.preprocess,
              "targets": {}}
    for (target, precision), got in outputs.items():
        assert got.shape == ref.shape and np.isfinite(got).all(), target
        agree = float((got.argmax(1) == ref.argmax(1)).mean() * 100)
        err = float(np.abs(got - ref).max() / max(1.0, np.abs(ref).max()))
        result["targets"][f"{target}-{precision}"] = {"agreement_pct": agree, "rel_err": err}
        if precision == "fp32":
            assert agree == 100.0 and err <= 2e-3, (target, err)
    if converted.made.pipeline is not None:  # the framework's own preprocessing on the same photos, too
        framework = converted.made.pipeline(converted.pixels)
        for (target, precision), got in outputs.items():
            if precision == "fp32":
                assert (got.argmax(1) == framework.argmax(1)).all(), target
                assert np.abs(got - framework).max() / max(1.0, np.abs(framework).max()) <= 2e-3, target
        result["framework_preprocessing"] = True
    table = os.environ.get("EDGERES_SOURCE_TABLE")
    if table:
        with open(table, "a") as f:
            f.write(json.dumps(result) + "\n")


# --- refusals that name the real reason -----------------------------------------------------------

def test_resnext_weights_under_a_plain_resnet_arch_name_the_grouped_convs(tmp_path):
    import torch

    from edgeres.errors import InputError
    from edgeres.sources.loading import load_model

    path = tmp_path / "resnext.pth"
    torch.save(torchvision_resnet((3, 4, 6, 3), planes=64, groups=32, width_per_group=4).state_dict(), path)
    assert load_model(path).spec.name == "resnext50_32x4d"
    with pytest.raises(InputError, match=r"3×3 convs in 32 groups \(ResNeXt\) but --arch resnet50 has plain"):
        load_model(path, "resnet50")


def test_pruning_a_resnext_is_refused_in_one_line_naming_the_grouped_convs(tmp_path):
    made = make_resnext(tmp_path)
    code, _, err = invoke("prune", made.path, "--ratio", "0.3", "--out", tmp_path / "p.pt")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "grouped 3×3 convs (groups 4, ResNeXt)" in lines[0] and "convert it unpruned" in lines[0]
    assert not (tmp_path / "p.pt").exists()


def test_greyscale_preprocessing_is_pillows_convert_L_before_the_resize():
    from PIL import Image

    from edgeres.calibration.preprocess import Preprocess

    photo = make_images(1, 90, seed=7)[0][0]
    pre = Preprocess(size=64, resize=73, channel_order="L", mean=(0.449,), std=(0.226,))
    grey = Image.fromarray(photo).convert("L")
    resized = np.asarray(grey.resize((73, 73), Image.BILINEAR))  # square photo: both sides 73
    crop = resized[4:68, 4:68].astype(np.float32) / 255
    np.testing.assert_allclose(pre(photo[None])[0, 0], (crop - 0.449) / 0.226, atol=1e-6)


def test_an_input_size_is_refused_where_the_file_fixes_it(tiny_checkpoint, tmp_path):
    from edgeres.convert.config import apply_preprocess_override
    from edgeres.errors import InputError
    from edgeres.model.zoo import IMAGENET_PREPROCESS

    assert apply_preprocess_override(IMAGENET_PREPROCESS, {"crop": 160}).resize == 182  # timm: floor(160 / 0.875)
    assert apply_preprocess_override(IMAGENET_PREPROCESS, {"crop": 160, "resize": 160}).resize == 160
    with pytest.raises(InputError, match=r"crop=160: the model takes 224×224 inputs \(the onnx model's input shape\)"):
        apply_preprocess_override(IMAGENET_PREPROCESS, {"crop": 160}, size_fixed_by="the onnx model's input shape")


def test_a_model_with_four_input_channels_is_refused_naming_them(tmp_path):
    import torch

    from edgeres.errors import InputError
    from edgeres.sources.loading import load_model

    path = tmp_path / "rgba.pth"
    torch.save(torchvision_resnet((1, 1), block="basic", in_channels=4).state_dict(), path)
    with pytest.raises(InputError, match=r"takes 4 input channels; edgeres converts colour \(3\) and greyscale \(1\)"):
        load_model(path)


def test_hf_folder_with_pytorch_model_bin_reads_like_the_safetensors_one(tmp_path):
    import torch

    from edgeres.sources.loading import load_model

    folder = tmp_path / "hf"
    hf_resnet(folder, layer_type="basic", num_labels=2)
    a = load_model(folder)
    sd = {k: v for k, v in __import__("safetensors.torch", fromlist=["load_file"]).load_file(folder / "model.safetensors").items()}
    (folder / "model.safetensors").unlink()
    torch.save(sd, folder / "pytorch_model.bin")
    b = load_model(folder)
    assert a.spec == b.spec and a.spec.block == "basic" and b.format == "huggingface"
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    assert load_model(folder / "pytorch_model.bin").spec == a.spec  # the weights file of the folder: the folder


def test_hf_weights_without_their_folder_are_refused_naming_the_folder(tmp_path):
    import shutil

    from edgeres.errors import InputError
    from edgeres.sources.loading import load_model

    hf_resnet(tmp_path / "hf", num_labels=2)
    shutil.copy(tmp_path / "hf" / "model.safetensors", tmp_path / "alone.safetensors")
    with pytest.raises(InputError, match="Hugging Face ResNetForImageClassification's weights.*give the save_pretrained folder"):
        load_model(tmp_path / "alone.safetensors")


# --- item 8: what each framework's loader does, repeated by a --preprocess setting ------------------

def test_direct_nearest_is_keras_load_img_and_direct_bilinear_unantialiased_is_tf_image_resize(tmp_path):
    """The docs' resize table: ``mode=direct,filter=nearest`` is ``keras.utils.load_img(target_size=…)``
    exactly; ``mode=direct,filter=bilinear,antialias=false`` is ``tf.image.resize`` (what
    ``image_dataset_from_directory`` uses) to within the uint8 rounding edgeres resizes into."""
    import keras
    import tensorflow as tf
    from PIL import Image

    from edgeres.calibration.preprocess import Preprocess

    photo = make_images(1, 131, seed=9)[0][0][:97]
    Image.fromarray(photo).save(tmp_path / "photo.png")
    loaded = np.asarray(keras.utils.load_img(tmp_path / "photo.png", target_size=(32, 32)))
    nearest = Preprocess(size=32, resize_mode="direct", filter="nearest").geometry(photo[None])[0]
    np.testing.assert_array_equal(nearest, loaded)
    antialiased = Preprocess(size=32, resize_mode="direct", filter="bilinear").geometry(photo[None])[0]
    assert (antialiased != loaded).mean() > 0.5  # the default bilinear is not load_img's way
    tf_resized = tf.image.resize(photo[None].astype(np.float32), (32, 32), method="bilinear", antialias=False).numpy()[0]
    plain = Preprocess(size=32, resize_mode="direct", filter="bilinear", antialias=False).geometry(photo[None])[0]
    assert np.abs(plain - tf_resized).max() <= 1.0


def test_timm_resnet50d_state_dict_is_the_zoo_entry_and_refuses_pruning(tmp_path):
    import torch

    from edgeres.compress.prune import check_prunable
    from edgeres.errors import InputError
    from edgeres.model.zoo import ZOO
    from edgeres.sources.loading import load_model

    path = tmp_path / "resnet50d.pth"
    torch.save(torchvision_resnet((3, 4, 6, 3), planes=64, resnet_d=True, num_classes=1000).state_dict(), path)
    loaded = load_model(path)
    assert loaded.spec == ZOO["resnet50d"] and ZOO["resnet50d"].cost()["params"] == 25_576_264  # timm's count
    with pytest.raises(InputError, match="pruning refused: resnet50d is a ResNet-D"):
        check_prunable(loaded.spec)


def test_pruning_a_pre_activation_resnet_is_refused_naming_it():
    from edgeres.compress.prune import check_prunable
    from edgeres.errors import InputError
    from edgeres.model.zoo import ZOO

    with pytest.raises(InputError, match=r"pruning refused: resnet50v2 is a pre-activation ResNet \(v2\).*convert it unpruned"):
        check_prunable(ZOO["resnet50v2"])


def test_a_pre_activation_state_dict_reads_back_and_the_weight_improvements_refuse_it(tmp_path):
    """An edgeres pre-activation model's state_dict (``post_bn``) infers as one; ``--quant accurate`` pairs convs
    with the BN after them, which a pre-activation block does not have: refused before any work."""
    import torch

    from edgeres.model.torch_model import build_torch, randomize_bn
    from edgeres.model.zoo import ZOO
    from edgeres.sources.loading import load_model

    spec = replace(ZOO["resnet50v2"], layers=(1, 2), stem_width=8, stage_widths=(16, 32),
                   inner_widths=(((4, 4),), ((8, 8), (8, 8))), num_classes=2)
    torch.save(randomize_bn(build_torch(spec)).state_dict(), tmp_path / "v2.pth")
    loaded = load_model(tmp_path / "v2.pth")
    assert loaded.spec.preact and loaded.spec.name == "resnet11v2-custom" and loaded.spec.preprocess.scale == 1 / 127.5
    x, y = make_images(IMAGES, 40, seed=3, classes=2)
    np.savez(tmp_path / "px.npz", x=x, y=y)
    code, _, err = invoke("convert", tmp_path / "v2.pth", "--calib", tmp_path / "px.npz", "--targets", "onnx",
                          "--precision", "int8", "--quant", "accurate", "--preprocess", "crop=32", "--no-bench",
                          "--out", tmp_path / "b")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "--quant accurate: resnet11v2-custom is a pre-activation ResNet (v2)" in lines[0] and "--quant fast" in lines[0]
    assert not (tmp_path / "b").exists()


def test_a_hf_folder_given_where_a_bundle_is_expected_is_named_as_such(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "resnet"}')
    x, y = make_images(4, 16)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    code, _, err = invoke("eval", tmp_path / "hf", "--data", tmp_path / "data.npz")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "is a Hugging Face model folder, not an edgeres bundle; convert it first" in lines[0]


def test_a_greyscale_onnx_export_maps_with_one_input_channel(tmp_path):
    import warnings

    import torch

    from edgeres.sources.loading import load_model

    model = torchvision_resnet((1, 1), block="basic", in_channels=1, num_classes=2)
    path = tmp_path / "grey.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 1, 32, 32),), str(path), opset_version=17, dynamo=False)
    loaded = load_model(path)  # the mapping is run beside the graph on random inputs
    assert loaded.spec.in_channels == 1 and loaded.spec.preprocess.channel_order == "L"


def test_executorch_compiles_a_greyscale_model_from_the_same_torch_builder(tmp_path):
    """The torch.export source takes the spec's input channels (it exported a 3-channel example before)."""
    pytest.importorskip("executorch")
    import torch

    from edgeres.calibration.preprocess import Preprocess
    from edgeres.targets import get_target

    model = torchvision_resnet((1, 1), block="basic", in_channels=1, num_classes=2)
    torch.save(model.state_dict(), tmp_path / "grey.pth")
    x, y = make_images(IMAGES, 40, seed=3, classes=2)
    np.savez(tmp_path / "px.npz", x=x, y=y)
    code, _, err = invoke("convert", tmp_path / "grey.pth", "--calib", tmp_path / "px.npz", "--targets", "executorch",
                          "--precision", "fp32", "--preprocess", "crop=40", "--no-bench", "--out", tmp_path / "b")
    assert code == 0, err
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    (artifact,) = manifest["artifacts"]
    assert artifact["status"] == "ok", artifact
    inputs = Preprocess.from_dict(manifest["preprocess"]).with_layout("NCHW")(x)
    got = get_target("executorch").load_runner(tmp_path / "b" / artifact["files"][0])(inputs)
    np.testing.assert_allclose(got, torch_reference(model)(inputs), rtol=1e-4, atol=1e-4)


def test_executorch_delegates_a_resnet_d_whose_pools_meet_even_sides(tmp_path):
    """At 64² every ResNet-D shortcut pool sees an even side, where ceil mode changes nothing: built without it,
    XNNPACK takes the average pools (it refuses ceil mode) and the artifact reproduces timm's layout."""
    pytest.importorskip("executorch")
    import torch

    from edgeres.calibration.preprocess import Preprocess
    from edgeres.targets import get_target

    model = torchvision_resnet((1, 1, 1, 1), resnet_d=True)
    torch.save(model.state_dict(), tmp_path / "r26d.pth")
    x, y = make_images(IMAGES, 70, seed=3, classes=2)
    np.savez(tmp_path / "px.npz", x=x, y=y)
    code, _, err = invoke("convert", tmp_path / "r26d.pth", "--calib", tmp_path / "px.npz", "--targets", "executorch",
                          "--precision", "fp32", "--preprocess", "crop=64", "--no-bench", "--out", tmp_path / "b")
    assert code == 0, err
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    (artifact,) = manifest["artifacts"]
    assert artifact["status"] == "ok", artifact
    inputs = Preprocess.from_dict(manifest["preprocess"]).with_layout("NCHW")(x)
    got = get_target("executorch").load_runner(tmp_path / "b" / artifact["files"][0])(inputs)
    np.testing.assert_allclose(got, torch_reference(model)(inputs), rtol=1e-4, atol=1e-4)
