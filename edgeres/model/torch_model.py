"""Build a torch ``nn.Module`` from a ``ResNetSpec`` (state_dict keys identical to torchvision's
for ImageNet specs and to the upstream CIFAR ``resnet.py`` for CIFAR specs)."""

from __future__ import annotations

from edgeres.model.zoo import ResNetSpec


def build_torch(spec: ResNetSpec):
    """A freshly initialised torch ResNet for ``spec`` (eval mode)."""
    import torch
    from torch import nn
    import torch.nn.functional as F

    class OptionAShortcut(nn.Module):
        """CIFAR option A: 2× spatial subsample and zero channels padded around the input."""

        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.stride, self.pad_lo, self.pad_hi = stride, (cout - cin) // 2, cout - cin - (cout - cin) // 2

        def forward(self, x):
            if self.stride != 1:
                x = x[:, :, :: self.stride, :: self.stride]
            return F.pad(x, (0, 0, 0, 0, self.pad_lo, self.pad_hi)) if self.pad_lo or self.pad_hi else x

    class Block(nn.Module):
        def __init__(self, cin: int, inner: tuple[int, ...], cout: int, stride: int, shortcut: nn.Module | None):
            super().__init__()
            if spec.block == "basic":
                self.conv1 = nn.Conv2d(cin, inner[0], 3, stride, 1, bias=False)
                self.bn1 = nn.BatchNorm2d(inner[0])
                self.conv2 = nn.Conv2d(inner[0], cout, 3, 1, 1, bias=False)
                self.bn2 = nn.BatchNorm2d(cout)
            else:
                s1, s3 = (stride, 1) if spec.stride_on == "1x1" else (1, stride)
                self.conv1 = nn.Conv2d(cin, inner[0], 1, s1, 0, bias=False)
                self.bn1 = nn.BatchNorm2d(inner[0])
                self.conv2 = nn.Conv2d(inner[0], inner[1], 3, s3, 1, bias=False)
                self.bn2 = nn.BatchNorm2d(inner[1])
                self.conv3 = nn.Conv2d(inner[1], cout, 1, 1, 0, bias=False)
                self.bn3 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=False)
            if isinstance(shortcut, nn.Sequential):
                self.downsample = shortcut
            else:
                self.downsample = None
                self.shortcut = shortcut  # parameter-free: no state_dict keys

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            if spec.block == "bottleneck":
                out = self.bn3(self.conv3(self.relu(out)))
            if self.downsample is not None:
                identity = self.downsample(x)
            elif self.shortcut is not None:
                identity = self.shortcut(x)
            else:
                identity = x
            return self.relu(out + identity)

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            if spec.stem == "imagenet":
                self.conv1 = nn.Conv2d(3, spec.stem_width, 7, 2, 3, bias=False)
            else:
                self.conv1 = nn.Conv2d(3, spec.stem_width, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(spec.stem_width)
            self.relu = nn.ReLU(inplace=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1) if spec.stem == "imagenet" else nn.Identity()
            for s, n in enumerate(spec.layers):
                blocks = []
                for b in range(n):
                    stride = spec.stage_strides[s] if b == 0 else 1
                    cin, cout = spec.block_in_width(s, b), spec.stage_widths[s]
                    shortcut = None
                    if spec.has_downsample(s, b):
                        if spec.shortcut == "projection":
                            shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                        else:
                            shortcut = OptionAShortcut(cin, cout, stride)
                    blocks.append(Block(cin, spec.inner_widths[s][b], cout, stride, shortcut))
                setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
            head = spec.head_layers
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
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

        def forward(self, x):
            x = self.run_stem(x)
            for s in range(len(spec.layers)):
                x = getattr(self, f"layer{s + 1}")(x)
            return self.run_head(x)

        def run_stem(self, x):
            return self.maxpool(self.relu(self.bn1(self.conv1(x))))

        def run_head(self, x):
            """Pooling, flatten, hidden Dense layers and the classifier, from the last stage's output."""
            head = spec.head_layers
            if head.pool == "avg":
                x = self.avgpool(x)
            elif head.pool == "max":
                x = self.globalmaxpool(x)
            x = torch.flatten(x, 1)  # "flatten": channel-major, see zoo.Head
            for linear, (_out, act) in zip(self.hidden if head.hidden else (), head.hidden):
                x = linear(x)
                if act == "relu":
                    x = self.relu(x)
            x = getattr(self, spec.head)(x)
            return torch.softmax(x, 1) if head.softmax else x

    return ResNet().eval()


def randomize_bn(model, seed: int = 0):
    """Give BatchNorm layers non-trivial statistics so random-weight models behave like trained ones."""
    import torch

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
