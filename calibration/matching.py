"""Tuned activation ranges carried to a runtime's own graph by matching activation values.

Quantisation-aware fine-tuning (``edgeres.compress.quant_finetune``) learns one range per
quantisation point of its torch model. A runtime's graph names its tensors its own way (ONNX node
outputs, TFLite tensor indices), so the ranges travel with the activations the points produce on a
few images: a runtime tensor that holds the same values (same element count, equal within float
rounding, NCHW or NHWC) is that point and takes its range. numpy only, so every target can use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RTOL = 1e-3  # relative to the tensor's largest magnitude: float32 runtimes differ by ~1e-6 here


@dataclass(frozen=True)
class ReferenceActivations:
    """Activations of the tuned model's float twin (int8 weights, float activations) on ``images``
    (NCHW float32) at each quantisation point, and the range each point was tuned to."""

    images: np.ndarray
    values: dict  # point -> array (NCHW for 4-D)
    ranges: dict  # point -> (lo, hi)

    def match(self, tensors: dict, *, layout: str = "NCHW") -> dict:
        """{tensor key: tuned (lo, hi)} for every runtime tensor (computed on ``images``) that equals
        a point's activation; tensors matching no point are left out."""
        out = {}
        for key, value in tensors.items():
            point = self._point_for(np.asarray(value, dtype=np.float32), layout)
            if point is not None:
                out[key] = tuple(float(v) for v in self.ranges[point])
        return out

    def _point_for(self, value: np.ndarray, layout: str):
        if value.ndim == 4 and layout == "NHWC":
            value = value.transpose(0, 3, 1, 2)
        for point, ref in self.values.items():
            if ref.size != value.size or len(ref) != len(value):
                continue
            ref_flat, flat = ref.reshape(len(ref), -1), value.reshape(len(value), -1)
            if ref_flat.shape != flat.shape:
                continue
            scale = max(float(np.abs(ref_flat).max()), 1e-6)
            if float(np.abs(ref_flat - flat).max()) <= RTOL * scale and _not_trivial(ref_flat):
                return point
        return None


def _not_trivial(x: np.ndarray) -> bool:
    """An all-constant activation (all zero) would match any other constant one: never a match."""
    return float(x.max()) != float(x.min())
