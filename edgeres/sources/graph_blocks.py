"""What the ONNX and Keras importers share: conv (+BN) units, the phase skeleton that walks a graph's
stem and residual blocks (``walk_trunk``, driving a format's ``ResNetWalker``), the checks that the
convs between two residual Adds form a ResNet block, and the stage layout (a stride-2 block opens a
stage) written out as torchvision state_dict keys. Each importer keeps only its own graph reading and
its head, which differ between the formats."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from edgeres.errors import InputError
from edgeres.model.zoo import BN_EPS  # noqa: F401 - re-exported: the importers fold BatchNorm with it

Refuse = Callable[[str], InputError]  # "what is wrong" → the importer's one-line refusal
STEM_KINDS = {(7, 2): "imagenet", (3, 1): "cifar"}  # the stem conv's (kernel, stride)


@dataclass(frozen=True)
class ConvUnit:
    weight: object  # numpy OIHW
    stride: int
    bn: dict  # weight, bias, running_mean, running_var (numpy)
    out: str  # name of the tensor / layer after the conv (and its BN, if any)


@dataclass(frozen=True)
class Shortcut:
    """How a block's input reaches its Add: "identity", "projection" (the 1×1 conv ``unit``) or
    "option_a" (Slice/Pad, no weights)."""

    kind: str
    unit: ConvUnit | None = None


@dataclass(frozen=True)
class Branch:
    """A residual block as a walker found it, before it is checked."""

    chain: tuple[ConvUnit, ...]  # the branch's convs, in order
    shortcut: Shortcut
    add: str  # the Add joining branch and shortcut, as refusals name it
    add_out: str  # the tensor / layer the Add writes


@dataclass(frozen=True)
class ResidualBlock:
    units: tuple[ConvUnit, ...]
    shortcut: Shortcut
    stride: int
    stride_at: int  # which of the units carries the stride
    cin: int
    cout: int
    add: str


@dataclass(frozen=True)
class StageLayout:
    block_kind: str  # "basic" or "bottleneck"
    shortcut_kind: str  # "projection" or "option_a"
    stride_on: str  # the bottleneck conv carrying a stage's stride: "3x3" or "1x1"


@dataclass(frozen=True)
class Stem:
    unit: ConvUnit
    kind: str  # "imagenet" (7×7/2 conv + max-pool) or "cifar" (3×3/1 conv)
    out: str  # the tensor / layer after its ReLU (and max-pool)


@dataclass(frozen=True)
class Trunk:
    """Stem and residual blocks of a walked graph; their weights are in the state_dict already."""

    stem: Stem
    blocks: tuple[ResidualBlock, ...]
    layout: StageLayout
    out: str  # where the head starts


class ResNetWalker(Protocol):
    """One format's graph, walked phase by phase; every method refuses what is not a ResNet v1."""

    def refuse(self, what: str) -> InputError: ...

    def stem(self) -> Stem: ...

    def at_head(self, x: str) -> bool: ...

    def branch(self, x: str) -> Branch: ...

    def after_add(self, branch: Branch) -> str: ...


def walk_trunk(walker: ResNetWalker, sd: dict) -> Trunk:
    """Walk stem and blocks from the graph input to the head, putting their weights into ``sd``."""
    stem = walker.stem()
    put_unit(sd, "conv1", stem.unit, "bn1")
    blocks, x = [], stem.out
    while not walker.at_head(x):
        branch = walker.branch(x)
        blocks.append(residual_block(branch, walker.refuse))
        x = walker.after_add(branch)
    layout = lay_out_stages(blocks, sd, walker.refuse)
    return Trunk(stem, tuple(blocks), layout, x)


def stem_kind(unit: ConvUnit, name: str, refuse: Refuse) -> str:
    """"imagenet" or "cifar" by the stem conv's kernel and stride; refused otherwise."""
    k = unit.weight.shape[-1]
    kind = STEM_KINDS.get((k, unit.stride))
    if kind is None:
        raise refuse(f"{name} is {k}×{k}/{unit.stride}, expected 7×7/2 or 3×3/1")
    return kind


