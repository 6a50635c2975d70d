"""ResNets as data: one frozen ``ResNetSpec`` describes any (pruned) ResNet; the zoo names the
standard ones. Every backend (torch, Keras, ONNX export) builds from the spec."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from edgeres.calibration.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from edgeres.errors import InputError
from edgeres.model.labels import label_problem

CIFAR10_LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# imagenet: 7×7/2 conv + 3×3/2 max-pool; cifar: 3×3/1 conv; deep: three 3×3 convs (the first /2) + 3×3/2
# max-pool (timm's ResNet-C/D, "Bag of Tricks"), the first two convs' widths in ``stem_inner``
STEMS = ("imagenet", "cifar", "deep")
BLOCKS = ("basic", "bottleneck")
# 1×1 conv + BN; CIFAR parameter-free subsample + zero pad; or ResNet-D's 2×2 average pool (ceil mode, padding
# not counted) before a stride-1 1×1 conv + BN (timm ``avg_down``: state_dict downsample.1 / downsample.2)
SHORTCUTS = ("projection", "option_a", "avg_projection")
STRIDE_ON = ("3x3", "1x1")  # torchvision v1.5 strides in the 3×3 conv; Keras/Caffe v1 in the first 1×1
HEAD_POOLS = ("avg", "max", "flatten")  # global average / max pool, or flatten the whole last feature map
HIDDEN_ACTIVATIONS = ("relu", "linear")
BN_EPS = 1e-5  # BatchNorm epsilon: torch BatchNorm2d default, which the zoo's models use


@dataclass(frozen=True)
class Head:
    """The classifier after the last stage. The default (global average pool → one Linear, logits out)
    is torchvision's; Keras transfer-learning heads add hidden Dense layers and a softmax.

    ``pool="flatten"`` flattens the C×H×W map in torch's (channel-major) order; Keras' Flatten is
    H×W×C, so importers permute the first Dense's weight rows (free at run time, and pruning sees a
    plain flatten). ``hidden``: (width, activation) of each Dense before the classifier (state_dict
    ``hidden.<i>``); ``softmax``: the model outputs probabilities, as the Keras original does.
    """

    pool: str = "avg"
    hidden: tuple[tuple[int, str], ...] = ()
    softmax: bool = False

    def problems(self) -> list[str]:
        out = []
        if self.pool not in HEAD_POOLS:
            out.append(f"head pool {self.pool!r} not in {HEAD_POOLS}")
        for width, act in self.hidden:
            if int(width) <= 0 or act not in HIDDEN_ACTIVATIONS:
                out.append(f"hidden layer ({width}, {act!r}) needs a positive width and an activation in {HIDDEN_ACTIVATIONS}")
        return out

    def to_dict(self) -> dict:
        return {"pool": self.pool, "hidden": [[int(w), a] for w, a in self.hidden], "softmax": self.softmax}

    @classmethod
    def from_dict(cls, d: dict) -> Head:
        return cls(str(d.get("pool", "avg")), tuple((int(w), str(a)) for w, a in d.get("hidden", ())),
                   bool(d.get("softmax", False)))


@dataclass(frozen=True)
class ResNetSpec:
    """Everything needed to rebuild a ResNet, pruned or not.

    ``stage_widths[s]`` is the width of the residual stream of stage ``s``; ``inner_widths[s][b]``
    holds the widths of block ``b``'s inner convs (basic: ``(conv1,)``; bottleneck: ``(conv1, conv2)``).
    """

    name: str
    stem: str
    block: str
    layers: tuple[int, ...]
    stem_width: int
    stage_widths: tuple[int, ...]
    inner_widths: tuple[tuple[tuple[int, ...], ...], ...]
    shortcut: str = "projection"
    stride_on: str = "3x3"
    num_classes: int = 1000
    head: str = "fc"  # state_dict name of the classifier: torchvision "fc", CIFAR upstream "linear"
    preprocess: Preprocess = Preprocess(size=224, resize=256)
    labels: tuple[str, ...] | None = None
    head_layers: Head = Head()  # recorded only when not the default, so older records read back unchanged
    # per stage: does block 0 have a projection shortcut? None = wherever its shape changes. Set when
    # pruning leaves a projection whose input and output widths came out equal (it still maps channels)
    projections: tuple[bool, ...] | None = None
    # per class, the other names it goes by (e.g. its ImageNet wnid), from a --labels table's other columns:
    # class folders named by any of them find their index. Recorded only when set.
    label_keys: tuple[tuple[str, ...], ...] | None = None
    # groups of every bottleneck's 3×3 conv: 1 for ResNet, e.g. 32 for ResNeXt-50 32×4d (torchvision's
    # ``groups``; its ``width_per_group`` is in inner_widths). Recorded only when not 1
    groups: int = 1
    # channels of the input image: 3 (colour), or 1 (greyscale, e.g. X-rays; preprocess channel_order
    # "L"). Recorded only when not 3
    in_channels: int = 3
    # the deep stem's first two 3×3 convs' widths (stem "deep"; its third conv is stem_width wide)
    stem_inner: tuple[int, ...] = ()
    # pre-activation bottlenecks (He et al. 2016, "Identity Mappings"; Keras ResNet50V2/101V2/152V2): each block
    # opens with BN + ReLU ("preact_bn"), the projection (block 0 of a stage, a 1×1 conv with bias) reads the
    # pre-activated input, conv3 has a bias and no BN, the Add ends the block without a ReLU. A stage's
    # downsampling sits on the LAST block of the stage before it (its 3×3 conv; the identity is a stride-s 1×1
    # max-pool). Stem: 7×7/2 conv with bias, no BN or ReLU, zero pad 1, 3×3/2 max-pool; a BN + ReLU
    # ("post_bn") after the last stage. Recorded only when set
    preact: bool = False

    def __post_init__(self):
        problems = list(self.head_layers.problems())
        if self.stem not in STEMS:
            problems.append(f"stem {self.stem!r} not in {STEMS}")
        if self.block not in BLOCKS:
            problems.append(f"block {self.block!r} not in {BLOCKS}")
        if self.shortcut not in SHORTCUTS:
            problems.append(f"shortcut {self.shortcut!r} not in {SHORTCUTS}")
        if self.stride_on not in STRIDE_ON:
            problems.append(f"stride_on {self.stride_on!r} not in {STRIDE_ON}")
        if len(self.stage_widths) != len(self.layers) or len(self.inner_widths) != len(self.layers):
            problems.append("stage_widths / inner_widths must have one entry per stage")
        else:
            per_block = 1 if self.block == "basic" else 2
            for s, n in enumerate(self.layers):
                if len(self.inner_widths[s]) != n or any(len(w) != per_block for w in self.inner_widths[s]):
                    problems.append(f"inner_widths of stage {s + 1} must hold {n} blocks × {per_block} widths")
        widths = [self.stem_width, *self.stage_widths, *(w for st in self.inner_widths for b in st for w in b)]
        if any(int(w) <= 0 for w in widths) or self.num_classes <= 0:
            problems.append("all widths and num_classes must be positive")
        if (self.stem == "deep") != (len(self.stem_inner) == 2) or any(int(w) <= 0 for w in self.stem_inner):
            problems.append("stem_inner must hold the two positive widths of a deep stem's first convs (stem 'deep' only)")
        if self.in_channels not in (1, 3):
            problems.append(f"in_channels {self.in_channels}: edgeres reads colour (3) or greyscale (1) images")
        elif self.in_channels != self.preprocess.channels:
            problems.append(f"in_channels {self.in_channels} but the preprocessing makes {self.preprocess.channels} "
                            f"channel(s) (channel order {self.preprocess.channel_order})")
        if self.preact and (self.stem, self.block, self.shortcut, self.groups, self.stride_on) != (
                "imagenet", "bottleneck", "projection", 1, "3x3"):
            problems.append("preact (ResNet v2) needs the imagenet stem, bottleneck blocks, projection shortcuts, "
                            "groups 1 and the stride on the 3×3 conv")
        if int(self.groups) < 1:
            problems.append(f"groups {self.groups} must be at least 1")
        elif self.groups != 1:
            if self.block != "bottleneck":
                problems.append(f"groups {self.groups}: grouped 3×3 convs need bottleneck blocks (ResNeXt)")
            elif any(w % self.groups for st in self.inner_widths for b in st for w in b):
                problems.append(f"groups {self.groups} must divide every bottleneck's inner widths")
        if self.projections is not None:
            if len(self.projections) != len(self.layers):
                problems.append("projections must have one entry per stage")
            elif any(not p and self._shape_changes(s, 0) for s, p in enumerate(self.projections)):
                problems.append("projections: a stage whose first block changes shape needs its projection")
        if self.labels is not None:
            problem = label_problem(self.labels)
            if problem:
                problems.append(problem)
            elif len(self.labels) != self.num_classes:
                problems.append(f"{len(self.labels)} labels for {self.num_classes} classes")
        if self.label_keys is not None:
            if (not isinstance(self.label_keys, tuple) or len(self.label_keys) != self.num_classes
                    or not all(isinstance(k, tuple) for k in self.label_keys)):
                problems.append(f"label_keys must hold one list of names per class ({self.num_classes})")
            else:
                problem = label_problem([k for keys in self.label_keys for k in keys], "label key")
                if problem:
                    problems.append(problem)
        if problems:
            raise InputError(f"invalid ResNet spec {self.name!r}: " + "; ".join(problems))

    # -- structure -------------------------------------------------------------------------
    @property
    def stage_strides(self) -> tuple[int, ...]:
        return tuple(1 if s == 0 else 2 for s in range(len(self.layers)))

    @property
    def input_size(self) -> int:
        return self.preprocess.size

    def block_stride(self, stage: int, block: int) -> int:
        """The stride of block ``block`` of ``stage``: a stage's first block (v1), or for pre-activation
        ResNets the last block of the stage before the one that downsamples."""
        if not self.preact:
            return self.stage_strides[stage] if block == 0 else 1
        last = block == self.layers[stage] - 1 and stage + 1 < len(self.layers)
        return self.stage_strides[stage + 1] if last else 1

    def block_in_width(self, stage: int, block: int) -> int:
        if block > 0:
            return self.stage_widths[stage]
        return self.stem_width if stage == 0 else self.stage_widths[stage - 1]

    def has_downsample(self, stage: int, block: int) -> bool:
        """True where the block has a shortcut module: where it changes shape (stride or width), or
        where ``projections`` says so."""
        if block == 0 and self.projections is not None and stage < len(self.projections):
            return bool(self.projections[stage])
        if self.preact:  # Keras' v2 projects in every stage's first block; a strided identity is a 1×1 max-pool
            return block == 0
        return self._shape_changes(stage, block)

    def _shape_changes(self, stage: int, block: int) -> bool:
        stride = self.block_stride(stage, block)
        return stride != 1 or self.block_in_width(stage, block) != self.stage_widths[stage]

    def stage_input_side(self, stage: int) -> int:
        """Height (= width) of the feature map entering stage ``stage`` at the spec's input size."""
        size = self.input_size
        for stride in ((2, 2) if self.stem in ("imagenet", "deep") else ()) + self.stage_strides[:stage]:
            size = (size + stride - 1) // stride
        return size

    @property
    def feature_size(self) -> int:
        """Height (= width) of the last stage's feature map."""
        size = self.input_size
        for stride in ((2, 2) if self.stem in ("imagenet", "deep") else ()) + self.stage_strides:
            size = (size + stride - 1) // stride
        return size

    @property
    def head_in_features(self) -> int:
        """Inputs of the first Dense/Linear of the head."""
        c = self.stage_widths[-1]
        return c * self.feature_size**2 if self.head_layers.pool == "flatten" else c

    @property
    def depth(self) -> int:
        return sum(self.layers) * (2 if self.block == "basic" else 3) + 2

    # -- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["preprocess"] = self.preprocess.to_dict()
        d["layers"] = list(self.layers)
        d["stage_widths"] = list(self.stage_widths)
        d["inner_widths"] = [[list(b) for b in st] for st in self.inner_widths]
        d["labels"] = list(self.labels) if self.labels is not None else None
        if self.head_layers == Head():
            del d["head_layers"]
        else:
            d["head_layers"] = self.head_layers.to_dict()
        if self.projections is None:
            del d["projections"]
        else:
            d["projections"] = list(self.projections)
        if self.groups == 1:
            del d["groups"]
        if self.in_channels == 3:
            del d["in_channels"]
        if not self.preact:
            del d["preact"]
        if not self.stem_inner:
            del d["stem_inner"]
        else:
            d["stem_inner"] = list(self.stem_inner)
        if self.label_keys is None:
            del d["label_keys"]
        else:
            d["label_keys"] = [list(k) for k in self.label_keys]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ResNetSpec":
        try:
            d = dict(d)
            d["preprocess"] = Preprocess.from_dict(d["preprocess"])
            d["layers"] = tuple(int(v) for v in d["layers"])
            d["stage_widths"] = tuple(int(v) for v in d["stage_widths"])
            d["inner_widths"] = tuple(tuple(tuple(int(w) for w in b) for b in st) for st in d["inner_widths"])
            d["labels"] = tuple(d["labels"]) if isinstance(d.get("labels"), list) else d.get("labels")
            if isinstance(d.get("label_keys"), list):
                d["label_keys"] = tuple(tuple(k) if isinstance(k, list) else k for k in d["label_keys"])
            if "head_layers" in d:
                d["head_layers"] = Head.from_dict(d["head_layers"])
            if d.get("projections") is not None:
                d["projections"] = tuple(bool(v) for v in d["projections"])
            for key in ("groups", "in_channels"):
                if key in d:
                    d[key] = int(d[key])
            if "preact" in d:
                d["preact"] = bool(d["preact"])
            if "stem_inner" in d:
                d["stem_inner"] = tuple(int(w) for w in d["stem_inner"])
            return cls(**d)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise InputError(f"invalid ResNet spec record ({type(e).__name__}: {e})") from None

    def with_widths(self, stem_width: int, stage_widths, inner_widths, name: str | None = None,
                    projections: tuple[bool, ...] | None = None) -> "ResNetSpec":
        """This spec with new widths; ``projections`` (per stage) is kept only where the shape rule
        would not give the same shortcuts."""
        new = replace(
            self,
            name=name or self.name,
            stem_width=int(stem_width),
            stage_widths=tuple(int(w) for w in stage_widths),
            inner_widths=tuple(tuple(tuple(int(w) for w in b) for b in st) for st in inner_widths),
            projections=None,
        )
        if projections is None or all(bool(p) == new._shape_changes(s, 0) for s, p in enumerate(projections)):
            return new
        return replace(new, projections=tuple(bool(p) for p in projections))

    # -- cost ------------------------------------------------------------------------------
    def cost(self) -> dict:
        """Parameter count and multiply-accumulates for one image (convs + FC; BN folded away)."""
        params, macs = 0, 0
        size = self.input_size

        def conv(cin, cout, k, stride, hw, bias=False, groups=1):
            nonlocal params, macs
            out = (hw + stride - 1) // stride
            params += cin // groups * cout * k * k + (cout if bias else 0)
            macs += cin // groups * cout * k * k * out * out
            return out

        def bn(c):
            nonlocal params
            params += 2 * c

        if self.stem == "deep":
            size = conv(self.in_channels, self.stem_inner[0], 3, 2, size)
            bn(self.stem_inner[0])
            conv(self.stem_inner[0], self.stem_inner[1], 3, 1, size)
            bn(self.stem_inner[1])
            conv(self.stem_inner[1], self.stem_width, 3, 1, size)
            size = (size + 1) // 2  # max-pool 3×3/2 pad 1
        elif self.stem == "imagenet":
            size = conv(self.in_channels, self.stem_width, 7, 2, size, bias=self.preact)
            size = (size + 1) // 2  # max-pool 3×3/2 pad 1
        else:
            size = conv(self.in_channels, self.stem_width, 3, 1, size)
        if not self.preact:  # a pre-activation stem has no BN; its conv has a bias
            bn(self.stem_width)
        for s, n in enumerate(self.layers):
            for b in range(n):
                stride = self.block_stride(s, b)
                cin, cout, inner = self.block_in_width(s, b), self.stage_widths[s], self.inner_widths[s][b]
                if self.preact:
                    bn(cin)
                if self.block == "basic":
                    hw = conv(cin, inner[0], 3, stride, size)
                    bn(inner[0])
                    conv(inner[0], cout, 3, 1, hw)
                else:
                    s1, s3 = (stride, 1) if self.stride_on == "1x1" else (1, stride)
                    hw = conv(cin, inner[0], 1, s1, size)
                    bn(inner[0])
                    hw = conv(inner[0], inner[1], 3, s3, hw, groups=self.groups)
                    bn(inner[1])
                    conv(inner[1], cout, 1, 1, hw, bias=self.preact)
                if not self.preact:
                    bn(cout)
                if self.has_downsample(s, b) and self.shortcut in ("projection", "avg_projection"):
                    conv(cin, cout, 1, stride, size, bias=self.preact)
                    if not self.preact:
                        bn(cout)
                size = (size + stride - 1) // stride
        if self.preact:
            bn(self.stage_widths[-1])
        width = self.head_in_features
        for out, _act in (*self.head_layers.hidden, (self.num_classes, "")):
            params += width * out + out
            macs += width * out
            width = out
        return {"params": params, "macs": macs}


