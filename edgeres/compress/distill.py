"""Recovery after pruning: knowledge distillation from the unpruned model on CPU, reproducible by seed.

The student learns the teacher's logits (squared error, default) or softened outputs (KL at temperature
``T``) on augmented images (random crop with padding + horizontal flip); when the data has labels, a share
of the loss is plain cross-entropy.
Data order and augmentation come from ``numpy.random.default_rng(seed + epoch)``, weights from
``torch.manual_seed(seed)``, so the same seed gives the same weights at the same thread count (more threads
sum in another order; over 10 epochs that moves top-1 like another seed would).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

import numpy as np

from edgeres.calibration import ImageDataset, Preprocess
from edgeres.errors import InputError
from edgeres.progress import log, progress


KD_LOSSES = ("kl", "mse")


@dataclass(frozen=True)
class FinetuneConfig:
    """KD fine-tuning recipe; defaults are the recipe measured on ResNet-32 at ratio 0.3 (see docs/pruning.md)."""

    epochs: int
    lr: float = 0.005  # 0.01: 8–10 pp lower top-1 after epochs 1–2 on ResNet-32 / train10k
    batch_size: int = 64
    seed: int = 0
    # "mse": squared error on the raw logits; "kl": softened outputs at ``temperature``. After least-squares
    # reconstruction (edgeres.compress.reconstruct) mse recovers more: ResNet-32 r0.3, 10 epochs, seeds 0–2: mean drop
    # −1.74 pp vs −2.14 with kl (docs/pruning.md)
    loss: str = "mse"
    temperature: float = 4.0
    label_weight: float = 0.1  # share of cross-entropy on labels when the data has them
    weight_decay: float = 5e-4
    momentum: float = 0.9
    warmup_epochs: float = 0.5
    augment: bool = True
    images: int | None = None  # use at most this many training images (spread evenly)

    def validate(self) -> None:
        if self.epochs < 0:
            raise InputError(f"--epochs {self.epochs}: must be 0 or more")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"--lr {self.lr}: must be a finite positive number, e.g. 0.005")
        if self.batch_size < 1:
            raise InputError(f"--batch-size {self.batch_size}: must be at least 1")
        if self.loss not in KD_LOSSES:
            raise InputError(f"--kd-loss {self.loss}: choose one of {', '.join(KD_LOSSES)}")
        # not CLI flags today, but a NaN in any of them would train NaN weights just as silently
        for name, value, lo, hi in (("label weight", self.label_weight, 0.0, 1.0),
                                    ("temperature", self.temperature, 1e-6, math.inf),
                                    ("weight decay", self.weight_decay, 0.0, math.inf),
                                    ("momentum", self.momentum, 0.0, 1.0),
                                    ("warm-up epochs", self.warmup_epochs, 0.0, math.inf)):
            if not (math.isfinite(value) and lo <= value <= hi):
                raise InputError(f"{name} {value}: must be a finite number in [{lo:g}, {hi:g}]")

    def to_dict(self) -> dict:
        return asdict(self)


def check_finetune_flags(epochs: int, finetune_data) -> None:
    """``--epochs`` fine-tunes on ``--finetune-data``: refuse epochs without the images."""
    if epochs and finetune_data is None:
        raise InputError(f"--epochs {epochs}: fine-tuning needs training images; give --finetune-data")


def augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random crop from a zero-padded image (pad = size/8) and random horizontal flip, uint8 NHWC."""
    n, h, w, _ = images.shape
    pad = max(1, h // 8)
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    dy = rng.integers(0, 2 * pad + 1, n)
    dx = rng.integers(0, 2 * pad + 1, n)
    flip = rng.random(n) < 0.5
    out = np.empty_like(images)
    for i in range(n):
        crop = padded[i, dy[i]: dy[i] + h, dx[i]: dx[i] + w]
        out[i] = crop[:, ::-1] if flip[i] else crop
    return out


def distill(student, teacher, dataset: ImageDataset, preprocess: Preprocess, cfg: FinetuneConfig, *,
            frozen_bns=(), evaluate: Callable[[object], float] | None = None) -> list[dict]:
    """Fine-tune ``student`` in place; returns one record per epoch (loss, seconds, and ``top1`` when
    ``evaluate(model) -> top-1 %`` is given; epoch 0 is the model before fine-tuning)."""
    run = _setup(student, teacher, dataset, preprocess, cfg, frozen_bns)
    curve = []
    if evaluate is not None:
        curve.append({"epoch": 0, "top1": evaluate(student.eval())})
    for epoch in range(1, cfg.epochs + 1):
        row = _train_epoch(run, epoch)
        if evaluate is not None:
            row["top1"] = evaluate(student)
        curve.append(row)
        log(f"epoch {epoch}/{cfg.epochs}: loss {row['loss']:.4f}" + (f", top-1 {row['top1']:.2f} %" if "top1" in row else "")
            + f" ({row['seconds']:.0f} s)")
    for p in teacher.parameters():
        p.requires_grad_(True)
    student.eval()
    return curve


@dataclass(frozen=True)
class _Schedule:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""

    lr: float
    steps_per_epoch: int
    warmup_steps: int
    total_steps: int

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        t = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return self.lr * 0.5 * (1 + math.cos(math.pi * t))


@dataclass(frozen=True)
class _Run:
    """What every epoch of one distillation run shares."""

    cfg: FinetuneConfig
    student: object
    teacher: object
    dataset: ImageDataset
    preprocess: Preprocess  # reads the images
    geometry_done: Preprocess  # normalises them after augmentation (they are already at the model's size)
    indices: np.ndarray  # the training images used, in dataset order
    frozen: frozenset  # ids of the modules kept in eval mode (identity BNs)
    optimizer: object
    schedule: _Schedule


def _setup(student, teacher, dataset: ImageDataset, preprocess: Preprocess, cfg: FinetuneConfig, frozen_bns) -> _Run:
    """Check the inputs, seed torch, and build the optimizer (no weight decay on biases and BN) and schedule."""
    import torch

    cfg.validate()
    dataset.check_image_size(preprocess)
    torch.manual_seed(cfg.seed)
    indices = dataset.spread(cfg.images)
    steps_per_epoch = math.ceil(len(indices) / cfg.batch_size)
    schedule = _Schedule(cfg.lr, steps_per_epoch, warmup_steps=int(cfg.warmup_epochs * steps_per_epoch),
                         total_steps=max(1, steps_per_epoch * cfg.epochs))
    frozen = frozenset(id(m) for m in frozen_bns)
    params = [p for m in student.modules() if id(m) not in frozen for p in m.parameters(recurse=False)]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, momentum=cfg.momentum)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return _Run(cfg, student, teacher, dataset, preprocess, replace(preprocess, resize=None), indices, frozen,
                optimizer, schedule)


