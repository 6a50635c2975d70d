"""``--quant finetune``: quantisation-aware distillation on the int8 grids the targets run.

The BN-folded model is fake-quantised exactly as the int8 graphs compute: per-output-channel
symmetric int8 weights with scale ``max|w| / 127`` (every runtime's weight quantiser recomputes that
from the weights it is given), and per-tensor asymmetric 8-bit activations at every point the QDQ and
TFLite graphs quantise — the model input, every ReLU output, every conv output feeding a residual add,
the pooled features and the logits — with ``scale = (hi - lo) / 255``, ``zero_point = round(-lo / scale)``.
Ranges start from the shared estimator on the calibration images and are learned (LSQ-style: the
gradient reaches the scale through the straight-through rounding) or kept fixed. Weights and ranges
are trained against the fp32 model's logits (KD) on the fine-tune images.

Lowering: the tuned weights are put on their grid and written back into the state_dict (BN made an
exact identity), so a runtime's min/max weight quantiser finds that very grid; the tuned ranges travel
as ``calibration.matching.ReferenceActivations`` and replace the estimator's range on every runtime
tensor that holds a point's activation. The int8 graphs are those of ``--quant fast``, op for op.

Reproducible by seed at a fixed thread count (``torch.set_num_threads``), like ``distill``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace

import numpy as np

from edgeres.calibration import DataError, ImageDataset, open_dataset
from edgeres.calibration.estimators import make_estimator
from edgeres.calibration.matching import ReferenceActivations
from edgeres.compress.distill import augment
from edgeres.compress.quant_accurate import _conv_bn_pairs
from edgeres.errors import InputError
from edgeres.int8.ranges import exposing_session
from edgeres.model.zoo import BN_EPS
from edgeres.progress import log, progress

MIN_FINETUNE_IMAGES = 256  # fewer leave too few for training plus a held-out agreement curve
# ResNet-20, train10k, 5000 dev (benchmarks/quant_finetune.md): 1 epoch is ≥ --quant fast on every target
# (seeds 0, 1); 3 epochs lower the runtimes' logit error further but not their flips, and onnx fell below fast
DEFAULT_EPOCHS = 1
LOSSES = ("mse", "kl", "boundary")
INITS = ("fp32", "accurate")
LEVELS = 255  # activation steps (uint8 in onnxruntime / OpenVINO, int8 with zero point in TFLite)
REFERENCE_VALUES = 2_000_000  # activation values kept for matching ranges to a runtime's tensors


@dataclass(frozen=True)
class QuantFinetuneConfig:
    """The recipe; recorded in the manifest."""

    epochs: int = DEFAULT_EPOCHS
    # ResNet-20, 1 epoch of train10k, dev 5000 (torch simulation): lr 1e-5 / range 1e-3 → RMS logit error
    # 0.289 → 0.254, agreement 99.20 → 99.20 %; 3e-5 / 3e-3 → 0.236, 99.36 %; lr 1e-4 worse on held-out (0.257)
    lr: float = 3e-5  # Adam on the folded weights and biases
    range_lr: float = 3e-3  # Adam on log(range ends); unused with learn_ranges=False
    learn_ranges: bool = True
    init: str = "fp32"  # student's start: the fp32 weights, or "accurate" (clipped + bias-corrected, --quant accurate)
    # on the logits; "kl": KL(teacher || student) at ``temperature`` (× T²); "boundary": MSE weighted per
    # image by 1 / (teacher's top-1 − top-2 margin + 0.5), batch mean 1 (the images that flip)
    loss: str = "mse"
    temperature: float = 4.0
    batch_size: int = 64
    seed: int = 0
    held_out: int = 1000  # fine-tune images kept out of training for the agreement curve
    weight_levels: int = 127
    estimator: str = "mse"
    augment: bool = True
    threads: int = 2

    def to_dict(self) -> dict:
        return asdict(self)


def check_finetune_data(path: str | None, spec, epochs: int) -> ImageDataset:
    """Open and check ``--finetune-data`` for ``--quant finetune`` (before any work)."""
    if path is None:
        raise InputError("--quant finetune: needs training images; give --finetune-data DATA (.npz or image folder)")
    if epochs < 0:
        raise InputError(f"--epochs {epochs}: must be 0 or more")
    try:
        dataset = open_dataset(path)
    except DataError as e:
        raise DataError(f"--finetune-data: {e}") from None
    if len(dataset) < MIN_FINETUNE_IMAGES:
        raise InputError(f"--finetune-data {path}: {len(dataset)} images; --quant finetune needs at least "
                         f"{MIN_FINETUNE_IMAGES} (training plus held-out images); give a larger set")
    try:
        dataset.check_image_size(spec.preprocess)
    except DataError as e:
        raise DataError(f"--finetune-data: {e}") from None
    return dataset


# -- fake quantisation ---------------------------------------------------------------------------

def _round_ste(x):
    return x + (x.round() - x).detach()


def fake_quant_weight(w, levels: int):
    """Per-output-channel symmetric fake quantisation with the runtimes' scale ``max|w| / levels``."""
    import torch

    absmax = w.detach().abs().reshape(len(w), -1).amax(dim=1)
    scale = (torch.where(absmax > 0, absmax, torch.ones_like(absmax)) / levels).reshape(-1, *([1] * (w.ndim - 1)))
    return torch.clamp(_round_ste(w / scale), -levels, levels) * scale


