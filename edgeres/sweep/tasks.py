"""The work of one sweep step, as plain functions that Ray runs in its workers (``engine`` wraps them).

Each takes a frozen job record and the results of the steps it depends on, writes to the sweep folder
(every node must see it at the same path) and returns a small dict. A step whose output is already
there with the same key is not redone, so a re-run resumes. Each step's log goes to ``logs/NAME.log``.
Each starts with ``settle_heap``: a Ray worker runs one step after another, and what the earlier steps imported
is then not scanned again by every garbage collection."""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from edgeres.calibration import open_dataset
from edgeres.bundle import (EVAL_FILE, MANIFEST, OutputLock, artifact_path, read_manifest, read_result,
                            reference_path)
from edgeres.compress.prune import prune_into_loaded
from edgeres.convert.build import RANGES_FILE, STAGED_QDQ, StepCache, build_bundle, staging_dir
from edgeres.convert.config import ConvertConfig
from edgeres.errors import InputError
from edgeres.int8 import qdq_record
from edgeres.measure.bench import BENCH_FILE, BenchConfig, RemoteHost, bench_bundle
from edgeres.measure.bundle_eval import evaluate_bundle
from edgeres.progress import log
from edgeres.sweep.grid import base_target
from edgeres.sources.loading import load_model, save_checkpoint
from edgeres.targets.base import settle_heap

PRUNE_LOG = "pruning (and fine-tuning) once for ratio"  # counted by the sweep: each ratio is pruned once
# A model with less than this in weights compiles in the Ray worker that runs its trial (a process of its own, one
# per CPU, kept for the next trials): a worker process per compile would import its runtime again each time, and
# TensorFlow's import alone (~5 s of CPU) is more than a CIFAR ResNet's whole TFLite compile. Bigger models keep
# a process per compile, so what a runtime holds after an ImageNet-size compile (GBs) leaves with it.
COMPILE_IN_TASK_BELOW_BYTES = 32 * 2**20


@dataclass(frozen=True)
class PruneJob:
    cfg: ConvertConfig  # the canonical prune config (grid.prune_key_config) with eval data
    path: str  # the shared pruned checkpoint
    log: str


@dataclass(frozen=True)
class ConversionJob:
    cfg: ConvertConfig
    key: str  # conversion_key(cfg, source sha256), computed by the driver
    log: str
    evaluate: bool  # trials are evaluated; base conversions only make the shared steps
    seed_ranges: bool  # reuse the base's calibration (the conversion compiles from the shared QDQ model)


@dataclass(frozen=True)
class BenchJob:
    bundle: str
    threads: tuple[int, ...]
    runs: int
    remote: str | None
    log: str


@contextlib.contextmanager
def logged(path: str, title: str):
    """This step's progress to its log file (the worker's stderr is not the user's terminal)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f, contextlib.redirect_stderr(f):
        print(f"== {title} ({time.strftime('%Y-%m-%d %H:%M:%S')})", file=f, flush=True)
        yield


def prune_step(job: PruneJob) -> str:
    """Prune (and fine-tune) the model once for a ratio; returns the shared checkpoint's path."""
    settle_heap()
    path = Path(job.path)
    with logged(job.log, f"prune {job.cfg.prune}"):
        if path.exists():
            log(f"✓ pruned model {path.name} (made earlier, reused)")
            return str(path)
        loaded = load_model(job.cfg.model, job.cfg.arch)
        calib = open_dataset(job.cfg.calib)
        evald = open_dataset(job.cfg.eval_data) if job.cfg.eval_data else None
        log(f"{PRUNE_LOG} {job.cfg.prune:g}…")
        pruned = prune_into_loaded(loaded, job.cfg, calib, evald)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(path, pruned.spec, pruned.state_dict, extra=pruned.extra)
        return str(path)


def _model(cfg: ConvertConfig, pruned: str | None):
    """The source model, with the shared pruned weights when the conversion prunes: the manifest still
    names the user's file and its hash, as ``edgeres convert --prune`` would."""
    loaded = load_model(cfg.model, cfg.arch)
    if pruned is None:
        return loaded
    p = load_model(pruned)
    return replace(loaded, spec=p.spec, state_dict=p.state_dict, extra=p.extra)


def conversion_step(job: ConversionJob, pruned: str | None, base: dict | None) -> dict:
    """Build (or find) one bundle, reusing the base's reference and calibration; evaluate a trial."""
    out = Path(job.cfg.out)
    settle_heap()
    with logged(job.log, f"conversion {out.name}"), OutputLock(out):
        built = existing_manifest(out, job.key)
        if built is None:
            loaded = _model(job.cfg, pruned)
            calib = open_dataset(job.cfg.calib)
            if base is not None and job.seed_ranges:
                _seed_calibration(out, job.key, base)
            reference = Path(base["reference"]) if base is not None else None
            build_bundle(compile_where(job.cfg, loaded), loaded, job.key, calib, reference=reference)
        else:
            log(f"✓ {out.name} is up to date (same model, data and options): build skipped")
        if job.evaluate:
            _evaluate(job.cfg, out)
        return summary(out)


