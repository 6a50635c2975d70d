"""Load trained ResNets safely: PyTorch state_dicts / checkpoints (always ``weights_only=True``, sizes
checked before anything is copied), ``.safetensors`` state_dicts (``safetensors_reader``), edgeres' own
pruned checkpoints, ResNet ONNX graphs (``onnx_import``) and Keras ResNets (``keras_import``); infer the
spec when no arch is given.
TorchScript archives are programs and are refused."""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

from edgeres.errors import InputError
from edgeres.targets.base import atomic_path, first_line, sha256_file
from edgeres.model.limits import check_archive, check_weight_bytes, size_text
from edgeres.model.infer import check_state_dict, infer_spec
from edgeres.model.zoo import ResNetSpec, get_spec, greyscale
from edgeres.sources.safetensors_reader import SAFETENSORS_SUFFIX, read_safetensors

TORCH_SUFFIXES = (".pt", ".pth", ".th", ".bin", ".ckpt")
SPEC_KEY = "edgeres_spec"


@dataclass
class LoadedModel:
    """A spec with matching float weights (numpy-free torch tensors) and where they came from."""

    spec: ResNetSpec
    state_dict: dict
    source: str
    sha256: str
    format: str
    extra: dict | None = None  # e.g. pruning record stored in an edgeres checkpoint
    spec_recorded: bool = False  # the file records its spec (an edgeres checkpoint): input size included

    def input_size_fixed_by(self) -> str | None:
        """What fixes the input size, or None where weights alone leave it free (a state_dict's convs
        and global pooling take any size: the size it was trained at is the user's to give)."""
        if self.spec.head_layers.pool == "flatten":
            return "its Flatten head's weights are sized for it"
        if self.format not in ("pytorch", "safetensors", "huggingface"):
            return f"the {self.format} model's input shape"
        if self.spec_recorded:
            return "its edgeres checkpoint records that size"
        return None

    def to_torch(self):
        from edgeres.model.torch_model import build_torch

        model = build_torch(self.spec)
        model.load_state_dict(self.state_dict, strict=False)
        return model.eval()


def load_model(path: str | Path, arch: str | None = None) -> LoadedModel:
    """Load MODEL for ``arch`` (or infer the arch); raise ``InputError`` naming the file on any problem."""
    p = Path(path)
    if arch is not None:
        get_spec(arch)  # an unknown name fails first, with the list of known ones
    if not p.exists():
        raise InputError(f"{p}: no such file; give a PyTorch checkpoint (.pt/.pth/.th) or .safetensors, a ResNet .onnx "
                         "or a Keras .keras/.h5")
    from edgeres.sources.keras_import import KERAS_SUFFIXES, is_saved_model_dir

    from edgeres.sources import hf_resnet

    if is_saved_model_dir(p):
        return _load_keras(p, arch)
    if hf_resnet.is_hf_folder(p):
        return _load_hf(p, arch)
    if p.is_dir():
        raise InputError(f"{p}: is a folder without saved_model.pb or config.json; give a model file "
                         "(.pt/.pth/.th/.onnx/.keras/.h5), a Keras SavedModel folder or a Hugging Face save_pretrained folder")
    if p.stat().st_size == 0:
        raise InputError(f"{p}: file is empty; re-save or re-download the checkpoint")
    suffix = p.suffix.lower()
    if suffix in KERAS_SUFFIXES:
        return _load_keras(p, arch)
    if suffix == ".onnx":
        return _load_onnx(p, arch)
    if suffix == SAFETENSORS_SUFFIX:
        raw, fmt = read_safetensors(p), "safetensors"
    elif suffix in TORCH_SUFFIXES:
        raw, fmt = _torch_load(p)
    else:
        raise InputError(f"{p}: unknown model format {suffix!r}; give a PyTorch checkpoint ({' '.join(TORCH_SUFFIXES)}), "
                         "a .safetensors state_dict, a ResNet .onnx or a Keras .keras/.h5")
    state_dict, saved_spec, extra = _unwrap(raw, p)
    if hf_resnet.looks_like_hf_keys(state_dict):
        if hf_resnet.is_hf_folder(p.parent):  # the weights file of a save_pretrained folder: read the folder
            return _load_hf(p.parent, arch)
        raise InputError(f"{p}: holds a Hugging Face ResNetForImageClassification's weights, whose architecture and "
                         "preprocessing are in the folder's config.json and preprocessor_config.json; give the "
                         "save_pretrained folder instead of the file")
    _check_finite(state_dict, p)
    if saved_spec is not None:
        spec = saved_spec
    else:
        inferred = infer_spec(state_dict, p)
        if arch is None:
            spec = inferred
        else:
            spec = get_spec(arch, num_classes=inferred.num_classes)
            if inferred.in_channels != spec.in_channels:
                spec = replace(spec, in_channels=1, preprocess=greyscale(spec.preprocess))  # a greyscale ResNet-18, say
            if inferred.groups != spec.groups:
                raise InputError(f"{p}: the weights hold {_groups_text(inferred.groups)} but --arch {arch} has {_groups_text(spec.groups)}; "
                                 f"omit --arch to read it off the weights ({inferred.name})")
            if (inferred.stem, inferred.block, inferred.layers) == (spec.stem, spec.block, spec.layers):
                # same architecture, possibly narrower (pruned) layers: keep the checkpoint's widths
                spec = spec.with_widths(inferred.stem_width, inferred.stage_widths, inferred.inner_widths,
                                        projections=inferred.projections)
    if arch is not None and saved_spec is not None and arch != saved_spec.name.split("-")[0]:
        raise InputError(f"{p}: is an edgeres checkpoint of {saved_spec.name}, not {arch}; omit --arch")
    check_state_dict(spec, state_dict, p, arch)
    return LoadedModel(spec, state_dict, str(p), sha256_file(p), fmt, extra, spec_recorded=saved_spec is not None)


