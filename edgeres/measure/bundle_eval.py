"""``eval``: the fp32 reference and every artifact of a bundle on the same images, or a model file."""

from __future__ import annotations

from pathlib import Path

from calibration import ImageDataset, Preprocess
from edgeres.bundle import (EVAL_FILE, artifact_path, ok_artifacts, read_manifest, read_result, reference_path,
                            store_result)
from edgeres.errors import InputError
from edgeres.measure.evaluate import (check_labels, collect_logits, compare_to_reference,
                                      topk_accuracy, torch_runner)
from edgeres.measure.layer_error import layer_sqnr_for_bundle
from edgeres.progress import log
from edgeres.sources.loading import load_model
from targets import TargetError, get_target, info_for_file

__all__ = ["EVAL_FILE", "evaluate_bundle", "evaluate_path"]


def evaluate_bundle(bundle: str | Path, dataset: ImageDataset, *, limit: int | None = None,
                    threads: int | None = None) -> dict:
    """Evaluate and store ``eval.json`` in the bundle; returns the ``eval --json`` document.

    When the bundle cannot be written (read-only) the result is still returned, with one warning."""

    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    pre = check_data_for(manifest, dataset)
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


def check_data_for(manifest: dict, dataset: ImageDataset) -> Preprocess:
    """The bundle's preprocessing, once the images fit it and their labels (class folders numbered by the
    model's labels) fit the model; unreadable or mis-sized images are the first problem reported."""
    pre = Preprocess.from_dict(manifest["preprocess"])
    dataset.check_image_size(pre)
    check_labels(dataset, manifest["arch"]["num_classes"], manifest["arch"].get("labels"))
    return pre


def check_eval_request(path: str | Path, layers: bool) -> None:
    """What ``eval`` can refuse before reading any data."""
    if layers and not Path(path).is_dir():
        raise InputError(f"--layers: {path} is not a bundle directory; per-layer SQNR compares a bundle's "
                         "int8 QDQ artifact to its fp32 reference")


def evaluate_path(path: str | Path, dataset: ImageDataset, *, arch: str | None = None, limit: int | None = None,
                  threads: int | None = None, layers: bool = False) -> dict:
    """``edgeres eval``: a bundle (every artifact vs its fp32 reference; ``layers``: per-layer SQNR of
    the int8 QDQ model, kept in eval.json for ``report``) or a model file (its torch fp32 accuracy)."""
    path = Path(path)
    check_eval_request(path, layers)
    if not path.is_dir():
        return _evaluate_model(path, dataset, arch, limit)
    layer_rows = None
    if layers:  # measured before evaluate_bundle stores eval.json, so a failure leaves the stored results as they were
        check_data_for(read_manifest(path, verify=False), dataset)
        layer_rows = layer_sqnr_for_bundle(path, dataset)
    result = evaluate_bundle(path, dataset, limit=limit, threads=threads)
    if layers:
        result["layers"] = layer_rows
        stored = read_result(path, EVAL_FILE) or {}
        store_result(path, EVAL_FILE, {**stored, "layers": layer_rows})
    return result


def _evaluate_model(path: Path, dataset: ImageDataset, arch: str | None, limit: int | None) -> dict:
    loaded = load_model(path, arch)
    dataset.check_image_size(loaded.spec.preprocess)
    check_labels(dataset, loaded.spec.num_classes, loaded.spec.labels)
    logits = collect_logits(torch_runner(loaded.to_torch()), dataset, loaded.spec.preprocess, limit=limit,
                            source=str(path))
    labels = dataset.labels[dataset.spread(limit)]
    return {"model": str(path), "arch": loaded.spec.name, "images": int(len(labels)), **topk_accuracy(logits, labels)}

