"""TFLite (LiteRT) target: Keras rebuild from the spec, conversion per precision, op report, runner."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from conftest import EDGERES_STAGES, ROOT, tiny_spec

pytest.importorskip("tensorflow")
pytest.importorskip("ai_edge_litert")


def _torch_logits(model, x_nchw: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(x_nchw)).numpy()


def _rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def _inputs(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


def _compile(tmp: Path, spec, model, precision: str, calib_npz: Path | None = None, calib_images: int | None = None,
             estimator: str | None = None, reference_activations: Path | None = None, **options):
    from edgeres.calibration import open_dataset
    from edgeres.model.keras_model import build_keras
    from edgeres.targets import tflite
    from edgeres.targets.base import KERAS, CompileJob

    calibration = None
    if calib_npz is not None:
        ds = open_dataset(calib_npz)

        def calibration(layout="NCHW", batch_size=32):
            return (x for x, _ in ds.batches(spec.preprocess.with_layout(layout), batch_size, calib_images))

    job = CompileJob(onnx_fp32=tmp / "unused.onnx", out_dir=tmp, precision=precision, calibration=calibration,
                     sources={KERAS: lambda: build_keras(spec, model.state_dict())}, options=options,
                     preprocess=spec.preprocess.to_dict(), labels=spec.labels, estimator=estimator,
                     reference_activations=str(reference_activations) if reference_activations else None)
    return tflite.compile(job)


@pytest.fixture(scope="module")
def tiny_artifacts(tmp_path_factory, tiny_model, tiny_npz):
    """fp32, float-I/O full-int8 and uint8-I/O full-int8 of the tiny model, compiled once."""
    spec, model = tiny_model
    out = {}
    for key, precision, options in (("fp32", "fp32", {}), ("int8", "int8", {}), ("uint8", "int8", {"io": "uint8"})):
        tmp = tmp_path_factory.mktemp(f"tflite-{key}")
        out[key] = (tmp, _compile(tmp, spec, model, precision, tiny_npz, **options))
    return out


# -- Keras rebuild ---------------------------------------------------------------------------------

def _imagenet_bottleneck_spec(stride_on: str, size: int):
    from edgeres.calibration import Preprocess
    from edgeres.model.zoo import get_spec

    spec = get_spec("resnet50", num_classes=7)
    return replace(spec, name="resnet-tiny-bottleneck", layers=(1, 2), stem_width=8, stage_widths=(16, 24),
                   inner_widths=(((8, 8),), ((8, 8), (16, 8))), stride_on=stride_on,
                   preprocess=Preprocess(size=size))


@pytest.mark.parametrize("stride_on,size", [("3x3", 32), ("1x1", 37)])
def test_keras_imagenet_bottleneck_projection_matches_torch(stride_on, size):
    import torch

    from edgeres.model.keras_model import build_keras
    from edgeres.model.torch_model import build_torch, randomize_bn

    spec = _imagenet_bottleneck_spec(stride_on, size)
    torch.manual_seed(1)
    model = randomize_bn(build_torch(spec), seed=1)
    x = _inputs(3, size)
    keras_logits = build_keras(spec, model.state_dict())(x.transpose(0, 2, 3, 1)).numpy()
    assert _rel_err(keras_logits, _torch_logits(model, x)) < 1e-5


def test_keras_cifar_option_a_matches_torch_on_odd_input(tiny_model):
    from edgeres.model.keras_model import build_keras
    from edgeres.model.torch_model import build_torch
    from edgeres.calibration import Preprocess

    spec, model = tiny_model
    odd = replace(spec, preprocess=Preprocess(size=15))  # odd sizes: [::2] keeps ceil(H/2) rows in both
    odd_model = build_torch(odd)
    odd_model.load_state_dict(model.state_dict())
    x = _inputs(2, 15)
    keras_logits = build_keras(odd, model.state_dict())(x.transpose(0, 2, 3, 1)).numpy()
    assert _rel_err(keras_logits, _torch_logits(odd_model, x)) < 1e-5


def test_keras_option_a_with_uneven_channel_padding_matches_torch(tiny_model):
    from edgeres.model.keras_model import build_keras
    from edgeres.model.torch_model import build_torch, randomize_bn

    spec, _ = tiny_model
    # pruned-looking widths: 8→12 pads 2/2 at stride 1, 12→21 pads 4/5 and 21→32 pads 5/6 at stride 2
    pruned = spec.with_widths(8, (12, 21, 32), (((10,),), ((14,),), ((19,),)), name="resnet8-pruned")
    model = randomize_bn(build_torch(pruned), seed=2)
    x = _inputs(2, pruned.input_size)
    keras_logits = build_keras(pruned, model.state_dict())(x.transpose(0, 2, 3, 1)).numpy()
    assert _rel_err(keras_logits, _torch_logits(model, x)) < 1e-5


def test_calibration_data_error_keeps_its_type(tmp_path, tiny_model):
    from edgeres.calibration import DataError
    from edgeres.model.keras_model import build_keras
    from edgeres.targets import tflite
    from edgeres.targets.base import KERAS, CompileJob

    spec, model = tiny_model

    def broken_calibration(layout="NCHW", batch_size=32):
        raise DataError("calib.npz: image 3 is truncated")
        yield  # pragma: no cover - makes this a generator

    job = CompileJob(onnx_fp32=tmp_path / "unused.onnx", out_dir=tmp_path, precision="int8",
                     calibration=broken_calibration, sources={KERAS: lambda: build_keras(spec, model.state_dict())})
    with pytest.raises(DataError, match="truncated"):
        tflite.compile(job)


# -- conversion ------------------------------------------------------------------------------------

def test_tflite_fp32_matches_torch_logits(tiny_model, tiny_artifacts):
    from edgeres.targets import tflite

    spec, model = tiny_model
    tmp, artifact = tiny_artifacts["fp32"]
    x = _inputs(5, spec.input_size)
    logits = tflite.load_runner(tmp / artifact.file)(x)
    assert _rel_err(logits, _torch_logits(model, x)) < 1e-4


def test_artifact_lists_model_then_op_report_and_sidecar(tiny_artifacts):
    tmp, artifact = tiny_artifacts["int8"]
    assert artifact.files == ("tflite/model.int8.tflite", "tflite/model.int8.ops.json", "tflite/model.int8.json")
    assert artifact.engine == "keras-from-spec + LiteRT converter"
    assert artifact.options["io"] == "float" and artifact.options["representative_images"] == 64
    assert all((tmp / f).is_file() for f in artifact.files)


def test_full_int8_op_report_has_only_int8_compute_ops(tiny_artifacts):
    tmp, artifact = tiny_artifacts["int8"]
    report = json.loads((tmp / artifact.files[1]).read_text())
    assert report["float_compute_ops"] == []
    compute = {op: dtypes for op, dtypes in report["summary"].items() if op not in ("QUANTIZE", "DEQUANTIZE")}
    assert {"CONV_2D", "ADD", "MEAN", "FULLY_CONNECTED", "STRIDED_SLICE", "PAD"} <= set(compute)
    assert all(set(d) == {"int8"} for d in compute.values()), compute
    assert report["summary"]["QUANTIZE"] == {"float32->int8": 1}


def test_float_compute_op_in_full_int8_is_an_error(tiny_artifacts):
    from edgeres.targets.base import TargetError
    from edgeres.targets.tflite import check_full_int8, op_report

    tmp, artifact = tiny_artifacts["fp32"]
    with pytest.raises(TargetError, match="still computes in float.*CONV_2D"):
        check_full_int8(op_report(tmp / artifact.file))


def test_full_int8_io_type_must_match_the_request(tiny_artifacts):
    from edgeres.targets.base import TargetError
    from edgeres.targets.tflite import check_full_int8, op_report

    tmp, artifact = tiny_artifacts["int8"]
    with pytest.raises(TargetError, match="input is float32, expected uint8"):
        check_full_int8(op_report(tmp / artifact.file), io="uint8")


def test_io_uint8_model_takes_uint8_and_runs_like_float_io(tiny_model, tiny_artifacts):
    from edgeres.targets import tflite

    spec, _ = tiny_model
    tmp_u8, u8 = tiny_artifacts["uint8"]
    tmp_f, f = tiny_artifacts["int8"]
    sidecar = json.loads((tmp_u8 / u8.files[2]).read_text())
    assert u8.input_dtype == "uint8" and sidecar["input"]["dtype"] == "uint8"
    assert sidecar["input"]["quantization"]["scale"] > 0 and sidecar["output"]["dtype"] == "uint8"
    x = _inputs(8, spec.input_size, seed=3)
    a, b = tflite.load_runner(tmp_u8 / u8.file)(x), tflite.load_runner(tmp_f / f.file)(x)
    assert a.dtype == np.float32 and a.shape == b.shape
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.75
    assert np.abs(a - b).max() < 0.1 * np.abs(b).max()


def test_sidecar_carries_labels_and_nhwc_preprocessing(tiny_model, tiny_artifacts):
    spec, _ = tiny_model
    tmp, artifact = tiny_artifacts["int8"]
    sidecar = json.loads((tmp / artifact.files[2]).read_text())
    assert sidecar["labels"] == list(spec.labels)
    assert sidecar["layout"] == "NHWC" and sidecar["preprocess"]["layout"] == "NHWC"
    assert sidecar["preprocess"]["mean"] == list(spec.preprocess.mean) and sidecar["input_size"] == spec.input_size


def test_runner_handles_changing_batch_sizes(tiny_model, tiny_artifacts):
    from edgeres.targets import tflite

    spec, _ = tiny_model
    tmp, artifact = tiny_artifacts["fp32"]
    runner = tflite.load_runner(tmp / artifact.file, threads=1)
    x = _inputs(7, spec.input_size, seed=5)
    whole = runner(x)
    parts = np.concatenate([runner(x[:1]), runner(x[1:4]), runner(x[4:])])
    assert whole.shape == (7, spec.num_classes)
    np.testing.assert_allclose(parts, whole, rtol=1e-5, atol=1e-5)


def test_unknown_tflite_option_is_rejected(tmp_path, tiny_model):
    from edgeres.targets.base import TargetError

    spec, model = tiny_model
    with pytest.raises(TargetError, match="unknown option.*tflite.iio"):
        _compile(tmp_path, spec, model, "fp32", iio="uint8")


# -- bundle ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tflite_bundle(tmp_path_factory, tiny_checkpoint, tiny_npz):
    from conftest import run_cli

    out = tmp_path_factory.mktemp("bundle") / "b"
    r = run_cli("convert", tiny_checkpoint, "--calib", tiny_npz, "--targets", "tflite", "--precision", "int8,fp32",
                "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_convert_then_eval_reports_tflite_fp32_equal_to_reference(cli, tflite_bundle, tiny_npz):
    r = cli("eval", tflite_bundle, "--data", tiny_npz, "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    by_precision = {a["precision"]: a for a in json.loads(r.stdout)["artifacts"]}
    assert by_precision["fp32"]["agreement_pct"] == 100.0
    assert by_precision["fp32"]["max_abs_logit_err"] < 1e-3
    assert by_precision["int8"]["agreement_pct"] >= 80.0
    manifest = json.loads((tflite_bundle / "manifest.json").read_text())
    int8 = next(a for a in manifest["artifacts"] if a["precision"] == "int8")
    assert int8["engine"] == "keras-from-spec + LiteRT converter"
    assert [r["file"] for r in int8["file_records"]] == int8["files"]


BLOCKED_RUNNER = """
import sys
for name in ("torch", "tensorflow", "tf_keras", "keras", "onnx", "onnxruntime", "openvino", *{stages!r}):
    sys.modules[name] = None  # any import of these now raises ImportError