def residual_block(branch: Branch, refuse: Refuse) -> ResidualBlock:
    """The checked block record for ``branch``; refused unless it is a basic/bottleneck block."""
    chain, shortcut, add = branch.chain, branch.shortcut, branch.add
    if len(chain) not in (2, 3):
        raise refuse(f"block ending at Add {add} has {len(chain)} convs, expected 2 or 3")
    kernels = [int(u.weight.shape[-1]) for u in chain]
    if kernels not in ([3, 3], [1, 3, 1]):
        raise refuse(f"block ending at Add {add} has kernels {kernels}, expected 3,3 or 1,3,1")
    strides = [u.stride for u in chain]
    stride = max(strides)
    if sorted(strides)[:-1] != [1] * (len(strides) - 1) or strides[-1] != 1 or stride not in (1, 2):
        raise refuse(f"block ending at Add {add} has strides {strides}, expected one stride-2 conv at most")
    if shortcut.unit is not None and shortcut.unit.stride != stride:
        raise refuse(f"projection stride {shortcut.unit.stride} ≠ block stride {stride} at Add {add}")
    return ResidualBlock(tuple(chain), shortcut, stride, strides.index(stride), int(chain[0].weight.shape[1]),
                         int(chain[-1].weight.shape[0]), add)


def lay_out_stages(blocks: list[ResidualBlock], sd: dict, refuse: Refuse) -> StageLayout:
    """Put every block's convs into ``sd`` under ``layer<s>.<b>`` keys."""
    if not blocks:
        raise refuse("no residual blocks between the stem and the head")
    kinds = {len(b.units) for b in blocks}
    if len(kinds) != 1:
        raise refuse("mixes basic (2-conv) and bottleneck (3-conv) blocks")
    block_kind = "basic" if kinds == {2} else "bottleneck"
    sc_kinds = {b.shortcut.kind for b in blocks} - {"identity"}
    if len(sc_kinds) > 1:
        raise refuse("mixes 1×1-conv and Slice/Pad shortcuts")
    shortcut_kind = sc_kinds.pop() if sc_kinds else "projection"
    stride_at = {b.stride_at for b in blocks if b.stride == 2}
    if len(stride_at) > 1:
        raise refuse("puts the stride in different convs in different blocks")
    stride_on = "1x1" if stride_at == {0} and block_kind == "bottleneck" else "3x3"
    stage, index = 0, 0
    for i, b in enumerate(blocks):
        if b.stride == 2 and i == 0:
            raise refuse(f"first block (Add {b.add}) has stride 2; edgeres' first stage keeps the resolution")
        if b.stride == 2:
            stage, index = stage + 1, 0
        if b.stride == 1 and i > 0 and b.cin != b.cout:
            raise refuse(f"block at Add {b.add} changes width without a stride; not a standard stage layout")
        pre = f"layer{stage + 1}.{index}"
        for j, u in enumerate(b.units):
            put_unit(sd, f"{pre}.conv{j + 1}", u, f"{pre}.bn{j + 1}")
        if b.shortcut.kind == "projection":
            put_unit(sd, f"{pre}.downsample.0", b.shortcut.unit, f"{pre}.downsample.1")
        index += 1
    return StageLayout(block_kind, shortcut_kind, stride_on)


def put_unit(sd: dict, conv: str, unit: ConvUnit, bn: str) -> None:
    sd[f"{conv}.weight"] = unit.weight
    for k, v in unit.bn.items():
        sd[f"{bn}.{k}"] = v


def to_state_dict(sd: dict) -> dict:
    """The walked numpy weights as the float32 torch tensors a state_dict holds."""
    import numpy as np
    import torch

    return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in sd.items()}


def check_mapping(p, source: str, spec, ref, got, rel_tol: float, hint: str) -> float:
    """Max |source − rebuilt torch| output difference relative to the output scale; the importer's
    one-line ``InputError`` ("mapping check failed") when the shapes differ or it exceeds ``rel_tol``."""
    import numpy as np

    if got.shape != ref.shape:
        raise InputError(f"{p}: mapping check failed ({source} output {ref.shape} vs rebuilt {got.shape}); {hint}")
    err = float(np.abs(got - ref).max() / max(1.0, float(np.abs(ref).max())))
    if not err <= rel_tol:
        raise InputError(f"{p}: mapping check failed (rebuilt {spec.name} differs from the {source} by "
                         f"{err:.2e} relative > {rel_tol:g}); {hint}")
    return err