def _load_hf(folder: Path, arch: str | None) -> LoadedModel:
    """A ResNetForImageClassification folder: torchvision-named weights, its class names and preprocessing."""
    from edgeres.model.infer import infer_spec
    from edgeres.sources import hf_resnet

    cfg = hf_resnet.read_config(folder)
    state_dict, weights = hf_resnet.read_weights(folder, lambda path: _unwrap(_torch_load(path)[0], path)[0])
    _check_finite(state_dict, weights)
    spec = infer_spec(state_dict, weights)
    if cfg.get("downsample_in_bottleneck", False):  # the stride on the first 1×1, as ResNet v1
        spec = replace(spec, name=spec.name if spec.name.endswith("-custom") else f"{spec.name}-custom", stride_on="1x1")
    want = (tuple(cfg.get("depths", ())), tuple(cfg.get("hidden_sizes", ())))
    if want != (spec.layers, spec.stage_widths):
        raise InputError(f"{folder}: config.json says depths {list(want[0])} and hidden_sizes {list(want[1])} but the "
                         f"weights hold {list(spec.layers)} and {list(spec.stage_widths)}; the folder is inconsistent — re-save it")
    pre, _ = hf_resnet.preprocess(folder, spec.preprocess)
    spec = replace(spec, preprocess=pre, labels=hf_resnet.labels(cfg, spec.num_classes))
    _check_mapped(folder, arch, spec, state_dict, "Hugging Face ResNet")
    files = [folder / hf_resnet.CONFIG_FILE, weights, folder / hf_resnet.PROCESSOR_FILE]
    h = hashlib.sha256()
    for f in files:
        if f.is_file():
            h.update(f.name.encode() + b"\0" + sha256_file(f).encode())
    return LoadedModel(spec, state_dict, str(folder), h.hexdigest(), "huggingface")


def _groups_text(groups: int) -> str:
    return "plain 3×3 convs (ResNet)" if groups == 1 else f"3×3 convs in {groups} groups (ResNeXt)"


def _load_onnx(p: Path, arch: str | None) -> LoadedModel:
    """Map a ResNet ONNX graph to spec + weights, and prove the mapping on random inputs."""
    from edgeres.sources.onnx_import import map_onnx, verify_mapping

    spec, state_dict = map_onnx(p)
    _check_mapped(p, arch, spec, state_dict, "ONNX graph")
    verify_mapping(p, spec, state_dict)
    return LoadedModel(spec, state_dict, str(p), sha256_file(p), "onnx")


# A Keras model this big (ResNet-101 and up) is mapped in a process of its own: TensorFlow and the Keras
# model (a ResNet-152's main process held 1.7 GB more than from a .pth) never enter the converting process.
# Smaller ones map here, sparing a second interpreter's imports (~5 s).
KERAS_CHILD_BYTES = 128 * 2**20
KERAS_SPEC_FILE, KERAS_WEIGHTS_FILE, KERAS_ERROR_FILE = "spec.json", "weights.npz", "error.txt"  # what the child writes


def _load_keras(p: Path, arch: str | None) -> LoadedModel:
    """Map a Keras ResNet v1 to spec + weights, and prove the mapping against Keras on random inputs."""
    if _size_bytes(p) >= KERAS_CHILD_BYTES:
        spec, state_dict = map_in_child(p, arch)
    else:
        spec, state_dict = map_keras_here(p, arch)
    digest = sha256_file(p) if p.is_file() else _sha256_dir(p)
    return LoadedModel(spec, state_dict, str(p), digest, "keras")