sys.path.insert(0, {root!r})
import json
import numpy as np
from edgeres.targets.tflite import load_runner
x = np.random.default_rng(0).standard_normal((3, 3, {size}, {size})).astype(np.float32)
print(json.dumps(load_runner({path!r})(x).tolist()))
"""


@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_bundle_tflite_runs_with_only_numpy_and_litert(tflite_bundle, precision):
    from edgeres.targets.tflite import load_runner

    size = tiny_spec().input_size
    path = str(tflite_bundle / "tflite" / f"model.{precision}.tflite")
    code = BLOCKED_RUNNER.format(root=str(ROOT), size=size, path=path, stages=EDGERES_STAGES)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    logits = np.array(json.loads(r.stdout.strip().splitlines()[-1]), np.float32)
    x = np.random.default_rng(0).standard_normal((3, 3, size, size)).astype(np.float32)
    np.testing.assert_allclose(logits, load_runner(path)(x), rtol=1e-6, atol=1e-6)


# -- real data -------------------------------------------------------------------------------------

@pytest.mark.realdata
@pytest.mark.slow
def test_resnet20_full_int8_drops_at_most_half_a_point(cifar, tmp_path):
    from edgeres.calibration import open_dataset
    from edgeres.measure.evaluate import collect_logits, topk_accuracy
    from edgeres.sources.loading import load_model
    from edgeres.targets import tflite

    loaded = load_model(cifar / "resnet20.th")
    model = loaded.to_torch()
    fp32_artifact = _compile(tmp_path / "fp32", loaded.spec, model, "fp32")
    int8_artifact = _compile(tmp_path / "int8", loaded.spec, model, "int8", cifar / "cifar10_calib.npz", calib_images=300)
    assert int8_artifact.options["representative_images"] == 300  # the pipeline's default calibration set
    assert json.loads((tmp_path / "int8" / int8_artifact.files[1]).read_text())["float_compute_ops"] == []
    dev, pre = open_dataset(cifar / "cifar10_dev.npz"), loaded.spec.preprocess

    def top1(path):
        return topk_accuracy(collect_logits(tflite.load_runner(path), dev, pre), dev.labels)["top1"]

    fp32 = top1(tmp_path / "fp32" / fp32_artifact.file)
    int8 = top1(tmp_path / "int8" / int8_artifact.file)
    assert fp32 == pytest.approx(91.48)  # the published dev-half accuracy of the torch model (data README)
    assert fp32 - int8 <= 0.5


def _activation_scales(path: Path) -> dict[str, float]:
    from edgeres.targets.tflite import _interpreter_module

    interp = _interpreter_module().Interpreter(model_path=str(path))
    return {t["name"]: float(t["quantization"][0]) for t in interp.get_tensor_details()
            if np.dtype(t["dtype"]) == np.int8 and t["quantization"][0] and "Conv2D" not in t["name"]
            and len(t["quantization_parameters"]["scales"]) == 1
            # the pixel-input normalisation (MUL+ADD in front): the converter gives its MUL the range of the
            # pair's output, our estimator the MUL's own values; the network's activations are compared
            and "/normalize/" not in t["name"]}


@pytest.fixture(scope="module")
def estimator_int8(tmp_path_factory, tiny_model, tiny_npz):
    """Full-int8 with the converter's min/max and with our minmax and percentile estimators."""
    spec, model = tiny_model
    out = {}
    for key, estimator, options in (("converter", None, {}), ("minmax", "minmax", {}),
                                    ("percentile", "percentile", {"io": "uint8"})):
        tmp = tmp_path_factory.mktemp(f"est-{key}")
        artifact = _compile(tmp, spec, model, "int8", tiny_npz, 64, estimator=estimator, **options)
        out[key] = (tmp / artifact.file, artifact)
    return out


