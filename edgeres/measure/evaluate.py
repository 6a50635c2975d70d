"""Accuracy of a model or artifact against labels and against the fp32 reference."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from edgeres.calibration import DataError, ImageDataset, Preprocess
from edgeres.errors import InputError
from edgeres.measure.paired import drop_interval_pp, pack_bits, paired_counts
from edgeres.progress import log, progress
from edgeres.targets.base import TargetError


class NonFiniteLogits(TargetError):
    """A model or artifact gave NaN/Inf: its accuracy would be a number that means nothing.

    A ``TargetError`` so a bundle's artifact becomes a failed row; exit 2 because the usual cause is the model
    file itself (e.g. a negative BatchNorm running_var), not the runtime.
    """

    exit_code = 2


def check_labels(dataset: ImageDataset, num_classes: int, class_names: Sequence[str] | None = None,
                 class_keys: Sequence[Sequence[str]] | None = None) -> None:
    """Labels must name classes the model has; a mismatch means the data is for another model.

    Class folders are numbered by ``class_names`` (the model's labels; see ``number_class_folders``); a dataset
    already numbered keeps its numbers when none are given.
    """
    if dataset.labels is None:
        raise InputError(f"{dataset.source}: has no labels; accuracy needs labelled images (y in the npz or class folders)")
    if dataset.class_names is not None and (class_names or dataset.class_indices is None):
        number_class_folders(dataset, class_names, class_keys)
    check_label_range(dataset, num_classes)


def check_label_range(dataset: ImageDataset, num_classes: int, *, fix: str = "check the data matches the model",
                      error: type[Exception] = InputError) -> None:
    """Labels, where the data has them, must be class indices 0..num_classes-1; ``fix`` ends the message."""
    if dataset.labels is None:
        return
    lo, hi = int(dataset.labels.min()), int(dataset.labels.max())
    if lo < 0 or hi >= num_classes:
        raise error(f"{dataset.source}: labels run {lo}..{hi} but the model has {num_classes} classes; {fix}")


def number_class_folders(dataset: ImageDataset, class_names: Sequence[str] | None,
                         class_keys: Sequence[Sequence[str]] | None = None) -> None:
    """Give each class folder the index of the model label it names, or of any other name the class goes by
    (``class_keys``, e.g. ImageNet wnids; case-insensitive; a numeric folder name is the index itself).
    Without model labels: numeric names as indices, else sorted folder order."""
    folders = dataset.class_names
    if class_names:
        index = {key.casefold(): i for i, keys in enumerate(class_keys or ()) for key in keys}
        index.update({name.casefold(): i for i, name in enumerate(class_names)})
        indices = []
        for folder in folders:
            i = index.get(folder.casefold())
            if i is None and folder.isdigit() and int(folder) < len(class_names):
                i = int(folder)
            if i is None:
                shown = ", ".join(class_names[:12]) + (f", … ({len(class_names)} in all)" if len(class_names) > 12 else "")
                raise DataError(f"{dataset.source}/{folder}: class folder names none of the model's labels ({shown}); "
                                f"rename it to its label or class index 0..{len(class_names) - 1}")
            indices.append(i)
    elif all(folder.isdigit() for folder in folders):
        indices = [int(folder) for folder in folders]
    else:
        indices = list(range(len(folders)))
        shown = ", ".join(f"{folder}={i}" for i, folder in enumerate(folders[:4]))
        log(f"{dataset.source}: the model has no class names, so class folders are numbered in sorted order "
            f"({shown}{', …' if len(folders) > 4 else ''})")
    dataset.number_classes(indices)


# images a batch at 224² (a runtime's buffers for a ResNet-50 grow with it: 100 of them took ~1.5 GB);
# smaller images get proportionally more, up to EVAL_BATCH
EVAL_PIXELS_PER_BATCH = 16 * 224 * 224
EVAL_BATCH = 100


def eval_batch_size(preprocess: Preprocess) -> int:
    """Images per batch when evaluating at ``preprocess``'s input size (100 for CIFAR's 32², 16 at 224²)."""
    size = int(getattr(preprocess, "size", None) or 224)
    return int(np.clip(EVAL_PIXELS_PER_BATCH // (size * size), 1, EVAL_BATCH))


def collect_logits(run: Callable[[np.ndarray], np.ndarray], dataset: ImageDataset, preprocess: Preprocess,
                   *, limit: int | None = None, batch_size: int | None = None, description: str = "evaluating",
                   source: str | None = None) -> np.ndarray:
    """Logits of ``run`` over the dataset (in ``dataset.spread(limit)`` order); NaN/Inf raise
    ``NonFiniteLogits`` naming ``source`` (the model or artifact; else the runner's path or ``description``).
    ``batch_size``: by default ``eval_batch_size`` (smaller for large images, bounding the runtime's memory)."""
    batch_size = batch_size or eval_batch_size(preprocess)
    name = source or getattr(run, "path", None) or description
    n = len(dataset.spread(limit))
    outs = []
    with progress(description, n) as advance:
        for x, _ in dataset.batches(preprocess, batch_size, limit):
            logits = np.asarray(run(x), dtype=np.float32).reshape(len(x), -1)
            if not np.isfinite(logits).all():
                raise NonFiniteLogits(
                    f"{name}: gives NaN or Inf outputs on {dataset.source}, so it has no meaningful accuracy; check "
                    "its weights (e.g. a negative BatchNorm running_var, a diverged training), then re-export or re-train it")
            outs.append(logits)
            advance(len(x))
    return np.concatenate(outs)


# One rule wherever a class is picked from logits (top-1, top-5, agreement, correct_bits, the paired counts):
# among tied scores the lowest class index ranks first, as np.argmax picks. int8 outputs tie often (71 of 200
# images on a 1000-class ResNet-50); with two rules top-1 and agreement contradicted each other.
TIE_RULE = "lowest-class-index"


def top_classes(logits: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` best classes per image, best first; tied scores in ``TIE_RULE`` order (a stable sort)."""
    return np.argsort(-logits, axis=1, kind="stable")[:, : min(k, logits.shape[1])]


def top1_class(logits: np.ndarray) -> np.ndarray:
    """The best class per image, ``top_classes(logits, 1)[:, 0]`` (np.argmax returns the first maximum)."""
    return logits.argmax(1)


def tied_top1_images(logits: np.ndarray) -> int:
    """Images whose top score is shared by two or more classes, so ``TIE_RULE`` picked their top-1."""
    return int(((logits == logits.max(1, keepdims=True)).sum(1) > 1).sum())


def topk_accuracy(logits: np.ndarray, labels: np.ndarray) -> dict:
    """top-1 / top-5 in percent, and how many images' top-1 was a tie."""
    top5 = top_classes(logits, 5)
    return {
        "top1": round(float((top1_class(logits) == labels).mean() * 100), 4),
        "top5": round(float((top5 == labels[:, None]).any(axis=1).mean() * 100), 4),
        "top1_tied_images": tied_top1_images(logits),
    }


def compare_to_reference(logits: np.ndarray, reference: np.ndarray, labels: np.ndarray | None) -> dict:
    """Accuracy of ``logits`` plus how far they are from the fp32 reference logits."""
    out = topk_accuracy(logits, labels) if labels is not None else {"top1_tied_images": tied_top1_images(logits)}
    predicted, expected = top1_class(logits), top1_class(reference)
    if labels is not None:
        out["top1_drop_pp"] = round(topk_accuracy(reference, labels)["top1"] - out["top1"], 4)
        correct = predicted == labels
        counts = paired_counts(expected == labels, correct)
        out["top1_drop_ci95_pp"] = list(drop_interval_pp(counts))
        out["paired"] = counts.to_dict()
        out["correct_bits"] = pack_bits(correct)
    out["agreement_pct"] = round(float((predicted == expected).mean() * 100), 4)
    out["max_abs_logit_err"] = float(np.abs(logits - reference).max())
    return out


def torch_runner(model) -> Callable[[np.ndarray], np.ndarray]:
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()

    return run
