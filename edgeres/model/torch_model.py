"""Build a torch ``nn.Module`` from a ``ResNetSpec`` (state_dict keys identical to torchvision's
for ImageNet specs and to the upstream CIFAR ``resnet.py`` for CIFAR specs).

Importing this module imports torch: modules that must stay light (the CLI's ``--help``) import it
inside the functions that build a model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgeres.model.zoo import ResNetSpec


class OptionAShortcut(nn.Module):
    """CIFAR option A: 2× spatial subsample and zero channels padded around the input."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride, self.pad_lo, self.pad_hi = stride, (cout - cin) // 2, cout - cin - (cout - cin) // 2

    def forward(self, x):
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_lo, self.pad_hi)) if self.pad_lo or self.pad_hi else x


class _ResidualBlock(nn.Module):
    """What both block kinds share: the shortcut and the final add + ReLU around their ``branch``.

    A projection shortcut is ``downsample`` (torchvision's key); a parameter-free one is ``shortcut``,
    with no state_dict keys. ``prune.option_a_to_projection`` swaps one for the other in place, so
    ``skip`` looks the shortcut up at run time.
    """

    def _attach_shortcut(self, shortcut: nn.Module | None) -> None:
        # registered after the convs and BNs: the state_dict order is torchvision's
        self.relu = nn.ReLU(inplace=False)
        if isinstance(shortcut, nn.Sequential):
            self.downsample = shortcut
        else:
            self.downsample = None
            self.shortcut = shortcut

    def skip(self, x):
        if self.downsample is not None:
            return self.downsample(x)
        if self.shortcut is not None:
            return self.shortcut(x)
        return x

    def forward(self, x):
        return self.relu(self.branch(x) + self.skip(x))


class BasicBlock(_ResidualBlock):
    """Two 3×3 convs; the first carries the stride."""

    def __init__(self, cin: int, inner: tuple[int, ...], cout: int, stride: int, shortcut: nn.Module | None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, inner[0], 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner[0])
        self.conv2 = nn.Conv2d(inner[0], cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self._attach_shortcut(shortcut)

    def branch(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out))


class Bottleneck(_ResidualBlock):
    """1×1 reduce, 3×3 (grouped in ResNeXt), 1×1 expand; the stride sits on the 3×3 (torchvision v1.5) or
    the first 1×1."""

    def __init__(self, cin: int, inner: tuple[int, ...], cout: int, stride: int, shortcut: nn.Module | None,
                 stride_on: str, groups: int = 1):
        super().__init__()
        s1, s3 = (stride, 1) if stride_on == "1x1" else (1, stride)
        self.conv1 = nn.Conv2d(cin, inner[0], 1, s1, 0, bias=False)
        self.bn1 = nn.BatchNorm2d(inner[0])
        self.conv2 = nn.Conv2d(inner[0], inner[1], 3, s3, 1, groups=groups, bias=False)  # ResNeXt: groups > 1
        self.bn2 = nn.BatchNorm2d(inner[1])
        self.conv3 = nn.Conv2d(inner[1], cout, 1, 1, 0, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self._attach_shortcut(shortcut)

    def branch(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))


