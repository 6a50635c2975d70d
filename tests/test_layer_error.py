"""eval --layers: per-layer SQNR of every runtime's int8 artifact, matched to the fp32 reference's points."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgeres.measure.layer_error import MIN_VALUE_MATCH_DB, layer_report, match_points


@pytest.fixture
def cli():
    """edgeres in this process: these tests read only its output, exit code and files."""
    from tests.conftest import run_cli_here

    return run_cli_here


RUNTIMES = ("onnx", "openvino", "tflite")
# the op a LiteRT tensor comes from, and the fp32 ONNX ops the point it matched may carry
COMPATIBLE_OPS = {"CONV_2D": {"Conv", "Conv+Relu"}, "DEPTHWISE_CONV_2D": {"Conv", "Conv+Relu"},
                  "ADD": {"Add", "Add+Relu", "input"}, "MEAN": {"GlobalAveragePool", "Flatten", "ReduceMean"},
                  "FULLY_CONNECTED": {"Gemm", "MatMul"}, "PAD": {"Pad"}, "STRIDED_SLICE": {"Slice"},
                  "RESHAPE": {"Flatten", "GlobalAveragePool", "Reshape"}, "MUL": {"input"}}
# (the normalisation a LiteRT model does on its pixels, a MUL and an ADD, gives the reference's input)


@pytest.fixture(scope="module")
def report(app_bundle, tiny_npz):
    from edgeres.calibration import open_dataset

    return layer_report(app_bundle, open_dataset(tiny_npz))


@pytest.mark.parametrize("target", RUNTIMES)
def test_every_runtimes_int8_artifact_gets_per_layer_sqnr(report, target):
    rows = [r for r in report["layers"] if r["target"] == target]
    (coverage,) = [c for c in report["layer_targets"] if c["target"] == target]
    assert coverage["status"] == "ok" and coverage["precision"] == "int8"
    assert len(rows) >= 10 and len(rows) == coverage["matched_by_name"] + coverage["matched_by_value"]
    assert all(5.0 < r["sqnr_db"] < 80.0 for r in rows)  # int8 error is neither zero nor total
    assert len({r["name"] for r in rows}) == len(rows)  # each network point once


def test_rows_are_worst_first_across_runtimes(report):
    sqnr = [r["sqnr_db"] for r in report["layers"]]
    assert sqnr == sorted(sqnr) and {r["target"] for r in report["layers"]} == set(RUNTIMES)


@pytest.mark.parametrize("target", ["onnx", "openvino"])
def test_runtimes_that_keep_the_source_names_are_matched_by_name(report, target):
    rows = [r for r in report["layers"] if r["target"] == target]
    assert sum(r["matched_by"] == "name" for r in rows) >= len(rows) - 1


def test_litert_tensors_are_matched_by_value_to_the_points_of_the_same_op(report):
    """LiteRT's model is rebuilt from Keras, so no name survives; its tensors still land on the network
    points onnxruntime quantises, each from an op of the same kind."""
    rows = [r for r in report["layers"] if r["target"] == "tflite"]
    assert rows and all(r["matched_by"] == "value" for r in rows)
    assert all(r["op"] in COMPATIBLE_OPS.get(r["runtime_op"], {r["op"]}) for r in rows), \
        [(r["runtime_op"], r["op"]) for r in rows if r["op"] not in COMPATIBLE_OPS.get(r["runtime_op"], {r["op"]})]
    onnx_points = {r["name"] for r in report["layers"] if r["target"] == "onnx"}
    assert len(onnx_points & {r["name"] for r in rows}) >= 0.8 * len(onnx_points)


def test_the_same_point_has_about_the_same_error_on_every_runtime(report):
    """The three artifacts share the calibration ranges: a point's SQNR differs by a few dB at most."""
    by_point: dict[str, dict] = {}
    for r in report["layers"]:
        by_point.setdefault(r["name"], {})[r["target"]] = r["sqnr_db"]
    shared = [v for v in by_point.values() if len(v) == 3]
    assert len(shared) >= 10
    assert np.median([max(v.values()) - min(v.values()) for v in shared]) < 3.0


@pytest.mark.parametrize("target", RUNTIMES)
def test_a_runners_int8_tensors_are_on_their_int8_grid(app_bundle, target):
    """What a runner taps in an int8 model are int8 tensors (dequantised): at most 256 levels each."""
    from edgeres import targets

    manifest = json.loads((app_bundle / "manifest.json").read_text())
    artifact = next(a for a in manifest["artifacts"] if a["target"] == target and a["precision"] == "int8")
    runner = targets.get_target(target).load_runner(app_bundle / artifact["file"])
    x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    tensors = [t for t in runner.intermediate_tensors()(x) if t["value"].size > 256]
    assert len(tensors) >= 10
    assert max(len(np.unique(t["value"])) for t in tensors) <= 256


def test_value_matching_takes_the_closest_same_shaped_point_once():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 4, 3, 3)).astype(np.float32), rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    reference = [{"name": "a", "value": a}, {"name": "b", "value": b}, {"name": "c", "value": a[:, :2].copy()}]
    noisy_b = (b + 0.05 * rng.standard_normal(b.shape)).transpose(0, 2, 3, 1).transpose(0, 3, 1, 2)
    runtime = [{"name": "t0", "value": noisy_b}, {"name": "t1", "value": b + 0.2},
               {"name": "kept", "names": ["x", "a"], "value": a}, {"name": "noise", "value": rng.standard_normal(b.shape)}]
    assert match_points(reference, runtime) == [(0, 2, "name"), (1, 0, "value")]
    unrelated = [{"name": "noise", "value": rng.standard_normal(b.shape).astype(np.float32)}]
    assert match_points(reference[1:2], unrelated) == []  # the same shape alone is no match
    assert MIN_VALUE_MATCH_DB > 0


def test_eval_layers_json_names_the_target_of_every_row(cli, app_bundle, tiny_npz, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(app_bundle, bundle)
    r = cli("eval", bundle, "--data", tiny_npz, "--layers", "--json", "--limit", "16")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert {row["target"] for row in doc["layers"]} == set(RUNTIMES)
    assert set(doc["layers"][0]) >= {"target", "precision", "name", "op", "runtime_op", "matched_by", "sqnr_db"}
    assert [c["status"] for c in doc["layer_targets"]] == ["ok"] * 3
    kept = json.loads((bundle / "eval.json").read_text())
    assert kept["layers"] == doc["layers"]  # report reads them from the kept run
    text = cli("eval", bundle, "--data", tiny_npz, "--layers", "--limit", "16")
    assert text.returncode == 0 and "matched to fp32 by name" in text.stdout and "runtime op" in text.stdout