def map_keras_here(p: Path, arch: str | None) -> tuple[ResNetSpec, dict]:
    """(spec, state_dict) of the Keras model at ``p``, mapped and verified in this process."""
    from edgeres.sources.keras_import import load_keras, map_keras, release_keras, verify_mapping

    model = load_keras(p)
    spec, state_dict = map_keras(model, p)
    _check_mapped(p, arch, spec, state_dict, "Keras model")
    verify_mapping(model, p, spec, state_dict)
    del model
    release_keras()  # the weights are torch's now: what Keras held goes before export and calibration
    return spec, state_dict


def map_in_child(p: Path, arch: str | None) -> tuple[ResNetSpec, dict]:
    """(spec, state_dict) of the Keras model at ``p``, mapped by ``python -m edgeres.sources.keras_process``:
    the same spec and float32 tensors ``map_keras_here`` gives, and its ``InputError`` when it refuses the model."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    import numpy as np
    import torch

    with tempfile.TemporaryDirectory(prefix="edgeres-keras-") as tmp:
        out = Path(tmp)
        proc = subprocess.run([sys.executable, "-m", "edgeres.sources.keras_process", str(p), arch or "", str(out)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              errors="replace", cwd=os.getcwd())
        if (out / KERAS_ERROR_FILE).exists():
            raise InputError((out / KERAS_ERROR_FILE).read_text())
        if proc.returncode != 0 or not (out / KERAS_SPEC_FILE).exists():
            reason = "killed" if proc.returncode < 0 else f"exit code {proc.returncode}"
            tail = [line for line in proc.stdout.splitlines() if line.strip()][-1:] or [""]
            raise RuntimeError(f"{p}: the process mapping the Keras model ended without a result ({reason}): {tail[0]}")
        spec = ResNetSpec.from_dict(json.loads((out / KERAS_SPEC_FILE).read_text()))
        with np.load(out / KERAS_WEIGHTS_FILE, allow_pickle=False) as z:
            state_dict = {k: torch.from_numpy(z[k]) for k in z.files}
    return spec, state_dict


def _size_bytes(p: Path) -> int:
    """A file's size, or the sum of a folder's (a SavedModel)."""
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _check_mapped(p: Path, arch: str | None, spec: ResNetSpec, state_dict: dict, what: str) -> None:
    """The checks every imported (mapped) model passes before its mapping is verified by running it."""
    _check_finite(state_dict, p)
    if arch is not None:
        want = get_spec(arch, num_classes=spec.num_classes)
        if (want.stem, want.block, want.layers) != (spec.stem, spec.block, spec.layers):
            raise InputError(f"{p}: the {what} is a {spec.name}, not {arch}; omit --arch")
    check_state_dict(spec, state_dict, p, arch)


def _sha256_dir(p: Path) -> str:
    """One digest over a folder's files (names and contents), e.g. a SavedModel."""
    h = hashlib.sha256()
    for f in sorted(x for x in p.rglob("*") if x.is_file()):
        h.update(str(f.relative_to(p)).encode() + b"\0" + sha256_file(f).encode())
    return h.hexdigest()


def _plain_data_globals() -> list:
    """The only classes a checkpoint's pickle may name besides tensors and containers: plain data that
    training scripts save beside the weights and that runs no code when rebuilt. torchvision's
    ``references/classification/train.py`` saves its ``argparse.Namespace`` of arguments as ``"args"``."""
    import argparse

    return [argparse.Namespace]


