"""``--quant accurate``: weight-side int8 improvements applied once to the model (spec + state_dict),
before ONNX export and the Keras build, so every target inherits them.

1. MSE-optimal weight clipping per output channel: for each conv (with its BatchNorm folded, as the
   runtimes see it) search the clip c minimising ||w - Q_c(w)||² on the symmetric int grid with
   scale c / levels, then clamp the raw weights so max|w_folded| = c. Every runtime's per-channel
   min/max weight quantiser then reproduces exactly that grid.
2. Bias correction: the mean shift E[conv(x, Q(w))] - E[conv(x, w)] per output channel, measured on
   the calibration images with float inputs, is subtracted from the BatchNorm beta.

The classifier head is left alone: runtimes quantise it per-tensor or per-channel differently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from edgeres.model.zoo import BN_EPS

if TYPE_CHECKING:
    import torch

CLIP_GRID = np.linspace(0.5, 1.0, 51)  # clip ratios of max|w| searched per channel


def quantize_symmetric(w: np.ndarray, clip: np.ndarray, levels: int) -> np.ndarray:
    """Fake-quantise rows of ``w`` (out_channels × k) to the symmetric grid of ``levels`` steps per side."""
    scale = np.where(clip > 0, clip, 1.0)[:, None] / levels
    return np.clip(np.round(w / scale), -levels, levels) * scale


def mse_clip(w: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row clip (absolute) minimising ||w - Q(w)||² and that error; ``w`` is out_channels × k."""
    absmax = np.abs(w).max(axis=1)
    best_clip, best_err = absmax.copy(), np.full(len(w), np.inf)
    for ratio in CLIP_GRID:
        clip = absmax * ratio
        err = ((w - quantize_symmetric(w, clip, levels)) ** 2).sum(axis=1)
        better = err < best_err
        best_clip[better], best_err[better] = clip[better], err[better]
    return best_clip, best_err


def _conv_bn_pairs(state_dict: dict) -> list[tuple[str, str]]:
    """(conv, bn) module name pairs: every 4-D ``*.weight`` whose BatchNorm follows it."""
    pairs = []
    for key, value in state_dict.items():
        if not key.endswith(".weight") or getattr(value, "ndim", 0) != 4:
            continue
        conv = key[: -len(".weight")]
        prefix, _, last = conv.rpartition(".")
        if last.startswith("conv"):
            bn = (prefix + "." if prefix else "") + "bn" + last[len("conv"):]
        elif last == "0":  # downsample Sequential(conv, bn)
            bn = prefix + ".1"
        else:
            continue
        if f"{bn}.running_var" in state_dict:
            pairs.append((conv, bn))
    return pairs


@dataclass(frozen=True)
class _ClippedConv:
    """One conv after weight clipping: its clamped raw weight, that weight's fake-quantised form, and
    the per-channel quantisation error summed before (plain min/max) and after clipping."""

    weight: torch.Tensor
    quantized: torch.Tensor
    qerr_before: float
    qerr_after: float
    clipped_channels: int
    channels: int


def improve_for_int8(spec, state_dict: dict, calib_batches, *, levels: int = 127, clip: bool = True,
                     bias_correction: bool = True) -> tuple[dict, dict]:
    """(new state_dict, record) with weights clipped and biases corrected for ``levels``-step int8.

    ``calib_batches``: iterable of float32 NCHW preprocessed batches (used for bias correction)."""
    sd = {k: v.detach().clone() for k, v in state_dict.items()}
    pairs = _conv_bn_pairs(sd)
    clipped = {conv: _clip_conv(sd, conv, bn, levels, clip) for conv, bn in pairs}
    for conv, result in clipped.items():
        sd[f"{conv}.weight"] = result.weight
    quantized = {conv: result.quantized for conv, result in clipped.items()}

    shifts_abs_mean = 0.0
    if bias_correction and pairs:
        sums, images = _conv_output_shifts(spec, state_dict, quantized, calib_batches)
        if images:
            shifts_abs_mean = _correct_biases(sd, pairs, sums, images)
    results = list(clipped.values())
    record = {
        "weight_levels": levels,
        "weight_clipping": "mse per output channel" if clip else None,
        "bias_correction": bool(bias_correction),
        "convs": len(pairs),
        "clipped_channels": sum(r.clipped_channels for r in results),
        "channels": sum(r.channels for r in results),
        "weight_qerr_before": _sum_floats(r.qerr_before for r in results),
        "weight_qerr_after": _sum_floats(r.qerr_after for r in results),
        "bias_shift_abs_mean": shifts_abs_mean,
    }
    return sd, record


