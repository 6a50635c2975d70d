"""Tuned activation ranges carried to a runtime's own graph by matching activation values.

Quantisation-aware fine-tuning (``edgeres.compress.quant_finetune``) learns one range per
quantisation point of its torch model. A runtime's graph names its tensors its own way (ONNX node
outputs, TFLite tensor indices), so the ranges travel with the activations the points produce on a
few images: a runtime tensor that holds the same values (same element count, equal within float
rounding, NCHW or NHWC) is that point and takes its range. numpy only, so every target can use it.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

RTOL = 1e-3  # relative to the tensor's largest magnitude: float32 runtimes differ by ~1e-6 here
SAMPLE_VALUES = 65_536  # values kept per image and tensor in a saved file (evenly spread over the tensor)


@dataclass(frozen=True)
class ReferenceActivations:
    """Activations of the tuned model's float twin (int8 weights, float activations) on ``images``
    (NCHW float32) at each quantisation point, and the range each point was tuned to."""

    images: np.ndarray
    values: dict  # point -> array (NCHW for 4-D); sampled (N × k, see ``sizes``) when read from a file
    ranges: dict  # point -> (lo, hi)
    # point -> values per image of the whole activation, for points whose ``values`` are an evenly spread
    # sample of it (``sample_indices``): what ``save`` writes, so a ResNet-50's activations stay small
    sizes: dict = field(default_factory=dict)

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
        if value.ndim == 0:  # a scalar is no activation
            return None
        if value.ndim == 4 and layout == "NHWC":
            value = value.transpose(0, 3, 1, 2)
        whole = value.reshape(len(value), -1)
        sampled = None  # the tensor at the saved positions, taken once for every sampled point
        for point, ref in self.values.items():
            if len(ref) != len(value):
                continue
            flat = whole
            if point in self.sizes:
                if whole.shape[1] != self.sizes[point]:
                    continue
                if sampled is None:
                    sampled = whole[:, sample_indices(whole.shape[1])]
                flat = sampled
            elif ref.size != value.size:
                continue
            ref_flat = ref.reshape(len(ref), -1)
            if ref_flat.shape != flat.shape:
                continue
            scale = max(float(np.abs(ref_flat).max()), 1e-6)
            if float(np.abs(ref_flat - flat).max()) <= RTOL * scale and _not_trivial(ref_flat):
                return point
        return None


def _not_trivial(x: np.ndarray) -> bool:
    """An all-constant activation (all zero) would match any other constant one: never a match."""
    return float(x.max()) != float(x.min())


@functools.lru_cache(maxsize=256)
def sample_indices(size: int) -> np.ndarray:
    """The positions (per image, flattened NCHW) a saved file keeps of an activation of ``size`` values.
    Made once per size (read-only): matching a ResNet-50's ~1100 tensor/point pairs re-made them for 6 s."""
    idx = np.unique(np.linspace(0, size - 1, min(size, SAMPLE_VALUES)).round().astype(np.int64))
    idx.flags.writeable = False
    return idx


def save(path: str | Path, reference: ReferenceActivations) -> None:
    """Write ``reference`` as a plain-data ``.npz`` (no pickle), each activation sampled (``sample_indices``)."""
    points = list(reference.values)
    arrays, sizes = {"images": np.asarray(reference.images, np.float32)}, {}
    for i, point in enumerate(points):
        value = np.asarray(reference.values[point], np.float32)
        flat = value.reshape(len(value), -1)
        sizes[point] = int(reference.sizes.get(point, flat.shape[1]))
        arrays[f"v{i}"] = flat if point in reference.sizes else flat[:, sample_indices(flat.shape[1])]
    meta = {"points": points, "sizes": sizes,
            "ranges": {p: [float(v) for v in r] for p, r in reference.ranges.items()}}
    arrays["meta"] = np.array(json.dumps(meta))
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def save_unavailable(path: str | Path, reason: str) -> None:
    """Say in the file a runtime waits for that there are no shared ranges to match, and why."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.npz")
    np.savez(tmp, meta=np.array(json.dumps({"unavailable": reason})))
    os.replace(tmp, path)


def load(path: str | Path) -> ReferenceActivations | str:
    """What ``save`` wrote, or the reason ``save_unavailable`` wrote."""
    with np.load(str(path), allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        if "unavailable" in meta:
            return str(meta["unavailable"])
        values = {p: z[f"v{i}"] for i, p in enumerate(meta["points"])}
        images = z["images"]
    return ReferenceActivations(images, values, {p: tuple(r) for p, r in meta["ranges"].items()}, meta["sizes"])
