"""Two more int8 methods from issue 8, measured in the QDQ simulation of `int8_noise_budget.py`.

* Residual-stream equalisation (cross-layer equalisation extended to residual networks): every stream
  channel of a stage is scaled by s_c — the BNs writing to the stream (stem, each block's last BN, the
  projection BN) multiply by s_c, the layers reading it (next blocks' first convs and projections, the
  classifier) divide their input columns by s_c; an option-A shortcut ties the channels it copies to the
  previous stage's scales. Block-internal ReLU channels are equalised the same way (DFQ). The fp32
  output is unchanged. Scales: (relative channel extent)^-alpha.
* Precision points (for comparison): plain PTQ with the model input, then also the conv outputs feeding
  residual adds, left in float.
* Learned weights: every BN-folded weight and bias trained through straight-through fake quantisation
  (W8 per channel, A8 per tensor at the calibration ranges) to match the fp32 logits on the calibration
  images — the strongest form of AdaRound/BRECQ-style weight optimisation.

Both are judged on the dev images by RMS logit error and top-1 flips against fp32.

    python benchmarks/int8_methods.py [--arch resnet20] [--epochs 4] [--lr 1.5e-5]
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
DATA = ROOT.parent / "shared" / "data" / "cifar10"

import int8_noise_budget as nb


def channel_ranges(spec, state_dict, batches) -> dict:
    """Per-channel (min, max) of the stem output, every block output and every BN output."""
    import torch

    from edgeres.model.torch_model import build_torch

    model = build_torch(spec)
    model.load_state_dict(state_dict)
    stats: dict = {}

    def record(name):
        def fn(module, inputs, output):
            lo, hi = output.detach().amin(dim=(0, 2, 3)), output.detach().amax(dim=(0, 2, 3))
            old = stats.get(name)
            stats[name] = (lo, hi) if old is None else (torch.minimum(old[0], lo), torch.maximum(old[1], hi))
        return fn

    for name, m in model.named_modules():
        if name == "maxpool" or isinstance(m, torch.nn.BatchNorm2d) or (name.count(".") == 1 and name.startswith("layer")):
            m.register_forward_hook(record(name))
    with torch.no_grad():
        for x in batches:
            model(torch.as_tensor(x))
    return stats


def relative_extent(lo, hi, relu: bool):
    if relu:
        lo, hi = lo.new_zeros(lo.shape), hi.clamp(min=0)
    return (hi - lo).double() / max(float(hi.max()) - min(float(lo.min()), 0.0), 1e-12)


def equalize(spec, state_dict, batches, *, alpha: float, stream: bool = True, inner: bool = True) -> dict:
    """A state_dict with the same fp32 function and equalised per-channel activation ranges."""
    import torch

    assert spec.block == "basic" and "layer1.0.downsample.0.weight" not in state_dict, "CIFAR basic-block layout only"
    sd = {k: v.clone() for k, v in state_dict.items()}
    st = channel_ranges(spec, sd, batches)

    def writer(bn, s):
        for p in ("weight", "bias"):
            sd[f"{bn}.{p}"] = sd[f"{bn}.{p}"] * s.to(sd[f"{bn}.{p}"].dtype)

    def reader(key, s):
        w = sd[key]
        sd[key] = w / s.to(w.dtype).reshape([1, -1] + [1] * (w.ndim - 2))

    blocks = [(s, f"layer{s + 1}.{b}") for s, n in enumerate(spec.layers) for b in range(n)]
    if inner:
        for _, p in blocks:
            t = relative_extent(*st[f"{p}.bn1"], True).clamp(min=1e-3) ** -alpha
            writer(f"{p}.bn1", t)
            reader(f"{p}.conv2.weight", t)
    prev = None
    for s, n in enumerate(spec.layers) if stream else ():
        names = [p for t, p in blocks if t == s]
        tensors = [(st["maxpool"], True)] if s == 0 else []
        for p in names:
            tensors += [(st[p], True), (st[f"{p}.bn2"], False)] + ([(st[f"{p}.downsample.1"], False)] if f"{p}.downsample.1" in st else [])
        want = torch.stack([relative_extent(lo, hi, r) for (lo, hi), r in tensors]).amax(0).clamp(min=1e-3) ** -alpha
        scale = want.clone()
        if s > 0 and f"{names[0]}.downsample.0.weight" not in sd:  # option A copies the previous stage's channels
            lo_pad = (len(scale) - len(prev)) // 2
            tied = slice(lo_pad, lo_pad + len(prev))
            scale = want * torch.median(prev / want[tied])
            scale[tied] = prev
        if s == 0:
            writer("bn1", scale)
            reader("layer1.0.conv1.weight", scale)
        for i, p in enumerate(names):
            writer(f"{p}.bn2", scale)
            if f"{p}.downsample.1.weight" in sd:
                writer(f"{p}.downsample.1", scale)
            if i > 0:
                reader(f"{p}.conv1.weight", scale)
        if s + 1 < len(spec.layers):
            reader(f"layer{s + 2}.0.conv1.weight", scale)
            if f"layer{s + 2}.0.downsample.0.weight" in sd:
                reader(f"layer{s + 2}.0.downsample.0.weight", scale)
        else:
            reader(f"{spec.head}.weight", scale)
        prev = scale
    return sd


def learn_weights(sim, calib: np.ndarray, *, epochs: int, lr: float, seed: int = 0):
    """Train the simulation's folded weights and biases through fake quantisation to the fp32 logits."""
    import torch
    import torch.nn.functional as F

    teacher = copy.deepcopy(sim.model)  # shares the hooks; run it with sim.enabled = False
    params = []
    for name in sim.weighted:
        m = sim.modules[name]
        params += [m.weight] + ([m.bias] if m.bias is not None else [])
        if isinstance(m, torch.nn.Conv2d):
            m.forward = lambda x, m=m: F.conv2d(x, nb.fake_quant_weight(m.weight, sim.levels, ste=True), m.bias, m.stride, m.padding)
        else:
            m.forward = lambda x, m=m: F.linear(x, nb.fake_quant_weight(m.weight, sim.levels, ste=True), m.bias)
    for p in sim.model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        for start in range(0, len(calib), 50):
            x = torch.from_numpy(calib[rng.permutation(len(calib))[start: start + 50]])
            x = torch.where(torch.from_numpy(rng.random(len(x)) < 0.5)[:, None, None, None], x.flip(3), x)
            sim.enabled = False
            with torch.no_grad():
                target = teacher(x)
            sim.enabled = True
            loss = ((sim.model(x) - target) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    for p in params:
        p.requires_grad_(False)


def main() -> None:
    from edgeres.calibration import open_dataset
    from edgeres.sources.loading import load_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet20")
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--calib-images", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1.5e-5)
    args = ap.parse_args()
    loaded = load_model(str(DATA / f"{args.arch}.th"))
    spec, pre = loaded.spec, loaded.spec.preprocess
    xs = [x for x, _ in open_dataset(DATA / "cifar10_dev.npz").batches(pre, 250, args.images)]
    calib_set = open_dataset(DATA / "cifar10_calib.npz")
    calib = [x for x, _ in calib_set.batches(pre, 50, args.calib_images)]
    sim = nb.QuantSim(spec, loaded.state_dict)
    ref = np.concatenate([sim(x) for x in xs])

    def score(label: str, sim, *, weights: bool | None = True) -> None:
        sim.enabled = True
        if weights is not None:  # None: the weights are fake-quantised inside the forward (learned)
            sim.set_weights_quantized(weights)
        q = np.concatenate([sim(x) for x in xs])
        rms, flips = float(np.sqrt(((q - ref) ** 2).mean())), int((q.argmax(1) != ref.argmax(1)).sum())
        print(f"| {label} | {rms:.3f} | {flips} |", flush=True)

    def equalised(sd):
        eq = nb.QuantSim(spec, sd)
        drift = float(np.abs(np.concatenate([eq(x) for x in xs]) - ref).max())
        assert drift < 1e-3, f"equalisation changed the fp32 logits by {drift:.3g}"  # a function-preserving rewrite
        eq.collect_ranges(calib)
        return eq

    print(f"{args.arch}, {len(ref)} dev images, {args.calib_images} calibration images (mse ranges), W8A8\n")
    print("| model | RMS logit error | top-1 flips |\n|---|---|---|")
    sim.collect_ranges(calib)
    score("plain PTQ", sim)
    measured, roles = dict(sim.ranges), nb.groups(sim.ranges, spec)
    for floats in (["model input"], ["model input", "conv outputs into residual adds"]):
        kept = [k for role in floats for k in roles[role]]
        sim.ranges = {k: v for k, v in measured.items() if k not in kept}
        score(f"plain PTQ, left in float: {' + '.join(floats)}", sim)
    for alpha in (0.5, 1.0):
        for stream, inner, what in ((True, True, "streams + block-internal"), (True, False, "streams"), (False, True, "block-internal")):
            score(f"equalised {what}, alpha {alpha}", equalised(equalize(spec, loaded.state_dict, calib, alpha=alpha, stream=stream, inner=inner)))
    sim.ranges = measured  # the plain model again: all its quantisation points, float weights to learn from
    sim.set_weights_quantized(False)
    nb.fake_quant_act = functools.partial(nb.fake_quant_act, ste=True)  # activation points, now with gradients
    all_calib = np.concatenate([x for x, _ in calib_set.batches(pre, 250)])
    learn_weights(sim, all_calib, epochs=args.epochs, lr=args.lr)
    score(f"learned weights ({len(all_calib)} calibration images, {args.epochs} epochs, lr {args.lr})", sim, weights=None)


if __name__ == "__main__":
    main()
