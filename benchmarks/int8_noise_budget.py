"""Where the int8 error of a CIFAR ResNet comes from: a noise budget by quantisation point.

A torch simulation of the QDQ int8 model every edgeres target builds (BN folded; uint8 per-tensor
activations with the mse estimator's ranges on the calibration images — model input, every ReLU
output, every conv output feeding a residual add, pooled features, logits; int8 per-channel
weights; on ResNet-20 its whole-model RMS logit error, 0.283, matches onnxruntime's int8 artifact,
0.283) is run with each group of quantisation points switched on alone. Reported per group: RMS logit error vs fp32 and images whose top-1 flips.

    python benchmarks/int8_noise_budget.py [--arch resnet20] [--images 2000]

Used for issue 8 (why ≥ 99.5 % top-1 agreement is out of reach for plain W8A8 PTQ here).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "cifar10"


def _round(y, ste: bool):
    """Round to integers; ``ste``: with a straight-through gradient (for learning through quantisation)."""
    import torch

    return y + (torch.round(y) - y).detach() if ste else torch.round(y)


def fake_quant_act(x, lo: float, hi: float, bits: int = 8, ste: bool = False):
    """uint8 asymmetric fake quantisation as onnxruntime derives it from the range (lo, hi)."""
    import torch

    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    n = 2**bits - 1
    scale = (hi - lo) / n if hi > lo else 1.0
    zp = float(np.round(-lo / scale))
    return (torch.clamp(_round(x / scale, ste) + zp, 0, n) - zp) * scale


def weight_scale(w, levels: int):
    """Per-output-channel symmetric scale, max|w| / levels (what every runtime's quantiser picks)."""
    import torch

    absmax = w.detach().abs().reshape(len(w), -1).amax(dim=1)
    return torch.where(absmax > 0, absmax, torch.ones_like(absmax)) / levels


def fake_quant_weight(w, levels: int, ste: bool = False):
    import torch

    s = weight_scale(w, levels).reshape(-1, *([1] * (w.ndim - 1)))
    return torch.clamp(_round(w / s, ste), -levels, levels) * s


class QuantSim:
    """A BN-folded copy of the torch model; ``collect_ranges`` finds activation ranges with an
    estimator, ``enabled`` switches the activation quantisation points in ``ranges`` on and
    ``set_weights_quantized`` the per-channel int8 weights."""

    def __init__(self, spec, state_dict: dict, *, levels: int = 127):
        import torch

        from edgeres.compress.quant_accurate import _conv_bn_pairs
        from edgeres.model.torch_model import build_torch

        self.spec, self.levels = spec, levels
        sd = {k: v.detach().clone().double() if v.is_floating_point() else v for k, v in state_dict.items()}
        self.pairs = _conv_bn_pairs(sd)
        model = build_torch(spec).double()  # fold in float64, simulate in float32
        model.load_state_dict(sd)
        modules = dict(model.named_modules())
        with torch.no_grad():
            for conv, bn in self.pairs:
                c, b = modules[conv], modules[bn]
                g = b.weight / torch.sqrt(b.running_var + b.eps)
                c.weight.mul_(g.reshape(-1, 1, 1, 1))
                c.bias = torch.nn.Parameter(b.bias - b.running_mean * g)
                b.weight.fill_(1.0), b.bias.zero_(), b.running_mean.zero_(), b.running_var.fill_(1.0 - b.eps)
        self.model = model.float().eval()
        self.modules = modules
        self.points = self._quant_points()
        self.ranges: dict[str, tuple[float, float]] = {}
        self.enabled = False
        self.weighted = [conv for conv, _ in self.pairs] + [spec.head]
        self.float_weights = {n: modules[n].weight.detach().clone() for n in self.weighted}
        self._hooks = []
        self._install()

    # -- where the QDQ graph quantises ------------------------------------------------------
    def _quant_points(self) -> list[str]:
        """Module names whose output is quantised (ReLU calls are numbered: 'relu#k')."""
        pts = ["input"]
        for conv, bn in self.pairs:
            last = conv.rpartition(".")[2]
            feeds_add = conv.endswith("downsample.0") or (
                last == ("conv2" if self.spec.block == "basic" else "conv3") and conv.startswith("layer"))
            if feeds_add:
                pts.append(bn)
        return pts

    def _install(self):
        import torch

        calls: dict[str, int] = {}
        self._calls = calls

        def act_hook(name):
            def fn(module, inputs, output):
                if isinstance(module, torch.nn.ReLU):
                    k = calls.get(name, 0)
                    calls[name] = k + 1
                    key = f"{name}#{k}"
                else:
                    key = name
                return self._observe(key, output)
            return fn

        def pre(module, inputs):
            calls.clear()
            return (self._observe("input", inputs[0]),)

        self._hooks.append(self.model.register_forward_pre_hook(pre))
        add_points = set(self.points)
        for name, m in self.modules.items():
            if isinstance(m, torch.nn.ReLU) or name in add_points or name in ("avgpool", self.spec.head):
                self._hooks.append(m.register_forward_hook(act_hook(name)))

    def _observe(self, key: str, x):
        if self.observer is not None:
            self.observer(key, x)
        if self.enabled and key in self.ranges:
            lo, hi = self.ranges[key]
            return fake_quant_act(x, lo, hi)
        return x

    observer = None

    def collect_ranges(self, batches, estimator: str = "mse"):
        """Activation ranges of the float (folded) model over ``batches`` with our estimator."""
        import torch

        from edgeres.calibration.estimators import make_estimator

        ests: dict = {}

        def observe(key, x):
            ests.setdefault(key, make_estimator(estimator)).update(x.detach().float().numpy())

        self.observer, was = observe, self.enabled
        self.enabled = False
        try:
            with torch.no_grad():
                for x in batches:
                    self.model(torch.as_tensor(np.asarray(x)).float())
        finally:
            self.observer, self.enabled = None, was
        self.ranges = {k: tuple(map(float, e.compute())) for k, e in ests.items()}
        return self.ranges

    def set_weights_quantized(self, on: bool):
        import torch

        with torch.no_grad():
            for name in self.weighted:
                w = self.float_weights[name]
                self.modules[name].weight.copy_(fake_quant_weight(w, self.levels) if on else w)

    def __call__(self, x):
        import torch

        with torch.no_grad():
            return self.model(torch.as_tensor(np.asarray(x)).float()).float().numpy()


def groups(ranges: dict, spec) -> dict[str, list[str]]:
    """Quantisation points by role; a block's last ReLU call follows its residual add."""
    add_relu = "relu#1" if spec.block == "basic" else "relu#2"
    in_blocks = [k for k in ranges if k.startswith("layer")]
    return {"model input": ["input"], "stem ReLU": ["relu#0"],
            "block-internal ReLUs": [k for k in in_blocks if "relu#" in k and not k.endswith(add_relu)],
            "conv outputs into residual adds": [k for k in in_blocks if "relu#" not in k],
            "add + ReLU outputs": [k for k in in_blocks if k.endswith(add_relu)],
            "pooled features": ["avgpool"], "logits": [spec.head]}


def main() -> None:
    from edgeres.calibration import open_dataset
    from edgeres.sources.loading import load_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet20")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--calib-images", type=int, default=300)
    args = ap.parse_args()
    loaded = load_model(str(DATA / f"{args.arch}.th"))
    pre = loaded.spec.preprocess
    xs = [x for x, _ in open_dataset(DATA / "cifar10_dev.npz").batches(pre, 250, args.images)]
    calib = [x for x, _ in open_dataset(DATA / "cifar10_calib.npz").batches(pre, 50, args.calib_images)]
    sim = QuantSim(loaded.spec, loaded.state_dict)
    all_ranges = sim.collect_ranges(calib)
    ref = np.concatenate([sim(x) for x in xs])

    def score(label: str, keys, weights: bool) -> None:
        sim.ranges = {k: all_ranges[k] for k in keys}
        sim.enabled = True
        sim.set_weights_quantized(weights)
        logits = np.concatenate([sim(x) for x in xs])
        rms = float(np.sqrt(((logits - ref) ** 2).mean()))
        flips = int((logits.argmax(1) != ref.argmax(1)).sum())
        print(f"| {label} | {len(keys)} | {rms:.3f} | {flips} |")

    print(f"{args.arch}, {len(ref)} dev images, {args.calib_images} calibration images (mse ranges)\n")
    print("| quantised alone | tensors | RMS logit error | top-1 flips |\n|---|---|---|---|")
    score("everything (weights + activations)", list(all_ranges), True)
    score("weights only", [], True)
    score("activations only", list(all_ranges), False)
    for label, keys in groups(all_ranges, loaded.spec).items():
        score(label, keys, False)


if __name__ == "__main__":
    main()
