"""``eval DIR --remote USER@HOST``: accuracy measured where the model runs, on the device's own kernels.

The same int8 model can give different answers on different CPUs (onnxruntime's int8 kernels differ
between VNNI, AVX2 and ARM), so a host evaluation does not prove the device's accuracy. Here the host
preprocesses the images once into a float32 N×C×H×W ``.npy`` (written batch by batch), sends it once
with the artifacts and the standalone runner, and the device writes each artifact's logits, reading the
inputs memory-mapped one batch at a time. The host runs the same artifacts on the same inputs, so each
row has the device's top-1, drop and agreement with fp32 (both measured on the device) and the agreement
between the device's and the host's predictions. Stored as ``device_eval.json`` for ``report``.
"""

from __future__ import annotations

import datetime as dt
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from edgeres.calibration import ImageDataset
from edgeres.bundle import ok_artifacts, read_manifest, store_result
from edgeres.errors import InputError
from edgeres.measure.bench import BenchConfig, BenchItem, RemoteError, RemoteExecutor, RemoteHost
from edgeres.measure.bench_runner import EVAL_SCHEMA
from edgeres.measure.bundle_eval import check_data_for
from edgeres.measure.evaluate import compare_to_reference, topk_accuracy
from edgeres.progress import log, progress
from edgeres.tables import fmt
from edgeres.targets import TargetError, get_target, info_for_file

DEVICE_EVAL_FILE = "device_eval.json"
SCHEMA = "edgeres-device-eval/1"
INPUTS = "eval_inputs.npy"
BATCH = 100


def eval_items(manifest: dict) -> list[BenchItem]:
    """The fp32 reference, then every ok artifact (the reference is always run: it is the yardstick)."""
    ref = manifest["reference"]
    items = [BenchItem("reference", ref.get("precision", "fp32"), ref["file"], (ref["file"],), (ref,))]
    for a in ok_artifacts(manifest):
        records = tuple(a["file_records"])
        items.append(BenchItem(a["target"], a["precision"], a["file"], tuple(r["file"] for r in records), records))
    return items


def write_inputs(dataset: ImageDataset, preprocess, limit: int | None, path: Path) -> np.ndarray:
    """The preprocessed images as one float32 .npy, filled a batch at a time (memory stays one batch)."""
    n = len(dataset.spread(limit))
    out = None
    start = 0
    with progress("preprocessing", n) as advance:
        for x, _ in dataset.batches(preprocess, BATCH, limit):
            if out is None:
                out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, *x.shape[1:]))
            out[start:start + len(x)] = x
            start += len(x)
            advance(len(x))
    out.flush()
    return np.load(path, mmap_mode="r")


def host_logits(item: BenchItem, bundle: Path, inputs: np.ndarray, threads: int | None) -> np.ndarray:
    """The artifact's logits on this machine, through the same runners ``edgeres eval`` uses."""
    info = info_for_file(item.file) if item.target == "reference" else None
    runner = get_target(info.name if info else item.target).load_runner(item.path(bundle), threads=threads)
    outs = [np.asarray(runner(np.ascontiguousarray(inputs[i:i + BATCH])), np.float32).reshape(
        min(BATCH, len(inputs) - i), -1) for i in range(0, len(inputs), BATCH)]
    return np.concatenate(outs)


def _device_logits(executor: RemoteExecutor, item: BenchItem, index: int, threads: int, work: Path,
                   n: int) -> tuple[np.ndarray | None, dict]:
    name = f"logits_{index}.npy"
    args = ["--artifact", item.file, "--runtime", item.runtime, "--threads", str(threads), "--batch", str(BATCH),
            "--eval-inputs", INPUTS, "--logits-out", name, "--json"]
    doc = executor.run_runner(item, args, "evaluating", EVAL_SCHEMA)
    if doc.get("status") != "ok":
        return None, doc
    executor.fetch(name, work / name)
    logits = np.load(work / name)
    if logits.shape[0] != n or not np.isfinite(logits).all():
        return None, {**doc, "status": "failed", "error": f"the device returned {logits.shape} logits, "
                      f"{'with NaN/Inf' if logits.shape[0] == n else f'expected {n} rows'}"}
    return logits, doc


def _row(item: BenchItem, device: np.ndarray | None, doc: dict, device_ref: np.ndarray | None,
         host: np.ndarray | None, host_ref: np.ndarray | None, labels: np.ndarray) -> dict:
    row = {"target": item.target, "precision": item.precision, "file": item.file}
    if device is None or device_ref is None:
        return {**row, "status": "failed", "error": doc.get("error", "the fp32 reference failed on the device")}
    row.update(status="ok", **compare_to_reference(device, device_ref, labels), runtime=doc.get("runtime"),
               runtime_version=doc.get("runtime_version"), device_seconds=doc.get("seconds"))
    if host is not None and host_ref is not None:
        row["host"] = compare_to_reference(host, host_ref, labels)
        row["device_host_agreement_pct"] = round(float((device.argmax(1) == host.argmax(1)).mean() * 100), 4)
        row["device_host_max_abs_logit_diff"] = float(np.abs(device - host).max())
    return row


