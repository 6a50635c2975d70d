"""Map a Keras pre-activation ResNet (``keras.applications`` ResNet50V2/101V2/152V2, built by
``resnet.ResNet(preact=True, use_bias=True)`` from ``stack_residual_blocks_v2``) to a ``ResNetSpec`` with
``preact`` set and its torch state_dict.

The layer graph, as ``keras_import`` flattens it, is walked from the input along the data path:
ZeroPadding2D(3) + 7×7/2 conv with a bias (no BN, no ReLU), ZeroPadding2D(1) + 3×3/2 max-pool; then blocks
of BN → ReLU (the pre-activation), 1×1 conv + BN + ReLU, ZeroPadding2D(1) + 3×3 conv (the block's stride)
+ BN + ReLU, 1×1 conv with a bias, Add with the shortcut — a 1×1 conv with a bias on the pre-activated
input, the block input itself, or a 1×1 max-pool of it when the block strides; then BN → ReLU (post) and
the head ``keras_import`` reads. A stage opens at each projection. Layer names are never relied on.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from edgeres.sources.graph_blocks import BN_EPS, ConvUnit, Refuse, put_unit


@dataclass(frozen=True)
class _Block:
    cin: int
    inner: tuple[int, int]
    cout: int
    stride: int
    projection: bool
    add: str


@dataclass(frozen=True)
class TrunkV2:
    """Stem and pre-activation blocks of a walked graph; their weights are in the state_dict already."""

    stem_width: int
    layers: tuple[int, ...]
    stage_widths: tuple[int, ...]
    inner_widths: tuple[tuple[tuple[int, int], ...], ...]
    out: str  # the post-activation ReLU, where the head starts

    @property
    def channels(self) -> int:
        return self.stage_widths[-1]

    def spec(self, head, side: int | None, refuse: Refuse):
        """The spec of this trunk with the Keras ``head``, tf-mode preprocessing at the model's input side."""
        from edgeres.model.zoo import ZOO, ResNetSpec

        size = side or (head.feature * 32 if head.pool == "flatten" else 224)
        base = next((n for n, z in ZOO.items() if z.preact and z.layers == self.layers), f"resnet{3 * sum(self.layers) + 2}v2")
        spec = ResNetSpec(f"{base}-keras", "imagenet", "bottleneck", self.layers, self.stem_width, self.stage_widths,
                          self.inner_widths, "projection", "3x3", int(head.dense[-1].kernel.shape[1]), "fc",
                          keras_tf_preprocess(int(size)), head_layers=head.layers(), preact=True)
        if head.pool == "flatten" and spec.feature_size != head.feature:
            raise refuse(f"Flatten sees a {head.feature}×{head.feature} map but a {size}² input gives "
                          f"{spec.feature_size}×{spec.feature_size}")
        return spec


def keras_tf_preprocess(size: int):
    """``keras.applications.resnet_v2.preprocess_input`` (tf mode: RGB, x / 127.5 − 1) at ``size``, with the
    geometry of Keras' v1 ResNets (``keras_import.keras_caffe_preprocess``): shorter side size·256/224, centre crop."""
    from edgeres.model.zoo import KERAS_TF_PREPROCESS

    return replace(KERAS_TF_PREPROCESS, size=size, resize=round(size * 256 / 224))


