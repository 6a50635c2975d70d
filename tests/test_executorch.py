"""ExecuTorch (XNNPACK) as a fourth runtime: one bundle of the tiny model grown with ``executorch`` fp32 +
int8 (the same calibration, its ranges shared by value), then every command a target takes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from edgeres import cli
from tests.conftest import ROOT, in_process_argv, make_images, run_cli, tiny_spec

pytest.importorskip("executorch", reason="executorch is not installed (pip install 'edgeres[executorch]')")
runner = CliRunner()


def _cli(*args):
    return runner.invoke(cli.app, in_process_argv(args))


@pytest.fixture(scope="module")
def et_bundle(tmp_path_factory, app_bundle, tiny_checkpoint, tiny_npz):
    """The session's onnx+openvino+tflite bundle, copied and grown with executorch fp32 and int8."""
    out = tmp_path_factory.mktemp("et") / "bundle"
    shutil.copytree(app_bundle, out)
    r = _cli("convert", tiny_checkpoint, "--calib", tiny_npz, "--targets", "executorch", "--precision", "fp32,int8",
             "--out", out, "--no-bench")
    assert r.exit_code == 0, r.output
    return out


def _artifacts(bundle) -> dict:
    manifest = json.loads((bundle / "manifest.json").read_text())
    return {(a["target"], a["precision"]): a for a in manifest["artifacts"]}, manifest


def test_int8_takes_the_shared_ranges_and_every_op_runs_in_xnnpack(et_bundle):
    arts, manifest = _artifacts(et_bundle)
    int8, fp32 = arts["executorch", "int8"], arts["executorch", "fp32"]
    assert int8["status"] == fp32["status"] == "ok"
    for a in (int8, fp32):
        audit = a["options"]["op_audit"]
        assert audit["ops_outside_delegate"] == 0 and audit["delegate_calls"] >= 1
        assert any("convolution" in op for op in audit["delegated_ops"])
    assert any(op.startswith("quantized_decomposed") for op in int8["options"]["op_audit"]["delegated_ops"])
    assert int8["options"]["ranges_from"] == "shared" and int8["options"]["ranges_matched"] > 0
    assert manifest["int8"]["recipes"]["executorch"]["activation_type"] == "int8"
    # labels and preprocessing travel beside the .pte, equal to the manifest's
    side = json.loads((et_bundle / "executorch" / "model.int8.json").read_text())
    assert side["labels"] == list(manifest["labels"]) and side["preprocess"]["mean"] == manifest["preprocess"]["mean"]
    assert int8["files"] == ["executorch/model.int8.pte", "executorch/model.int8.json"]


def test_eval_gives_agreement_and_a_drop_interval_and_says_why_there_are_no_layers(et_bundle, tiny_npz):
    r = _cli("eval", et_bundle, "--data", tiny_npz, "--layers", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout[r.stdout.index("{"):])
    rows = {(a["target"], a["precision"]): a for a in doc["artifacts"]}
    assert rows["executorch", "fp32"]["agreement_pct"] == 100.0
    assert rows["executorch", "int8"]["agreement_pct"] >= 90.0
    assert len(rows["executorch", "int8"]["top1_drop_ci95_pp"]) == 2
    coverage = {(c["target"], c["precision"]): c for c in doc["layer_targets"]}
    assert coverage["executorch", "int8"]["status"] == "failed"
    assert "XNNPACK delegate runs the whole network" in coverage["executorch", "int8"]["error"]


@pytest.mark.parametrize("threads", [1, 2])
def test_the_runner_honours_the_thread_count(et_bundle, threads):
    from edgeres.targets.executorch import load_runner

    assert load_runner(et_bundle / "executorch" / "model.int8.pte", threads=threads).threads == threads


def test_the_device_runner_times_both_artifacts_at_each_thread_count(et_bundle):
    """What ``edgeres bench`` runs per artifact (the standalone runner in a fresh process), for the
    executorch artifacts only: the other targets' rows are test_bench's."""
    from edgeres.bundle import read_manifest
    from edgeres.measure.bench import BenchConfig, LocalExecutor, plan_items

    cfg = BenchConfig(threads=(1, 2), warmup=1, runs=3)
    items = [i for i in plan_items(read_manifest(et_bundle)) if i.target == "executorch"]
    with LocalExecutor(et_bundle, cfg) as executor:
        docs = [(i.precision, t, executor.run(i, t)) for i in items for t in cfg.threads]
    assert sorted((p, t) for p, t, _ in docs) == [("fp32", 1), ("fp32", 2), ("int8", 1), ("int8", 2)]
    assert all(doc["status"] == "ok" and doc["p50_ms"] > 0 for _, _, doc in docs), docs