def evaluate_bundle_remote(bundle: str | Path, dataset: ImageDataset, remote: RemoteHost, *,
                           limit: int | None = None, threads: int | None = None) -> dict:
    """Evaluate every artifact on ``remote`` and here on the same inputs; stores ``device_eval.json``."""
    remote.validate()
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise InputError(f"--remote: {bundle} is not a bundle directory; the device evaluation runs a bundle's artifacts")
    manifest = read_manifest(bundle)
    pre = check_data_for(manifest, dataset)
    labels = dataset.labels[dataset.spread(limit)]
    items = eval_items(manifest)
    for item in items:  # every file checked before anything is sent
        item.path(bundle)
    device_threads = threads or 0  # the runner's "every core": accuracy does not depend on it, time does
    with tempfile.TemporaryDirectory(prefix="edgeres-device-eval-") as tmp:
        work = Path(tmp)
        inputs = write_inputs(dataset, pre, limit, work / INPUTS)
        host = {}
        for i, item in enumerate(items):
            log(f"{item.target} {item.precision} here…")
            try:
                host[i] = host_logits(item, bundle, inputs, threads)
            except TargetError as e:
                log(f"[yellow]{item.target} {item.precision} failed here:[/] {e}")
        cfg = replace(BenchConfig(), run_timeout_s=1800.0)  # emulated devices are slow
        device, docs = {}, {}
        with RemoteExecutor(bundle, cfg, remote, items, extra_files=(work / INPUTS,)) as executor:
            for i, item in enumerate(items):
                log(f"{item.target} {item.precision} on {remote.destination}…")
                # a .tflite that takes pixels: the runner reads its normalisation from the model itself
                device[i], docs[i] = _device_logits(executor, item, i, device_threads, work, len(labels))
                if device[i] is None:
                    log(f"[red]{item.target} {item.precision} failed on {remote.destination}:[/] "
                        f"{docs[i].get('error', 'unknown failure')}")
    return _result(bundle, manifest, dataset, remote, items, labels, host, device, docs, device_threads)


def _result(bundle, manifest, dataset, remote, items, labels, host, device, docs, threads) -> dict:
    if device[0] is None:
        raise RemoteError(f"{remote.destination}: the fp32 reference {items[0].file} failed on the device "
                          f"({docs[0].get('error', 'unknown failure')}); nothing to compare against")
    system = next((d.get("system") for d in docs.values() if d.get("status") == "ok"), None) or {}
    reference = {**topk_accuracy(device[0], labels), "runtime_version": docs[0].get("runtime_version"),
                 "device_seconds": docs[0].get("seconds")}
    if host.get(0) is not None:
        reference["host"] = topk_accuracy(host[0], labels)
        reference["device_host_agreement_pct"] = round(float((device[0].argmax(1) == host[0].argmax(1)).mean() * 100), 4)
    result = {
        "schema": SCHEMA, "host": remote.destination, "images": int(len(labels)),
        "threads": docs[0].get("threads") or threads,
        "emulated": bool((system.get("emulation") or {}).get("emulated")), "device": system,
        "reference": reference,
        "artifacts": [_row(item, device[i], docs[i], device[0], host.get(i), host.get(0), labels)
                      for i, item in enumerate(items) if i > 0],
    }
    stored = dict(result, data=str(dataset.source), conversion_key=manifest.get("conversion_key"),
                  created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    store_result(bundle, DEVICE_EVAL_FILE, stored)
    return result


def device_eval_table(result: dict) -> tuple[list[str], list[list]]:
    """One row per artifact: the device's figures, then how they compare with this host's."""
    headers = ["target", "precision", "device top-1 %", "drop pp", "agree fp32 %", "host top-1 %",
               "device=host %", "status"]
    ref = result["reference"]
    rows = [["reference", "fp32", fmt(ref["top1"], ".2f"), "", "", fmt((ref.get("host") or {}).get("top1"), ".2f"),
             fmt(ref.get("device_host_agreement_pct"), ".2f"), "ok"]]
    for r in result["artifacts"]:
        if r["status"] != "ok":
            rows.append([r["target"], r["precision"], "", "", "", "", "", f"failed: {r.get('error', '')}"])
            continue
        rows.append([r["target"], r["precision"], fmt(r["top1"], ".2f"), fmt(r["top1_drop_pp"], "+.2f"),
                     fmt(r["agreement_pct"], ".2f"), fmt((r.get("host") or {}).get("top1"), ".2f"),
                     fmt(r.get("device_host_agreement_pct"), ".2f"), "ok"])
    return headers, rows
