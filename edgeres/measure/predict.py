"""``predict``: classify image files with one artifact of a bundle, as an app would.

Images are decoded by ``calibration.image_file`` (EXIF orientation applied, size checked before decoding,
image formats only; the exported Python app decodes with the same code) and preprocessed by
``calibration``'s ``Preprocess`` from the manifest (the code calibration and eval use), then run by the
artifact's own runtime only: nothing here imports torch, so predict works where only numpy, Pillow and
one runtime are installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeres.calibration import DataError, Preprocess
from edgeres.calibration.readers import IMAGE_SUFFIXES, read_image
from edgeres.bundle import SCORES, artifact_path, label_names, ok_artifacts, outputs_probabilities, read_manifest, verify_file, warn
from edgeres.errors import InputError
from edgeres.progress import progress
from edgeres.targets import get_target

BATCH = 32
PREFERRED_PRECISIONS = ("int8", "fp32")  # without --precision: the smallest artifact that keeps accuracy, else fp32


@dataclass(frozen=True)
class Skipped:
    """An input that could not be classified, and why (one line naming the file)."""

    file: str
    reason: str


def pick_artifact(manifest: dict, bundle: Path, target: str | None, precision: str | None) -> dict:
    """The artifact ``--target`` / ``--precision`` name (defaults: int8, else fp32, of the first target)."""
    ok = ok_artifacts(manifest)
    have = ", ".join(f"{a['target']} {a['precision']}" for a in ok) or "none"
    if not ok:
        raise InputError(f"{bundle}: holds no working artifact; re-run `edgeres convert`")
    matching = [a for a in ok if (target is None or a["target"] == target)
                and (precision is None or a["precision"] == precision)]
    if not matching:
        asked = " ".join(v for v in (target, precision) if v)
        raise InputError(f"{bundle}: has no {asked} artifact; it has {have} (choose with --target and --precision)")
    if precision is None:
        for wanted in PREFERRED_PRECISIONS:
            preferred = [a for a in matching if a["precision"] == wanted]
            if preferred:
                return preferred[0]
    return matching[0]


def image_files(inputs: list[str]) -> list[str]:
    """Files to classify: each file as given, each folder's images (by suffix, recursively, sorted).
    A path that does not exist, or is not a regular file, is an error before any work."""
    files = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if not found:
                raise InputError(f"{p}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
            files += found
        elif p.is_file():
            files.append(str(p))
        elif p.exists():  # a FIFO would block the read and a device never end: refused without opening it
            raise InputError(f"{p}: is not a regular file (a FIFO, device or socket); give image files or a folder "
                             "of images")
        else:
            raise InputError(f"{p}: no such image file or folder; give image files or a folder of images")
    return files


def top_k(logits: np.ndarray, labels: list[str], k: int, probabilities: bool = False) -> list[dict]:
    """The ``k`` best classes of one output row with their scores: the softmax of logits, or the row itself
    when the model outputs ``probabilities`` already (a second softmax would flatten them)."""
    if probabilities:
        probs = logits.astype(np.float64)
    else:
        z = logits.astype(np.float64) - logits.max()
        probs = np.exp(z) / np.exp(z).sum()
    order = np.argsort(-probs, kind="stable")[:k]
    return [{"index": int(i), "label": labels[i] if i < len(labels) else str(i), "score": round(float(probs[i]), 6)}
            for i in order]


def _decoded(files: list[str], pre: Preprocess, skipped: list[Skipped]):
    """(file, network input C×H×W or H×W×C) for each file that decodes and fits the preprocessing."""
    for f in files:
        try:
            yield f, pre(read_image(f)[None], source=f)[0]
        except DataError as e:
            skipped.append(Skipped(f, str(e)))
            warn(f"{e} (skipped)")


def predict(bundle: str | Path, inputs: list[str], *, target: str | None = None, precision: str | None = None,
            top: int = 5, threads: int | None = None) -> dict:
    """``edgeres predict``: the ``predict --json`` document (predictions, skipped files, the artifact used)."""
    bundle = Path(bundle)
    if top < 1:
        raise InputError(f"--top {top}: give a positive number of classes")
    files = image_files(inputs)
    manifest = read_manifest(bundle, verify=False)
    artifact = pick_artifact(manifest, bundle, target, precision)
    for record in artifact.get("file_records", []):
        verify_file(bundle, record)
    runner = get_target(artifact["target"]).load_runner(artifact_path(bundle, artifact), threads=threads)
    pre = Preprocess.from_dict(manifest["preprocess"]).with_layout("NCHW")  # every runner takes NCHW float32
    labels = label_names(manifest)
    top = min(top, manifest["arch"]["num_classes"])
    probabilities = outputs_probabilities(manifest)
    predictions, skipped = [], []
    with progress(f"predict {artifact['target']} {artifact['precision']}", len(files)) as advance:
        batch: list[tuple[str, np.ndarray]] = []
        for item in [*_decoded(files, pre, skipped), None]:
            if item is not None:
                batch.append(item)
            if batch and (item is None or len(batch) == BATCH):
                logits = np.asarray(runner(np.stack([x for _, x in batch])), np.float32)
                predictions += [{"file": f, "top": top_k(row, labels, top, probabilities)} for (f, _), row in zip(batch, logits)]
                advance(len(batch))
                batch = []
    if skipped and predictions:
        warn(f"skipped {len(skipped)} of {len(files)} file(s) that could not be read as images")
    if not predictions:
        raise InputError(f"none of the {len(files)} input file(s) could be read as an image "
                         f"(first: {skipped[0].reason})")
    return {"artifact": {"target": artifact["target"], "precision": artifact["precision"], "file": artifact["file"]},
            "scores": SCORES[probabilities], "predictions": predictions, "skipped": [{"file": s.file, "reason": s.reason} for s in skipped]}
