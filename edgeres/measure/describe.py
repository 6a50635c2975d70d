"""What a model file or bundle holds: arch, params, MACs, widths, artifacts."""

from __future__ import annotations

import os
from pathlib import Path

from edgeres.model.zoo import Head, ResNetSpec


def plain(value) -> str:
    """A value as a person reads it, not as Python prints it: ``[[16], [16]]`` → ``16, 16``,
    ``[64, 64]`` inside a list → ``64/64``, a dict → ``key=value, …``."""
    if isinstance(value, dict):
        return ", ".join(f"{k}={plain(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join("/".join(map(str, v)) if isinstance(v, (list, tuple)) else plain(v) for v in value)
    return str(value)


def labels_text(labels, num_classes) -> str:
    """``tench, goldfish, … (1000 names)``, or that the classes are numbered only."""
    if not labels:
        return f"{num_classes} numbered 0..{(num_classes or 1) - 1} (no names; give convert --labels FILE)"
    return ", ".join(str(v) for v in labels[:3]) + (f", … ({len(labels)} names)" if len(labels) > 3 else "")


def describe_spec(spec: ResNetSpec) -> dict:
    cost = spec.cost()
    info = {
        "arch": spec.name,
        "stem": spec.stem,
        "block": spec.block,
        "layers": list(spec.layers),
        "depth": spec.depth,
        "stem_width": spec.stem_width,
        "stage_widths": list(spec.stage_widths),
        "inner_widths": [[list(b) for b in st] for st in spec.inner_widths],
        "shortcut": spec.shortcut,
        "num_classes": spec.num_classes,
        "input_size": spec.input_size,
        "params": cost["params"],
        "macs": cost["macs"],
        "preprocess": spec.preprocess.to_dict(),
        "labels": list(spec.labels) if spec.labels else None,
    }
    if spec.in_channels != 3:  # a greyscale model
        info["in_channels"] = spec.in_channels
    if spec.preact:  # a pre-activation ResNet (Keras v2)
        info["preact"] = True
    if spec.groups != 1:  # ResNeXt: grouped 3×3 convs
        info["groups"] = spec.groups
    if spec.head_layers != Head():  # e.g. a Keras Flatten → Dense → softmax head
        info["head"] = spec.head_layers.to_dict()
    return info


def inspect_path(path: str | Path, arch: str | None = None) -> dict:
    p = Path(path)
    if p.is_dir() and not (p / "saved_model.pb").exists() and not (p / "config.json").exists():  # a bundle
        from edgeres.bundle import read_manifest

        manifest = read_manifest(p)
        info = describe_spec(ResNetSpec.from_dict(manifest["arch"]))
        info["preprocess"] = manifest["preprocess"]  # what the bundle's runs use
        info["bundle"] = str(p)
        info["artifacts"] = [
            {k: a.get(k) for k in ("target", "precision", "file", "engine", "size_bytes", "status")}
            for a in manifest["artifacts"]
        ]
        return info
    from edgeres.sources.loading import load_model

    loaded = load_model(p, arch)
    info = describe_spec(loaded.spec)
    size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else os.path.getsize(p)  # SavedModel
    info.update(file=str(p), file_size_bytes=size, format=loaded.format, sha256=loaded.sha256)
    return info