def _train_epoch(run: _Run, epoch: int) -> dict:
    """One pass over the images in this epoch's seeded order; returns the epoch's row of the curve."""
    cfg = run.cfg
    t0 = time.perf_counter()
    rng = np.random.default_rng([cfg.seed, epoch])
    order = run.indices[rng.permutation(len(run.indices))]
    run.student.train()
    for m in run.student.modules():
        if id(m) in run.frozen:
            m.eval()
    loss_sum, seen = 0.0, 0
    step = (epoch - 1) * run.schedule.steps_per_epoch  # every epoch takes the same number of steps
    with progress(f"epoch {epoch}/{cfg.epochs}", len(order)) as advance:
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start: start + cfg.batch_size]
            loss_sum += _train_batch(run, idx, rng, step, epoch) * len(idx)
            step += 1
            seen += len(idx)
            advance(len(idx))
    run.student.eval()
    _check_finite_weights(run.student, cfg, epoch)
    return {"epoch": epoch, "loss": round(loss_sum / max(1, seen), 5), "seconds": round(time.perf_counter() - t0, 1)}


def _train_batch(run: _Run, idx: np.ndarray, rng: np.random.Generator, step: int, epoch: int) -> float:
    """One SGD step on the images ``idx``; returns the batch's loss."""
    import torch

    cfg = run.cfg
    images = run.dataset.read(idx, run.preprocess)
    if cfg.augment:
        images = augment(images, rng)
    x = torch.from_numpy(run.geometry_done(images, run.dataset.source))
    for g in run.optimizer.param_groups:
        g["lr"] = run.schedule.lr_at(step)
    with torch.no_grad():
        target = run.teacher(x)
    logits = run.student(x)
    labels = run.dataset.labels
    loss = _kd_loss(logits, target, torch.from_numpy(labels[idx]) if labels is not None else None, cfg)
    run.optimizer.zero_grad(set_to_none=True)
    batch_loss = float(loss.detach())
    if not math.isfinite(batch_loss):
        raise _diverged(cfg, epoch, f"the loss is {batch_loss}")
    loss.backward()
    run.optimizer.step()
    return batch_loss


def _kd_loss(logits, target, labels, cfg: FinetuneConfig):
    """The distillation loss on the teacher's logits ``target``, mixed with cross-entropy when labelled."""
    import torch.nn.functional as F

    T = cfg.temperature
    if cfg.loss == "mse":
        loss = 0.5 * F.mse_loss(logits, target)
    else:
        loss = F.kl_div(F.log_softmax(logits / T, dim=1), F.softmax(target / T, dim=1), reduction="batchmean") * T * T
    if labels is not None and cfg.label_weight > 0:
        loss = (1 - cfg.label_weight) * loss + cfg.label_weight * F.cross_entropy(logits, labels)
    return loss


def _diverged(cfg: FinetuneConfig, epoch: int, what: str) -> InputError:
    return InputError(f"fine-tuning diverged in epoch {epoch} at --lr {cfg.lr} ({what}); nothing was written; "
                      f"try a smaller --lr (default {FinetuneConfig.lr})")


def _check_finite_weights(model, cfg: FinetuneConfig, epoch: int) -> None:
    """Stop before a diverged model is evaluated or saved (its accuracy would read as a plain number)."""
    import torch

    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise _diverged(cfg, epoch, f"{name} holds NaN or Inf")
