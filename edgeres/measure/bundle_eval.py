"""``eval DIR``: the fp32 reference and every artifact of a bundle on the same images."""

from __future__ import annotations

from pathlib import Path

from calibration import ImageDataset, Preprocess
from edgeres.bundle import EVAL_FILE, artifact_path, ok_artifacts, read_manifest, reference_path, store_result
from edgeres.measure.evaluate import check_labels, collect_logits, compare_to_reference, topk_accuracy
from edgeres.progress import log

__all__ = ["EVAL_FILE", "evaluate_bundle"]


def evaluate_bundle(bundle: str | Path, dataset: ImageDataset, *, limit: int | None = None,
                    threads: int | None = None) -> dict:
    """Evaluate and store ``eval.json`` in the bundle; returns the ``eval --json`` document.

    When the bundle cannot be written (read-only) the result is still returned, with one warning."""
    from targets import get_target, info_for_file
    from targets.base import TargetError

    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    pre = Preprocess.from_dict(manifest["preprocess"])
    check_labels(dataset, manifest["arch"]["num_classes"])
    dataset.check_image_size(pre)
    labels = dataset.labels[dataset.spread(limit)]
    artifacts = ok_artifacts(manifest)
    paths = [artifact_path(bundle, a) for a in artifacts]  # every file checked before any is run
    ref_path = reference_path(bundle, manifest)
    ref_runner = get_target(info_for_file(ref_path.name).name).load_runner(ref_path, threads=threads)
    reference = collect_logits(ref_runner, dataset, pre, limit=limit, description="fp32 reference")
    result = {"reference": topk_accuracy(reference, labels), "artifacts": [], "images": int(len(labels))}
    for a, path in zip(artifacts, paths):
        entry = {"target": a["target"], "precision": a["precision"], "file": a["file"]}
        try:
            runner = get_target(a["target"]).load_runner(path, threads=threads)
            logits = collect_logits(runner, dataset, pre, limit=limit, description=f"{a['target']} {a['precision']}")
            entry.update(compare_to_reference(logits, reference, labels))
        except TargetError as e:
            entry.update(status="failed", error=str(e))
            log(f"[red]{a['target']} {a['precision']} failed:[/] {e}")
        result["artifacts"].append(entry)
    stored = dict(result, data=str(dataset.source), conversion_key=manifest.get("conversion_key"))
    store_result(bundle, EVAL_FILE, stored)
    return result