def fake_quant_act(x, lo, hi):
    """Asymmetric 8-bit fake quantisation of the range (lo ≤ 0 ≤ hi) as onnxruntime and TFLite derive it."""
    import torch

    scale = (hi - lo) / LEVELS
    zero_point = (-lo / scale).round().detach()
    return (torch.clamp(_round_ste(x / scale) + zero_point, 0, LEVELS) - zero_point) * scale


def _quant_conv_class():
    import torch
    import torch.nn.functional as F

    class QuantConv2d(torch.nn.Module):
        """A BN-folded conv whose weight is fake-quantised per output channel in every forward."""

        def __init__(self, conv, weight, bias, levels: int):
            super().__init__()
            self.weight, self.bias = torch.nn.Parameter(weight), torch.nn.Parameter(bias)
            self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
            self.levels = levels

        def forward(self, x):
            return F.conv2d(x, fake_quant_weight(self.weight, self.levels), self.bias, self.stride, self.padding,
                            self.dilation, self.groups)

    class QuantLinear(torch.nn.Module):
        def __init__(self, linear, levels: int):
            super().__init__()
            self.weight = torch.nn.Parameter(linear.weight.detach().float().clone())
            self.bias = torch.nn.Parameter(linear.bias.detach().float().clone())
            self.levels = levels

        def forward(self, x):
            return F.linear(x, fake_quant_weight(self.weight, self.levels), self.bias)

    return QuantConv2d, QuantLinear


def _set_module(model, name: str, module) -> None:
    parent, _, last = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, last, module)


def _feeds_add(spec, conv: str) -> bool:
    """Does ``conv``'s (folded) output go straight into a residual add?"""
    last = conv.rpartition(".")[2]
    return conv.endswith("downsample.0") or (
        conv.startswith("layer") and last == ("conv2" if spec.block == "basic" else "conv3"))


