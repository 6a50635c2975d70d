"""A projection shortcut that pruning leaves between equal widths is kept, recorded and rebuilt."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from conftest import make_images


def _bottleneck_spec():
    from edgeres.calibration import Preprocess
    from edgeres.model.zoo import get_spec

    # stage 1 goes 8 → 16 wide, so block 0 needs a projection; pruning by half makes it 8 → 8
    return replace(get_spec("resnet50"), name="resnet-tiny-bottleneck", layers=(1, 1), stem_width=8,
                   stage_widths=(16, 32), inner_widths=(((8, 8),), ((8, 8),)), num_classes=10, labels=None,
                   preprocess=Preprocess(size=32, resize=None))


def test_spec_keeps_a_projection_between_equal_widths_only_when_told():
    spec = _bottleneck_spec()
    pruned = spec.with_widths(8, (8, 16), (((4, 4),), ((8, 8),)))
    assert not pruned.has_downsample(0, 0) and pruned.projections is None
    kept = spec.with_widths(8, (8, 16), (((4, 4),), ((8, 8),)), projections=(True, True))
    assert kept.has_downsample(0, 0) and kept.projections == (True, True)
    assert type(kept).from_dict(json.loads(json.dumps(kept.to_dict()))) == kept
    assert "projections" not in spec.to_dict()  # older records read back unchanged


def test_projection_cannot_be_dropped_where_the_shape_changes():
    from edgeres.errors import InputError

    with pytest.raises(InputError, match="needs its projection"):
        replace(_bottleneck_spec(), projections=(False, True))


def test_pruning_stage_one_down_to_the_stem_width_keeps_its_projection(tmp_path, cli):
    import numpy as np
    import torch

    from edgeres.sources.loading import load_model, save_checkpoint
    from edgeres.model.torch_model import build_torch, randomize_bn

    torch.manual_seed(0)
    spec = _bottleneck_spec()
    model = randomize_bn(build_torch(spec))
    save_checkpoint(tmp_path / "m.pt", spec, model.state_dict())
    r = cli("prune", tmp_path / "m.pt", "--ratio", "0.5", "--round-to", "1", "--out", tmp_path / "p.pt")
    assert r.returncode == 0, r.stderr
    loaded = load_model(str(tmp_path / "p.pt"))
    assert loaded.spec.stage_widths[0] == loaded.spec.stem_width == 8
    assert loaded.spec.has_downsample(0, 0) and "layer1.0.downsample.0.weight" in loaded.state_dict
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32))
    with torch.no_grad():
        assert torch.isfinite(loaded.to_torch()(x)).all()
    # a plain state_dict (no spec inside) infers the same shortcut from its keys
    torch.save(loaded.state_dict, tmp_path / "plain.pt")
    assert load_model(str(tmp_path / "plain.pt")).spec.has_downsample(0, 0)
    npz = tmp_path / "d.npz"
    images, labels = make_images(12, 32)
    np.savez(npz, x=images, y=labels)
    r = cli("convert", tmp_path / "p.pt", "--calib", npz, "--targets", "onnx", "--precision", "int8",
            "--no-bench", "--out", tmp_path / "b")
    assert r.returncode == 0, r.stderr
