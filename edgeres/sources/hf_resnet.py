"""Hugging Face ``ResNetForImageClassification`` folders (what ``save_pretrained`` writes: ``config.json``
+ ``model.safetensors`` or ``pytorch_model.bin``, and ``preprocessor_config.json`` from the image
processor): its key names mapped to torchvision's, class names from ``id2label``, preprocessing from the
processor's config. Read as data: no ``transformers`` import, no code from the folder runs."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from edgeres.errors import InputError

CONFIG_FILE, PROCESSOR_FILE = "config.json", "preprocessor_config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HF_KEY_PREFIX = "resnet.embedder."  # a key every ResNetForImageClassification state_dict has
# PIL's resampling numbers, as the processors store them (PILImageResampling)
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}

_KEY_RULES = [  # HF key → torchvision key
    (re.compile(r"^resnet\.embedder\.embedder\.convolution\.(.+)$"), r"conv1.\1"),
    (re.compile(r"^resnet\.embedder\.embedder\.normalization\.(.+)$"), r"bn1.\1"),
    (re.compile(r"^resnet\.encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.convolution\.(.+)$"), None),
    (re.compile(r"^resnet\.encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.normalization\.(.+)$"), None),
    (re.compile(r"^resnet\.encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.convolution\.(.+)$"), None),
    (re.compile(r"^resnet\.encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.normalization\.(.+)$"), None),
    (re.compile(r"^classifier\.1\.(.+)$"), r"fc.\1"),
]


def is_hf_folder(p: Path) -> bool:
    return p.is_dir() and (p / CONFIG_FILE).is_file()


def looks_like_hf_keys(state_dict: dict) -> bool:
    return any(k.startswith(HF_KEY_PREFIX) for k in state_dict)


def torchvision_key(key: str) -> str | None:
    """The torchvision name of a ResNetForImageClassification key (None: a key it does not have)."""
    for pattern, template in _KEY_RULES:
        m = pattern.match(key)
        if not m:
            continue
        if template is not None:
            return m.expand(template)
        g = m.groups()
        block = f"layer{int(g[0]) + 1}.{g[1]}"
        if ".shortcut.convolution." in key:
            return f"{block}.downsample.0.{g[2]}"
        if ".shortcut.normalization." in key:
            return f"{block}.downsample.1.{g[2]}"
        kind = "conv" if ".convolution." in key else "bn"
        return f"{block}.{kind}{int(g[2]) + 1}.{g[3]}"
    return None


def _read_json(p: Path, what: str) -> dict:
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{p}: cannot read the {what} ({type(e).__name__}); re-save the folder with save_pretrained") from None
    if not isinstance(data, dict):
        raise InputError(f"{p}: the {what} is not a JSON object; re-save the folder with save_pretrained")
    return data


def read_config(folder: Path) -> dict:
    """``config.json`` of a ResNetForImageClassification, checked for what the spec can express."""
    cfg = _read_json(folder / CONFIG_FILE, "model config")
    kind, archs = cfg.get("model_type"), cfg.get("architectures") or []
    if kind != "resnet":
        raise InputError(f"{folder}: is a Hugging Face {kind or 'model'} folder ({', '.join(map(str, archs)) or 'no architectures'}), "
                         "not a ResNet; edgeres reads ResNetForImageClassification folders")
    problems = []
    if cfg.get("hidden_act", "relu") != "relu":
        problems.append(f"hidden_act {cfg.get('hidden_act')!r} (edgeres builds ReLU ResNets)")
    if cfg.get("downsample_in_first_stage", False):
        problems.append("downsample_in_first_stage (a stride-2 first stage)")
    if cfg.get("num_channels", 3) not in (1, 3):
        problems.append(f"num_channels {cfg.get('num_channels')} (colour or greyscale only)")
    if problems:
        raise InputError(f"{folder / CONFIG_FILE}: this ResNet has {'; '.join(problems)}, which edgeres cannot build")
    return cfg


def read_weights(folder: Path, torch_load) -> tuple[dict, Path]:
    """The folder's weights in torchvision key names; ``torch_load(path)`` reads a ``.bin`` (weights only)."""
    from edgeres.sources.safetensors_reader import read_safetensors

    present = [folder / n for n in WEIGHT_FILES if (folder / n).is_file()]
    if not present:
        sharded = sorted(x.name for x in folder.glob("*.index.json"))
        if sharded:
            raise InputError(f"{folder}: holds sharded weights ({sharded[0]}); a ResNet fits one file: re-save with "
                             "save_pretrained(path, max_shard_size='2GB')")
        raise InputError(f"{folder}: has config.json but no {' or '.join(WEIGHT_FILES)}; copy the whole save_pretrained folder")
    path = present[0]
    raw = read_safetensors(path) if path.suffix == ".safetensors" else torch_load(path)
    if isinstance(raw, dict) and not looks_like_hf_keys(raw) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict) or not looks_like_hf_keys(raw):
        raise InputError(f"{path}: holds no ResNetForImageClassification weights (no {HF_KEY_PREFIX}* keys); "
                         "re-save the model with save_pretrained")
    mapped, unknown = {}, []
    for key, value in raw.items():
        name = torchvision_key(key)
        if name is None:
            unknown.append(key)
        else:
            mapped[name] = value
    if unknown:
        more = f" (+{len(unknown) - 3} more)" if len(unknown) > 3 else ""
        raise InputError(f"{path}: keys a ResNetForImageClassification does not have: {', '.join(unknown[:3])}{more}; "
                         "is it another model class (e.g. a backbone with its own head)?")
    return mapped, path


