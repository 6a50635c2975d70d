"""Build a ``ResNetSpec`` in Keras (NHWC) with the torch weights copied in, for the LiteRT converter.

BatchNorm is folded into the preceding conv (weights and bias), as in the fp32 ONNX reference, so the
converter sees Conv → ReLU → Add chains it fuses and quantises whole. Every padding is explicit
(``ZeroPadding2D``) where Keras' ``"same"`` would pad differently from torch (stride 2: TF pads
bottom/right only), so fp32 matches torch to float rounding.

We build with ``tf_keras`` (Keras 2): ``TFLiteConverter.from_keras_model`` traces it directly, with
no Keras-3 export detour, and its layers map one-to-one onto TFLite builtins.
"""

from __future__ import annotations

import numpy as np

from edgeres.model.zoo import BN_EPS, ResNetSpec


def folded_conv(state_dict: dict, conv: str, bn: str) -> tuple[np.ndarray, np.ndarray]:
    """Torch conv ``conv`` with BatchNorm ``bn`` folded in: (HWIO kernel, bias), float32."""
    w = _np(state_dict[f"{conv}.weight"]).astype(np.float64)  # OIHW
    gamma, beta = _np(state_dict[f"{bn}.weight"]), _np(state_dict[f"{bn}.bias"])
    mean, var = _np(state_dict[f"{bn}.running_mean"]), _np(state_dict[f"{bn}.running_var"])
    scale = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + BN_EPS)
    kernel = (w * scale[:, None, None, None]).transpose(2, 3, 1, 0)
    bias = beta - mean * scale
    return kernel.astype(np.float32), bias.astype(np.float32)


def flatten_rows_to_hwc(kernel: np.ndarray, channels: int, size: int) -> np.ndarray:
    """Dense kernel rows in torch's C×H×W flatten order → Keras' H×W×C order."""
    return kernel.reshape(channels, size, size, -1).transpose(1, 2, 0, 3).reshape(channels * size * size, -1)


def flatten_rows_to_chw(kernel: np.ndarray, channels: int, size: int) -> np.ndarray:
    """Dense kernel rows in Keras' H×W×C flatten order → torch's C×H×W order."""
    return kernel.reshape(size, size, channels, -1).transpose(2, 0, 1, 3).reshape(channels * size * size, -1)


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)


def build_keras(spec: ResNetSpec, state_dict: dict):
    """A ``tf_keras.Model`` computing the same logits as ``build_torch(spec)`` with ``state_dict``.

    Input: float32 N×size×size×in_channels (NHWC, preprocessed); output: float32 N×num_classes logits
    (probabilities when the spec's head ends in a softmax).
    """
    import tensorflow as tf
    import tf_keras as keras

    build = _KerasBuild(spec, state_dict, keras.layers, tf)
    size = spec.input_size
    inputs = keras.Input((size, size, spec.in_channels), dtype="float32", name="input")
    x = build.stem(inputs)
    for s, n in enumerate(spec.layers):
        for b in range(n):
            x = build.block(x, s, b)
    logits = build.head(x)
    model = keras.Model(inputs, logits, name=spec.name.replace("-", "_"))
    for layer, values in build.weights:
        layer.set_weights(values)
    return model


