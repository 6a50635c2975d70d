"""OpenVINO target: IR fp32/fp16/int8, explicit fp16 compression, both int8 engines, embedded preprocessing,
runner threads, and a bundle that runs with only numpy + openvino."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import EDGERES_STAGES, ROOT, make_images

if find_spec("openvino") is None:  # found, not imported: usage_reports imports it in a fresh process
    pytest.skip("openvino is not installed: pip install 'edgeres[openvino]'", allow_module_level=True)


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory, tiny_model):
    from edgeres.model.export import export_onnx

    spec, model = tiny_model
    path = tmp_path_factory.mktemp("ov_src") / "model.fp32.onnx"
    export_onnx(model, spec, path)
    return spec, path


@pytest.fixture(scope="module")
def calib_images():
    return make_images(48, 16, seed=1)[0]


@pytest.fixture(scope="module")
def calib_fn(tiny_onnx, calib_images):
    spec, _ = tiny_onnx

    def calibration(layout: str = "NCHW", batch_size: int = 32):
        pre = spec.preprocess.with_layout(layout)
        return (pre(calib_images[i : i + batch_size]) for i in range(0, len(calib_images), batch_size))

    return calibration


@pytest.fixture(scope="module")
def qdq_onnx(tiny_onnx, calib_fn, tmp_path_factory):
    """A QDQ int8 ONNX made here with onnxruntime (stands in for the pipeline's shared QDQ file)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    _, src = tiny_onnx

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = calib_fn()

        def get_next(self):
            x = next(self.batches, None)
            return None if x is None else {"input": x}

    path = tmp_path_factory.mktemp("ov_qdq") / "model.qdq.onnx"
    quantize_static(str(src), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return path


@pytest.fixture(scope="module")
def test_inputs(tiny_onnx):
    spec, _ = tiny_onnx
    images = make_images(8, 16, seed=2)[0]
    return images, spec.preprocess(images)


@pytest.fixture(scope="module")
def reference_logits(tiny_onnx, test_inputs):
    from edgeres.targets import onnx as onnx_target

    return onnx_target.load_runner(tiny_onnx[1])(test_inputs[1])


def compile_ir(tiny_onnx, out_dir, precision, *, calibration=None, qdq=None, **options):
    from edgeres.targets import openvino as ov_target
    from edgeres.targets.base import QDQ_ONNX, CompileJob

    spec, src = tiny_onnx
    job = CompileJob(onnx_fp32=src, out_dir=Path(out_dir), precision=precision, calibration=calibration,
                     sources={QDQ_ONNX: qdq} if qdq is not None else {}, options=options, preprocess=spec.preprocess.to_dict())
    return ov_target.compile(job)


@pytest.fixture(scope="module")
def built(tiny_onnx, tmp_path_factory, qdq_onnx, calib_fn):
    """Each IR variant compiled once for the module: {name: (artifact, out_dir)}."""
    variants = {"fp32": ("fp32", {}), "fp16": ("fp16", {}), "int8-qdq": ("int8", {"engine": "qdq"}),
                "int8-nncf": ("int8", {"engine": "nncf"}), "fp32-raw": ("fp32", {"embed_preprocess": True}),
                "fp32-throughput": ("fp32", {"hint": "throughput"})}
    out = {}
    for name, (precision, options) in variants.items():
        d = tmp_path_factory.mktemp(f"ov_{name}")
        out[name] = (compile_ir(tiny_onnx, d, precision, calibration=calib_fn, qdq=qdq_onnx, **options), d)
    return out


def const_element_types(xml_path: Path) -> set[str]:
    root = ET.parse(xml_path).getroot()
    return {layer.find("data").get("element_type") for layer in root.iter("layer") if layer.get("type") == "Const"}


def op_types(xml_path: Path) -> list[str]:
    return [layer.get("type") for layer in ET.parse(xml_path).getroot().iter("layer")]


def test_artifact_lists_xml_then_bin_under_openvino(built):
    a, d = built["fp32"]
    assert a.files == ("openvino/model.fp32.xml", "openvino/model.fp32.bin")
    assert all((d / f).is_file() for f in a.files)


def test_fp32_ir_matches_onnx_reference(built, test_inputs, reference_logits):
    from edgeres.targets import openvino as ov_target

    a, d = built["fp32"]
    logits = ov_target.load_runner(d / a.file)(test_inputs[1])
    assert logits.dtype == np.float32 and logits.shape == reference_logits.shape
    rel = np.abs(logits - reference_logits).max() / np.abs(reference_logits).max()
    assert rel <= 1e-4


def test_fp32_ir_keeps_fp32_weights(built):
    a, d = built["fp32"]
    types = const_element_types(d / a.file)
    assert "f16" not in types and "f32" in types
    assert a.options["compress_to_fp16"] is False


def test_fp16_ir_stores_fp16_weights_at_half_the_size(built):
    (fp32, d32), (fp16, d16) = built["fp32"], built["fp16"]
    assert "f16" in const_element_types(d16 / fp16.file)
    ratio = (d16 / fp16.files[1]).stat().st_size / (d32 / fp32.files[1]).stat().st_size
    assert 0.45 < ratio < 0.55
    assert fp16.options["compress_to_fp16"] is True


def test_fp16_ir_stays_close_to_reference(built, test_inputs, reference_logits):
    from edgeres.targets import openvino as ov_target

    a, d = built["fp16"]
    logits = ov_target.load_runner(d / a.file)(test_inputs[1])
    assert np.abs(logits - reference_logits).max() / np.abs(reference_logits).max() <= 5e-3


def test_int8_from_qdq_onnx_is_fake_quantized(built):
    a, d = built["int8-qdq"]
    assert "FakeQuantize" in op_types(d / a.file)
    assert a.engine == "qdq" and a.options["engine"] == "qdq" and a.options["fake_quantize_ops"] > 0


def test_int8_with_nncf_is_fake_quantized_and_records_settings(built, calib_images):
    a, d = built["int8-nncf"]
    assert "FakeQuantize" in op_types(d / a.file)
    assert a.engine == "nncf"
    assert a.options["nncf"]["calibration_images"] == len(calib_images)
    assert a.options["nncf"]["preset"] == "performance" and "nncf" in a.tool_versions


@pytest.mark.parametrize("variant", ["int8-qdq", "int8-nncf"])
def test_int8_ir_stays_close_to_reference(built, variant, test_inputs, reference_logits):
    from edgeres.targets import openvino as ov_target

    a, d = built[variant]
    logits = ov_target.load_runner(d / a.file)(test_inputs[1])
    err = np.abs(logits - reference_logits).max() / np.abs(reference_logits).max()
    assert 0 < err < 0.2  # quantised (not bit-identical to float) yet close


def test_int8_qdq_engine_without_qdq_file_fails_naming_the_fix(tiny_onnx, tmp_path):
    from edgeres.targets.base import TargetError

    with pytest.raises(TargetError, match="engine=nncf"):
        compile_ir(tiny_onnx, tmp_path, "int8", qdq=None, engine="qdq")


@pytest.mark.parametrize("options, fragment", [({"engine": "tensorrt"}, "engine"), ({"colour": 1}, "unknown option"),
                                               ({"embed_preprocess": "maybe"}, "true or false")])
def test_bad_options_are_refused_naming_the_option(tiny_onnx, tmp_path, options, fragment):
    from edgeres.targets.base import TargetError

    with pytest.raises(TargetError, match=fragment):
        compile_ir(tiny_onnx, tmp_path, "fp32", **options)


def threads_and_hint(ir: str, threads: int) -> list:
    """(INFERENCE_NUM_THREADS, PERFORMANCE_HINT) of the runner for ``ir`` at ``threads``, in a process that may
    use every core: OpenVINO caps the thread count at the cores it finds when its CPU plugin loads, and a test
    worker runs on its share of them (tests/conftest.py)."""
    try:
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    except (AttributeError, OSError):
        pass
    from edgeres.targets import openvino as ov_target

    runner = ov_target.load_runner(Path(ir), threads=threads, hint="THROUGHPUT")
    return [runner.compiled.get_property("INFERENCE_NUM_THREADS"), str(runner.compiled.get_property("PERFORMANCE_HINT"))]


@pytest.mark.parametrize("threads", [1, 2])
def test_runner_honours_thread_count_and_hint(built, threads):
    from tests.fresh_process import call_in_fresh_process

    a, d = built["fp32"]
    assert call_in_fresh_process(threads_and_hint, d / a.file, threads) == [threads, "THROUGHPUT"]


def test_runner_defaults_to_the_hint_compiled_into_the_ir(built):
    from edgeres.targets import openvino as ov_target

    a, d = built["fp32-throughput"]
    assert a.options["runtime"]["hint"] == "THROUGHPUT"
    assert str(ov_target.load_runner(d / a.file).compiled.get_property("PERFORMANCE_HINT")) == "THROUGHPUT"
    latency = ov_target.load_runner(d / a.file, hint="LATENCY")
    assert str(latency.compiled.get_property("PERFORMANCE_HINT")) == "LATENCY"


def test_runner_pins_fp32_inference_precision(built):
    """OpenVINO would run an fp32 IR in bf16 on CPUs with avx512_bf16 unless told otherwise."""
    from edgeres.targets import openvino as ov_target

    a, d = built["fp32"]
    runner = ov_target.load_runner(d / a.file)
    assert str(runner.compiled.get_property("INFERENCE_PRECISION_HINT")) in ("f32", "<Type: 'float32'>")


def test_embedded_preprocess_ir_takes_raw_uint8_nhwc_images(built, test_inputs, reference_logits):
    from edgeres.targets import openvino as ov_target

    a, d = built["fp32-raw"]
    assert (a.input_layout, a.input_dtype) == ("NHWC", "uint8")
    runner = ov_target.load_runner(d / a.file)
    images = test_inputs[0]
    logits = runner.run_native(images)
    assert np.abs(logits - reference_logits).max() / np.abs(reference_logits).max() <= 1e-4


def test_embedded_preprocess_runner_still_accepts_eval_float_nchw(built, test_inputs):
    from edgeres.targets import openvino as ov_target

    a, d = built["fp32-raw"]
    runner = ov_target.load_runner(d / a.file)
    images, x = test_inputs
    np.testing.assert_array_equal(runner.to_uint8_images(x), images)
    np.testing.assert_allclose(runner(x), runner.run_native(images), rtol=0, atol=1e-6)


def test_convert_makes_one_bundle_with_onnx_and_openvino_and_eval_lists_both(cli, tiny_checkpoint, tiny_npz, tmp_path):
    out = tmp_path / "bundle"
    r = cli("convert", tiny_checkpoint, "--no-bench", "--targets", "onnx,openvino", "--precision", "fp32,int8",
            "--calib", tiny_npz, "--out", out, "--eval", tiny_npz)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    ov = [a for a in manifest["artifacts"] if a["target"] == "openvino"]
    assert [(a["precision"], a["status"]) for a in ov] == [("fp32", "ok"), ("int8", "ok")]
    assert {a["target"] for a in manifest["artifacts"]} == {"onnx", "openvino"}
    r = cli("eval", out, "--data", tiny_npz, "--json")
    assert r.returncode == 0, r.stderr
    evaluated = {(a["target"], a["precision"]): a for a in json.loads(r.stdout)["artifacts"]}
    assert evaluated[("openvino", "fp32")]["agreement_pct"] == 100.0
    assert "top1_drop_pp" in evaluated[("openvino", "int8")]


def test_convert_records_the_nncf_engine_when_asked(cli, tiny_checkpoint, tiny_npz, tmp_path):
    out = tmp_path / "bundle"
    r = cli("convert", tiny_checkpoint, "--no-bench", "--targets", "openvino", "--precision", "int8",
            "--calib", tiny_npz, "--out", out, "--option", "openvino.engine=nncf")
    assert r.returncode == 0, r.stderr
    (ov,) = json.loads((out / "manifest.json").read_text())["artifacts"]
    assert ov["engine"] == "nncf" and ov["options"]["nncf"]["calibration_images"] == 64


BLOCK_HEAVY = textwrap.dedent("""
    import sys
    class Block:
        BLOCKED = {"torch", "onnxruntime", "onnx", "tensorflow", "nncf", "keras", "tf_keras", *%r}
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.BLOCKED or name.rpartition(".")[0] in self.BLOCKED or name in self.BLOCKED:
                raise ImportError(f"{name} is blocked: the runner must need only numpy + openvino")
            return None
    sys.meta_path.insert(0, Block())
""") % (EDGERES_STAGES,)


def test_bundle_artifact_runs_with_only_numpy_and_openvino(cli, tiny_checkpoint, tiny_npz, tmp_path):
    out = tmp_path / "bundle"
    r = cli("convert", tiny_checkpoint, "--no-bench", "--targets", "openvino", "--precision", "int8",
            "--calib", tiny_npz, "--out", out, "--option", "openvino.embed_preprocess=true")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    artifact = next(a for a in manifest["artifacts"] if a["target"] == "openvino")
    assert (artifact["input_layout"], artifact["input_dtype"]) == ("NHWC", "uint8")
    probe = BLOCK_HEAVY + textwrap.dedent(f"""
        import json, numpy as np
        from edgeres.targets.openvino import load_runner
        runner = load_runner({str(out / artifact["file"])!r}, threads=1)
        images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
        logits = runner.run_native(images)
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in Block.BLOCKED or m.startswith(tuple(Block.BLOCKED)))
        print(json.dumps({{"shape": list(logits.shape), "finite": bool(np.isfinite(logits).all()), "heavy": heavy}}))
    """)
    r = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"shape": [2, 10], "finite": True, "heavy": []}


@pytest.fixture(scope="module")
def resnet20_int8(cifar, tmp_path_factory):
    """ResNet-20 through the real pipeline (300 calibration images → one QDQ ONNX → ONNX and OpenVINO int8),
    then the fp32 reference and both int8 artifacts on the 5000 dev images: {manifest, labels, top1 per model}."""
    from edgeres.calibration import Preprocess, open_dataset
    from edgeres.measure.evaluate import collect_logits
    from edgeres.targets import get_target
    from tests.conftest import run_cli

    out = tmp_path_factory.mktemp("r20") / "bundle"
    r = run_cli("convert", cifar / "resnet20.th", "--arch", "resnet20", "--calib", cifar / "cifar10_calib.npz",
                "--calib-images", "300", "--targets", "onnx,openvino", "--precision", "int8", "--no-bench",
                "--out", out)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    pre = Preprocess.from_dict(manifest["preprocess"])
    dev = open_dataset(cifar / "cifar10_dev.npz", require_labels=True)
    files = {"fp32": ("onnx", manifest["reference"]["file"])}
    files.update({a["target"]: (a["target"], a["file"]) for a in manifest["artifacts"] if a["precision"] == "int8"})
    top1 = {k: collect_logits(get_target(t).load_runner(out / f), dev, pre).argmax(1) for k, (t, f) in files.items()}
    return {"manifest": manifest, "labels": dev.labels, "top1": top1}


@pytest.mark.realdata
def test_resnet20_openvino_int8_drops_at_most_0_3_pp(resnet20_int8):
    top1, labels = resnet20_int8["top1"], resnet20_int8["labels"]
    assert len(labels) == 5000
    drop_pp = ((top1["fp32"] == labels).mean() - (top1["openvino"] == labels).mean()) * 100
    assert drop_pp <= 0.3


@pytest.mark.realdata
def test_resnet20_openvino_int8_is_built_from_the_shared_qdq_ranges(resnet20_int8):
    ov = next(a for a in resnet20_int8["manifest"]["artifacts"] if a["target"] == "openvino")
    assert ov["engine"] == "qdq" and ov["options"]["fake_quantize_ops"] > 0


@pytest.mark.realdata
def test_resnet20_openvino_and_onnx_int8_agree_on_99_pct_of_images(resnet20_int8):
    top1 = resnet20_int8["top1"]
    assert (top1["onnx"] == top1["openvino"]).mean() >= 0.99


def usage_reports(home: str, onnx: str, consent: str | None, edgeres_first: bool) -> dict:
    """In a fresh process whose home is ``home`` (``consent``: the content of OpenVINO's opt-in file, or no file):
    the usage reports OpenVINO would send while it is imported and converts ``onnx``, caught before they leave
    (nothing goes out). ``edgeres_first``: edgeres imports OpenVINO; else OpenVINO is imported first, as a user's
    own code may do, and edgeres only before the conversion."""
    os.environ["HOME"] = home
    for name in ("CI", "TF_BUILD", "JENKINS_URL"):  # OpenVINO never reports from a CI job: measure its default
        os.environ.pop(name, None)
    if consent is not None:
        (Path(home) / "intel").mkdir()
        (Path(home) / "intel" / "openvino_telemetry").write_text(consent)
    from openvino_telemetry.main import TelemetrySender

    caught: list[str] = []
    TelemetrySender.send = lambda self, backend, message: caught.append(json.dumps(message)[:300])
    from edgeres.targets.runners.openvino_runner import openvino_by_consent

    if edgeres_first:
        ov = openvino_by_consent()
    else:
        import openvino as ov
    at_import = len(caught)
    ov = openvino_by_consent()
    ov.convert_model(onnx)
    return {"at_import": at_import, "converting": len(caught) - at_import,
            "client_id_written": (Path(home) / "intel" / "openvino_ga_cid").exists()}


@pytest.mark.parametrize("consent, edgeres_first, expect", [
    (None, True, {"at_import": 0, "converting": 0, "client_id_written": False}),  # no file: nothing
    ("0", True, {"at_import": 0, "converting": 0, "client_id_written": False}),  # opted out
    (None, False, {"at_import": 1, "converting": 0, "client_id_written": True}),  # OpenVINO's own default, then edgeres
])
def test_openvino_reports_usage_only_where_the_user_said_yes(tiny_onnx, tmp_path, consent, edgeres_first, expect):
    from tests.fresh_process import call_in_fresh_process

    got = call_in_fresh_process(usage_reports, tmp_path, tiny_onnx[1], consent, edgeres_first)
    assert got == expect
    if consent is None:  # edgeres reads the user's choice and never writes it
        assert not (tmp_path / "intel" / "openvino_telemetry").exists()


def test_openvino_reports_usage_where_the_user_opted_in(tiny_onnx, tmp_path):
    from tests.fresh_process import call_in_fresh_process

    got = call_in_fresh_process(usage_reports, tmp_path, tiny_onnx[1], "1", True)
    assert got["at_import"] >= 1 and got["converting"] >= 1 and got["client_id_written"], got  # caught, not sent