def test_estimator_minmax_reproduces_the_converters_own_ranges(estimator_int8):
    converter, ours = (_activation_scales(estimator_int8[k][0]) for k in ("converter", "minmax"))
    assert converter.keys() == ours.keys() and len(ours) > 5
    for name, scale in converter.items():
        assert ours[name] == pytest.approx(scale, rel=1e-4), name
    assert estimator_int8["minmax"][1].options["calibration"] == "edgeres minmax estimator on the LiteRT tensors"


def test_estimator_ranges_replace_the_converters_min_max(estimator_int8, tiny_model):
    converter, ours = (_activation_scales(estimator_int8[k][0]) for k in ("converter", "percentile"))
    narrower = [n for n in ours if ours[n] < converter[n] * 0.999]
    assert narrower, "the percentile estimator should clip some activation ranges below min/max"
    from edgeres.targets import tflite

    spec, model = tiny_model
    x = _inputs(4, spec.input_size)
    got = tflite.load_runner(estimator_int8["percentile"][0])(x)
    assert got.shape == (4, spec.num_classes) and np.isfinite(got).all()
    assert (got.argmax(1) == _torch_logits(model, x).argmax(1)).mean() >= 0.5


def test_estimator_ranges_need_the_estimators_name(tmp_path, tiny_model, tiny_npz):
    from edgeres.targets.base import TargetError

    spec, model = tiny_model
    with pytest.raises(TargetError, match="tflite.ranges=estimator needs"):
        _compile(tmp_path, spec, model, "int8", tiny_npz, 16, ranges="estimator")