def walk_v2(g, walk, sd: dict) -> TrunkV2:
    """Walk ``g`` (a ``keras_import._Graph``; ``walk`` its v1 walker, for the stem pool, the head test and
    refusals) from the input to the post-activation, putting the weights into ``sd``."""
    first = g.one_user(g.input, "stem convolution")
    if first.cls not in ("Conv2D", "ZeroPadding2D"):
        raise walk.refuse(f"found {first.cls} {first.id} after the input, expected the stem convolution; "
                          "preprocessing inside the model (Rescaling, preprocess_input ops) is not mapped: save the "
                          "model without it, edgeres applies keras.applications' tf preprocessing itself")
    stem = g.conv(first.id)
    k = int(stem.unit.weight.shape[-1])
    if (k, stem.unit.stride) != (7, 2) or stem.fused_relu:
        raise walk.refuse(f"the pre-activation stem conv is {k}×{k}/{stem.unit.stride}"
                          f"{' with a ReLU' if stem.fused_relu else ''}; Keras' ResNet v2 stem is a plain 7×7/2 conv")
    weight, bias = _with_bias(stem.unit)
    sd["conv1.weight"], sd["conv1.bias"] = weight, bias
    x = walk.stem_pool(stem.unit.out)
    blocks: list[_Block] = []
    while True:
        bn_node, pre = _pre_activation(g, walk, x)
        if walk.at_head(pre):
            if not blocks:
                raise walk.refuse("no residual blocks between the stem and the head")
            _put_bn(sd, "post_bn", g.batch_norm(bn_node, blocks[-1].cout))
            out = pre
            break
        block, x = _block(g, walk, x, bn_node, pre, sd, len(blocks))
        blocks.append(block)
    return _lay_out(blocks, sd, walk, out)


def _pre_activation(g, walk, x: str):
    """The BatchNormalization reading block input ``x`` and the ReLU after it."""
    bns = [u for u in g.users(x) if u.cls == "BatchNormalization"]
    if len(bns) != 1:
        kinds = ", ".join(f"{u.cls} {u.id}" for u in g.users(x)) or "nothing"
        raise walk.refuse(f"{g.nodes[x].cls} {x} feeds {kinds}, expected the BatchNormalization → ReLU that opens "
                          "a pre-activation block (or the post-activation before the head)")
    return bns[0], g.relu_after(bns[0].id, f"after BatchNormalization {bns[0].id}")


def _block(g, walk, x: str, bn_node, pre: str, sd: dict, index: int):
    """One pre-activation block from input ``x``: its record (the weights staged in ``sd`` under ``_b<index>``)
    and the Add it ends at."""
    starts = g.users(pre)
    if any(u.cls not in ("Conv2D", "ZeroPadding2D") for u in starts) or not 1 <= len(starts) <= 2:
        raise walk.refuse(f"the pre-activation {pre} feeds {', '.join(f'{u.cls} {u.id}' for u in starts)}, "
                          "expected a block's first 1×1 conv and at most a 1×1 projection")
    convs = [g.conv(u.id) for u in starts]
    proj = [c.unit for c in convs if not c.fused_relu and [v.cls for v in g.users(c.unit.out)] == ["Add"]]
    main = [c for c in convs if all(c.unit is not q for q in proj)]
    if len(main) != 1 or len(proj) != len(starts) - 1:
        raise walk.refuse(f"the pre-activation {pre} feeds {len(starts)} convolutions, not one pre-activation block")
    chain = [main[0]]
    while len(chain) < 3:  # conv (+BN) → ReLU → the next conv
        relu = chain[-1].unit.out if chain[-1].fused_relu else g.relu_after(chain[-1].unit.out, "in a residual block")
        chain.append(g.conv(g.one_user(relu, "Conv2D in a residual block").id))
    last = chain[-1]
    add = g.one_user(last.unit.out, "the Add ending a pre-activation block")
    if last.fused_relu or add.cls != "Add" or len(add.inputs) != 2:
        raise g.found(add, "the Add ending a pre-activation block (its last conv without a ReLU)")
    units = [c.unit for c in chain]
    kernels = [int(u.weight.shape[-1]) for u in units]
    strides = [u.stride for u in units]
    if kernels != [1, 3, 1] or strides[0] != 1 or strides[2] != 1 or strides[1] not in (1, 2):
        raise walk.refuse(f"pre-activation block ending at Add {add.id} has kernels {kernels} and strides {strides}, "
                          "expected 1,3,1 with the stride (1 or 2) on the 3×3 conv")
    for u in units[:2]:
        if g.nodes[u.out].cls != "BatchNormalization":
            raise walk.refuse(f"conv {u.out} in the block ending at Add {add.id} has no BatchNormalization after it")
    stride = strides[1]
    other = add.inputs[1 - add.inputs.index(last.unit.out)]
    if proj:
        if other != proj[0].out or proj[0].weight.shape[-1] != 1 or proj[0].stride != stride:
            raise walk.refuse(f"Add {add.id} shortcut is not a 1×1 projection with the block's stride {stride}")
    elif stride == 1 and other != x:
        raise walk.refuse(f"Add {add.id} shortcut comes from {g.nodes[other].cls} {other}, not the block input")
    elif stride != 1:
        pool = g.nodes[other]
        c = pool.cfg if pool.cls == "MaxPooling2D" else {}
        if not (pool.inputs == [x] and _ints(c.get("pool_size")) == [1, 1] and _ints(c.get("strides")) == [stride, stride]):
            raise walk.refuse(f"Add {add.id} shortcut comes from {pool.cls} {other}, expected the block input through "
                              f"MaxPooling2D(1, strides={stride}), as Keras strides an identity shortcut")
    cin = int(units[0].weight.shape[1])
    pre_key = f"_b{index}"
    _put_bn(sd, f"{pre_key}.preact_bn", g.batch_norm(bn_node, cin))
    put_unit(sd, f"{pre_key}.conv1", units[0], f"{pre_key}.bn1")
    put_unit(sd, f"{pre_key}.conv2", units[1], f"{pre_key}.bn2")
    sd[f"{pre_key}.conv3.weight"], sd[f"{pre_key}.conv3.bias"] = _with_bias(units[2])
    if proj:
        sd[f"{pre_key}.downsample.0.weight"], sd[f"{pre_key}.downsample.0.bias"] = _with_bias(proj[0])
    block = _Block(cin, (int(units[0].weight.shape[0]), int(units[1].weight.shape[0])), int(units[2].weight.shape[0]),
                   stride, bool(proj), add.id)
    return block, add.id


