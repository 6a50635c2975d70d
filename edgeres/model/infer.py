"""A ResNet's spec read off a state_dict's tensor shapes, and the check that weights fit a spec:
shared by every reader in ``edgeres.sources`` (checkpoints, ONNX graphs, Keras models)."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from edgeres.errors import InputError
from edgeres.model.limits import check_input_side, check_weight_bytes
from edgeres.model.torch_model import build_torch
from edgeres.model.zoo import (CIFAR_PREPROCESS, IMAGENET_PREPROCESS, KERAS_TF_PREPROCESS, TIMM_D_PREPROCESS, ZOO, ResNetSpec,
                               greyscale)


def _head_weight(sd: dict):
    for k, v in sd.items():
        if k.endswith(".weight") and "." not in k[: -len(".weight")] and v.ndim == 2:
            return k[: -len(".weight")], v
    return None


_BLOCK_KEY = re.compile(r"^layer(\d+)\.(\d+)\.")


def infer_spec(sd: dict, p: Path | str = "checkpoint") -> ResNetSpec:
    """Read stem, block kind, depth and every width off the tensor shapes of a state_dict."""
    stem_w, stem_inner = sd.get("conv1.weight"), ()
    deep = [sd.get(f"conv1.{i}.weight") for i in (0, 3, 6)]
    if stem_w is None and all(w is not None and w.ndim == 4 and w.shape[-1] == 3 for w in deep):
        # timm's deep stem (ResNet-C/D): three 3×3 convs in conv1.0 / conv1.3 / conv1.6
        stem_inner, stem_w = (int(deep[0].shape[0]), int(deep[1].shape[0])), deep[0]
    head = _head_weight(sd)
    if stem_w is None or stem_w.ndim != 4 or head is None:
        raise InputError(f"{p}: does not look like a ResNet state_dict (no conv1.weight or classifier); pass --arch or check the file")
    stem = "deep" if stem_inner else "imagenet" if stem_w.shape[-1] == 7 else "cifar"
    in_channels = int(stem_w.shape[1])
    if in_channels not in (1, 3):
        raise InputError(f"{p}: conv1.weight {tuple(stem_w.shape)} takes {in_channels} input channels; edgeres converts "
                         "colour (3) and greyscale (1) models — images with other channels (e.g. RGBA, "
                         "multispectral) are not supported")
    blocks: dict[int, set[int]] = {}
    for k in sd:
        m = _BLOCK_KEY.match(k)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if not blocks or sorted(blocks) != list(range(1, len(blocks) + 1)):
        raise InputError(f"{p}: no layer1..layerN blocks found; is this a ResNet? pass --arch or check the file")
    layers = tuple(len(blocks[s]) for s in sorted(blocks))
    kind = "bottleneck" if "layer1.0.conv3.weight" in sd else "basic"
    try:
        inner, stage = [], []
        for s in range(len(layers)):
            convs = ("conv1", "conv2") if kind == "bottleneck" else ("conv1",)
            inner.append(tuple(tuple(int(sd[f"layer{s + 1}.{b}.{c}.weight"].shape[0]) for c in convs) for b in range(layers[s])))
            last = "conv3" if kind == "bottleneck" else "conv2"
            stage.append(int(sd[f"layer{s + 1}.0.{last}.weight"].shape[0]))
    except KeyError as e:
        raise InputError(f"{p}: missing key {e.args[0]} needed to read the ResNet's widths; the checkpoint is incomplete") from None
    groups = _groups(sd, layers, kind, p)
    if any(k.endswith(".downsample.0.weight") for k in sd):
        shortcut, down_key = "projection", "downsample.0.weight"
    elif any(k.endswith(".downsample.1.weight") and sd[k].ndim == 4 for k in sd):  # ResNet-D: pool, conv, BN
        shortcut, down_key = "avg_projection", "downsample.1.weight"
    else:
        shortcut, down_key = "option_a", None
    head_name, head_w = head
    num_classes = int(head_w.shape[0])
    preprocess = {"imagenet": IMAGENET_PREPROCESS, "deep": TIMM_D_PREPROCESS}.get(stem, CIFAR_PREPROCESS)
    if in_channels == 1:
        preprocess = greyscale(preprocess)
    stem_width = int(deep[2].shape[0]) if stem_inner else int(stem_w.shape[0])
    preact = "post_bn.weight" in sd  # a pre-activation ResNet (Keras v2 layout): BN + ReLU after the last stage
    if preact:
        preprocess = KERAS_TF_PREPROCESS if in_channels == 3 else greyscale(KERAS_TF_PREPROCESS)
    spec = ResNetSpec("inferred", stem, kind, layers, stem_width, tuple(stage), tuple(inner),
                      shortcut, "3x3", num_classes, head_name, preprocess, None, groups=groups,
                      in_channels=in_channels, stem_inner=stem_inner, preact=preact)
    if down_key:  # a pruned projection can join equal widths: the keys say where it is
        spec = spec.with_widths(spec.stem_width, spec.stage_widths, spec.inner_widths, name=spec.name,
                                projections=tuple(f"layer{s + 1}.0.{down_key}" in sd for s in range(len(layers))))
    for name, z in ZOO.items():
        candidate = replace(z, num_classes=num_classes, labels=z.labels if num_classes == z.num_classes else None)
        if replace(spec, name=name, labels=candidate.labels) == candidate:
            return candidate
    depth = spec.depth
    base = next((n for n, z in ZOO.items() if z.stem == stem and z.block == kind and z.layers == layers
                 and z.preact == preact), f"resnet{depth}{'v2' if preact else ''}")
    return replace(spec, name=f"{base}-custom")


def _groups(sd: dict, layers: tuple[int, ...], kind: str, p) -> int:
    """The group count of the 3×3 convs, read as torch stores a grouped weight: (out, in / groups, k, k).
    ResNeXt groups its bottlenecks' 3×3 convs, all with one count."""
    found = set()
    for s, n in enumerate(layers):
        for b in range(n):
            w, prev = sd[f"layer{s + 1}.{b}.conv2.weight"], sd[f"layer{s + 1}.{b}.conv1.weight"]
            if w.ndim != 4 or prev.ndim != 4 or w.shape[1] <= 0:
                raise InputError(f"{p}: layer{s + 1}.{b}.conv2.weight has shape {tuple(w.shape)}, not a 2-D conv's "
                                 "(out, in, k, k); the checkpoint is not a ResNet")
            cin = int(prev.shape[0])
            if cin % int(w.shape[1]):
                raise InputError(f"{p}: layer{s + 1}.{b}.conv2.weight {tuple(w.shape)} takes {int(w.shape[1])} channels "
                                 f"per group from conv1's {cin}, which no group count divides; the checkpoint is broken")
            found.add(cin // int(w.shape[1]))
    if len(found) > 1:
        raise InputError(f"{p}: the 3×3 convs are grouped with different counts ({', '.join(map(str, sorted(found)))}); "
                         "edgeres reads ResNeXt with one group count for every block")
    groups = found.pop() if found else 1
    if groups != 1 and kind != "bottleneck":
        raise InputError(f"{p}: grouped 3×3 convs (groups {groups}) in basic blocks; edgeres reads grouped convs in "
                         "bottleneck blocks only (ResNeXt), as torchvision builds them")
    return groups


def check_state_dict(spec: ResNetSpec, sd: dict, p: Path | str, arch: str | None = None) -> None:
    """Raise ``InputError`` naming missing / unexpected / mis-shaped keys when ``sd`` does not fit ``spec``."""
    # the spec may come from the file (an edgeres checkpoint): its size is checked before it is built
    check_weight_bytes(Path(p), 4 * spec.cost()["params"], f"its architecture ({spec.name})")
    check_input_side(Path(p), "its preprocessing", spec.input_size)
    expected = {k: tuple(v.shape) for k, v in build_torch(spec).state_dict().items()}
    missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in expected]
    misshaped = [f"{k} {tuple(sd[k].shape)}≠{expected[k]}" for k in expected if k in sd and tuple(sd[k].shape) != expected[k]]
    if missing or unexpected or misshaped:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
                parts.append(f"{label}: {', '.join(items[:3])}{more}")
        what = f"--arch {arch}" if arch else spec.name
        raise InputError(f"{p}: weights do not fit {what}: " + "; ".join(parts) + (
            "; check --arch or omit it to infer the architecture" if arch else ""))