def labels(cfg: dict, num_classes: int) -> tuple[str, ...] | None:
    """Class names from ``id2label``; None when they are HF's placeholders (``LABEL_0``…) or incomplete."""
    table = cfg.get("id2label") or {}
    try:
        names = [str(table[str(i)] if str(i) in table else table[i]) for i in range(num_classes)]
    except (KeyError, TypeError):
        return None
    if all(n == f"LABEL_{i}" for i, n in enumerate(names)):
        return None
    return tuple(names)


def preprocess(folder: Path, default):
    """The image processor's preprocessing (ConvNextImageProcessor, which ResNet checkpoints use): shorter
    side ``int(shortest_edge / crop_pct)``, centre crop ``shortest_edge`` (from 384 on: a direct resize,
    no crop), Pillow's ``resample`` (bicubic: 3), rescale, mean/std. ``default`` where there is no file."""
    from dataclasses import replace

    p = folder / PROCESSOR_FILE
    if not p.is_file():
        return default, False
    cfg = _read_json(p, "image processor config")
    size = cfg.get("size") or {}
    edge = size.get("shortest_edge") if isinstance(size, dict) else None
    if edge is None and isinstance(size, dict) and size.get("height") == size.get("width"):
        edge = size.get("height")
    resample = _RESAMPLE.get(cfg.get("resample", 3))
    if not isinstance(edge, int) or edge <= 0 or resample is None:
        raise InputError(f"{p}: size {size!r} / resample {cfg.get('resample')!r} is not a square crop edgeres can repeat; "
                         "give the preprocessing with --preprocess")
    crop_pct = float(cfg.get("crop_pct") or 224 / 256)
    changes = dict(size=edge, filter=resample, antialias=True)
    if not cfg.get("do_resize", True):
        changes.update(resize=None, resize_mode="shorter_side_crop")
    elif edge < 384:
        changes.update(resize=int(edge / crop_pct), resize_mode="shorter_side_crop")
    else:
        changes.update(resize=None, resize_mode="direct")
    if cfg.get("do_rescale", True):
        changes["scale"] = float(cfg.get("rescale_factor", 1 / 255))
    else:
        changes["scale"] = 1.0
    if cfg.get("do_normalize", True):
        changes["mean"] = tuple(float(v) for v in cfg.get("image_mean", default.mean))
        changes["std"] = tuple(float(v) for v in cfg.get("image_std", default.std))
    else:
        changes["mean"], changes["std"] = (0.0,) * len(default.mean), (1.0,) * len(default.std)
    if len(changes["mean"]) != default.channels:  # a greyscale model with the processor's colour statistics
        changes["mean"] = (sum(changes["mean"]) / len(changes["mean"]),) * default.channels
        changes["std"] = (sum(changes["std"]) / len(changes["std"]),) * default.channels
    if not all(math.isfinite(v) for v in (*changes["mean"], *changes["std"], changes["scale"])):
        raise InputError(f"{p}: image_mean / image_std / rescale_factor are not finite numbers")
    return replace(default, **changes), True
