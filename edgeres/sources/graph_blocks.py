"""What the ONNX and Keras importers share once they have walked a graph: conv (+BN) units, the
checks that the convs between two residual Adds form a ResNet block, and the stage layout (a stride-2
block opens a stage) written out as torchvision state_dict keys."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from edgeres.errors import InputError

BN_EPS = 1e-5  # torch BatchNorm2d default, which build_torch uses
Refuse = Callable[[str], InputError]  # "what is wrong" → the importer's one-line refusal


@dataclass
class ConvUnit:
    weight: object  # numpy OIHW
    stride: int
    bn: dict  # weight, bias, running_mean, running_var (numpy)
    out: str  # name of the tensor / layer after the conv (and its BN, if any)


def residual_block(chain: list[ConvUnit], shortcut: tuple[str, ConvUnit | None], add: str, refuse: Refuse) -> dict:
    """A block record for the branch ``chain`` joined with ``shortcut`` ("identity", "projection" or
    "option_a", with the projection unit) at Add ``add``; refused unless it is a basic/bottleneck block."""
    if len(chain) not in (2, 3):
        raise refuse(f"block ending at Add {add} has {len(chain)} convs, expected 2 or 3")
    kernels = [int(u.weight.shape[-1]) for u in chain]
    if kernels not in ([3, 3], [1, 3, 1]):
        raise refuse(f"block ending at Add {add} has kernels {kernels}, expected 3,3 or 1,3,1")
    strides = [u.stride for u in chain]
    stride = max(strides)
    if sorted(strides)[:-1] != [1] * (len(strides) - 1) or strides[-1] != 1 or stride not in (1, 2):
        raise refuse(f"block ending at Add {add} has strides {strides}, expected one stride-2 conv at most")
    if shortcut[1] is not None and shortcut[1].stride != stride:
        raise refuse(f"projection stride {shortcut[1].stride} ≠ block stride {stride} at Add {add}")
    return {"units": chain, "shortcut": shortcut, "stride": stride, "stride_at": strides.index(stride),
            "cin": int(chain[0].weight.shape[1]), "cout": int(chain[-1].weight.shape[0]), "add": add}


def lay_out_stages(blocks: list[dict], sd: dict, refuse: Refuse) -> tuple[str, str, str]:
    """Put every block's convs into ``sd`` under ``layer<s>.<b>`` keys; returns (block kind, shortcut
    kind, stride_on)."""
    if not blocks:
        raise refuse("no residual blocks between the stem and the head")
    kinds = {len(b["units"]) for b in blocks}
    if len(kinds) != 1:
        raise refuse("mixes basic (2-conv) and bottleneck (3-conv) blocks")
    block_kind = "basic" if kinds == {2} else "bottleneck"
    sc_kinds = {b["shortcut"][0] for b in blocks} - {"identity"}
    if len(sc_kinds) > 1:
        raise refuse("mixes 1×1-conv and Slice/Pad shortcuts")
    shortcut_kind = sc_kinds.pop() if sc_kinds else "projection"
    stride_at = {b["stride_at"] for b in blocks if b["stride"] == 2}
    if len(stride_at) > 1:
        raise refuse("puts the stride in different convs in different blocks")
    stride_on = "1x1" if stride_at == {0} and block_kind == "bottleneck" else "3x3"
    stage, index = 0, 0
    for i, b in enumerate(blocks):
        if b["stride"] == 2 and i == 0:
            raise refuse(f"first block (Add {b['add']}) has stride 2; edgeres' first stage keeps the resolution")
        if b["stride"] == 2:
            stage, index = stage + 1, 0
        if b["stride"] == 1 and i > 0 and b["cin"] != b["cout"]:
            raise refuse(f"block at Add {b['add']} changes width without a stride; not a standard stage layout")
        pre = f"layer{stage + 1}.{index}"
        for j, u in enumerate(b["units"]):
            put_unit(sd, f"{pre}.conv{j + 1}", u, f"{pre}.bn{j + 1}")
        if b["shortcut"][0] == "projection":
            put_unit(sd, f"{pre}.downsample.0", b["shortcut"][1], f"{pre}.downsample.1")
        index += 1
    return block_kind, shortcut_kind, stride_on


def put_unit(sd: dict, conv: str, unit: ConvUnit, bn: str) -> None:
    sd[f"{conv}.weight"] = unit.weight
    for k, v in unit.bn.items():
        sd[f"{bn}.{k}"] = v


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
