"""--accuracy-budget re-makes over-budget int8 artifacts with better settings and says what it did."""

import json

import numpy as np
import pytest
import torch

from edgeres.bundle import read_manifest
from tests.conftest import make_images


@pytest.fixture
def cli():
    """edgeres in this process: these tests read only its output, exit code and files."""
    from tests.conftest import run_cli_here

    return run_cli_here


@pytest.fixture(scope="module")
def labelled_by_fp32(tmp_path_factory, tiny_model):
    """Images labelled with the fp32 model's own answers, so any int8 disagreement is a top-1 drop."""
    spec, model = tiny_model
    x, _ = make_images(200, 16, seed=1)
    with torch.no_grad():
        y = model(torch.from_numpy(spec.preprocess(x))).argmax(1).numpy()
    path = tmp_path_factory.mktemp("budget") / "eval.npz"
    np.savez(path, x=x, y=y)
    return path


def test_budget_re_makes_or_reports_every_over_budget_artifact(cli, tmp_path, tiny_checkpoint, tiny_npz,
                                                               labelled_by_fp32):
    out = tmp_path / "bundle"
    r = cli("convert", tiny_checkpoint, "--calib", tiny_npz, "--eval", labelled_by_fp32, "--targets", "onnx,openvino",
            "--precision", "int8", "--accuracy-budget", "0", "--no-bench", "--out", out)
    assert r.returncode == 0, r.stderr
    manifest = read_manifest(out)  # spliced artifacts still match their sha256
    actions = manifest["accuracy_budget"]["actions"]
    final = json.loads((out / "eval.json").read_text())
    for entry in final["artifacts"]:
        mine = [a for a in actions if a["target"] == entry["target"]]
        if entry["top1_drop_pp"] > 0:  # over budget: every option was tried and the report says so
            assert mine and mine[-1]["action"] == "none left"
            assert any(a["action"].startswith("estimator") for a in mine)
            assert any("in float" in a["action"] for a in mine)
        elif mine:  # re-made: the fitting attempt is recorded on the artifact
            fitted = [a for a in mine if a["fits"]]
            record = next(a for a in manifest["artifacts"] if a["target"] == entry["target"])
            assert fitted and record["budget_action"] == fitted[-1]["action"]
    # the stored evaluation is what a fresh evaluation gives
    fresh = json.loads(cli("eval", out, "--data", labelled_by_fp32, "--json").stdout)
    assert [a["top1"] for a in fresh["artifacts"]] == [a["top1"] for a in final["artifacts"]]
    assert "Accuracy budget: 0.0 pp" in (out / "report.md").read_text()


def test_budget_without_eval_data_is_refused(cli, tmp_path, tiny_checkpoint, tiny_npz):
    r = cli("convert", tiny_checkpoint, "--calib", tiny_npz, "--targets", "onnx", "--accuracy-budget", "0.5",
            "--out", tmp_path / "b")
    assert r.returncode == 2 and "--accuracy-budget needs --eval" in r.stderr
    assert not (tmp_path / "b").exists()
