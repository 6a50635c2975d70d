"""Real CIFAR-10: the default int8 recipe costs ResNet-20 at most 0.3 pp top-1 on the dev half."""

import json

import pytest

from edgeres.convert.config import ConvertConfig


@pytest.mark.realdata
@pytest.mark.slow
def test_resnet20_int8_drop_is_at_most_0_3_pp_with_the_default_estimator(cli, cifar, tmp_path):
    out = tmp_path / "r20"
    r = cli("convert", cifar / "resnet20.th", "--calib", cifar / "cifar10_calib.npz", "--targets", "onnx",
            "--precision", "int8", "--eval", cifar / "cifar10_dev.npz", "--out", out)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["calibration"]["estimator"] == ConvertConfig.estimator
    assert manifest["calibration"]["images"] == 300
    result = json.loads((out / "eval.json").read_text())
    int8 = result["artifacts"][0]
    assert result["reference"]["top1"] == pytest.approx(91.48, abs=0.03) and result["images"] == 5000
    assert int8["precision"] == "int8" and int8["top1_drop_pp"] <= 0.3
    assert int8["agreement_pct"] >= 98.0
