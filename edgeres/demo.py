"""The built-in demo: train a small ResNet on scikit-learn's digits, then convert, evaluate and report.

Nothing is downloaded: the digits ship with scikit-learn; they are upsampled to 32×32 RGB so the
network is a real CIFAR-style ResNet-20."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from edgeres.calibration.preprocess import bilinear_resize
from edgeres.progress import log, progress

DIGIT_LABELS = tuple(str(d) for d in range(10))


@dataclass(frozen=True)
class DemoConfig:
    out: str = "demo-out"
    arch: str = "resnet20"
    train_seconds: float = 1800.0  # only a safety cap: 8 epochs take ~30 s on 2 idle cores
    max_epochs: int = 8
    test_images: int = 500
    seed: int = 0

    def __post_init__(self):
        from edgeres.errors import InputError

        if not 0 < self.train_seconds < float("inf"):  # NaN too: it would silently mean "no cap"
            raise InputError(f"--train-seconds {self.train_seconds}: must be a finite number of seconds above 0")


def digits_dataset(test_images: int = 500, seed: int = 0):
    """scikit-learn digits as uint8 32×32 RGB: (x_train, y_train), (x_test, y_test)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    imgs = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    big = np.stack([bilinear_resize(img[:, :, None], 32, 32)[:, :, 0] for img in imgs])
    x = np.repeat(big[..., None], 3, axis=-1)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    test, train = order[:test_images], order[test_images:]
    return (x[train], y[train]), (x[test], y[test])


def train_digits_model(spec, x, y, *, seconds: float, max_epochs: int, seed: int):
    """SGD on CPU until ``seconds`` or ``max_epochs``; returns the trained torch model (eval mode)."""
    import torch
    import torch.nn.functional as F

    from edgeres.model.torch_model import build_torch

    torch.manual_seed(seed)
    model = build_torch(spec).train()
    inputs = torch.from_numpy(spec.preprocess(x))
    labels = torch.from_numpy(y)
    batch = 64
    steps_per_epoch = (len(x) + batch - 1) // batch
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=max_epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    with progress("training ResNet on digits", max_epochs * steps_per_epoch) as advance:
        for epoch in range(max_epochs):
            perm = torch.randperm(len(x), generator=gen)
            for i in range(steps_per_epoch):
                idx = perm[i * batch : (i + 1) * batch]
                xb = inputs[idx]
                shift = torch.randint(-2, 3, (2,), generator=gen)  # small translations for robustness
                xb = torch.roll(xb, shifts=(int(shift[0]), int(shift[1])), dims=(2, 3))
                loss = F.cross_entropy(model(xb), labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                advance()
            if time.perf_counter() - start > seconds:
                break
    log(f"trained {epoch + 1} epoch(s) in {time.perf_counter() - start:.0f} s (last loss {loss.item():.3f})")
    return model.eval()


def prepare(cfg: DemoConfig) -> dict:
    """Train (or reuse) the demo model and write its data files; returns their paths."""
    from edgeres.sources.loading import save_checkpoint
    from edgeres.model.zoo import get_spec

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"model": out / "digits_resnet.pt", "calib": out / "digits_calib.npz", "test": out / "digits_test.npz"}
    (x_train, y_train), (x_test, y_test) = digits_dataset(cfg.test_images, cfg.seed)
    np.savez(paths["calib"], x=x_train, y=y_train)
    np.savez(paths["test"], x=x_test, y=y_test)
    if not paths["model"].exists():
        spec = replace(get_spec(cfg.arch), name=f"{cfg.arch}-digits", labels=DIGIT_LABELS)
        model = train_digits_model(spec, x_train, y_train, seconds=cfg.train_seconds,
                                   max_epochs=cfg.max_epochs, seed=cfg.seed)
        save_checkpoint(paths["model"], spec, model.state_dict())
    else:
        log(f"reusing the trained demo model {paths['model']}")
    return paths


def run_demo(cfg: DemoConfig) -> dict:
    """Train (or reuse) the digits ResNet, convert it for every target at int8 and fp32, evaluate."""
    from edgeres.convert.config import ConvertConfig
    from edgeres.convert.run import convert

    paths = prepare(cfg)
    bundle = Path(cfg.out) / "bundle"
    convert_cfg = ConvertConfig(model=str(paths["model"]), out=str(bundle), calib=str(paths["calib"]),
                                precisions=("int8", "fp32"),  # every registered target
                                eval_data=str(paths["test"]))
    manifest = convert(convert_cfg)
    return {"bundle": str(bundle), "manifest": manifest, **{k: str(v) for k, v in paths.items()}}