def _lay_out(blocks: list[_Block], sd: dict, walk, out: str) -> TrunkV2:
    """Blocks into stages (each opens at a projection; a stage's last block carries the next one's stride),
    their staged weights renamed to ``layer<s>.<b>`` keys."""
    stages: list[list[int]] = []
    for i, b in enumerate(blocks):
        if b.projection:
            stages.append([])
        elif not stages:
            raise walk.refuse(f"the first block (Add {b.add}) has no projection shortcut; Keras' ResNet v2 opens "
                              "every stage with one")
        elif b.cin != b.cout:
            raise walk.refuse(f"block at Add {b.add} changes width without a projection")
        stages[-1].append(i)
    for s, members in enumerate(stages):
        for j, i in enumerate(members):
            want = 2 if (j == len(members) - 1 and s + 1 < len(stages)) else 1
            if blocks[i].stride != want:
                where = "the last block of every stage but the last" if want == 2 else "no other block"
                raise walk.refuse(f"block at Add {blocks[i].add} has stride {blocks[i].stride}; Keras' ResNet v2 "
                                  f"strides {where} (stride 2)")
    for s, members in enumerate(stages):
        for j, i in enumerate(members):
            for key in [k for k in sd if k.startswith(f"_b{i}.")]:
                sd[f"layer{s + 1}.{j}.{key.split('.', 1)[1]}"] = sd.pop(key)
    return TrunkV2(int(sd["conv1.weight"].shape[0]), tuple(len(m) for m in stages),
                   tuple(blocks[m[0]].cout for m in stages),
                   tuple(tuple(blocks[i].inner for i in m) for m in stages), out)


def _with_bias(unit: ConvUnit) -> tuple[np.ndarray, np.ndarray]:
    """(OIHW weight, bias) of a conv whose BN (an identity holding the conv's bias when it has none) is folded in."""
    bn = unit.bn
    scale = np.asarray(bn["weight"], np.float64) / np.sqrt(np.asarray(bn["running_var"], np.float64) + BN_EPS)
    weight = np.asarray(unit.weight, np.float64) * scale[:, None, None, None]
    return weight, np.asarray(bn["bias"], np.float64) - np.asarray(bn["running_mean"], np.float64) * scale


def _ints(v) -> list[int]:
    return [int(i) for i in np.ravel(v)] if v is not None else []


def _put_bn(sd: dict, name: str, bn: dict) -> None:
    for k, v in bn.items():
        sd[f"{name}.{k}"] = v