class FakeQuantModel:
    """The BN-folded model with int8 weights and 8-bit activation points, as the int8 graphs run it.

    ``quantize_acts`` switches the activation points (off: the float twin the runtimes calibrate on);
    ``observer(point, x)`` sees every point's float value."""

    def __init__(self, spec, state_dict: dict, *, levels: int = 127):
        import torch

        from edgeres.model.torch_model import build_torch

        quant_conv, quant_linear = _quant_conv_class()
        self.spec, self.levels = spec, levels
        model = build_torch(spec)
        model.load_state_dict(state_dict)
        self.pairs = _conv_bn_pairs(state_dict)
        modules = dict(model.named_modules())
        with torch.no_grad():
            for conv, bn in self.pairs:
                c, b = modules[conv], modules[bn]
                g = b.weight.double() / torch.sqrt(b.running_var.double() + b.eps)
                w = (c.weight.double() * g.reshape(-1, 1, 1, 1)).float()
                bias = (b.bias.double() - b.running_mean.double() * g).float()
                _set_module(model, conv, quant_conv(c, w, bias, levels))
                _set_module(model, bn, torch.nn.Identity())
            self.linears = [n for n, m in modules.items() if isinstance(m, torch.nn.Linear)]
            for name in self.linears:
                _set_module(model, name, quant_linear(modules[name], levels))
        self.model = model.eval()
        self.convs = [conv for conv, _ in self.pairs]
        self.quantize_acts, self.observer = True, None
        self.log_hi: dict = {}
        self.log_neg: dict = {}  # only points whose range reaches below 0
        self._calls: dict = {}
        self._install_hooks()

    def _install_hooks(self) -> None:
        import torch

        def pre(module, inputs):
            self._calls.clear()
            return (self._point("input", inputs[0]),)

        def post(name, counted):
            def fn(module, inputs, output):
                key = name
                if counted:
                    k = self._calls.get(name, 0)
                    self._calls[name] = k + 1
                    key = f"{name}#{k}"
                return self._point(key, output)
            return fn

        self.model.register_forward_pre_hook(pre)
        pools = (torch.nn.AdaptiveAvgPool2d, torch.nn.AdaptiveMaxPool2d, torch.nn.MaxPool2d)
        for name, m in self.model.named_modules():
            if isinstance(m, torch.nn.ReLU):
                m.register_forward_hook(post(name, True))
            elif isinstance(m, pools) or name in self.linears or (name in self.convs and _feeds_add(self.spec, name)):
                m.register_forward_hook(post(name, False))

    def _point(self, key: str, x):
        if self.observer is not None:
            self.observer(key, x)
        if self.quantize_acts and key in self.log_hi:
            lo, hi = self.range(key)
            return fake_quant_act(x, lo, hi)
        return x

    def range(self, key: str):
        """(lo, hi) of a point as tensors (lo is 0 for a point that never goes negative)."""
        import torch

        hi = torch.exp(self.log_hi[key])
        lo = -torch.exp(self.log_neg[key]) if key in self.log_neg else torch.zeros_like(hi)
        return lo, hi

    def ranges(self) -> dict:
        import torch

        with torch.no_grad():
            return {k: (float(lo), float(hi)) for k in self.log_hi for lo, hi in [self.range(k)]}

    def init_ranges(self, batches, estimator: str) -> None:
        """Every point's range from the shared estimator over ``batches`` (float activations)."""
        import torch

        estimators: dict = {}

        def observe(key, x):
            estimators.setdefault(key, make_estimator(estimator)).update(x.detach().numpy())

        self._observe_float(observe, batches)
        for key, est in estimators.items():
            lo, hi = est.compute()
            self.log_hi[key] = torch.nn.Parameter(torch.tensor(math.log(max(hi, 1e-8))))
            if lo < 0:
                self.log_neg[key] = torch.nn.Parameter(torch.tensor(math.log(-lo)))

    def _observe_float(self, observe, batches) -> None:
        import torch

        self.observer, self.quantize_acts = observe, False
        try:
            with torch.no_grad():
                for x in batches:
                    self.model(torch.as_tensor(np.asarray(x, dtype=np.float32)))
        finally:
            self.observer, self.quantize_acts = None, True

    def __call__(self, x):
        import torch

        return self.model(torch.as_tensor(np.asarray(x, dtype=np.float32)) if isinstance(x, np.ndarray) else x)

    def weight_params(self) -> list:
        return [p for p in self.model.parameters() if p.requires_grad]

    def range_params(self) -> list:
        return [*self.log_hi.values(), *self.log_neg.values()]

    def lowered_state_dict(self, state_dict: dict) -> dict:
        """``state_dict`` with each conv's folded weight on its int8 grid and its BN an exact identity,
        the classifier's weight on its grid: what the runtimes' quantisers reproduce exactly."""
        import torch

        sd = {k: v.detach().clone() for k, v in state_dict.items()}
        modules = dict(self.model.named_modules())
        # gamma / sqrt(var + eps) is exactly 1 in float32 with these two
        one = torch.sqrt(torch.tensor(1.0, dtype=torch.float32) + BN_EPS)
        with torch.no_grad():
            for conv, bn in self.pairs:
                m = modules[conv]
                sd[f"{conv}.weight"] = fake_quant_weight(m.weight, self.levels).detach().to(sd[f"{conv}.weight"].dtype)
                n = len(m.bias)
                sd[f"{bn}.weight"] = one.expand(n).clone()
                sd[f"{bn}.bias"] = m.bias.detach().clone()
                sd[f"{bn}.running_mean"] = torch.zeros(n)
                sd[f"{bn}.running_var"] = torch.ones(n)
            for name in self.linears:
                m = modules[name]
                sd[f"{name}.weight"] = fake_quant_weight(m.weight, self.levels).detach().clone()
                sd[f"{name}.bias"] = m.bias.detach().clone()
        return sd

    def reference_activations(self, images: np.ndarray) -> ReferenceActivations:
        """The float twin's activation at every point on ``images`` with its tuned range."""
        values: dict = {}
        self._observe_float(lambda key, x: values.__setitem__(key, x.detach().numpy().copy()), [images])
        return ReferenceActivations(np.asarray(images, dtype=np.float32), values, self.ranges())


# -- training ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TunedInt8:
    """One fine-tuned int8 model: its lowered state_dict, the activations that carry its ranges, the record."""

    state_dict: dict
    reference: ReferenceActivations
    record: dict