def _with_a_dead_relu(model):
    """A copy of ``model`` whose second stage's first ReLU outputs 0 for every input (its BN shifts by -1000)."""
    import copy

    import torch

    dead = copy.deepcopy(model)
    with torch.no_grad():
        dead.layer2[0].bn1.bias.fill_(-1000.0)
    return dead


@pytest.mark.parametrize("estimator", ["minmax", "mse"])
def test_an_always_zero_activation_gets_a_range_xnnpack_loads(tmp_path, tiny_model, tiny_npz, estimator):
    """A dead ReLU's range is empty; LiteRT's quantiser made it 2e-6 wide and XNNPACK refused the model when
    it loaded (a Keras ResNet-V2 with random weights, issue 37's suite run): it takes its input's range."""
    from edgeres.targets import tflite

    spec, model = tiny_model
    dead = _with_a_dead_relu(model)
    artifact = _compile(tmp_path, spec, dead, "int8", tiny_npz, 32, estimator=estimator)
    assert artifact.options["ranges_of_always_zero_tensors"] >= 1
    x = _inputs(4, spec.input_size)
    got = tflite.load_runner(tmp_path / artifact.file)(x)  # XNNPACK, as eval and apps load it
    assert np.isfinite(got).all()
    assert (got.argmax(1) == _torch_logits(dead, x).argmax(1)).mean() >= 0.5


