"""Loading checkpoints: formats, wrappers, spec inference, and refusals that name the file."""

import argparse
import json
import pickle
import re
import struct
import warnings
from dataclasses import replace

import pytest
import torch

from edgeres.errors import InputError
from edgeres.sources.loading import load_model, save_checkpoint
from edgeres.model.torch_model import build_torch, randomize_bn
from edgeres.model.zoo import ZOO


def _save(path, obj):
    torch.save(obj, path)
    return path


def test_wrapped_module_prefixed_checkpoint_without_bn_counters_loads(tmp_path):
    model = randomize_bn(build_torch(ZOO["resnet20"]))
    sd = {f"module.{k}": v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    loaded = load_model(_save(tmp_path / "m.th", {"state_dict": sd, "best_prec1": 91.0}))
    assert loaded.spec.name == "resnet20"
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(loaded.to_torch()(x), model(x), atol=1e-5)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnet32"])
def test_spec_is_inferred_from_state_dict(tmp_path, arch):
    path = _save(tmp_path / "m.pt", build_torch(ZOO[arch]).state_dict())
    assert load_model(path).spec == ZOO[arch]


def test_narrowed_widths_are_inferred(tmp_path):
    spec = ZOO["resnet20"].with_widths(16, (16, 24, 48), (((8,),) * 3, ((16,), (12,), (20,)), ((40,),) * 3))
    path = _save(tmp_path / "pruned.pt", build_torch(spec).state_dict())
    loaded = load_model(path)
    assert loaded.spec.stage_widths == (16, 24, 48)
    assert loaded.spec.inner_widths[1] == ((16,), (12,), (20,))
    assert load_model(path, arch="resnet20").spec.stage_widths == (16, 24, 48)


def test_edgeres_checkpoint_carries_its_spec(tmp_path):
    spec = replace(ZOO["resnet20"], name="resnet20-pruned")
    save_checkpoint(tmp_path / "p.pt", spec, build_torch(spec).state_dict())
    assert load_model(tmp_path / "p.pt").spec == spec


def test_torchscript_archive_is_refused_without_loading_it(tmp_path):
    model = build_torch(ZOO["resnet20"])
    torch.jit.trace(model, torch.randn(1, 3, 32, 32)).save(str(tmp_path / "ts.pt"))
    with pytest.raises(InputError, match=r"ts.pt: is a TorchScript archive .*torch.save\(model.state_dict\(\), path\)"):
        load_model(tmp_path / "ts.pt")


def test_wrong_arch_names_missing_and_misshaped_keys(tmp_path):
    path = _save(tmp_path / "r20.pt", build_torch(ZOO["resnet20"]).state_dict())
    with pytest.raises(InputError, match=r"r20.pt: weights do not fit --arch resnet32: missing: layer1.3"):
        load_model(path, arch="resnet32")
    with pytest.raises(InputError, match="mis-shaped|missing"):
        load_model(path, arch="resnet18")


def test_pickle_with_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"conv1.weight": Evil()}}, f)
    with pytest.raises(InputError, match="evil.pt: refused"):
        load_model(path)
    assert not marker.exists()