@dataclass(frozen=True)
class _Data:
    """The fine-tune images: training indices, held-out indices and their fp32 top-1."""

    dataset: ImageDataset
    read: object  # Preprocess: uint8 images at the model's size
    normalise: object  # Preprocess that only normalises (the images are already at size)
    train: np.ndarray
    held_out: np.ndarray


def quantization_aware_finetune(spec, state_dict: dict, calib_batches, dataset: ImageDataset,
                                cfg: QuantFinetuneConfig) -> TunedInt8:
    """Fine-tune the int8 model of ``spec``/``state_dict`` against its fp32 logits; ``calib_batches``
    (NCHW float32) initialise the ranges with ``cfg.estimator``."""
    import torch

    from edgeres.model.torch_model import build_torch

    if cfg.loss not in LOSSES or cfg.init not in INITS:
        raise InputError(f"quant finetune: loss {cfg.loss!r} / init {cfg.init!r}: loss is one of {', '.join(LOSSES)}, "
                         f"init one of {', '.join(INITS)}")
    t0 = time.perf_counter()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        torch.manual_seed(cfg.seed)
        teacher = build_torch(spec)
        teacher.load_state_dict(state_dict)
        teacher.eval().requires_grad_(False)
        calib_batches = list(calib_batches)
        student = state_dict
        if cfg.init == "accurate":
            from edgeres.compress.quant_accurate import improve_for_int8

            student, _ = improve_for_int8(spec, state_dict, calib_batches, levels=cfg.weight_levels)
        fq = FakeQuantModel(spec, student, levels=cfg.weight_levels)
        fq.init_ranges(calib_batches, cfg.estimator)
        data = _split(dataset, spec, cfg)
        curve = _train(fq, teacher, data, cfg)
        reference = fq.reference_activations(_reference_images(data, spec))
    finally:
        torch.set_num_threads(threads_before)
    record = {"recipe": "quantisation-aware KD on the targets' int8 grids (W8 per channel, A8 per tensor)",
              **cfg.to_dict(), "train_images": len(data.train), "held_out_images": len(data.held_out),
              "quantised_points": len(fq.log_hi), "curve": curve, "seconds": round(time.perf_counter() - t0, 1)}
    return TunedInt8(fq.lowered_state_dict(state_dict), reference, record)


