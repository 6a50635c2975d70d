"""ONNX input (issue 12): a ResNet exported to ONNX by torch maps back to the zoo spec + weights and
converts, prunes and evaluates like the PyTorch path; anything else is refused in one line."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace

import numpy as np
import pytest

from conftest import tiny_spec


def torch_export(model, spec, path, **kwargs):
    """The plain torch exporter (TorchScript path), as a user would run it."""
    import torch

    x = torch.zeros(1, 3, spec.input_size, spec.input_size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (x,), str(path), dynamo=False, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}}, **kwargs)
    return path


def random_model(spec, seed=0):
    import torch

    from edgeres.model.torch_model import build_torch, randomize_bn

    torch.manual_seed(seed)
    return randomize_bn(build_torch(spec), seed=seed)


def max_rel_diff(a, b):
    return float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))


def logits(model, spec, seed=1, n=3):
    import torch

    x = torch.from_numpy(np.random.default_rng(seed).standard_normal((n, 3, spec.input_size, spec.input_size)).astype(np.float32))
    with torch.no_grad():
        return model.eval()(x).numpy()


@pytest.fixture(scope="module")
def resnet18_onnx(tmp_path_factory):
    from edgeres.model.zoo import get_spec

    spec = get_spec("resnet18", input_size=64)
    model = random_model(spec)
    return spec, model, torch_export(model, spec, tmp_path_factory.mktemp("onnx") / "resnet18.onnx")


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory, tiny_model):
    spec, model = tiny_model
    return spec, model, torch_export(model, spec, tmp_path_factory.mktemp("onnx") / "tiny.onnx")


def test_torchvision_resnet18_onnx_maps_to_the_zoo_spec_with_the_same_outputs(resnet18_onnx):
    from edgeres.sources.loading import load_model, sha256_file

    spec, model, path = resnet18_onnx
    loaded = load_model(path)
    assert loaded.spec == spec
    assert (loaded.format, loaded.sha256) == ("onnx", sha256_file(path))
    assert max_rel_diff(logits(loaded.to_torch(), spec), logits(model, spec)) <= 1e-4


def test_cifar_resnet20_with_option_a_shortcuts_maps_to_the_zoo_spec(tmp_path):
    from edgeres.sources.loading import load_model
    from edgeres.model.zoo import get_spec

    spec = get_spec("resnet20")
    model = random_model(spec, seed=3)
    loaded = load_model(torch_export(model, spec, tmp_path / "resnet20.onnx"))
    assert loaded.spec == spec and loaded.spec.shortcut == "option_a"
    assert max_rel_diff(logits(loaded.to_torch(), spec), logits(model, spec)) <= 1e-4


@pytest.mark.parametrize("stride_on", ["3x3", "1x1"])
def test_bottleneck_resnet50_layout_maps_with_its_stride_placement(tmp_path, stride_on):
    from edgeres.sources.loading import load_model
    from edgeres.model.zoo import get_spec

    # resnet50's topology at 1/8 width keeps the test fast; the mapping does not depend on width
    z = get_spec("resnet50", input_size=64, num_classes=10)
    spec = replace(z.with_widths(8, [w // 8 for w in z.stage_widths],
                                 [[[w // 8 for w in b] for b in st] for st in z.inner_widths]), stride_on=stride_on)
    model = random_model(spec, seed=5)
    loaded = load_model(torch_export(model, spec, tmp_path / "r50.onnx"))
    assert replace(loaded.spec, name=spec.name) == spec
    assert max_rel_diff(logits(loaded.to_torch(), spec), logits(model, spec)) <= 1e-4


def test_unfolded_batchnorm_nodes_keep_their_statistics(tmp_path, tiny_model):
    import onnx
    import torch

    from edgeres.sources.loading import load_model

    spec, model = tiny_model
    path = torch_export(model, spec, tmp_path / "bn.onnx", training=torch.onnx.TrainingMode.PRESERVE,
                        do_constant_folding=False)
    assert "BatchNormalization" in {n.op_type for n in onnx.load(str(path)).graph.node}
    loaded = load_model(path)
    assert max_rel_diff(logits(loaded.to_torch(), spec), logits(model, spec)) <= 1e-4
    assert torch.allclose(loaded.state_dict["bn1.running_var"], model.state_dict()["bn1.running_var"])


def test_edgeres_own_simplified_export_round_trips(tmp_path, tiny_model):
    from edgeres.model.export import export_onnx
    from edgeres.sources.loading import load_model

    spec, model = tiny_model
    loaded = load_model(export_onnx(model, spec, tmp_path / "model.fp32.onnx"))
    assert replace(loaded.spec, name=spec.name, labels=spec.labels) == spec
    assert max_rel_diff(logits(loaded.to_torch(), spec), logits(model, spec)) <= 1e-4


def test_a_mapping_that_does_not_reproduce_the_graph_is_refused(tiny_onnx):
    from edgeres.errors import InputError
    from edgeres.sources.onnx_import import map_onnx, verify_mapping

    _, _, path = tiny_onnx
    spec, sd = map_onnx(path)
    sd = dict(sd, **{"layer2.0.bn2.bias": sd["layer2.0.bn2.bias"] + 0.5})
    with pytest.raises(InputError, match="mapping check failed"):
        verify_mapping(path, spec, sd)


def test_probabilities_output_is_refused_naming_the_softmax(tmp_path, tiny_model):
    import torch

    from edgeres.errors import InputError
    from edgeres.sources.loading import load_model

    spec, model = tiny_model
    path = torch_export(torch.nn.Sequential(model, torch.nn.Softmax(dim=1)), spec, tmp_path / "probs.onnx")
    with pytest.raises(InputError, match="found op Softmax"):
        load_model(path)


def test_non_resnet_onnx_is_refused_with_exit_2_and_one_line(cli, tmp_path, tiny_npz):
    import torch

    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    path = torch_export(mlp, tiny_spec(), tmp_path / "mlp.onnx")
    r = cli("convert", path, "--targets", "onnx", "--precision", "fp32", "--no-bench", "--out", tmp_path / "out")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "mlp.onnx" in lines[0]
    assert "is not a ResNet this tool can map (found op Flatten" in lines[0]
    assert not (tmp_path / "out").exists()


def test_onnx_input_converts_to_all_targets_and_evaluates(cli, tiny_onnx, tiny_npz, tmp_path):
    _, _, path = tiny_onnx
    out = tmp_path / "bundle"
    r = cli("convert", path, "--targets", "onnx,openvino,tflite", "--precision", "int8", "--calib", tiny_npz,
            "--no-bench", "--out", out)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["format"] == "onnx"
    assert {(a["target"], a["status"]) for a in manifest["artifacts"]} == {("onnx", "ok"), ("openvino", "ok"), ("tflite", "ok")}
    r = cli("eval", out, "--data", tiny_npz, "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert {"reference", "artifacts", "images"} <= set(report) and report["images"] == 64
    assert {a["target"] for a in report["artifacts"]} == {"onnx", "openvino", "tflite"}
    assert all({"top1", "top1_drop_pp", "agreement_pct", "max_abs_logit_err"} <= set(a) for a in report["artifacts"])


def test_onnx_input_can_be_pruned(cli, tiny_onnx, tmp_path):
    from edgeres.sources.loading import load_model

    _, _, path = tiny_onnx
    out = tmp_path / "pruned.pt"
    r = cli("prune", path, "--ratio", "0.5", "--round-to", "1", "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    pruned = load_model(out)
    assert sum(pruned.spec.stage_widths) < sum(tiny_spec().stage_widths)


def test_torch_default_dynamo_export_maps_too(tmp_path, tiny_model):
    import torch

    from edgeres.sources.loading import load_model

    spec, model = tiny_model
    path = tmp_path / "dynamo.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(1, 3, 16, 16),), str(path), input_names=["input"],
                          output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    loaded = load_model(path)
    assert replace(loaded.spec, name=spec.name, labels=spec.labels) == spec
    assert max_rel_diff(logits(loaded.to_torch(), spec), logits(model, spec)) <= 1e-4