def compile_where(cfg: ConvertConfig, loaded) -> ConvertConfig:
    """``cfg`` with ``jobs=0`` (compile in this Ray worker) for a model under ``COMPILE_IN_TASK_BELOW_BYTES`` of
    weights; else unchanged (a worker process per compile). Not part of the conversion key: same files either way."""
    weights = sum(int(getattr(v, "nbytes", 0)) for v in loaded.state_dict.values())
    return replace(cfg, jobs=0) if cfg.jobs is None and weights < COMPILE_IN_TASK_BELOW_BYTES else cfg


def existing_manifest(out: Path, key: str) -> dict | None:
    if not (out / MANIFEST).exists():
        return None
    try:
        manifest = read_manifest(out)
    except InputError:
        return None
    return manifest if manifest.get("conversion_key") == key else None


def _seed_calibration(out: Path, key: str, base: dict) -> None:
    """Put the base's finished calibrate step into this build's staging folder (its resume point)."""
    if not base.get("qdq"):
        return
    work = staging_dir(out, key)
    steps = StepCache(work) if work.exists() else None
    if steps is not None and steps.done.get("calibrate") is not None:
        return
    (work / STAGED_QDQ).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(base["ranges"], work / RANGES_FILE)
    shutil.copyfile(base["qdq"], work / STAGED_QDQ)
    StepCache(work).finish("calibrate", base["calibration"])
    log(f"calibration ({base['calibration'].get('estimator')}) reused from {Path(base['bundle']).name}")


def _evaluate(cfg: ConvertConfig, out: Path) -> None:
    stored = read_result(out, EVAL_FILE)
    manifest = read_manifest(out)
    if stored and stored.get("conversion_key") == manifest.get("conversion_key") and \
            stored.get("data") == str(cfg.eval_data) and _eval_images_match(stored, cfg):
        log("✓ eval (done in an earlier run, skipped)")
        return
    evaluate_bundle(out, open_dataset(cfg.eval_data), limit=cfg.eval_images, threads=cfg.threads)


def _eval_images_match(stored: dict, cfg: ConvertConfig) -> bool:
    ds = open_dataset(cfg.eval_data)
    return stored.get("images") == len(ds.spread(cfg.eval_images))


def summary(out: Path) -> dict:
    """What the driver needs of a bundle: its one artifact, eval entry and the files the base shares."""
    manifest = read_manifest(out)
    artifact = manifest["artifacts"][0]
    evaluated = read_result(out, EVAL_FILE) or {}
    entry = next((e for e in evaluated.get("artifacts", []) if e["target"] == artifact["target"]
                  and e["precision"] == artifact["precision"]), None)
    qdq = None
    if artifact["status"] == "ok" and artifact["target"] == base_target() and artifact["precision"] == "int8":
        path = artifact_path(out, artifact)
        # the base target's int8 artifact is the QDQ model unchanged: checked, not assumed
        if qdq_record(path) == (manifest.get("calibration") or {}).get("qdq"):
            qdq = str(path)
    ranges = out / RANGES_FILE
    return {"bundle": str(out), "conversion_key": manifest["conversion_key"], "artifact": artifact,
            "eval": entry, "reference_top1": (evaluated.get("reference") or {}).get("top1"),
            "eval_images": evaluated.get("images"), "reference": str(reference_path(out, manifest)),
            "qdq": qdq, "ranges": str(ranges) if ranges.exists() else None,
            "calibration": manifest.get("calibration"), "pruning": manifest.get("pruning"),
            "timings": manifest.get("timings")}


def bench_step(job: BenchJob) -> dict:
    """Benchmark one bundle at every thread count; only one runs at a time per ``bench`` slot."""
    bundle = Path(job.bundle)
    cfg = BenchConfig(threads=job.threads, runs=job.runs, warmup=5)
    host = job.remote or "local"
    settle_heap()
    with logged(job.log, f"bench {bundle.name}"), OutputLock(bundle):
        stored = read_result(bundle, BENCH_FILE)
        settings = (stored or {}).get("settings", {})
        if stored and settings.get("threads") == list(job.threads) and settings.get("runs") == job.runs \
                and stored.get("host") == host:
            log("✓ bench (done in an earlier run, skipped)")
            return stored
        remote = RemoteHost(job.remote) if job.remote is not None else None
        print(f"benchmarking on {host} ({sys.platform})", file=sys.stderr)
        return bench_bundle(bundle, cfg, remote)
