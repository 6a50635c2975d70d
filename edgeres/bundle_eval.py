"""``eval DIR``: the fp32 reference and every artifact of a bundle on the same images."""

from __future__ import annotations

from pathlib import Path

from calibration import ImageDataset, Preprocess
from edgeres.bundle import REFERENCE_FILE, ok_artifacts, read_manifest, write_json_atomic
from edgeres.evaluate import check_labels, collect_logits, compare_to_reference, topk_accuracy
from edgeres.progress import log

EVAL_FILE = "eval.json"


def evaluate_bundle(bundle: str | Path, dataset: ImageDataset, *, limit: int | None = None,
                    threads: int | None = None) -> dict:
    """Evaluate and store ``eval.json`` in the bundle; returns the ``eval --json`` document."""
    from targets import get_target
    from targets.base import TargetError

    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    pre = Preprocess.from_dict(manifest["preprocess"])
    check_labels(dataset, manifest["arch"]["num_classes"])
    dataset.check_image_size(pre)
    labels = dataset.labels[dataset.spread(limit)]
    ref_runner = get_target("onnx").load_runner(bundle / REFERENCE_FILE, threads=threads)
    reference = collect_logits(ref_runner, dataset, pre, limit=limit, description="fp32 reference")
    result = {"reference": topk_accuracy(reference, labels), "artifacts": [], "images": int(len(labels))}
    for a in ok_artifacts(manifest):
        entry = {"target": a["target"], "precision": a["precision"], "file": a["file"]}
        try:
            runner = get_target(a["target"]).load_runner(bundle / a["file"], threads=threads)
            logits = collect_logits(runner, dataset, pre, limit=limit, description=f"{a['target']} {a['precision']}")
            entry.update(compare_to_reference(logits, reference, labels))
        except TargetError as e:
            entry.update(status="failed", error=str(e))
            log(f"[red]{a['target']} {a['precision']} failed:[/] {e}")
        result["artifacts"].append(entry)
    stored = dict(result, data=str(dataset.source), conversion_key=manifest.get("conversion_key"))
    write_json_atomic(bundle / EVAL_FILE, stored)
    return result
