"""``eval``: the fp32 reference and every artifact of a bundle on the same images, or a model file."""

from __future__ import annotations

import platform
from pathlib import Path

from edgeres.calibration import ImageDataset, Preprocess

from edgeres.bundle import EVAL_FILE, artifact_path, ok_artifacts, read_manifest, reference_path
from edgeres.errors import InputError
from edgeres.measure.evaluate import (TIE_RULE, check_labels, collect_logits, compare_to_reference,
                                      top1_class, topk_accuracy, torch_runner)
from edgeres.measure.layer_error import layer_report
from edgeres.measure.paired import CI_METHOD, pack_bits, pack_classes
from edgeres.measure.records import artifact_sha, data_fingerprint, keep_eval, now
from edgeres.progress import log
from edgeres.sources.loading import load_model
from edgeres.targets import TargetError, get_target, info_for_file
from edgeres.targets.base import release_memory

__all__ = ["EVAL_FILE", "evaluate_bundle", "evaluate_path", "record_eval"]


def evaluate_bundle(bundle: str | Path, dataset: ImageDataset, *, limit: int | None = None,
                    threads: int | None = None, layers: dict | None = None) -> dict:
    """Evaluate and keep the run in the bundle (``eval.json`` + ``evals/``); returns the ``eval --json``
    document. ``layers``: the per-layer SQNR measured for this run (``layers`` rows and ``layer_targets``),
    kept in the same record.

    When the bundle cannot be written (read-only) the result is still returned, with one warning."""

    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    pre = check_data_for(manifest, dataset)
    labels = dataset.labels[dataset.spread(limit)]
    artifacts = ok_artifacts(manifest)
    paths = [artifact_path(bundle, a) for a in artifacts]  # every file checked before any is run
    ref_path = reference_path(bundle, manifest)
    shas = artifact_sha(manifest)
    ref_target = info_for_file(ref_path.name).name
    ref_runner = get_target(ref_target).load_runner(ref_path, threads=threads)
    reference = collect_logits(ref_runner, dataset, pre, limit=limit, description="fp32 reference")
    del ref_runner  # one runtime's model at a time: each is let go before the next loads
    release_memory()
    # the reference's top-1 per image too: what another framework's predictions on the same pixels are compared with
    ref_top1 = top1_class(reference)
    result = {"reference": {**topk_accuracy(reference, labels), "correct_bits": pack_bits(ref_top1 == labels),
                            "top1_classes": pack_classes(ref_top1)},
              "artifacts": [], "images": int(len(labels))}
    for a, path in zip(artifacts, paths):
        entry = {"target": a["target"], "precision": a["precision"], "file": a["file"],
                 "sha256": shas.get((a["target"], a["precision"], a["file"]))}
        if a["target"] == ref_target and entry["sha256"] == manifest["reference"].get("sha256"):
            # the reference file itself, for the reference's runtime (ONNX fp32): the same bytes run by the same
            # runtime give the reference's logits, already measured on these images
            entry.update(compare_to_reference(reference, reference, labels), same_file_as_reference=True)
            log(f"[dim]{a['target']} {a['precision']} is the fp32 reference file itself (same sha256): "
                "its results are the reference run's[/]")
            result["artifacts"].append(entry)
            continue
        try:
            runner = get_target(a["target"]).load_runner(path, threads=threads)
            logits = collect_logits(runner, dataset, pre, limit=limit, description=f"{a['target']} {a['precision']}")
            entry.update(compare_to_reference(logits, reference, labels))
        except TargetError as e:
            entry.update(status="failed", error=str(e))
            log(f"[red]{a['target']} {a['precision']} failed:[/] {e}")
        finally:
            runner = None
            release_memory()
        result["artifacts"].append(entry)
    if layers is not None:
        result.update(layers)
    return record_eval(bundle, manifest, dataset, result, threads=threads)


def record_eval(bundle: Path, manifest: dict, dataset: ImageDataset, result: dict, *, threads: int | None,
                host: str = "local") -> dict:
    """Describe the run (data fingerprint, images, partial, threads, host, time) and keep it in the bundle;
    returns ``result`` with those fields. A remote evaluation calls this with its own result and host."""
    result.update(data=str(dataset.source), data_fingerprint=data_fingerprint(dataset.source),
                  dataset_images=len(dataset), partial=result["images"] < len(dataset), threads=threads, host=host,
                  hostname=platform.node(), created=now(), conversion_key=manifest.get("conversion_key"),
                  ci_method=CI_METHOD, tie_rule=TIE_RULE)
    run = keep_eval(bundle, result)
    if run is not None:
        result["run"] = run
    return result


def check_data_for(manifest: dict, dataset: ImageDataset) -> Preprocess:
    """The bundle's preprocessing, once the images fit it and their labels (class folders numbered by the
    model's labels) fit the model; unreadable or mis-sized images are the first problem reported."""
    pre = Preprocess.from_dict(manifest["preprocess"])
    dataset.check_image_size(pre)
    check_labels(dataset, manifest["arch"]["num_classes"], manifest["arch"].get("labels"), manifest["arch"].get("label_keys"))
    return pre


def check_eval_request(path: str | Path, layers: bool) -> None:
    """What ``eval`` can refuse before reading any data."""
    if layers and not Path(path).is_dir():
        raise InputError(f"--layers: {path} is not a bundle directory; per-layer SQNR compares each int8 "
                         "artifact of a bundle to its fp32 reference")


def evaluate_path(path: str | Path, dataset: ImageDataset, *, arch: str | None = None, limit: int | None = None,
                  threads: int | None = None, layers: bool = False) -> dict:
    """``edgeres eval``: a bundle (every artifact vs its fp32 reference; ``layers``: per-layer SQNR of
    every int8 artifact, kept in eval.json for ``report``) or a model file (its torch fp32 accuracy)."""
    path = Path(path)
    check_eval_request(path, layers)
    if not path.is_dir():
        return _evaluate_model(path, dataset, arch, limit)
    layer_rows = None
    if layers:  # measured before evaluate_bundle stores its record, so a failure leaves the stored results as they were
        check_data_for(read_manifest(path, verify=False), dataset)
        layer_rows = layer_report(path, dataset)
    return evaluate_bundle(path, dataset, limit=limit, threads=threads, layers=layer_rows)


def _evaluate_model(path: Path, dataset: ImageDataset, arch: str | None, limit: int | None) -> dict:
    loaded = load_model(path, arch)
    dataset.check_image_size(loaded.spec.preprocess)
    check_labels(dataset, loaded.spec.num_classes, loaded.spec.labels, loaded.spec.label_keys)
    logits = collect_logits(torch_runner(loaded.to_torch()), dataset, loaded.spec.preprocess, limit=limit,
                            source=str(path))
    labels = dataset.labels[dataset.spread(limit)]
    return {"model": str(path), "arch": loaded.spec.name, "images": int(len(labels)), **topk_accuracy(logits, labels)}

