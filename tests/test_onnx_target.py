"""The ONNX target: ranges from our estimators end up in the QDQ graph; int8/fp16 bundles convert,
run and evaluate; bad calibration data exits 2 leaving nothing behind."""

import json

import numpy as np
import pytest

from edgeres.calibration import DataError
from edgeres.calibration.cpu import CpuFeatures, cpu_features
from edgeres import int8
from edgeres.int8 import choose_recipe
from edgeres.targets import onnx as onnx_target
from edgeres.targets.base import TargetError
from tests.conftest import make_images


@pytest.fixture
def cli():
    """edgeres in this process: these tests read only its output, exit code and files."""
    from tests.conftest import run_cli_here

    return run_cli_here


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory, tiny_model):
    from edgeres.model.export import export_onnx

    spec, model = tiny_model
    return export_onnx(model, spec, tmp_path_factory.mktemp("onnx") / "tiny.fp32.onnx")


def calib_batches(n=16, seed=0):
    from tests.conftest import tiny_spec

    x, _ = make_images(n, 16, seed)
    pre = tiny_spec().preprocess

    def calib_fn(layout="NCHW", batch_size=32):
        return iter([pre.with_layout(layout)(x[i : i + 8]) for i in range(0, n, 8)])

    return calib_fn


def qdq_params(path):
    """{activation tensor name: (scale, zero point)} read from the QuantizeLinear nodes of a QDQ ONNX."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n.input[0]: (float(consts[n.input[1]]), int(consts[n.input[2]]))
            for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in consts}


@pytest.fixture(scope="module")
def tiny_ranges(tiny_onnx):
    return int8.compute_ranges(tiny_onnx, calib_batches(), estimator="percentile")




def test_calibration_keeps_no_activation_once_its_estimator_has_seen_it(tiny_onnx, monkeypatch):
    """Ranges are collected batch by batch into bounded estimators, so the memory of calibration does not
    grow with the number of images: once ranges are computed no activation (a ResNet-152's are 224 MB an
    image) is referenced anywhere — by the estimators, the session or the stage."""
    import weakref

    from edgeres.calibration import estimators

    seen = []
    make = estimators.make_estimator

    def spying(*args, **kwargs):
        estimator = make(*args, **kwargs)
        update = estimator.update

        def update_and_note(x, *bounds):
            seen.append(weakref.ref(x))
            update(x, *bounds)

        estimator.update = update_and_note
        return estimator

    monkeypatch.setattr(estimators, "make_estimator", spying)
    ranges = int8.compute_ranges(tiny_onnx, calib_batches(), estimator="mse")
    assert len(seen) == 2 * len(ranges)  # every tensor, two batches
    assert not [r for r in seen if r() is not None]

def relu_tensor(ranges):
    return next(n for n in ranges if n.endswith("relu/Relu_output_0"))


def test_compute_ranges_covers_every_activation_with_zero_inside(tiny_onnx, tiny_ranges):
    import onnx

    model = onnx.load(str(tiny_onnx))
    relus = [n.output[0] for n in model.graph.node if n.op_type == "Relu"]
    assert set(relus) <= set(tiny_ranges) and "input" in tiny_ranges
    assert all(lo <= 0.0 <= hi for lo, hi in tiny_ranges.values())
    assert all(tiny_ranges[r][0] == 0.0 for r in relus)


def test_qdq_scales_come_from_our_ranges(tiny_onnx, tiny_ranges, tmp_path):
    name = relu_tensor(tiny_ranges)
    ranges = dict(tiny_ranges)
    ranges[name] = (0.0, 5.1)  # a range no estimator would produce: the graph must use it
    int8.quantize_qdq(tiny_onnx, ranges, tmp_path / "q.onnx", consumer=onnx_target.INFO,
                      options={"activation_type": "uint8"})
    scale, zero_point = qdq_params(tmp_path / "q.onnx")[name]
    assert scale == pytest.approx(5.1 / 255, rel=1e-6)
    assert zero_point == 0


def test_qdq_is_int8_per_channel_opset_17_and_records_the_recipe(tiny_onnx, tiny_ranges, tmp_path):
    import onnx

    record = int8.quantize_qdq(tiny_onnx, tiny_ranges, tmp_path / "q.onnx", consumer=onnx_target.INFO)
    model = onnx.load(str(tmp_path / "q.onnx"))
    assert record["per_channel"] and record["weight_type"] == "int8" and record["quantized_tensors"] > 5
    assert record["opset"] >= 17
    weight_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and "Conv_" in n.input[0]]
    scales = {t.name: t for t in model.graph.initializer}
    assert any(len(scales[n.input[1]].dims) == 1 and scales[n.input[1]].dims[0] > 1 for n in weight_dq)
    assert int8.qdq_record(tmp_path / "q.onnx") == onnx_target.qdq_record(tmp_path / "q.onnx") == record


@pytest.mark.parametrize("flags, vnni_expected_reduce", [(("avx2",), True), (("avx2", "avx512_vnni"), False)])
def test_reduce_range_follows_vnni(flags, vnni_expected_reduce):
    recipe = choose_recipe(onnx_target.INFO, CpuFeatures("x86", flags))
    assert recipe["reduce_range"] is vnni_expected_reduce and recipe["activation_type"] == "uint8"


def test_user_options_override_the_cpu_choice():
    recipe = choose_recipe(onnx_target.INFO, CpuFeatures("x86", ("avx2", "avx512_vnni")),
                           {"reduce_range": True, "activation_type": "int8"})
    assert recipe["reduce_range"] is True and recipe["activation_type"] == "int8"
    assert recipe["reason"].startswith("set by option")


@pytest.mark.parametrize("options", [{"activation_type": "int4"}, {"reduce_range": "maybe"}, {"reduce_rang": True}])
def test_bad_int8_options_are_refused(options):
    with pytest.raises(TargetError, match="int8"):
        choose_recipe(onnx_target.INFO, CpuFeatures("x86", ("avx2",)), options)


def test_old_onnx_spellings_of_int8_options_are_taken_as_int8_with_a_note(capsys):
    from edgeres.convert.config import parse_target_options

    options = parse_target_options(["onnx.reduce_range=true", "int8.per_channel=false", "openvino.engine=nncf"])
    assert options == {"int8": {"reduce_range": True, "per_channel": False}, "openvino": {"engine": "nncf"}}
    err = capsys.readouterr().err
    assert "--option onnx.reduce_range is now spelled --option int8.reduce_range" in err and err.count("\n") == 1


def test_int8_options_do_not_reach_a_runtime_with_its_own_int8_spec(tmp_path):
    from edgeres.convert.build import int8_recipes
    from edgeres.convert.config import ConvertConfig

    cfg = ConvertConfig(model="m.pt", out=str(tmp_path / "b"), targets=("onnx", "openvino", "tflite"),
                        target_options={"int8": {"reduce_range": True}})
    recipes = int8_recipes(cfg, [(t, "int8") for t in cfg.targets])
    assert recipes["onnx"]["reduce_range"] is True and recipes["openvino"]["reduce_range"] is True
    assert recipes["tflite"]["reduce_range"] is False and recipes["tflite"]["activation_type"] == "int8"


def test_cpu_features_read_vnni_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor : 0\nflags : fpu sse avx2 avx512f avx512_vnni\n")
    assert cpu_features(info, machine="x86_64").vnni
    info.write_text("processor : 0\nflags : fpu sse avx2\n")
    assert not cpu_features(info, machine="x86_64").vnni


def test_nan_calibration_activations_raise_data_error(tiny_onnx):
    def nan_batches(layout="NCHW", batch_size=32):
        x = np.zeros((2, 3, 16, 16), np.float32)
        x[0, 0, 0, 0] = np.nan
        return iter([x])

    with pytest.raises(DataError, match="NaN"):
        int8.compute_ranges(tiny_onnx, nan_batches)


def test_empty_calibration_raises_data_error(tiny_onnx):
    with pytest.raises(DataError, match="no images"):
        int8.compute_ranges(tiny_onnx, lambda layout="NCHW", batch_size=32: iter([]))


# --- through the CLI -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory, tiny_checkpoint, tiny_npz):
    from tests.conftest import run_cli_here as run_cli

    out = tmp_path_factory.mktemp("bundles") / "int8"
    r = run_cli("convert", tiny_checkpoint, "--calib", tiny_npz, "--targets", "onnx", "--precision", "int8,fp16",
                "--option", "int8.reduce_range=true", "--out", out)
    assert r.returncode == 0, r.stderr
    return out


def test_convert_int8_records_the_recipe_in_the_manifest(int8_bundle):
    manifest = json.loads((int8_bundle / "manifest.json").read_text())
    int8 = next(a for a in manifest["artifacts"] if a["precision"] == "int8")
    assert int8["status"] == "ok" and int8["file"] == "onnx/model.int8.onnx"
    assert int8["options"]["reduce_range"] is True and int8["options"]["reason"] == "set by option int8.reduce_range"
    assert manifest["calibration"]["qdq"]["reduce_range"] is True
    assert manifest["calibration"]["estimator"] == "mse"  # the default
    assert (int8_bundle / "model.fp32.onnx").exists()


def test_fp16_artifact_has_half_weights_and_float_io(int8_bundle):
    import onnx
    from onnx import TensorProto

    model = onnx.load(str(int8_bundle / "onnx" / "model.fp16.onnx"))
    assert {t.data_type for t in model.graph.initializer if t.dims and len(t.dims) == 4} == {TensorProto.FLOAT16}
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT


def test_eval_json_compares_int8_and_fp16_to_the_reference(cli, int8_bundle, tiny_npz):
    r = cli("eval", int8_bundle, "--data", tiny_npz, "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert set(result) >= {"reference", "artifacts", "images"}
    by_precision = {a["precision"]: a for a in result["artifacts"]}
    assert by_precision["fp16"]["agreement_pct"] >= 95.0
    assert by_precision["int8"]["agreement_pct"] >= 80.0
    assert set(by_precision["int8"]) >= {"top1", "top5", "top1_drop_pp", "agreement_pct", "max_abs_logit_err"}


def test_eval_layers_lists_quantised_layers_worst_first(cli, int8_bundle, tiny_npz):
    r = cli("eval", int8_bundle, "--data", tiny_npz, "--layers", "--json")
    assert r.returncode == 0, r.stderr
    layers = json.loads(r.stdout)["layers"]
    sqnr = [row["sqnr_db"] for row in layers]
    assert len(layers) > 5 and sqnr == sorted(sqnr)
    assert any(row["op"] == "Conv+Relu" for row in layers)
    assert all(5.0 < s < 80.0 for s in sqnr)  # int8 error is neither zero nor total


@pytest.mark.parametrize("case", ["four_channels", "empty", "wrong_size"])
def test_bad_calibration_data_exits_2_and_leaves_no_bundle(cli, tmp_path, tiny_checkpoint, case):
    data = tmp_path / "calib.npz"
    if case == "four_channels":
        np.savez(data, x=np.zeros((8, 16, 16, 4), np.uint8), y=np.zeros(8, np.int64))
    elif case == "empty":
        np.savez(data, x=np.zeros((0, 16, 16, 3), np.uint8), y=np.zeros(0, np.int64))
    else:
        np.savez(data, x=np.zeros((8, 20, 20, 3), np.uint8), y=np.zeros(8, np.int64))
    out = tmp_path / "bundle"
    r = cli("convert", tiny_checkpoint, "--calib", data, "--targets", "onnx", "--precision", "int8", "--out", out)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "calib.npz" in r.stderr
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["calib.npz"]


THREAD_CORES = """
import glob, os, sys
os.sched_setaffinity(0, {int(sys.argv[2])})  # before any library starts a thread
import numpy as np
from edgeres.int8.ranges import exposing_session
from edgeres.targets import onnx as onnx_target
import onnx
runner = onnx_target.load_runner(sys.argv[1])
runner(np.zeros((2, 3, 16, 16), np.float32))
session = exposing_session(onnx.load(sys.argv[1]), [])
session.run(None, {session.get_inputs()[0].name: np.zeros((2, 3, 16, 16), np.float32)})
print(sorted({open(t).read().split("Cpus_allowed_list:")[1].split()[0] for t in glob.glob("/proc/self/task/*/status")}))
"""


def test_onnxruntime_without_a_thread_count_stays_on_the_cores_it_was_given(tiny_onnx):
    """onnxruntime's default pool pins a thread to every core of the machine: under taskset (or a container's
    cpuset) eval and calibration ran on cores they were not given, beside whatever ran there."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    cores = list(range(os.cpu_count() or 1))  # the machine's (a pytest-xdist worker runs on a share of them)
    if len(cores) < 2 or not hasattr(os, "sched_setaffinity"):
        pytest.skip("needs a machine with two cores or more and sched_setaffinity, to give the runtime one core")
    r = subprocess.run([sys.executable, "-c", THREAD_CORES, str(tiny_onnx), str(cores[0])], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split("\n")[-2] == repr([str(cores[0])]), r.stdout


@pytest.mark.parametrize("given", [None, "0"])
def test_an_edgeres_process_keeps_onnxruntime_from_reporting_unless_told(tiny_onnx, tmp_path, given):
    """onnxruntime reports usage and keeps a device ID under ~/.cache/Microsoft unless ORT_DISABLE_TELEMETRY=1:
    edgeres sets it when the user has not (their "0" is kept, and passed on to the processes edgeres starts)."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "XDG_CACHE_HOME")}
    env.update(HOME=str(tmp_path), PYTHONPATH=str(ROOT), **({"ORT_DISABLE_TELEMETRY": given} if given else {}))
    # onnxruntime is started only where it would not report (a test sends nothing anywhere)
    code = ("import os, sys, edgeres; print(os.environ['ORT_DISABLE_TELEMETRY']); "
            "os.environ['ORT_DISABLE_TELEMETRY'] == '1' and __import__('onnxruntime').InferenceSession(sys.argv[1])")
    r = subprocess.run([sys.executable, "-c", code, str(tiny_onnx)], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [given or "1"]
    assert not (tmp_path / ".cache" / "Microsoft").exists()  # no device ID, no stored reports
