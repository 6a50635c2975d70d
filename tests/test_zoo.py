"""The zoo's specs build torch modules whose state_dicts equal torchvision's and upstream CIFAR's."""

import json
from pathlib import Path

import pytest

from edgeres.errors import InputError
from edgeres.model.torch_model import build_torch
from edgeres.model.zoo import ZOO, ResNetSpec, get_spec

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_state_dict_keys_and_shapes_equal_torchvision(arch):
    expected = json.loads((DATA / f"torchvision_{arch}_keys.json").read_text())
    ours = {k: list(v.shape) for k, v in build_torch(ZOO[arch]).state_dict().items()}
    assert ours == expected


@pytest.mark.parametrize("arch,params", [("resnet20", 269_722), ("resnet32", 464_154), ("resnet18", 11_689_512),
                                         ("resnet34", 21_797_672), ("resnet50", 25_557_032)])
def test_param_count_matches_published(arch, params):
    model = build_torch(ZOO[arch])
    assert sum(p.numel() for p in model.parameters()) == params
    assert ZOO[arch].cost()["params"] == params


def test_cost_counts_macs_of_resnet50():
    # torchvision's documented ResNet-50 GFLOPS (multiply-adds) is 4.09
    assert abs(ZOO["resnet50"].cost()["macs"] / 1e9 - 4.09) < 0.01


def test_spec_round_trips_through_dict():
    for spec in ZOO.values():
        assert ResNetSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_unknown_arch_is_an_input_error():
    with pytest.raises(InputError, match="unknown architecture 'resnet19'"):
        get_spec("resnet19")


def test_spec_rejects_inconsistent_widths():
    spec = ZOO["resnet20"]
    with pytest.raises(InputError, match="inner_widths"):
        spec.with_widths(16, (16, 32, 64), (((16,),), ((32,),), ((64,),)))


def test_option_a_shortcut_pads_zero_channels():
    import torch

    model = build_torch(ZOO["resnet20"])
    block = model.layer2[0]
    x = torch.randn(1, 16, 8, 8)
    out = block.shortcut(x)
    assert out.shape == (1, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2]) and out[:, :8].abs().sum() == 0
