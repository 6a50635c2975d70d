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

import numpy as np

BN_EPS = 1e-5  # torch BatchNorm2d default (as in keras_model.folded_conv)
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


def improve_for_int8(spec, state_dict: dict, calib_batches, *, levels: int = 127, clip: bool = True,
                     bias_correction: bool = True) -> tuple[dict, dict]:
    """(new state_dict, record) with weights clipped and biases corrected for ``levels``-step int8.

    ``calib_batches``: iterable of float32 NCHW preprocessed batches (used for bias correction)."""
    import torch
    import torch.nn.functional as F

    from edgeres.model.torch_model import build_torch

    sd = {k: v.detach().clone() for k, v in state_dict.items()}
    pairs = _conv_bn_pairs(sd)
    quantized: dict[str, torch.Tensor] = {}  # conv → raw weight whose folded form is on the int grid
    mse_before = mse_after = 0.0
    clipped_channels = total_channels = 0
    for conv, bn in pairs:
        w = sd[f"{conv}.weight"].double()
        scale = sd[f"{bn}.weight"].double() / torch.sqrt(sd[f"{bn}.running_var"].double() + BN_EPS)
        folded = (w * scale[:, None, None, None]).reshape(len(w), -1).numpy()
        absmax = np.abs(folded).max(axis=1)
        err_max = ((folded - quantize_symmetric(folded, absmax, levels)) ** 2).sum(axis=1)
        if clip:
            c, err = mse_clip(folded, levels)
        else:
            c, err = absmax, err_max
        mse_before += float(err_max.sum())
        mse_after += float(err.sum())
        clipped_channels += int((c < absmax).sum())
        total_channels += len(c)
        folded_clamped = np.clip(folded, -c[:, None], c[:, None])
        s = scale.numpy()[:, None]
        safe = np.where(s != 0, s, 1.0)
        raw_clamped = np.where(s != 0, folded_clamped / safe, w.reshape(len(w), -1).numpy())
        raw_q = np.where(s != 0, quantize_symmetric(folded_clamped, c, levels) / safe, raw_clamped)
        dtype = sd[f"{conv}.weight"].dtype
        sd[f"{conv}.weight"] = torch.from_numpy(raw_clamped.reshape(w.shape)).to(dtype)
        quantized[conv] = torch.from_numpy(raw_q.reshape(w.shape)).to(dtype)

    shifts_abs_mean = 0.0
    if bias_correction and pairs:
        model = build_torch(spec)
        model.load_state_dict(state_dict)  # float inputs: the original model's activations
        modules = dict(model.named_modules())
        sums = {conv: torch.zeros(quantized[conv].shape[0], dtype=torch.float64) for conv, _ in pairs}
        count = [0]

        def hook(name):
            def fn(module, inputs, output):
                delta_w = quantized[name] - module.weight
                d = F.conv2d(inputs[0], delta_w, None, module.stride, module.padding)
                sums[name] += d.double().mean(dim=(2, 3)).sum(dim=0)
            return fn

        handles = [modules[conv].register_forward_hook(hook(conv)) for conv, _ in pairs]
        try:
            with torch.no_grad():
                for x in calib_batches:
                    x = torch.as_tensor(np.asarray(x, dtype=np.float32))
                    model(x)
                    count[0] += len(x)
        finally:
            for h in handles:
                h.remove()
        if count[0]:
            shifts = []
            for conv, bn in pairs:
                scale = sd[f"{bn}.weight"].double() / torch.sqrt(sd[f"{bn}.running_var"].double() + BN_EPS)
                shift = scale * sums[conv] / count[0]  # in BN output units
                sd[f"{bn}.bias"] = (sd[f"{bn}.bias"].double() - shift).to(sd[f"{bn}.bias"].dtype)
                shifts.append(shift.abs().mean().item())
            shifts_abs_mean = float(np.mean(shifts))
    record = {
        "weight_levels": levels,
        "weight_clipping": "mse per output channel" if clip else None,
        "bias_correction": bool(bias_correction),
        "convs": len(pairs),
        "clipped_channels": clipped_channels,
        "channels": total_channels,
        "weight_qerr_before": mse_before,
        "weight_qerr_after": mse_after,
        "bias_shift_abs_mean": shifts_abs_mean,
    }
    return sd, record