def _torch_load(p: Path):
    import contextlib
    import pickle
    import re

    import torch

    with open(p, "rb") as f:
        archive = f.read(4) == b"PK\x03\x04"  # torch.load's own test for the zip format
    if archive:
        _refuse_torchscript(p, check_archive(p, "PyTorch checkpoint"))
    # scoped to this call: nothing else in the process may unpickle these classes
    safe_globals = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    allowed = safe_globals(_plain_data_globals()) if safe_globals else contextlib.nullcontext()
    try:
        with warnings.catch_warnings(), allowed:
            warnings.simplefilter("ignore")  # pickle-protocol notes; the refusal below says what matters
            # mmap: the storages stay in the file until _check_tensor_sizes has seen what they declare
            return torch.load(str(p), map_location="cpu", weights_only=True, mmap=archive), "pytorch"
    except pickle.UnpicklingError as e:
        text = str(e).split("WeightsUnpickler error:")[-1]
        foreign = re.search(r"GLOBAL (\S+) was not an allowed global", text)
        if foreign:
            raise InputError(
                f"{p}: refused: the checkpoint holds an object of {foreign.group(1)}, a Python class or function that "
                "could run code when loaded (nothing was executed); save only the weights: torch.save({'model': model.state_dict()}, path)"
            ) from None
        raise InputError(
            f"{p}: refused: not a tensor-only checkpoint ({_first_sentence(text) or type(e).__name__}); it is corrupt, "
            "or holds Python objects that could run code (nothing was executed); save only the state_dict: "
            "torch.save(model.state_dict(), path)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, IndexError, KeyError) as e:
        raise InputError(f"{p}: is not a readable PyTorch checkpoint ({first_line(e, 160, with_type=True)}); the file is corrupt or truncated") from None


def _first_sentence(text: str, limit: int = 160) -> str:
    """The first line of ``text`` up to its first full stop, cut at a word (never mid-word) past ``limit``."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    sentence = lines[0].split(". ")[0].rstrip(".") if lines else ""
    if len(sentence) > limit:
        sentence = sentence[:limit].rsplit(" ", 1)[0] + " …"
    return sentence


def _refuse_torchscript(p: Path, members) -> None:
    """TorchScript is a program, not weights: its code (``__setstate__`` included) runs when it is loaded."""
    inner = [m.filename.split("/", 1)[-1] for m in members]
    if any(n.startswith("code/") or n in ("constants.pkl", "bytecode.pkl") for n in inner):
        raise InputError(f"{p}: is a TorchScript archive (a program; loading it would run its code), refused "
                         "(nothing was executed); save the weights instead: torch.save(model.state_dict(), path)")


def _check_tensor_sizes(tensors: dict, p: Path) -> None:
    """Refuse tensors that claim more memory than they store, before anything copies them: a stride-0
    (expanded) tensor can store 4 bytes and read as 40 GB once converted or compared."""
    total = 0
    for k, v in tensors.items():
        declared, stored = v.numel() * v.element_size(), v.untyped_storage().nbytes()
        if declared > stored or any(st == 0 and n > 1 for n, st in zip(v.shape, v.stride())):
            shape = "×".join(map(str, v.shape))
            raise InputError(f"{p}: tensor {k} ({shape}) declares {size_text(declared)} but stores {size_text(stored)} "
                             "(an expanded, stride-0 view), refused (nothing was allocated); save real tensors: "
                             "torch.save({k: v.clone() for k, v in model.state_dict().items()}, path)")
        total += declared
    check_weight_bytes(p, total)


def _unwrap(raw, p: Path):
    import torch

    saved_spec, extra = None, None
    if not isinstance(raw, dict):
        raise InputError(f"{p}: holds a {type(raw).__name__}, not a state_dict; save model.state_dict()")
    if SPEC_KEY in raw:
        saved_spec = ResNetSpec.from_dict(raw[SPEC_KEY])
        extra = raw.get("edgeres_extra")
    for key in ("state_dict", "model_state_dict", "model", "net", "weights"):
        if key in raw and isinstance(raw[key], dict):
            raw = raw[key]
            break
    tensors = {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise InputError(f"{p}: contains no tensors; expected a state_dict or {{'state_dict': ...}}")
    _check_tensor_sizes(tensors, p)
    cleaned = {}
    for k, v in tensors.items():
        for prefix in ("module.", "model.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        # a copy in memory: the loaded tensor is a view into the memory-mapped file
        cleaned[k] = v.to(torch.float32, copy=True) if v.is_floating_point() else v.clone()
    return cleaned, saved_spec, extra


def _check_finite(sd: dict, p: Path) -> None:
    import torch

    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise InputError(f"{p}: weights contain NaN or Inf ({', '.join(bad[:3])}); the checkpoint is broken")
    # a BatchNorm's running variance is a variance: below zero, folding it takes a square root of a
    # negative number and every artifact would compute NaN
    negative = [k for k, v in sd.items() if k.endswith("running_var") and v.is_floating_point() and (v < 0).any()]
    if negative:
        raise InputError(f"{p}: BatchNorm running variance below zero ({', '.join(negative[:3])}); the checkpoint "
                         "is broken — re-export it from the trained model")


def save_checkpoint(path: str | Path, spec: ResNetSpec, state_dict: dict, extra: dict | None = None) -> None:
    """Write an edgeres checkpoint (spec + weights) atomically; loadable with ``weights_only=True``."""
    import torch

    path = Path(path)
    payload = {SPEC_KEY: spec.to_dict(), "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()}}
    if extra:
        payload["edgeres_extra"] = extra
    try:
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
    except OSError as e:
        raise InputError(f"{path}: cannot write checkpoint ({e.strerror}); choose a writable path") from None
