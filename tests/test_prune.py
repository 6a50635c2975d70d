"""Structured pruning (issue 7): widths, coupling, exact rebuild, reload, recovery, errors, convert."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import make_images


@pytest.fixture
def cli():
    """edgeres in this process: these tests read only its output, exit code and files."""
    from tests.conftest import run_cli_here

    return run_cli_here


@pytest.fixture(scope="module")
def pruned(tiny_model):
    from edgeres.compress.prune import PruneConfig, prune

    spec, model = tiny_model
    return prune(model, spec, PruneConfig(ratio=0.5, importance="l1", round_to=8, match_macs=False))


def _x(spec, n=4, seed=0):
    import torch

    return torch.randn(n, 3, spec.input_size, spec.input_size, generator=torch.Generator().manual_seed(seed))


def test_option_a_rewrite_as_projection_leaves_outputs_unchanged(tiny_model):
    import copy

    import torch

    from edgeres.compress.prune import option_a_to_projection

    spec, model = tiny_model
    rewritten, new_spec = option_a_to_projection(copy.deepcopy(model), spec)
    assert spec.shortcut == "option_a" and new_spec.shortcut == "projection"
    with torch.no_grad():
        assert torch.equal(rewritten(_x(spec)), model(_x(spec)))


def test_nearest_rounding_shrinks_widths_to_multiples_of_round_to(pruned, tiny_model):
    spec, _ = tiny_model
    new = pruned.spec
    assert new.stage_widths[1:] == (8, 16) and new.stage_widths[1] < spec.stage_widths[1]
    inner = [w for st in new.inner_widths for b in st for w in b]
    assert all(w % 8 == 0 for w in [*new.stage_widths, *inner])
    assert pruned.record["macs_after"] < pruned.record["macs_before"]


def test_stem_and_classifier_are_protected(pruned, tiny_model):
    spec, _ = tiny_model
    assert pruned.spec.stem_width == spec.stem_width
    assert pruned.spec.num_classes == spec.num_classes
    assert pruned.model.linear.out_features == spec.num_classes


def test_residual_coupled_widths_stay_consistent(pruned):
    model, spec = pruned.model, pruned.spec
    for s, n in enumerate(spec.layers):
        layer = getattr(model, f"layer{s + 1}")
        assert {layer[b].conv2.out_channels for b in range(n)} == {spec.stage_widths[s]}
        for b in range(n):
            assert layer[b].conv1.in_channels == spec.block_in_width(s, b)
    assert model.linear.in_features == spec.stage_widths[-1]


def test_rebuilt_spec_reproduces_the_pruned_module_exactly(pruned):
    import torch

    from edgeres.model.torch_model import build_torch

    rebuilt = build_torch(pruned.spec)
    rebuilt.load_state_dict(pruned.state_dict, strict=True)
    with torch.no_grad():
        assert torch.equal(rebuilt(_x(pruned.spec)), pruned.model(_x(pruned.spec)))


def test_round_to_one_keeps_exact_ratio_widths(tiny_model):
    from edgeres.compress.prune import PruneConfig, prune

    spec, model = tiny_model
    out = prune(model, spec, PruneConfig(ratio=0.3, round_to=1))
    assert out.spec.stage_widths == (8, 11, 22)  # 16·0.7 = 11.2, 32·0.7 = 22.4; the stem stream is protected


def test_round_width_is_nearest_multiple_never_below_round_to():
    from edgeres.compress.prune import round_width

    assert round_width(11.2, 16, 8) == 8
    assert round_width(44.8, 64, 8) == 48
    assert round_width(2.0, 64, 8) == 8
    assert round_width(3.0, 4, 8) == 4  # a layer narrower than round_to stays as it is


def test_width_step_is_round_to_but_at_most_an_eighth_of_the_width():
    from edgeres.compress.prune import width_step

    assert [width_step(w, 8) for w in (4, 16, 32, 64, 2048)] == [1, 2, 4, 8, 8]
    assert width_step(64, 1) == 1


def test_nearest_rounding_halves_a_16_wide_layer_but_matched_rounding_does_not(tiny_model):
    from edgeres.compress.prune import PruneConfig, prune

    spec, model = tiny_model
    nearest = prune(model, spec, PruneConfig(ratio=0.3, match_macs=False))
    matched = prune(model, spec, PruneConfig(ratio=0.3, match_macs=True))
    assert nearest.spec.stage_widths[1] == 8  # 16·0.7 = 11.2 → 8
    assert matched.spec.stage_widths[1] in (10, 12)


def test_matched_rounding_costs_no_more_macs_than_exact_widths(tiny_model):
    from edgeres.compress.prune import PruneConfig, prune, width_step

    spec, model = tiny_model
    exact = prune(model, spec, PruneConfig(ratio=0.3, round_to=1, match_macs=False))
    matched = prune(model, spec, PruneConfig(ratio=0.3, match_macs=True))
    assert matched.record["macs_after"] <= exact.record["macs_after"] < matched.record["macs_before"]
    for s, w in enumerate(matched.spec.stage_widths[1:], start=1):
        assert w % width_step(spec.stage_widths[s], 8) == 0
    for s, stage in enumerate(matched.spec.inner_widths):
        assert all(b[0] % width_step(spec.inner_widths[s][0][0], 8) == 0 for b in stage)


@pytest.mark.parametrize("importance", ["l1", "l2", "bn-scale"])
def test_global_ranking_meets_the_channel_budget(tiny_model, importance):
    from edgeres.compress.prune import PruneConfig, prune

    spec, model = tiny_model
    out = prune(model, spec, PruneConfig(ratio=0.5, importance=importance, global_ranking=True, round_to=1))
    assert out.record["macs_after"] < out.record["macs_before"]
    assert out.record["global"] is True


def test_taylor_importance_needs_data(tiny_checkpoint):
    from edgeres.errors import InputError
    from edgeres.sources.loading import load_model
    from edgeres.compress.prune import PruneConfig, prune_loaded

    with pytest.raises(InputError, match="taylor"):
        prune_loaded(load_model(tiny_checkpoint), PruneConfig(ratio=0.3, importance="taylor"))


def test_taylor_importance_prunes_with_data(tiny_checkpoint, tiny_npz):
    from edgeres.calibration import open_dataset
    from edgeres.sources.loading import load_model
    from edgeres.compress.prune import PruneConfig, prune_loaded

    out = prune_loaded(load_model(tiny_checkpoint), PruneConfig(ratio=0.5, importance="taylor"),
                       train_data=open_dataset(tiny_npz))
    assert out.spec.stage_widths == (8, 8, 16)


def test_bn_recalibration_restores_running_stats_of_the_pruned_model(pruned, tiny_npz):
    import copy

    import torch

    from edgeres.calibration import open_dataset
    from edgeres.compress.prune import identity_bns, recalibrate_bn

    model = copy.deepcopy(pruned.model)
    fixed = identity_bns(model)
    assert fixed, "rewritten option-A shortcuts keep identity BNs"
    before = [bn.running_var.clone() for bn in fixed]
    ds = open_dataset(tiny_npz)
    seen = recalibrate_bn(model, (x for x, _ in ds.batches(pruned.spec.preprocess, 32)), frozen=fixed)
    assert seen == 64
    assert all(torch.equal(a, bn.running_var) for a, bn in zip(before, fixed))
    assert not torch.equal(model.bn1.running_mean, pruned.model.bn1.running_mean)


def test_pruned_checkpoint_reloads_without_flags(cli, tiny_checkpoint, tmp_path):
    from edgeres.sources.loading import load_model

    out = tmp_path / "p.pt"
    r = cli("prune", tiny_checkpoint, "--ratio", "0.5", "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    record = json.loads(r.stdout)
    loaded = load_model(out)
    assert loaded.spec.stage_widths == (8, 8, 16) and loaded.spec.shortcut == "projection"
    assert loaded.extra["pruning"]["macs_after"] == record["macs_after"] == loaded.spec.cost()["macs"]
    info = json.loads(cli("inspect", out, "--json").stdout)
    assert info["stage_widths"] == [8, 8, 16] and info["inner_widths"][2] == [[16]]


def test_finetune_one_epoch_is_reproducible_with_the_same_seed(tiny_model, tiny_npz):
    import copy

    import torch

    from edgeres.calibration import open_dataset
    from edgeres.compress.distill import FinetuneConfig, distill
    from edgeres.compress.prune import PruneConfig, identity_bns, prune

    spec, model = tiny_model
    ds = open_dataset(tiny_npz)
    weights = []
    for _ in range(2):
        student = prune(model, spec, PruneConfig(ratio=0.5)).model
        start = copy.deepcopy(student.state_dict())
        curve = distill(student, copy.deepcopy(model), ds, spec.preprocess, FinetuneConfig(epochs=1, batch_size=16, seed=3),
                        frozen_bns=identity_bns(student))
        weights.append(student.state_dict())
        assert len(curve) == 1 and np.isfinite(curve[0]["loss"])
    assert not torch.equal(start["layer2.0.conv1.weight"], weights[0]["layer2.0.conv1.weight"])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.parametrize("loss", ["mse", "kl"])
def test_distillation_moves_the_student_towards_the_teacher(tiny_model, tiny_npz, loss):
    import copy

    import torch

    from edgeres.calibration import open_dataset
    from edgeres.compress.distill import FinetuneConfig, distill
    from edgeres.compress.prune import PruneConfig, identity_bns, prune

    spec, model = tiny_model
    ds = open_dataset(tiny_npz)
    student = prune(model, spec, PruneConfig(ratio=0.5)).model
    x = torch.from_numpy(next(ds.batches(spec.preprocess, 64))[0])

    def gap():
        with torch.no_grad():
            return float(((student.eval()(x) - model.eval()(x)) ** 2).mean())

    before = gap()
    distill(student, copy.deepcopy(model), ds, spec.preprocess,
            FinetuneConfig(epochs=3, batch_size=16, lr=0.02, loss=loss, label_weight=0.0, augment=False),
            frozen_bns=identity_bns(student))
    assert gap() < 0.7 * before


def test_unknown_kd_loss_exits_2_and_writes_nothing(cli, tiny_checkpoint, tiny_npz, tmp_path):
    out = tmp_path / "p.pt"
    r = cli("prune", tiny_checkpoint, "--ratio", "0.3", "--finetune-data", tiny_npz, "--epochs", "1",
            "--kd-loss", "huber", "--out", out)
    assert r.returncode == 2
    assert "--kd-loss huber" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_prune_with_finetune_records_a_curve(cli, tiny_checkpoint, tiny_npz, tmp_path):
    out = tmp_path / "p.pt"
    r = cli("prune", tiny_checkpoint, "--ratio", "0.5", "--finetune-data", tiny_npz, "--epochs", "1",
            "--batch-size", "32", "--eval", tiny_npz, "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    record = json.loads(r.stdout)
    assert [row["epoch"] for row in record["finetune"]["curve"]] == [0, 1]
    assert {"top1_before", "top1_after", "top1_drop_pp", "params_before", "params_after"} <= set(record)


@pytest.mark.parametrize("args, message", [
    (["--ratio", "0.95"], "--ratio"),
    (["--ratio", "-0.1"], "--ratio"),
    (["--ratio", "0.3", "--importance", "magic"], "--importance"),
])
def test_bad_ratio_or_importance_exit_2_and_write_nothing(cli, tiny_checkpoint, tmp_path, args, message):
    out = tmp_path / "p.pt"
    r = cli("prune", tiny_checkpoint, *args, "--out", out)
    assert r.returncode == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_finetune_data_of_the_wrong_image_size_exits_2(cli, tiny_checkpoint, tmp_path):
    x, y = make_images(8, 32)
    data = tmp_path / "big.npz"
    np.savez(data, x=x, y=y)
    out = tmp_path / "p.pt"
    r = cli("prune", tiny_checkpoint, "--ratio", "0.3", "--finetune-data", data, "--epochs", "1", "--out", out)
    assert r.returncode == 2
    assert "32×32" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_pruned_checkpoint_converts_to_onnx_fp32_with_the_same_outputs(cli, tiny_checkpoint, tiny_npz, tmp_path):
    import onnxruntime as ort
    import torch

    from edgeres.sources.loading import load_model

    pruned = tmp_path / "p.pt"
    assert cli("prune", tiny_checkpoint, "--ratio", "0.5", "--out", pruned).returncode == 0
    bundle = tmp_path / "bundle"
    r = cli("convert", pruned, "--targets", "onnx", "--precision", "fp32", "--no-bench", "--out", bundle)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["arch"]["stage_widths"] == [8, 8, 16]
    assert manifest["pruning"]["ratio"] == 0.5
    loaded = load_model(pruned)
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    onnx_out = ort.InferenceSession(str(bundle / manifest["artifacts"][0]["file"])).run(None, {"input": x})[0]
    with torch.no_grad():
        torch_out = loaded.to_torch()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(onnx_out, torch_out, atol=1e-4)


def test_convert_prune_records_pruning_in_the_manifest(cli, tiny_checkpoint, tiny_npz, tmp_path):
    bundle = tmp_path / "bundle"
    r = cli("convert", tiny_checkpoint, "--prune", "0.5", "--calib", tiny_npz, "--targets", "onnx",
            "--precision", "fp32", "--no-bench", "--eval", tiny_npz, "--out", bundle)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((bundle / "manifest.json").read_text())
    rec = manifest["pruning"]
    assert manifest["arch"]["stage_widths"] == [8, 8, 16]
    assert rec["macs_after"] == manifest["cost"]["macs"] < rec["macs_before"]
    # the calibration images refit the pruned layers (reconstruction), so BN statistics stay the unpruned ones
    assert rec["reconstruction"][0]["images"] == 64 and rec["bn_recalibration_images"] == 0 and "top1_after" in rec


def test_convert_with_a_bad_prune_ratio_exits_2(cli, tiny_checkpoint, tmp_path):
    bundle = tmp_path / "bundle"
    r = cli("convert", tiny_checkpoint, "--prune", "1.5", "--targets", "onnx", "--precision", "fp32", "--no-bench", "--out", bundle)
    assert r.returncode == 2 and "--prune 1.5" in r.stderr
    assert not bundle.exists()


@pytest.mark.realdata
def test_resnet32_at_ratio_0_3_has_1_7x_fewer_macs_and_bn_recalibration_recovers_accuracy(cifar):
    from edgeres.calibration import open_dataset
    from edgeres.sources.loading import load_model
    from edgeres.compress.prune import PruneConfig, identity_bns, prune, recalibrate_bn, top1

    loaded = load_model(cifar / "resnet32.th")
    out = prune(loaded.to_torch(), loaded.spec, PruneConfig(ratio=0.3, importance="l2", match_macs=True))
    assert out.spec.stage_widths == (16, 24, 48)  # stem stream protected; 32·0.7 → 24, 64·0.7 → 48
    assert min(w for b in out.spec.inner_widths[0] for w in b) >= 10  # not halved to 8 by rounding
    assert out.record["macs_ratio"] >= 1.7
    dev, train = open_dataset(cifar / "cifar10_dev.npz"), open_dataset(cifar / "cifar10_train10k.npz")
    pre = out.spec.preprocess
    stale = top1(out.model, dev, pre, 500)
    recalibrate_bn(out.model, (x for x, _ in train.batches(pre, 100, 1000)), frozen=identity_bns(out.model))
    assert top1(out.model, dev, pre, 500) > stale + 10


@pytest.mark.realdata
def test_resnet32_reconstruction_recovers_most_of_the_accuracy_before_any_finetuning(cifar):
    from edgeres.calibration import open_dataset
    from edgeres.sources.loading import load_model
    from edgeres.compress.prune import PruneConfig, prune_loaded

    loaded = load_model(cifar / "resnet32.th")
    dev, train = open_dataset(cifar / "cifar10_dev.npz"), open_dataset(cifar / "cifar10_train10k.npz")
    rebuilt = prune_loaded(loaded, PruneConfig(ratio=0.3, importance="l2"), train_data=train, eval_data=dev,
                           eval_images=1000).record
    recal = prune_loaded(loaded, PruneConfig(ratio=0.3, importance="l2", reconstruct=False), train_data=train,
                         eval_data=dev, eval_images=1000).record
    assert rebuilt["macs_ratio"] >= 1.7 and rebuilt["reconstruction"][0]["images"] == 1000
    # measured: 86.95 % reconstructed vs 63.4 % with BN re-estimation only (2000 dev images)
    assert rebuilt["top1_after_prune"] >= 84.0
    assert rebuilt["top1_after_prune"] > recal["top1_after_prune"] + 15