def _standard(name, stem, block, layers, base, shortcut, num_classes, head, preprocess, labels=None, *,
              groups=1, width_per_group=64, stem_inner=(), preact=False):
    """torchvision's widths: stage s has planes base·2^s; a bottleneck's inner width is
    int(planes · width_per_group / 64) · groups (ResNeXt, Wide ResNet), its output planes · 4."""
    expansion = 4 if block == "bottleneck" else 1
    stage_widths = tuple(base * (2**s) * expansion for s in range(len(layers)))
    inner_width = [int(base * 2**s * width_per_group / 64) * groups for s in range(len(layers))]
    inner = tuple(
        tuple((inner_width[s],) if block == "basic" else (inner_width[s], inner_width[s]) for _ in range(n))
        for s, n in enumerate(layers)
    )
    return ResNetSpec(name, stem, block, tuple(layers), base, stage_widths, inner, shortcut, "3x3",
                      num_classes, head, preprocess, labels, groups=groups, stem_inner=tuple(stem_inner), preact=preact)


IMAGENET_PREPROCESS = Preprocess(size=224, resize=256, mean=IMAGENET_MEAN, std=IMAGENET_STD)
CIFAR_PREPROCESS = Preprocess(size=32, resize=None, mean=IMAGENET_MEAN, std=IMAGENET_STD)
TIMM_D_PREPROCESS = replace(IMAGENET_PREPROCESS, filter="bicubic")
# keras.applications.resnet_v2.preprocess_input (mode "tf"): RGB, x / 127.5 - 1, in that order; the geometry is
# the ImageNet evaluation convention, as for Keras' v1 ResNets
KERAS_TF_PREPROCESS = Preprocess(size=224, resize=256, mean=(1.0, 1.0, 1.0), std=(1.0, 1.0, 1.0), scale=1 / 127.5)


