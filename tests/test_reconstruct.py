"""Least-squares reconstruction after pruning (issue 7): channel correspondence, repair, integration."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from tests.conftest import make_images


def _bottleneck_model():
    import torch

    from edgeres.calibration import Preprocess
    from edgeres.model.torch_model import build_torch, randomize_bn
    from edgeres.model.zoo import get_spec

    spec = replace(get_spec("resnet50"), name="resnet-tiny-bottleneck", layers=(1, 2), stem_width=8,
                   stage_widths=(16, 32), inner_widths=(((8, 8),), ((8, 8), (8, 8))), num_classes=10, labels=None,
                   preprocess=Preprocess(size=32, resize=None))
    torch.manual_seed(1)
    return spec, randomize_bn(build_torch(spec))


def _inputs(spec, n, seed):
    x, _ = make_images(n, spec.input_size, seed=seed)
    return spec.preprocess(x, "test images")


def _pruned_with_reference(spec, model, ratio=0.5):
    from edgeres.compress.prune import PruneConfig, prune

    kept = {}

    def grab(pruned, reference):
        kept["reference"] = reference

    out = prune(model, spec, PruneConfig(ratio=ratio, importance="l1"), after_step=grab)
    return out, kept["reference"]


def _logit_rms(a, b, x):
    import torch

    with torch.no_grad():
        x = torch.as_tensor(x)
        return float(((a.eval()(x) - b.eval()(x)) ** 2).mean().sqrt())


@pytest.fixture(params=["basic", "bottleneck"])
def case(request, tiny_model):
    if request.param == "basic":
        return tiny_model
    return _bottleneck_model()


def test_channel_maps_point_at_the_kept_reference_channels(case):
    import torch

    from edgeres.compress.reconstruct import channel_maps

    spec, model = case
    out, reference = _pruned_with_reference(spec, model)
    maps = channel_maps(out.model, reference)
    ref = dict(reference.named_modules())
    assert maps, "every non-identity BatchNorm gets a map"
    shrunk = 0
    for name, idx in maps.items():
        bn = out.model.get_submodule(name)
        assert len(idx) == bn.num_features and len(set(idx.tolist())) == len(idx)
        assert torch.equal(bn.running_var, ref[name].running_var[idx])
        shrunk += bn.num_features < ref[name].num_features
    assert shrunk > 0
    # the conv before each BN kept the same output channels (its weights are a slice of the reference's)
    # (the stem is protected, so the first conv reads all its input channels)
    w, w_ref = out.model.layer1[0].conv1.weight, ref["layer1.0.conv1"].weight
    assert torch.equal(w, w_ref[maps["layer1.0.bn1"]])


def test_reconstruction_brings_the_pruned_outputs_back_towards_the_reference(case):
    from edgeres.compress.reconstruct import reconstruct

    spec, model = case
    out, reference = _pruned_with_reference(spec, model)
    held_out = _inputs(spec, 32, seed=7)
    before = _logit_rms(out.model, reference, held_out)
    record = reconstruct(out.model, reference, spec, [_inputs(spec, 64, seed=s) for s in range(4)])
    after = _logit_rms(out.model, reference, held_out)
    assert record["images"] == 256 and record["layers"] >= 3
    assert after < 0.6 * before, (before, after)


def test_reconstructing_an_unpruned_model_keeps_its_outputs(tiny_model):
    import torch

    from edgeres.compress.reconstruct import reconstruct

    spec, model = tiny_model
    out, reference = _pruned_with_reference(spec, model, ratio=0.0)
    x = _inputs(spec, 16, seed=3)
    with torch.no_grad():
        scale = float(reference.eval()(torch.as_tensor(x)).pow(2).mean().sqrt())
    reconstruct(out.model, reference, spec, [_inputs(spec, 128, seed=s) for s in range(4)], ridge=1e-6)
    assert _logit_rms(out.model, reference, x) < 1e-3 * scale


def test_prune_with_data_reconstructs_and_skips_bn_reestimation(tiny_checkpoint, tiny_npz):
    from edgeres.calibration import open_dataset
    from edgeres.sources.loading import load_model
    from edgeres.compress.prune import PruneConfig, prune_loaded

    loaded = load_model(tiny_checkpoint)
    train = open_dataset(tiny_npz)
    out = prune_loaded(loaded, PruneConfig(ratio=0.5, importance="l1"), train_data=train)
    [rec] = out.record["reconstruction"]
    assert rec["images"] == 64 and rec["layers"] >= 3
    assert out.record["bn_recalibration_images"] == 0
    plain = prune_loaded(loaded, PruneConfig(ratio=0.5, importance="l1", reconstruct=False), train_data=train)
    assert "reconstruction" not in plain.record and plain.record["bn_recalibration_images"] == 64
    # the saved state_dict is the reconstructed model's
    w = out.state_dict["layer1.0.conv2.weight"]
    assert not np.array_equal(w.numpy(), plain.state_dict["layer1.0.conv2.weight"].numpy())


def test_plan_uses_fewer_images_and_smaller_batches_for_large_inputs():
    from edgeres.compress.reconstruct import IMAGES, plan
    from edgeres.model.zoo import get_spec

    images, batch = plan(get_spec("resnet32"))
    assert images == IMAGES and batch == 100
    images50, batch50 = plan(get_spec("resnet50"))
    assert 32 <= images50 < IMAGES and batch50 < 100


def test_iterative_pruning_reconstructs_after_every_step(tiny_checkpoint, tiny_npz):
    from edgeres.calibration import open_dataset
    from edgeres.compress.distill import FinetuneConfig
    from edgeres.sources.loading import load_model
    from edgeres.compress.prune import PruneConfig, check_rebuild, prune_loaded

    loaded = load_model(tiny_checkpoint)
    out = prune_loaded(loaded, PruneConfig(ratio=0.5, importance="l1", steps=2), train_data=open_dataset(tiny_npz),
                       finetune=FinetuneConfig(epochs=2, batch_size=32))
    assert len(out.record["reconstruction"]) == 2
    assert check_rebuild(out.model, out.spec, out.state_dict) == 0


def test_layers_with_too_few_images_for_a_fit_keep_their_pruned_weights(tiny_model):
    import torch

    from edgeres.compress.reconstruct import reconstruct

    spec, model = tiny_model
    out, reference = _pruned_with_reference(spec, model)
    head = out.model.linear.weight.detach().clone()
    # 8 images: plenty of rows for stage 1 (8 × 16² positions), too few for the 4×4 last stage and the classifier
    record = reconstruct(out.model, reference, spec, [_inputs(spec, 8, seed=0)])
    assert "linear" in record["skipped_too_few_images"] and "layer1.0.conv1" not in record["skipped_too_few_images"]
    assert record["layers"] >= 2
    assert torch.equal(out.model.linear.weight, head)