def test_a_model_xnnpack_refuses_is_a_compile_error_not_an_artifact(tmp_path, tiny_model, tiny_npz, monkeypatch):
    from edgeres.targets import tflite
    from edgeres.targets.base import TargetError

    monkeypatch.setattr(tflite, "_live_ranges", lambda model, ranges: (ranges, 0))  # the empty range kept
    spec, model = tiny_model
    with pytest.raises(TargetError, match="LiteRT cannot load the converted model with XNNPACK"):
        _compile(tmp_path, spec, _with_a_dead_relu(model), "int8", tiny_npz, 32, estimator="minmax")


# -- ranges once: the int8 stage's shared ranges, matched to the LiteRT tensors by value --------------

@pytest.fixture(scope="module")
def shared_reference(tmp_path_factory, tiny_model, tiny_npz):
    """(the reference activations file the int8 stage writes, its ranges) for the tiny model: percentile
    ranges of its fp32 ONNX over 64 images, its activations on 2 of them."""
    from edgeres.calibration import matching, open_dataset
    from edgeres.int8 import compute_ranges, reference_activations
    from edgeres.model.export import export_onnx

    spec, model = tiny_model
    tmp = tmp_path_factory.mktemp("shared")
    export_onnx(model, spec, tmp / "ref.onnx")
    ds = open_dataset(tiny_npz)

    def batches(layout="NCHW", batch_size=32):
        return (x for x, _ in ds.batches(spec.preprocess.with_layout(layout), batch_size, 64))

    ranges = compute_ranges(tmp / "ref.onnx", batches, estimator="percentile")
    matching.save(tmp / "reference.npz", reference_activations(tmp / "ref.onnx", batches, ranges))
    return tmp / "reference.npz", ranges


def _tensor_ranges(path: Path) -> dict[str, tuple[float, float]]:
    """{tensor name: (lo, hi)} of a full-int8 .tflite's per-tensor int8 activations (scale, zero point)."""
    from edgeres.targets.tflite import _interpreter_module

    interp = _interpreter_module().Interpreter(model_path=str(path))
    out = {}
    for t in interp.get_tensor_details():
        scales = t["quantization_parameters"]["scales"]
        if np.dtype(t["dtype"]) == np.int8 and len(scales) == 1 and scales[0]:
            scale, zp = float(scales[0]), int(t["quantization_parameters"]["zero_points"][0])
            out[t["name"]] = ((-128 - zp) * scale, (127 - zp) * scale)
    return out