def greyscale(pre: Preprocess) -> Preprocess:
    """``pre`` for a one-channel model: images turned grey (Pillow's ``convert("L")``) before the resize,
    mean/std the average of the colour ones (ImageNet's: 0.449 / 0.226) — there is no common standard,
    so a model trained otherwise gives its own with ``--preprocess mean=M,std=S``."""
    mean, std = sum(pre.mean) / len(pre.mean), sum(pre.std) / len(pre.std)
    return replace(pre, channel_order="L", mean=(round(mean, 6),), std=(round(std, 6),))

ZOO: dict[str, ResNetSpec] = {
    **{
        name: _standard(name, "imagenet", block, layers, 64, "projection", 1000, "fc", IMAGENET_PREPROCESS)
        for name, block, layers in [
            ("resnet18", "basic", (2, 2, 2, 2)),
            ("resnet34", "basic", (3, 4, 6, 3)),
            ("resnet50", "bottleneck", (3, 4, 6, 3)),
            ("resnet101", "bottleneck", (3, 4, 23, 3)),
            ("resnet152", "bottleneck", (3, 8, 36, 3)),
        ]
    },
    # torchvision's ResNeXt (grouped 3×3 convs) and Wide ResNets: same file, same keys, other widths
    **{
        name: _standard(name, "imagenet", "bottleneck", layers, 64, "projection", 1000, "fc", IMAGENET_PREPROCESS,
                        groups=groups, width_per_group=wpg)
        for name, layers, groups, wpg in [
            ("resnext50_32x4d", (3, 4, 6, 3), 32, 4),
            ("resnext101_32x8d", (3, 4, 23, 3), 32, 8),
            ("resnext101_64x4d", (3, 4, 23, 3), 64, 4),
            ("wide_resnet50_2", (3, 4, 6, 3), 1, 128),
            ("wide_resnet101_2", (3, 4, 23, 3), 1, 128),
        ]
    },
    # timm's ResNet-D: deep stem 32-32-64, average-pool shortcuts; bicubic at crop_pct 0.875 (its weights' config)
    **{
        name: _standard(name, "deep", block, layers, 64, "avg_projection", 1000, "fc", TIMM_D_PREPROCESS,
                        stem_inner=(32, 32))
        for name, block, layers in [
            ("resnet18d", "basic", (2, 2, 2, 2)),
            ("resnet26d", "bottleneck", (2, 2, 2, 2)),
            ("resnet34d", "basic", (3, 4, 6, 3)),
            ("resnet50d", "bottleneck", (3, 4, 6, 3)),
            ("resnet101d", "bottleneck", (3, 4, 23, 3)),
            ("resnet152d", "bottleneck", (3, 8, 36, 3)),
        ]
    },
    # Keras' pre-activation ResNets (keras.applications.resnet_v2): widths as ResNet-50/101/152's
    **{
        name: _standard(name, "imagenet", "bottleneck", layers, 64, "projection", 1000, "fc", KERAS_TF_PREPROCESS,
                        preact=True)
        for name, layers in [
            ("resnet50v2", (3, 4, 6, 3)),
            ("resnet101v2", (3, 4, 23, 3)),
            ("resnet152v2", (3, 8, 36, 3)),
        ]
    },
    **{
        f"resnet{6 * n + 2}": _standard(f"resnet{6 * n + 2}", "cifar", "basic", (n, n, n), 16, "option_a", 10,
                                        "linear", CIFAR_PREPROCESS, CIFAR10_LABELS)
        for n in (3, 5, 7, 9, 18)
    },
}


def get_spec(arch: str, *, num_classes: int | None = None, input_size: int | None = None) -> ResNetSpec:
    """The zoo entry ``arch``, optionally with another class count or input size."""
    if arch not in ZOO:
        raise InputError(f"unknown architecture {arch!r}; known: {', '.join(ZOO)} (see `edgeres zoo`)")
    spec = ZOO[arch]
    if num_classes is not None and num_classes != spec.num_classes:
        spec = replace(spec, num_classes=num_classes, labels=None)
    if input_size is not None and input_size != spec.input_size:
        spec = replace(spec, preprocess=resized_preprocess(spec.preprocess, input_size))
    return spec


def resized_preprocess(pre: Preprocess, size: int, resize: int | None = None) -> Preprocess:
    """``pre`` at input ``size``; the shorter side (unless given) keeps the crop fraction and is floored,
    as timm does (``floor(size / crop_pct)``: 160 at 224/256 → 182) and torchvision's 224 → 256 agrees."""
    if pre.resize_mode == "direct" or (pre.resize is None and resize is None):
        return replace(pre, size=size, resize=None)
    return replace(pre, size=size, resize=resize if resize is not None else size * pre.resize // pre.size)