def test_the_python_app_classifies_as_predict_does(et_bundle, tmp_path):
    x, _ = make_images(2, tiny_spec().input_size, seed=3)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, img in enumerate(x):
        Image.fromarray(img).save(photos / f"p{i}.png")
    predicted = _cli("predict", et_bundle, photos, "--target", "executorch", "--precision", "int8", "--json")
    assert predicted.exit_code == 0, predicted.output
    app = tmp_path / "app"
    r = _cli("export-app", et_bundle, "--kind", "python", "--target", "executorch", "--precision", "int8", "--out", app)
    assert r.exit_code == 0, r.output
    needs = (app / "requirements.txt").read_text().splitlines()
    assert any(line.startswith("executorch==") for line in needs) and any(line.startswith("torch==") for line in needs)
    assert (app / "model.int8.json").exists()
    ran = subprocess.run([sys.executable, "classify.py", str(photos), "--json"], cwd=app, capture_output=True,
                         text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-2000:]
    top = lambda doc: {p["file"].rsplit("/", 1)[-1]: p["top"][0]["label"] for p in doc["predictions"]}  # noqa: E731
    assert top(json.loads(ran.stdout)) == top(json.loads(predicted.stdout[predicted.stdout.index("{"):]))


def test_a_missing_runtime_is_a_failed_row_that_says_what_to_install(tiny_checkpoint, tmp_path):
    code = ("import sys; sys.modules['executorch'] = None\nfrom edgeres import cli\ncli.app(sys.argv[1:])")
    out = tmp_path / "b"
    r = subprocess.run([sys.executable, "-c", code, "convert", str(tiny_checkpoint), "--targets", "onnx,executorch",
                        "--precision", "fp32", "--out", str(out), "--no-bench", "--jobs", "0"], cwd=ROOT,
                       env={**__import__("os").environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 3, r.stderr
    arts, _ = _artifacts(out)
    assert arts["onnx", "fp32"]["status"] == "ok"
    assert arts["executorch", "fp32"]["status"] == "failed"
    assert "pip install 'edgeres[executorch]'" in arts["executorch", "fp32"]["error"]


class _Subsample(__import__("torch").nn.Module):
    def forward(self, x):
        return x[:, :, ::2, ::2] * 2.0


def test_the_op_audit_refuses_a_strided_slice_that_the_rewrite_turns_into_a_convolution():
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from edgeres.targets import TargetError
    from edgeres.targets.executorch import op_audit, xnnpack_friendly

    x = torch.randn(1, 4, 8, 8)
    program = torch.export.export(_Subsample().eval(), (x,))
    lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    with pytest.raises(TargetError, match="slice_copy"):
        op_audit(lowered.exported_program())
    module = program.module()
    assert xnnpack_friendly(module)
    torch.testing.assert_close(module(x), _Subsample()(x), rtol=0, atol=0)  # delegated: the bundle's audit


def test_a_lone_batch_norm_and_a_zero_pad_become_depthwise_convolutions_computing_the_same():
    """A pre-activation ResNet's stem pad and its BNs that follow no conv: XNNPACK runs them in fp32 only (an int8
    program keeping them fails in its compiler), so the rewrite makes them convolutions it quantises."""
    import torch
    from torch import nn

    from edgeres.model.torch_model import randomize_bn
    from edgeres.targets.executorch import xnnpack_friendly

    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ZeroPad2d(1), nn.MaxPool2d(3, 2), nn.BatchNorm2d(4),
                                       nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))).eval()
    x = torch.randn(2, 3, 12, 12)
    module = torch.export.export(model, (x,)).module()
    assert xnnpack_friendly(module)
    ops = [n.target.__name__ for n in module.graph.nodes if n.op == "call_function"]
    assert ops.count("batch_norm.default") == 1 and "pad.default" not in ops  # the BN after a conv stays, to fold
    assert ops.count("conv2d.default") == 4
    torch.testing.assert_close(module(x), model(x), rtol=1e-5, atol=1e-5)


def test_the_android_code_uses_executorchs_module_api_with_the_manifests_constants(et_bundle, tmp_path):
    from tests.test_export_app import _constants

    out = tmp_path / "android"
    r = _cli("export-app", et_bundle, "--kind", "android", "--target", "executorch", "--precision", "int8", "--out", out)
    assert r.exit_code == 0, r.output
    arts, manifest = _artifacts(et_bundle)
    code = (out / "ImageClassifier.kt").read_text()
    assert "Module.load(" in code and "EValue.from(" in code
    c = _constants(code, swift=False)
    assert c["MODEL_FILE"] == "model.int8.pte" and (out / "model.int8.pte").is_file()
    assert c["INPUT_SIZE"] == manifest["preprocess"]["size"] and c["MEAN"] == pytest.approx(manifest["preprocess"]["mean"])
    version = arts["executorch", "int8"]["tool_versions"]["executorch"]
    assert f'"org.pytorch:executorch-android:{version}"' in (out / "build.gradle.kts.snippet").read_text()
    assert "Not compiled here" in (out / "README.md").read_text()
