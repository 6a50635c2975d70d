"""``--quant accurate``: weight clipping + bias correction on the model, inherited by every int8 target."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import make_images
from conftest import run_cli_here as run_cli  # in process: an ONNX-only convert


@pytest.fixture
def cli():
    """edgeres in this process: these tests read only its output, exit code and files."""
    from tests.conftest import run_cli_here

    return run_cli_here


@pytest.fixture(scope="module")
def calib_x(tiny_model):
    spec, _ = tiny_model
    x, _ = make_images(32, 16, seed=1)
    return spec.preprocess(x)


def test_mse_clip_never_increases_weight_quantisation_error_per_channel():
    from edgeres.compress.quant_accurate import mse_clip, quantize_symmetric

    rng = np.random.default_rng(0)
    w = rng.standard_t(df=3, size=(16, 2304))  # heavy tails, 3×3×256 fan-in: clipping outliers pays off
    absmax = np.abs(w).max(axis=1)
    err_max = ((w - quantize_symmetric(w, absmax, 127)) ** 2).sum(axis=1)
    clip, err = mse_clip(w, 127)
    assert np.all(err <= err_max)
    assert np.all(clip <= absmax)
    assert (err < err_max).sum() >= 8  # most heavy-tailed channels gain


def test_improved_weights_put_max_folded_weight_on_the_chosen_clip(tiny_model, calib_x):
    import torch

    from edgeres.compress.quant_accurate import improve_for_int8

    spec, model = tiny_model
    sd, record = improve_for_int8(spec, model.state_dict(), [calib_x], levels=127)
    assert record["weight_qerr_after"] <= record["weight_qerr_before"]
    assert record["clipped_channels"] > 0
    w0, w1 = model.state_dict()["layer2.0.conv1.weight"], sd["layer2.0.conv1.weight"]
    assert torch.all(w1.abs() <= w0.abs() + 1e-7)  # clamped, never enlarged
    assert not torch.equal(sd["layer2.0.bn1.bias"], model.state_dict()["layer2.0.bn1.bias"])  # bias corrected
    # the improved model still computes nearly the same function in float
    from edgeres.model.torch_model import build_torch

    improved = build_torch(spec)
    improved.load_state_dict(sd)
    with torch.no_grad():
        x = torch.from_numpy(calib_x)
        agreement = (model(x).argmax(1) == improved(x).argmax(1)).float().mean().item()
    assert agreement >= 0.9


@pytest.fixture(scope="module")
def fast_and_accurate(tiny_checkpoint, tiny_npz, tmp_path_factory):
    """ONNX int8 bundles of the tiny model with ``--quant fast`` and ``--quant accurate``."""
    tmp = tmp_path_factory.mktemp("presets")
    out_fast, out_acc = tmp / "fast", tmp / "acc"
    for out, preset in ((out_fast, "fast"), (out_acc, "accurate")):
        r = run_cli("convert", tiny_checkpoint, "--calib", tiny_npz, "--targets", "onnx", "--precision", "int8",
                "--quant", preset, "--no-bench", "--out", out)
        assert r.returncode == 0, r.stderr
    return out_fast, out_acc


def test_convert_accurate_records_the_preset_and_keeps_the_original_reference(fast_and_accurate):
    out_fast, out_acc = fast_and_accurate
    fast, acc = (json.loads((o / "manifest.json").read_text()) for o in (out_fast, out_acc))
    assert fast["calibration"]["quant"] == "fast" and "accurate" not in fast["calibration"]
    assert acc["calibration"]["quant"] == "accurate"
    assert acc["calibration"]["accurate"]["qdq_onnx"]["bias_correction"] is True
    assert acc["reference"]["sha256"] == fast["reference"]["sha256"]  # fp32 reference: the original model
    assert acc["artifacts"][0]["sha256"] != fast["artifacts"][0]["sha256"]
    assert acc["conversion_key"] != fast["conversion_key"]


def test_eval_layers_shows_the_sqnr_gain_over_fast_for_an_accurate_bundle(fast_and_accurate, tiny_npz, cli):
    out_fast, out_acc = fast_and_accurate
    layers = {}
    for name, out in (("fast", out_fast), ("accurate", out_acc)):
        r = cli("eval", out, "--data", tiny_npz, "--layers", "--json")
        assert r.returncode == 0, r.stderr
        layers[name] = json.loads(r.stdout)["layers"]
    assert layers["fast"] and not any("gain_db" in row for row in layers["fast"])
    rows = layers["accurate"]
    assert rows and all("gain_db" in row for row in rows)
    for row in rows:
        assert row["gain_db"] == pytest.approx(row["sqnr_db"] - row["fast_sqnr_db"], abs=0.011)
    assert any(row["gain_db"] != 0 for row in rows)  # the accurate weights change the int8 model
    text = cli("eval", out_acc, "--data", tiny_npz, "--layers")
    assert text.returncode == 0 and "vs --quant fast" in text.stdout


def test_unknown_quant_preset_is_refused(tiny_checkpoint, tiny_npz, tmp_path, cli):
    r = cli("convert", tiny_checkpoint, "--calib", tiny_npz, "--quant", "best", "--out", tmp_path / "b")
    assert r.returncode == 2
    assert "--quant" in r.stderr and "accurate" in r.stderr