def _torchvision_train_checkpoint(model: torch.nn.Module, args) -> dict:
    """What torchvision's references/classification/train.py passes to torch.save after an epoch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()  # momentum buffers: tensors in the optimizer state
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=30, gamma=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheduler.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict(),
            "epoch": 0, "args": args}


def _train_args(**extra) -> argparse.Namespace:
    return argparse.Namespace(
        data_path="/datasets01/imagenet_full_size/061417/", model="resnet18", device="cuda", batch_size=32, epochs=90,
        workers=16, opt="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4, norm_weight_decay=None, label_smoothing=0.0,
        lr_scheduler="steplr", lr_warmup_epochs=0, lr_step_size=30, lr_gamma=0.1, output_dir=".", resume="",
        start_epoch=0, sync_bn=False, test_only=False, auto_augment=None, amp=False, world_size=1,
        dist_url="env://", interpolation="bilinear", val_resize_size=256, val_crop_size=224, train_crop_size=224,
        clip_grad_norm=None, weights=None, distributed=False, **extra)


def test_torchvision_training_checkpoint_with_its_argparse_namespace_loads(tmp_path):
    torch.manual_seed(0)  # unseeded, some draws of random BN statistics overflow ResNet-20 to NaN: order-dependent
    model = randomize_bn(build_torch(ZOO["resnet20"]))
    path = _save(tmp_path / "model_0.pth", _torchvision_train_checkpoint(model, _train_args()))
    loaded = load_model(path)
    assert loaded.spec.name == "resnet20"
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(loaded.to_torch()(x), model.eval()(x), atol=1e-5)


class TrainingConfig:
    """A class of the training script's own: unpickling it would import and run the script's code."""


@pytest.mark.parametrize("args,global_name", [
    (TrainingConfig(), "TrainingConfig"),
    (_train_args(callback=print), "print"),  # a Namespace is no way in for a function
])
def test_checkpoint_with_any_other_global_is_refused_in_one_line_naming_it(tmp_path, args, global_name):
    model = build_torch(ZOO["resnet20"])
    path = _save(tmp_path / "model_0.pth", _torchvision_train_checkpoint(model, args))
    with pytest.raises(InputError) as e:
        load_model(path)
    message = str(e.value)
    assert "\n" not in message
    assert re.match(rf"{re.escape(str(path))}: refused: the checkpoint holds an object of ([\w.]+\.)?{global_name}, "
                    "a Python class or function that could run code when loaded \\(nothing was executed\\)", message)
    assert message.endswith("torch.save({'model': model.state_dict()}, path)")


@pytest.mark.parametrize("content,match", [(b"", "file is empty"), (b"not a checkpoint at all" * 10, "refused: not a tensor-only checkpoint")])
def test_bad_bytes_are_refused(tmp_path, content, match):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(InputError, match=f"bad.pt: .*{match}"):
        load_model(path)


def test_truncated_checkpoint_is_refused(tmp_path):
    good = _save(tmp_path / "good.pt", build_torch(ZOO["resnet20"]).state_dict())
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InputError, match="cut.pt: .*corrupt or truncated"):
        load_model(cut)


def test_nan_weights_are_refused(tmp_path):
    sd = build_torch(ZOO["resnet20"]).state_dict()
    sd["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN or Inf"):
        load_model(_save(tmp_path / "nan.pt", sd))


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_model(tmp_path / "nope.pt")
    (tmp_path / "m.xyz").write_bytes(b"x")
    with pytest.raises(InputError, match="unknown model format"):
        load_model(tmp_path / "m.xyz")


@pytest.mark.realdata
@pytest.mark.parametrize("arch,params", [("resnet20", 269_722), ("resnet32", 464_154)])
def test_real_cifar_checkpoints_load_with_and_without_arch(cifar, arch, params):
    a = load_model(cifar / f"{arch}.th")
    b = load_model(cifar / f"{arch}.th", arch=arch)
    assert a.spec == b.spec == ZOO[arch]
    assert sum(p.numel() for p in a.to_torch().parameters()) == params


@pytest.mark.parametrize("prefix,dtype", [("", torch.float32), ("module.", torch.float32), ("", torch.float16)])
def test_safetensors_state_dict_loads_like_the_pth(tmp_path, prefix, dtype):
    from safetensors.torch import save_file

    model = randomize_bn(build_torch(ZOO["resnet20"])).eval()
    sd = {prefix + k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_file(sd, str(tmp_path / "model.safetensors"))
    loaded = load_model(tmp_path / "model.safetensors")
    as_pth = load_model(_save(tmp_path / "model.pth", sd))
    assert loaded.format == "safetensors" and loaded.spec == as_pth.spec == ZOO["resnet20"]
    assert loaded.state_dict.keys() == as_pth.state_dict.keys()
    assert all(torch.equal(loaded.state_dict[k], as_pth.state_dict[k]) for k in loaded.state_dict)


def test_safetensors_with_unknown_keys_asks_for_arch(tmp_path):
    from safetensors.torch import save_file

    # Hugging Face's ResNetForImageClassification names its tensors differently
    sd = {f"resnet.encoder.{k}": v for k, v in build_torch(ZOO["resnet20"]).state_dict().items()}
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(InputError, match=r"model.safetensors: does not look like a ResNet state_dict .*pass --arch"):
        load_model(tmp_path / "model.safetensors")


def _safetensors_bytes(header: dict | bytes, data: bytes = b"") -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _f32(shape, begin, end):
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


# each refused from its header alone, before the safetensors library reads or allocates anything
BAD_SAFETENSORS = [
    ("header-longer-than-file", struct.pack("<Q", 1 << 40) + b"{}", r"declares a 1024.0 GiB header in a 10 B file"),
    ("not-json", _safetensors_bytes(b"{not json"), r"has no readable JSON header"),
    ("huge-shape", _safetensors_bytes({"fc.weight": _f32([1 << 20, 1 << 20], 0, 16)}, bytes(16)),
     r"tensor 'fc.weight' \(1048576×1048576 F32\) declares 4096.0 GiB but stores 16 B"),
    ("offsets-past-end", _safetensors_bytes({"fc.weight": _f32([4], 0, 16)}, bytes(8)),
     r"tensor 'fc.weight' has data_offsets \[0, 16\] outside the file's 8 data bytes"),
    ("overlapping", _safetensors_bytes({"a": _f32([2], 0, 8), "b": _f32([2], 4, 12)}, bytes(12)),
     r"tensor 'b' starts at byte 4 of the data, expected 8"),
    ("hidden-bytes", _safetensors_bytes({"a": _f32([2], 0, 8)}, bytes(64)), r"its tensors cover 8 of the 64 data bytes"),
    ("unknown-dtype", _safetensors_bytes({"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, bytes(8)),
     r"tensor 'a' has dtype 'C64'"),
    ("negative-dim", _safetensors_bytes({"a": _f32([-1, 2], 0, 8)}, bytes(8)), r"tensor 'a' has shape \[-1, 2\]"),
    ("duplicate-name", _safetensors_bytes(b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                                          b'"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', bytes(8)),
     r"its header names 'a' twice"),
]


@pytest.mark.parametrize("content,match", [c[1:] for c in BAD_SAFETENSORS], ids=[c[0] for c in BAD_SAFETENSORS])
def test_bad_safetensors_are_refused_from_the_header_in_one_line(tmp_path, content, match):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(InputError) as e:
        load_model(path)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{path}: refused: not a valid safetensors file: ")
    assert re.search(match, message), message
    assert message.endswith("(nothing was allocated); re-save it: safetensors.torch.save_file(model.state_dict(), path)")


def test_truncated_safetensors_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file(build_torch(ZOO["resnet20"]).state_dict(), str(tmp_path / "good.safetensors"))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes((tmp_path / "good.safetensors").read_bytes()[:-100])
    with pytest.raises(InputError, match=r"cut.safetensors: refused: not a valid safetensors file: tensor .* outside"):
        load_model(cut)
