"""Accuracy of a model or artifact against labels and against the fp32 reference."""

from __future__ import annotations

from typing import Callable

import numpy as np

from calibration import ImageDataset, Preprocess
from edgeres.progress import progress


def check_labels(dataset: ImageDataset, num_classes: int) -> None:
    """Labels must name classes the model has; a mismatch means the data is for another model."""
    from edgeres.errors import InputError

    if dataset.labels is None:
        raise InputError(f"{dataset.source}: has no labels; accuracy needs labelled images (y in the npz or class folders)")
    lo, hi = int(dataset.labels.min()), int(dataset.labels.max())
    if lo < 0 or hi >= num_classes:
        raise InputError(f"{dataset.source}: labels run {lo}..{hi} but the model has {num_classes} classes; "
                         "check the data matches the model")


def collect_logits(run: Callable[[np.ndarray], np.ndarray], dataset: ImageDataset, preprocess: Preprocess,
                   *, limit: int | None = None, batch_size: int = 100, description: str = "evaluating") -> np.ndarray:
    """Logits of ``run`` over the dataset (in ``dataset.spread(limit)`` order)."""
    n = len(dataset.spread(limit))
    outs = []
    with progress(description, n) as advance:
        for x, _ in dataset.batches(preprocess, batch_size, limit):
            outs.append(np.asarray(run(x), dtype=np.float32).reshape(len(x), -1))
            advance(len(x))
    return np.concatenate(outs)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray) -> dict:
    """top-1 / top-5 in percent."""
    top5 = np.argsort(-logits, axis=1)[:, : min(5, logits.shape[1])]
    return {
        "top1": round(float((top5[:, 0] == labels).mean() * 100), 4),
        "top5": round(float((top5 == labels[:, None]).any(axis=1).mean() * 100), 4),
    }


def compare_to_reference(logits: np.ndarray, reference: np.ndarray, labels: np.ndarray | None) -> dict:
    """Accuracy of ``logits`` plus how far they are from the fp32 reference logits."""
    out = topk_accuracy(logits, labels) if labels is not None else {}
    if labels is not None:
        out["top1_drop_pp"] = round(topk_accuracy(reference, labels)["top1"] - out["top1"], 4)
    out["agreement_pct"] = round(float((logits.argmax(1) == reference.argmax(1)).mean() * 100), 4)
    out["max_abs_logit_err"] = float(np.abs(logits - reference).max())
    return out


def torch_runner(model) -> Callable[[np.ndarray], np.ndarray]:
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()

    return run
