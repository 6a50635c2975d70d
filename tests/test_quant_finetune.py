"""``--quant finetune``: quantisation-aware KD on the int8 grids, lowered into every int8 target."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import make_images, run_cli

TARGETS = ("onnx", "openvino", "tflite")


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("qft")
    x, y = make_images(300, 16, seed=3)
    np.savez(root / "train.npz", x=x, y=y)
    x, y = make_images(64, 16, seed=1)
    np.savez(root / "calib.npz", x=x, y=y)
    return root


def _convert(checkpoint, data: Path, out: Path, quant: str, **extra) -> dict:
    from edgeres.convert.config import ConvertConfig
    from edgeres.convert.run import convert

    # jobs=0: compiled here (worker processes are tests/test_convert_workers.py's; each would import its runtime)
    cfg = ConvertConfig(model=str(checkpoint), out=str(out), calib=str(data / "calib.npz"), targets=TARGETS,
                        quant=quant, bench=False, jobs=0, **extra)
    return convert(cfg)


@pytest.fixture(scope="module")
def bundles(tiny_checkpoint, data_files, tmp_path_factory):
    """A fast and a finetune bundle of the tiny model, and the TunedInt8 the finetune build lowered for
    each int8 weight grid it used ({levels: TunedInt8}: ±127, and ±64 where the CPU's recipe takes
    reduce_range for the QDQ ONNX — AVX2 without VNNI)."""
    import edgeres.convert.build as build

    captured = {}
    original = build.quantization_aware_finetune

    def capture(*args, **kwargs):
        tuned = original(*args, **kwargs)
        captured.setdefault("tuned", {})[tuned.record["weight_levels"]] = tuned
        return tuned

    root = tmp_path_factory.mktemp("bundles")
    fast = _convert(tiny_checkpoint, data_files, root / "fast", "fast")
    build.quantization_aware_finetune = capture
    try:
        tuned = _convert(tiny_checkpoint, data_files, root / "ft", "finetune",
                         finetune_data=str(data_files / "train.npz"), finetune_epochs=1)
    finally:
        build.quantization_aware_finetune = original
    return {"fast": (root / "fast", fast), "finetune": (root / "ft", tuned), "tuned": captured["tuned"]}


def _artifact(bundle: Path, manifest: dict, target: str) -> Path:
    (a,) = [a for a in manifest["artifacts"] if a["target"] == target]
    assert a["status"] == "ok", a
    return bundle / a["file"]


def test_each_runtime_runs_what_was_trained_within_one_int8_step(bundles, data_files, tiny_model):
    import torch

    from edgeres import targets
    from edgeres.compress.quant_finetune import fake_quant_model

    spec, _ = tiny_model
    x = spec.preprocess(make_images(64, 16, seed=9)[0])
    bundle, manifest = bundles["finetune"]
    grids = {"qdq_onnx": manifest["calibration"]["finetune"]["qdq_onnx"]["weight_levels"], "keras": 127}
    for target in TARGETS:
        # each runtime against the simulation of the grid its weights were tuned on
        tuned = bundles["tuned"][grids[targets.get_info(target).consumes]]
        with torch.no_grad():
            simulated = fake_quant_model(spec, tuned)(x).numpy()
        lo, hi = tuned.reference.ranges[spec.head]
        step = (hi - lo) / 255  # one step of the int8 logits
        out = targets.get_target(target).load_runner(_artifact(bundle, manifest, target))(x)
        steps = np.abs(out - simulated) / step
        # rounding ties inside the network move a few logits by one more step; OpenVINO on AVX2
        # without VNNI requantises on its own path: 97.8 % within one step, the rest within two
        # (measured on an EPYC AVX2 runner; 98 %+ on VNNI CPUs)
        assert np.mean(steps <= 1.01) >= 0.97, (target, np.mean(steps <= 1.01))
        assert steps.max() <= 3.01, (target, steps.max())


def test_int8_graphs_are_op_for_op_those_of_fast(bundles):
    import onnx
    import openvino as ov

    import edgeres.targets.tflite as tfl

    ops = {}
    for preset in ("fast", "finetune"):
        bundle, manifest = bundles[preset]
        onnx_ops = [n.op_type for n in onnx.load(str(_artifact(bundle, manifest, "onnx"))).graph.node]
        ir = ov.Core().read_model(str(_artifact(bundle, manifest, "openvino")))
        ov_ops = [op.get_type_name() for op in ir.get_ordered_ops()]
        tfl_ops = [o["op"] for o in tfl.op_report(_artifact(bundle, manifest, "tflite"))["ops"]]
        ops[preset] = (onnx_ops, ov_ops, tfl_ops)
    assert ops["fast"] == ops["finetune"]
    assert "QuantizeLinear" in ops["fast"][0] and "FakeQuantize" in ops["fast"][1]


def test_manifest_records_recipe_epochs_and_held_out_curve(bundles):
    _, manifest = bundles["finetune"]
    record = manifest["calibration"]["finetune"]["qdq_onnx"]
    assert record["epochs"] == 1 and record["learn_ranges"] is True and record["seed"] == 0
    assert [row["epoch"] for row in record["curve"]] == [0, 1]
    assert all(0 <= row["agreement_pct"] <= 100 for row in record["curve"])
    assert record["held_out_images"] == 60 and record["train_images"] == 240
    assert manifest["calibration"]["tuned_ranges"] > 0
    assert manifest["config"]["quant"] == "finetune"


def _tune(spec, state_dict, data_files, **cfg):
    from edgeres.calibration import open_dataset
    from edgeres.compress.quant_finetune import QuantFinetuneConfig, quantization_aware_finetune

    calib = [spec.preprocess(make_images(32, 16, seed=1)[0])]
    recipe = QuantFinetuneConfig(**{"epochs": 1, "threads": 1, **cfg})
    return quantization_aware_finetune(spec, state_dict, calib, open_dataset(data_files / "train.npz"), recipe)


def test_same_seed_same_weights_and_ranges_other_seed_differs(tiny_model, data_files):
    spec, model = tiny_model
    a, b, c = (_tune(spec, model.state_dict(), data_files, seed=s) for s in (0, 0, 1))
    key = "layer1.0.conv1.weight"
    assert np.array_equal(a.state_dict[key].numpy(), b.state_dict[key].numpy())
    assert a.reference.ranges == b.reference.ranges
    assert not np.array_equal(a.state_dict[key].numpy(), c.state_dict[key].numpy())


def test_fixed_ranges_stay_at_the_estimator_ranges(tiny_model, data_files):
    spec, model = tiny_model
    fixed = _tune(spec, model.state_dict(), data_files, learn_ranges=False, lr=1e-4)
    learned = _tune(spec, model.state_dict(), data_files, learn_ranges=True, lr=1e-4, range_lr=1e-2)
    untrained = _tune(spec, model.state_dict(), data_files, epochs=0)
    # the same initial ranges (before training) in all three; only the learned run moves them
    def flat(t):
        return np.array([v for key in sorted(t.reference.ranges) for v in t.reference.ranges[key]])

    assert np.array_equal(flat(fixed), flat(untrained))
    assert np.abs(flat(learned) - flat(untrained)).max() > 1e-3 * np.abs(flat(untrained)).max()


@pytest.mark.parametrize("case", ["no data", "wrong size", "too few"])
def test_bad_finetune_data_is_one_line_exit_2_before_any_work(case, tiny_checkpoint, data_files, tmp_path):
    if case == "wrong size":
        x, y = make_images(300, 24)
        np.savez(tmp_path / "bad.npz", x=x, y=y)
        flags = ["--finetune-data", str(tmp_path / "bad.npz")]
    elif case == "too few":
        x, y = make_images(50, 16)
        np.savez(tmp_path / "bad.npz", x=x, y=y)
        flags = ["--finetune-data", str(tmp_path / "bad.npz")]
    else:
        flags = []
    out = tmp_path / "out"
    r = run_cli("convert", tiny_checkpoint, "--calib", data_files / "calib.npz", "--quant", "finetune", *flags,
                "--out", out, "--no-bench")
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("edgeres: error:"), r.stderr
    assert "finetune" in lines[0]
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


@pytest.mark.realdata
@pytest.mark.xfail(reason="measured (benchmarks/quant_finetune.md): 1 epoch of train10k is >= fast on every "
                          "target but ties it on onnx (99.34 vs 99.34 %, seed 0); the flips left are images whose "
                          "fp32 margin is below the int8 noise, so 'more often than fast' is not reliably met",
                   strict=False)
def test_resnet20_finetune_agrees_with_fp32_more_often_than_fast_on_every_runtime(cifar, tmp_path):
    """One short epoch on part of train10k; agreement with fp32 on the same dev images, per runtime."""
    from edgeres.calibration import open_dataset
    from edgeres.measure.bundle_eval import evaluate_bundle

    subset = open_dataset(cifar / "cifar10_train10k.npz")
    idx = subset.spread(3000)
    np.savez(tmp_path / "train3k.npz", x=subset.read(idx), y=subset.labels[idx])
    common = dict(arch="resnet20", calib=str(cifar / "cifar10_calib.npz"), targets=TARGETS, bench=False, jobs=0)
    from edgeres.convert.config import ConvertConfig
    from edgeres.convert.run import convert

    dev = open_dataset(cifar / "cifar10_dev.npz")
    scores = {}
    for quant, extra in (("fast", {}), ("finetune", {"finetune_data": str(tmp_path / "train3k.npz"),
                                                     "finetune_epochs": 1})):
        out = tmp_path / quant
        convert(ConvertConfig(model=str(cifar / "resnet20.th"), out=str(out), quant=quant, **common, **extra))
        result = evaluate_bundle(out, dev, limit=2000)
        scores[quant] = {r["target"]: r for r in result["results"] if r.get("precision") == "int8"}
    for target in TARGETS:
        fast, tuned = scores["fast"][target], scores["finetune"][target]
        assert tuned["agreement_pct"] > fast["agreement_pct"], (target, fast, tuned)


def test_kl_loss_and_accurate_start_are_recipes_of_their_own(tiny_model, data_files):
    """``loss="kl"`` and ``loss="boundary"`` train other weights than MSE; ``init="accurate"`` starts from the clipped,
    bias-corrected weights (so its untrained curve point differs from the fp32 start's)."""
    spec, model = tiny_model
    mse = _tune(spec, model.state_dict(), data_files, lr=1e-4)
    kl = _tune(spec, model.state_dict(), data_files, lr=1e-4, loss="kl", temperature=4.0)
    key = "layer1.0.conv1.weight"
    assert not np.array_equal(mse.state_dict[key].numpy(), kl.state_dict[key].numpy())
    assert kl.record["loss"] == "kl" and np.isfinite(kl.record["curve"][-1]["logit_rms"])
    boundary = _tune(spec, model.state_dict(), data_files, lr=1e-4, loss="boundary")
    assert not np.array_equal(mse.state_dict[key].numpy(), boundary.state_dict[key].numpy())
    plain = _tune(spec, model.state_dict(), data_files, epochs=0)
    accurate = _tune(spec, model.state_dict(), data_files, epochs=0, init="accurate")
    assert accurate.record["init"] == "accurate"
    assert any(not np.array_equal(plain.state_dict[k].numpy(), accurate.state_dict[k].numpy())
               for k in plain.state_dict if k.endswith((".weight", ".bias")))


def test_unknown_loss_is_a_clear_error(tiny_model, data_files):
    from edgeres.errors import InputError

    spec, model = tiny_model
    with pytest.raises(InputError, match="loss 'l1'"):
        _tune(spec, model.state_dict(), data_files, loss="l1")