class _KerasBuild:
    """One ``build_keras`` call: the torch weights it reads, and the (layer, weights) pairs it sets
    once the model exists (a Keras layer has no weights until it has been called)."""

    def __init__(self, spec: ResNetSpec, state_dict: dict, layers, tf):
        self.spec, self.state_dict, self.layers, self.tf = spec, state_dict, layers, tf
        self.weights: list[tuple[object, list[np.ndarray]]] = []

    def conv(self, x, torch_conv: str, torch_bn: str, k: int, stride: int, relu: bool, name: str, groups: int = 1):
        """k×k conv with torch's symmetric padding (k//2), BN folded, optional fused ReLU; a grouped conv's
        OIHW weight (O, I/groups, k, k) transposes to Keras' grouped HWIO kernel (k, k, I/groups, O)."""
        kernel, bias = folded_conv(self.state_dict, torch_conv, torch_bn)
        pad = k // 2
        if pad and stride == 1:
            padding = "same"  # odd k, stride 1: TF "same" pads k//2 on every side, as torch does
        else:
            padding = "valid"
            if pad:
                x = self.layers.ZeroPadding2D(pad, name=f"{name}_pad")(x)
        layer = self.layers.Conv2D(kernel.shape[-1], k, strides=stride, padding=padding, use_bias=True,
                                   activation="relu" if relu else None, groups=groups, name=name)
        y = layer(x)
        self.weights.append((layer, [kernel, bias]))
        return y

    def biased_conv(self, x, torch_conv: str, k: int, stride: int, name: str):
        """k×k conv with its own bias and no BN (a pre-activation ResNet's stem, conv3 and projection)."""
        kernel = _np(self.state_dict[f"{torch_conv}.weight"]).transpose(2, 3, 1, 0).astype(np.float32)
        bias = _np(self.state_dict[f"{torch_conv}.bias"]).astype(np.float32)
        if k // 2:
            x = self.layers.ZeroPadding2D(k // 2, name=f"{name}_pad")(x)
        layer = self.layers.Conv2D(kernel.shape[-1], k, strides=stride, padding="valid", use_bias=True, name=name)
        y = layer(x)
        self.weights.append((layer, [kernel, bias]))
        return y

    def bn_relu(self, x, torch_bn: str, name: str):
        """A BatchNorm that follows no conv (pre-activation, post-activation) and its ReLU."""
        values = [_np(self.state_dict[f"{torch_bn}.{k}"]).astype(np.float32)
                  for k in ("weight", "bias", "running_mean", "running_var")]
        layer = self.layers.BatchNormalization(epsilon=BN_EPS, name=name)
        y = layer(x)
        self.weights.append((layer, values))
        return self.layers.ReLU(name=f"{name}_relu")(y)

    def preact_block(self, x, s: int, b: int):
        """Keras' ``residual_block_v2`` (torch ``PreActBottleneck``): BN + ReLU first, no ReLU after the Add."""
        spec, p, name = self.spec, f"layer{s + 1}.{b}", f"layer{s + 1}_{b}"
        stride = spec.block_stride(s, b)
        pre = self.bn_relu(x, f"{p}.preact_bn", f"{name}_preact_bn")
        y = self.conv(pre, f"{p}.conv1", f"{p}.bn1", 1, 1, True, f"{name}_conv1")
        y = self.conv(y, f"{p}.conv2", f"{p}.bn2", 3, stride, True, f"{name}_conv2")
        y = self.biased_conv(y, f"{p}.conv3", 1, 1, f"{name}_conv3")
        if spec.has_downsample(s, b):
            identity = self.biased_conv(pre, f"{p}.downsample.0", 1, stride, f"{name}_downsample")
        elif stride != 1:
            identity = self.layers.MaxPooling2D(1, stride, name=f"{name}_subsample")(x)
        else:
            identity = x
        return self.layers.Add(name=f"{name}_add")([y, identity])

    def option_a(self, x, cin: int, cout: int, stride: int, name: str):
        """CIFAR option A: x[:, ::s, ::s] then zero channels padded lo/hi (STRIDED_SLICE + PAD in TFLite)."""
        lo = (cout - cin) // 2
        hi = cout - cin - lo
        tf = self.tf

        def shortcut(t):
            if stride != 1:
                t = t[:, ::stride, ::stride, :]
            if lo or hi:
                t = tf.pad(t, [[0, 0], [0, 0], [0, 0], [lo, hi]])
            return t

        return self.layers.Lambda(shortcut, name=name)(x)

    def stem(self, inputs):
        if self.spec.stem == "cifar":
            return self.conv(inputs, "conv1", "bn1", 3, 1, True, "conv1")
        if self.spec.preact:  # conv with a bias, no BN or ReLU: the pool's zero padding is Keras' own
            x = self.biased_conv(inputs, "conv1", 7, 2, "conv1")
            x = self.layers.ZeroPadding2D(1, name="maxpool_pad")(x)
            return self.layers.MaxPooling2D(3, 2, padding="valid", name="maxpool")(x)
        if self.spec.stem == "deep":
            x = self.conv(inputs, "conv1.0", "conv1.1", 3, 2, True, "conv1_0")
            x = self.conv(x, "conv1.3", "conv1.4", 3, 1, True, "conv1_3")
            x = self.conv(x, "conv1.6", "bn1", 3, 1, True, "conv1_6")
        else:
            x = self.conv(inputs, "conv1", "bn1", 7, 2, True, "conv1")
        # torch max-pools with -inf padding; after ReLU every value is ≥ 0, so a zero pad gives the same max
        x = self.layers.ZeroPadding2D(1, name="maxpool_pad")(x)
        return self.layers.MaxPooling2D(3, 2, padding="valid", name="maxpool")(x)

    def block(self, x, s: int, b: int):
        """Block ``b`` of stage ``s``: torch module ``layer{s+1}.{b}``, Keras layers ``layer{s+1}_{b}_*``."""
        spec, conv = self.spec, self.conv
        if spec.preact:
            return self.preact_block(x, s, b)
        p = f"layer{s + 1}.{b}"
        name = f"layer{s + 1}_{b}"
        stride = spec.stage_strides[s] if b == 0 else 1
        cin, cout = spec.block_in_width(s, b), spec.stage_widths[s]
        if spec.block == "basic":
            y = conv(x, f"{p}.conv1", f"{p}.bn1", 3, stride, True, f"{name}_conv1")
            y = conv(y, f"{p}.conv2", f"{p}.bn2", 3, 1, False, f"{name}_conv2")
        else:
            s1, s3 = (stride, 1) if spec.stride_on == "1x1" else (1, stride)
            y = conv(x, f"{p}.conv1", f"{p}.bn1", 1, s1, True, f"{name}_conv1")
            y = conv(y, f"{p}.conv2", f"{p}.bn2", 3, s3, True, f"{name}_conv2", spec.groups)
            y = conv(y, f"{p}.conv3", f"{p}.bn3", 1, 1, False, f"{name}_conv3")
        if not spec.has_downsample(s, b):
            identity = x
        elif spec.shortcut == "projection":
            identity = conv(x, f"{p}.downsample.0", f"{p}.downsample.1", 1, stride, False, f"{name}_downsample")
        elif spec.shortcut == "avg_projection":
            # TF's "same" average pool pads bottom/right and leaves the padding out of the count: torch's
            # ceil_mode=True, count_include_pad=False on odd sides, plain 2×2 windows on even ones
            pooled = x if stride == 1 else self.layers.AveragePooling2D(2, stride, padding="same", name=f"{name}_avgpool")(x)
            identity = conv(pooled, f"{p}.downsample.1", f"{p}.downsample.2", 1, 1, False, f"{name}_downsample")
        else:
            identity = self.option_a(x, cin, cout, stride, f"{name}_shortcut")
        x = self.layers.Add(name=f"{name}_add")([y, identity])
        return self.layers.ReLU(name=f"{name}_relu")(x)

    def head(self, x):
        """Pool or flatten, then the Dense layers named after their torch keys (``hidden.0`` → ``hidden_0``)."""
        spec, layers = self.spec, self.layers
        head = spec.head_layers
        if spec.preact:
            x = self.bn_relu(x, "post_bn", "post_bn")
        if head.pool == "avg":
            x = layers.GlobalAveragePooling2D(name="avgpool")(x)
        elif head.pool == "max":
            x = layers.GlobalMaxPooling2D(name="globalmaxpool")(x)
        else:
            x = layers.Flatten(name="flatten")(x)
        dense_layers = [(f"hidden.{i}", act) for i, (_w, act) in enumerate(head.hidden)]
        dense_layers.append((spec.head, "softmax" if head.softmax else None))
        for i, (key, act) in enumerate(dense_layers):
            kernel = _np(self.state_dict[f"{key}.weight"]).T.astype(np.float32)  # (in, out)
            if i == 0 and head.pool == "flatten":
                kernel = flatten_rows_to_hwc(kernel, spec.stage_widths[-1], spec.feature_size)
            dense = layers.Dense(kernel.shape[1], activation=None if act == "linear" else act, name=key.replace(".", "_"))
            x = dense(x)
            self.weights.append((dense, [kernel, _np(self.state_dict[f"{key}.bias"]).astype(np.float32)]))
        return x