def test_shared_ranges_cover_every_tensor_without_an_own_pass(tmp_path, tiny_model, tiny_npz, shared_reference):
    spec, model = tiny_model
    artifact = _compile(tmp_path, spec, model, "int8", tiny_npz, 64, estimator="percentile",
                        reference_activations=shared_reference[0])
    o = artifact.options
    assert o["ranges_from"] == "shared" and o["ranges_own_pass"] == 0 and o["representative_images"] is None
    assert o["ranges_matched"] > 5 and o["ranges_derived"] >= 2  # the pixel input and its normalising MUL
    assert artifact.notes == () and "fp32 reference" in o["calibration"]


def test_shared_ranges_are_what_the_artifact_uses(tmp_path, tiny_model, tiny_npz, shared_reference):
    """Doubling every shared range doubles the int8 activation grids of the matched tensors."""
    from edgeres.calibration import matching

    spec, model = tiny_model
    ref = matching.load(shared_reference[0])
    wide = matching.ReferenceActivations(ref.images, ref.values, {k: (2 * lo, 2 * hi) for k, (lo, hi) in ref.ranges.items()},
                                         ref.sizes)
    matching.save(tmp_path / "wide.npz", wide)
    base = _compile(tmp_path / "a", spec, model, "int8", tiny_npz, 64, estimator="percentile",
                    reference_activations=shared_reference[0])
    doubled = _compile(tmp_path / "b", spec, model, "int8", tiny_npz, 64, estimator="percentile",
                       reference_activations=tmp_path / "wide.npz")
    a, b = _tensor_ranges(tmp_path / "a" / base.file), _tensor_ranges(tmp_path / "b" / doubled.file)
    # (the pixel input keeps 0..255 and its normalising MUL follows from it; the rest is the network's)
    ratios = [(b[n][1] - b[n][0]) / (a[n][1] - a[n][0]) for n in a if n in b and "/normalize/" not in n
              and n != "tfl.quantize"]
    assert len(ratios) > 10 and ratios == pytest.approx([2.0] * len(ratios), rel=1e-3), ratios


def test_unmatched_tensors_fall_back_to_the_own_pass_with_a_note(tmp_path, tiny_model, tiny_npz, shared_reference):
    from edgeres.calibration import matching

    spec, model = tiny_model
    ref = matching.load(shared_reference[0])
    noise = np.random.default_rng(0)
    other = matching.ReferenceActivations(ref.images, {k: v + noise.standard_normal(v.shape).astype(np.float32)
                                                       for k, v in ref.values.items()}, ref.ranges, ref.sizes)
    matching.save(tmp_path / "other.npz", other)
    artifact = _compile(tmp_path, spec, model, "int8", tiny_npz, 64, estimator="percentile",
                        reference_activations=tmp_path / "other.npz")
    o = artifact.options
    assert o["ranges_matched"] == 0 and o["ranges_own_pass"] > 5 and o["representative_images"] == 64
    assert any("own estimator pass" in n for n in artifact.notes)


def test_no_shared_ranges_means_the_own_pass_and_converter_ranges_still_work(tmp_path, tiny_model, tiny_npz,
                                                                            shared_reference):
    from edgeres.calibration import matching

    spec, model = tiny_model
    matching.save_unavailable(tmp_path / "none.npz", "onnxruntime is not installed")
    artifact = _compile(tmp_path / "a", spec, model, "int8", tiny_npz, 64, estimator="percentile",
                        reference_activations=tmp_path / "none.npz")
    assert artifact.options["ranges_from"] == "own estimator pass"
    assert any("onnxruntime is not installed" in n for n in artifact.notes)
    converter = _compile(tmp_path / "b", spec, model, "int8", tiny_npz, 64, estimator="percentile",
                         reference_activations=shared_reference[0], ranges="converter")
    assert converter.options["calibration"] == "min/max (LiteRT converter)" and "ranges_from" not in converter.options