class PreActBottleneck(nn.Module):
    """Keras' ``residual_block_v2``: BN + ReLU first (``preact_bn``), 1×1 → 3×3 (carrying the stride) → 1×1
    with a bias, added to the shortcut with no ReLU after. The projection (``downsample``: a 1×1 conv with a
    bias) reads the pre-activated input; an identity that strides is Keras' 1×1 max-pool (``shortcut``)."""

    def __init__(self, cin: int, inner: tuple[int, ...], cout: int, stride: int, projection: bool):
        super().__init__()
        self.preact_bn = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, inner[0], 1, 1, 0, bias=False)
        self.bn1 = nn.BatchNorm2d(inner[0])
        self.conv2 = nn.Conv2d(inner[0], inner[1], 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(inner[1])
        self.conv3 = nn.Conv2d(inner[1], cout, 1, 1, 0, bias=True)
        self.relu = nn.ReLU(inplace=False)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=True)) if projection else None
        # Keras' MaxPooling2D(1, strides=s) is x[::s, ::s]: taken as that slice (option A without padding), which
        # every runtime runs (XNNPACK has no pool striding past its kernel; the ExecuTorch target rewrites the slice)
        self.shortcut = OptionAShortcut(cin, cin, stride) if stride != 1 and not projection else None

    def forward(self, x):
        pre = self.relu(self.preact_bn(x))
        skip = self.downsample(pre) if self.downsample is not None else self.shortcut(x) if self.shortcut is not None else x
        out = self.relu(self.bn1(self.conv1(pre)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.conv3(out) + skip


def _shortcut(spec: ResNetSpec, stage: int, block: int) -> nn.Module | None:
    """Block ``block`` of ``stage``'s shortcut: a 1×1 projection, option A, or None (identity)."""
    if not spec.has_downsample(stage, block):
        return None
    stride = spec.block_stride(stage, block)
    cin, cout = spec.block_in_width(stage, block), spec.stage_widths[stage]
    if spec.shortcut == "projection":
        return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
    if spec.shortcut == "avg_projection":  # ResNet-D: average the 2×2 windows, then a stride-1 projection
        # timm pools in ceil mode; on an even side that changes nothing, and without it XNNPACK (ExecuTorch)
        # takes the op, so ceil mode is kept only where the side at the spec's input size is odd
        odd = spec.stage_input_side(stage) % 2 == 1
        pool = nn.AvgPool2d(2, stride, ceil_mode=odd, count_include_pad=False) if stride != 1 else nn.Identity()
        return nn.Sequential(pool, nn.Conv2d(cin, cout, 1, 1, bias=False), nn.BatchNorm2d(cout))
    return OptionAShortcut(cin, cout, stride)


def _block(spec: ResNetSpec, stage: int, block: int) -> nn.Module:
    stride = spec.block_stride(stage, block)
    cin, cout = spec.block_in_width(stage, block), spec.stage_widths[stage]
    inner = spec.inner_widths[stage][block]
    if spec.preact:
        return PreActBottleneck(cin, inner, cout, stride, spec.has_downsample(stage, block))
    # the shortcut is built before the block's convs: that order of draws from torch's global RNG is
    # what makes a seeded build_torch reproduce earlier initial weights
    shortcut = _shortcut(spec, stage, block)
    if spec.block == "basic":
        return BasicBlock(cin, inner, cout, stride, shortcut)
    return Bottleneck(cin, inner, cout, stride, shortcut, spec.stride_on, spec.groups)


class ResNet(nn.Module):
    """Stem, stages ``layer1``…, head: the module names (and so the state_dict keys) are torchvision's."""

    def __init__(self, spec: ResNetSpec):
        super().__init__()
        # only the structure forward needs, not the spec: pruning changes the widths in place. Private
        # names, so no submodule named after spec.head can shadow them
        self._num_stages, self._head, self._classifier_name = len(spec.layers), spec.head_layers, spec.head
        self._preact = spec.preact
        self._build_stem(spec)
        for s, n in enumerate(spec.layers):
            setattr(self, f"layer{s + 1}", nn.Sequential(*(_block(spec, s, b) for b in range(n))))
        self._build_head(spec)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _build_stem(self, spec: ResNetSpec) -> None:
        if spec.stem == "deep":  # timm's keys: conv1.0, conv1.1 (BN), conv1.3, conv1.4 (BN), conv1.6
            (c0, c1), bn = spec.stem_inner, nn.BatchNorm2d
            self.conv1 = nn.Sequential(
                nn.Conv2d(spec.in_channels, c0, 3, 2, 1, bias=False), bn(c0), nn.ReLU(),
                nn.Conv2d(c0, c1, 3, 1, 1, bias=False), bn(c1), nn.ReLU(),
                nn.Conv2d(c1, spec.stem_width, 3, 1, 1, bias=False))
        elif spec.stem == "imagenet":
            self.conv1 = nn.Conv2d(spec.in_channels, spec.stem_width, 7, 2, 3, bias=spec.preact)
        else:
            self.conv1 = nn.Conv2d(spec.in_channels, spec.stem_width, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=False)
        if spec.preact:
            # no BN or ReLU before the pool, so its padding matters: Keras pads with zeros (ZeroPadding2D(1)),
            # where torch's max-pool padding is -inf; the BN + ReLU after the stages is post_bn
            self.maxpool = nn.Sequential(nn.ZeroPad2d(1), nn.MaxPool2d(3, 2))
            return
        self.bn1 = nn.BatchNorm2d(spec.stem_width)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if spec.stem in ("imagenet", "deep") else nn.Identity()

    def _build_head(self, spec: ResNetSpec) -> None:
        head = spec.head_layers
        if spec.preact:
            self.post_bn = nn.BatchNorm2d(spec.stage_widths[-1])
        if head.pool == "avg":
            self.avgpool = nn.AdaptiveAvgPool2d(1)
        elif head.pool == "max":
            self.globalmaxpool = nn.AdaptiveMaxPool2d(1)
        width = spec.head_in_features
        if head.hidden:  # Keras transfer-learning heads: Dense layers before the classifier
            self.hidden = nn.ModuleList()
            for out, _act in head.hidden:
                self.hidden.append(nn.Linear(width, out))
                width = out
        setattr(self, spec.head, nn.Linear(width, spec.num_classes))

    def forward(self, x):
        x = self.run_stem(x)
        for s in range(self._num_stages):
            x = getattr(self, f"layer{s + 1}")(x)
        return self.run_head(x)

    def run_stem(self, x):
        if self._preact:
            return self.maxpool(self.conv1(x))
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def run_head(self, x):
        """A pre-activation ResNet's post BN + ReLU, pooling, flatten, hidden Dense layers and the classifier,
        from the last stage's output."""
        head = self._head
        if self._preact:
            x = self.relu(self.post_bn(x))
        if head.pool == "avg":
            x = self.avgpool(x)
        elif head.pool == "max":
            x = self.globalmaxpool(x)
        x = torch.flatten(x, 1)  # "flatten": channel-major, see zoo.Head
        for linear, (_out, act) in zip(self.hidden if head.hidden else (), head.hidden):
            x = linear(x)
            if act == "relu":
                x = self.relu(x)
        x = getattr(self, self._classifier_name)(x)
        return torch.softmax(x, 1) if head.softmax else x


def build_torch(spec: ResNetSpec) -> ResNet:
    """A freshly initialised torch ResNet for ``spec`` (eval mode)."""
    return ResNet(spec).eval()


def randomize_bn(model, seed: int = 0):
    """Give BatchNorm layers non-trivial statistics so random-weight models behave like trained ones."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.2 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
    return model