def _split(dataset: ImageDataset, spec, cfg: QuantFinetuneConfig) -> _Data:
    everything = np.arange(len(dataset))
    held = dataset.spread(max(1, min(cfg.held_out, len(dataset) // 5)))
    train = np.setdiff1d(everything, held)
    pre = spec.preprocess
    return _Data(dataset, pre, replace(pre, resize=None), train, held)


def _batch(data: _Data, idx: np.ndarray, rng=None):
    import torch

    images = data.dataset.read(idx, data.read)
    if rng is not None:
        images = augment(images, rng)
    return torch.from_numpy(data.normalise(images, data.dataset.source))


def _reference_images(data: _Data, spec) -> np.ndarray:
    c, h, w = 3, spec.preprocess.size, spec.preprocess.size
    n = int(np.clip(REFERENCE_VALUES // (c * h * w * 80), 1, 8))  # ~80 activation values per input value
    return _batch(data, data.held_out[:n]).numpy()


def _held_out_scores(fq: FakeQuantModel, teacher_logits: np.ndarray, data: _Data) -> dict:
    """Top-1 agreement with fp32 (%) and RMS logit error on the held-out images."""
    import torch

    with torch.no_grad():
        logits = np.concatenate([fq(_batch(data, data.held_out[s:s + 250])).numpy()
                                 for s in range(0, len(data.held_out), 250)])
    agree = float((logits.argmax(1) == teacher_logits.argmax(1)).mean())
    return {"agreement_pct": round(100.0 * agree, 3),
            "logit_rms": round(float(np.sqrt(((logits - teacher_logits) ** 2).mean())), 5)}


def _train(fq: FakeQuantModel, teacher, data: _Data, cfg: QuantFinetuneConfig) -> list[dict]:
    """Adam with cosine decay on the folded weights (and the ranges); one curve row per epoch."""
    import torch

    with torch.no_grad():
        teacher_logits = np.concatenate([teacher(_batch(data, data.held_out[s:s + 250])).numpy()
                                         for s in range(0, len(data.held_out), 250)])
    groups = [{"params": fq.weight_params(), "lr": cfg.lr, "base_lr": cfg.lr}]
    if cfg.learn_ranges:
        groups.append({"params": fq.range_params(), "lr": cfg.range_lr, "base_lr": cfg.range_lr})
    optimizer = torch.optim.Adam(groups)
    steps_per_epoch = math.ceil(len(data.train) / cfg.batch_size)
    total = max(1, steps_per_epoch * cfg.epochs)
    curve = [{"epoch": 0, **_held_out_scores(fq, teacher_logits, data)}]
    log(f"quant finetune: before training, agreement with fp32 {curve[0]['agreement_pct']:.2f} %, RMS logit "
        f"error {curve[0]['logit_rms']:.4f} on {len(data.held_out)} held-out images")
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        rng = np.random.default_rng([cfg.seed, epoch])
        order = data.train[rng.permutation(len(data.train))]
        loss_sum, step0 = 0.0, (epoch - 1) * steps_per_epoch
        with progress(f"quant finetune epoch {epoch}/{cfg.epochs}", len(order)) as advance:
            for k, start in enumerate(range(0, len(order), cfg.batch_size)):
                idx = order[start:start + cfg.batch_size]
                for g in optimizer.param_groups:
                    g["lr"] = g["base_lr"] * 0.5 * (1 + math.cos(math.pi * (step0 + k) / total))
                loss_sum += _step(fq, teacher, _batch(data, idx, rng if cfg.augment else None), optimizer,
                                  cfg) * len(idx)
                advance(len(idx))
        row = {"epoch": epoch, "loss": round(loss_sum / len(order), 6), **_held_out_scores(fq, teacher_logits, data),
               "seconds": round(time.perf_counter() - t0, 1)}
        curve.append(row)
        log(f"quant finetune: epoch {epoch}/{cfg.epochs} loss {row['loss']:.4f}, agreement with fp32 "
            f"{row['agreement_pct']:.2f} %, RMS logit error {row['logit_rms']:.4f} ({row['seconds']:.0f} s)")
    return curve


def _step(fq: FakeQuantModel, teacher, x, optimizer, cfg: QuantFinetuneConfig) -> float:
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        target = teacher(x)
    out = fq(x)
    if cfg.loss == "kl":
        t = cfg.temperature
        loss = F.kl_div(F.log_softmax(out / t, dim=1), F.log_softmax(target / t, dim=1), log_target=True,
                        reduction="batchmean") * t * t
    elif cfg.loss == "boundary":
        top2 = target.topk(2, dim=1).values
        weight = 1.0 / (top2[:, 0] - top2[:, 1] + 0.5)
        loss = 0.5 * ((out - target) ** 2).mean(dim=1).mul(weight / weight.mean()).mean()
    else:
        loss = 0.5 * ((out - target) ** 2).mean()
    value = float(loss.detach())
    if not math.isfinite(value):
        raise InputError(f"--quant finetune diverged (loss {value}); nothing was written; try fewer --epochs")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return value


# -- lowering into ONNX --------------------------------------------------------------------------

PASS_THROUGH_OPS = ("Slice", "Pad", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose")


def tuned_onnx_ranges(onnx_fp32, reference: ReferenceActivations) -> dict:
    """{ONNX tensor: tuned range} for the tensors of ``onnx_fp32`` (the tuned model's float twin) that
    hold a point's activation, and for the outputs of data-movement ops on them (Slice, Pad, …), which
    then requantise nothing: their values already lie on their input's grid."""
    import onnx

    model = onnx.load(str(onnx_fp32))
    input_name = model.graph.input[0].name
    outputs = [o for n in model.graph.node for o in n.output if o]
    session = exposing_session(model, outputs)
    values = dict(zip(outputs, session.run(outputs, {input_name: reference.images})))
    tuned = reference.match({input_name: reference.images, **values})
    for node in model.graph.node:
        if node.op_type in PASS_THROUGH_OPS and node.input[0] in tuned and node.output[0] not in tuned:
            tuned[node.output[0]] = tuned[node.input[0]]
    return tuned


def fake_quant_model(spec, tuned: TunedInt8) -> FakeQuantModel:
    """The fake-quantised model a ``TunedInt8`` lowers (its weights on their grid, its ranges fixed)."""
    import torch

    fq = FakeQuantModel(spec, tuned.state_dict, levels=tuned.record["weight_levels"])
    for key, (lo, hi) in tuned.reference.ranges.items():
        fq.log_hi[key] = torch.tensor(math.log(max(hi, 1e-8)))
        if lo < 0:
            fq.log_neg[key] = torch.tensor(math.log(-lo))
    return fq