def _sum_floats(values) -> float:
    # plain left-to-right addition: Python ≥ 3.12's sum() compensates rounding, which would change
    # the recorded errors in their last digits from one Python to the next
    total = 0.0
    for v in values:
        total += v
    return total


def _bn_scale(sd: dict, bn: str):
    """gamma / sqrt(var + eps) of BatchNorm ``bn``, float64: what folding multiplies the conv by."""
    import torch

    return sd[f"{bn}.weight"].double() / torch.sqrt(sd[f"{bn}.running_var"].double() + BN_EPS)


def _clip_conv(sd: dict, conv: str, bn: str, levels: int, clip: bool) -> _ClippedConv:
    """Clip ``conv``'s BN-folded weight per output channel (MSE-optimal, or at max|w| without ``clip``)."""
    import torch

    w = sd[f"{conv}.weight"].double()
    scale = _bn_scale(sd, bn)
    folded = (w * scale[:, None, None, None]).reshape(len(w), -1).numpy()
    absmax = np.abs(folded).max(axis=1)
    err_max = ((folded - quantize_symmetric(folded, absmax, levels)) ** 2).sum(axis=1)
    if clip:
        c, err = mse_clip(folded, levels)
    else:
        c, err = absmax, err_max
    folded_clamped = np.clip(folded, -c[:, None], c[:, None])
    # unfold back to raw weights; a channel whose BN scale is 0 keeps its weight (its output is constant)
    s = scale.numpy()[:, None]
    safe = np.where(s != 0, s, 1.0)
    raw_clamped = np.where(s != 0, folded_clamped / safe, w.reshape(len(w), -1).numpy())
    raw_q = np.where(s != 0, quantize_symmetric(folded_clamped, c, levels) / safe, raw_clamped)
    dtype = sd[f"{conv}.weight"].dtype
    return _ClippedConv(weight=torch.from_numpy(raw_clamped.reshape(w.shape)).to(dtype),
                        quantized=torch.from_numpy(raw_q.reshape(w.shape)).to(dtype),
                        qerr_before=float(err_max.sum()), qerr_after=float(err.sum()),
                        clipped_channels=int((c < absmax).sum()), channels=len(c))


def _conv_output_shifts(spec, state_dict: dict, quantized: dict, calib_batches) -> tuple[dict, int]:
    """Per conv, the per-channel sum over images of mean(conv(x, Q(w)) - conv(x, w)), and the image
    count; ``x`` is each conv's input in the original (float, unclipped) model."""
    import torch
    import torch.nn.functional as F

    from edgeres.model.torch_model import build_torch  # imports torch, so not at the top

    model = build_torch(spec)
    model.load_state_dict(state_dict)  # float inputs: the original model's activations
    modules = dict(model.named_modules())
    sums = {conv: torch.zeros(q.shape[0], dtype=torch.float64) for conv, q in quantized.items()}

    def hook(name):
        def fn(module, inputs, output):
            delta_w = quantized[name] - module.weight
            d = F.conv2d(inputs[0], delta_w, None, module.stride, module.padding)
            sums[name] += d.double().mean(dim=(2, 3)).sum(dim=0)
        return fn

    images = 0
    handles = [modules[conv].register_forward_hook(hook(conv)) for conv in quantized]
    try:
        with torch.no_grad():
            for x in calib_batches:
                x = torch.as_tensor(np.asarray(x, dtype=np.float32))
                model(x)
                images += len(x)
    finally:
        for h in handles:
            h.remove()
    return sums, images


def _correct_biases(sd: dict, pairs: list[tuple[str, str]], sums: dict, images: int) -> float:
    """Subtract each conv's mean output shift from its BN beta (in place); the mean |shift|."""
    shifts = []
    for conv, bn in pairs:
        shift = _bn_scale(sd, bn) * sums[conv] / images  # in BN output units
        sd[f"{bn}.bias"] = (sd[f"{bn}.bias"].double() - shift).to(sd[f"{bn}.bias"].dtype)
        shifts.append(shift.abs().mean().item())
    return float(np.mean(shifts))
