"""``sweep``: check every flag → plan the grid → on Ray: prune per ratio → base (fp32 reference +
calibration) per (ratio, estimator) → each conversion + evaluation → benchmarks one at a time →
``sweep.json`` with the Pareto front and the best trial under the budget → report.

A driver above ``convert``: it calls the builder, evaluator and benchmark with the same per-conversion
``ConvertConfig`` that ``edgeres convert`` would make, so each bundle is what convert makes, and its
key says when a re-run can skip it."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

from edgeres.calibration import open_dataset
from edgeres.bundle import OutputLock, read_result, write_json_atomic
from edgeres.convert.config import MIN_CALIB_IMAGES, conversion_key
from edgeres.errors import InputError
from edgeres.measure.bench import BENCH_FILE
from edgeres.measure.bundle_eval import EVAL_FILE, check_data_for
from edgeres.progress import log
from edgeres.sources.loading import load_model
from edgeres.sweep import tasks
from edgeres.sweep.engine import TaskRunner, check_address, ray_session, stop_on_sigterm
from edgeres.sweep.grid import (LOGS_DIR, SHARED_DIR, Conversion, SweepConfig, base_conversion, base_dir,
                                conversions, convert_config, prune_key_config, pruned_path, trials, validate_sweep)
from edgeres.sweep.report import write_sweep_report
from edgeres.sweep.results import sweep_document, trial_row

SWEEP_FILE = "sweep.json"


@dataclass(frozen=True)
class Planned:
    """A conversion with its bundle folder and key, and whether an earlier run already finished it."""

    conversion: Conversion
    job: tasks.ConversionJob
    done: bool


def sweep(cfg: SweepConfig) -> dict:
    """Run (or resume) the sweep into ``cfg.out``; returns the ``sweep.json`` document."""
    validate_sweep(cfg)
    check_address(cfg.address)  # before any work: a closed address fails in seconds
    cfg = _absolute(cfg)  # every node reads the same files, whatever its working directory
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is a file; choose a folder for the sweep")
    if out.is_dir() and any(out.iterdir()) and not (out / SWEEP_FILE).exists() and not (out / SHARED_DIR).exists():
        raise InputError(f"--out {out}: exists and is not an edgeres sweep folder; choose an empty or new folder")
    for folder in (out, out / SHARED_DIR, out / LOGS_DIR):
        folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with stop_on_sigterm(), OutputLock(out):
        sha, eval_images = _check_inputs(cfg)
        plan = _plan(cfg, out, sha, eval_images)
        try:
            with ray_session(cfg.address) as engine:
                log(f"[bold]edgeres sweep[/] {len(trials(cfg))} trials ({len(plan['trials'])} conversions) on "
                    f"Ray {engine['ray_version']} ({engine['mode']}, {engine['cpus']:g} CPUs) → {out}")
                built, benches = _execute(cfg, out, plan, TaskRunner())
        finally:
            _drop_stale_locks(plan)
        doc = _document(cfg, out, plan, built, benches, engine, time.perf_counter() - t0)
        write_json_atomic(out / SWEEP_FILE, doc)
        write_sweep_report(out, doc, html_out=cfg.html)
    return doc


def _drop_stale_locks(plan: dict) -> None:
    """A task killed while it held its bundle's lock leaves the lock file (never a lock: the kernel dropped
    it); taking and releasing the lock removes the file. One still held is left to its holder."""
    for p in [*plan["bases"].values(), *plan["trials"]]:
        folder = Path(p.job.cfg.out)
        if (folder.parent / f".{folder.name}.lock").exists():
            with contextlib.suppress(InputError, OSError), OutputLock(folder):
                pass


def _absolute(cfg: SweepConfig) -> SweepConfig:
    paths = {name: str(Path(getattr(cfg, name)).absolute()) for name in ("model", "out", "calib", "eval_data",
                                                                             "finetune_data")
             if getattr(cfg, name) is not None}
    return replace(cfg, **paths)


def _check_inputs(cfg: SweepConfig) -> tuple[str, int]:
    """The model and the images, before any work: the source hash and the number of eval images."""
    loaded = load_model(cfg.model, cfg.arch)
    pre = loaded.spec.preprocess
    needs_calib = "int8" in cfg.precisions or any(cfg.prune)
    calib = open_dataset(cfg.calib, min_images=MIN_CALIB_IMAGES if needs_calib else 1)
    calib.check_image_size(pre)
    evald = open_dataset(cfg.eval_data, require_labels=True)
    check_data_for({"preprocess": pre.to_dict(), "arch": loaded.spec.to_dict()}, evald)
    if cfg.finetune_data is not None:
        open_dataset(cfg.finetune_data).check_image_size(pre)
    return loaded.sha256, len(evald.spread(cfg.eval_images))


def _plan(cfg: SweepConfig, out: Path, sha: str, eval_images: int) -> dict:
    """Trials and the shared bases per (ratio, estimator), each marked done when an earlier run finished it."""
    logs = out / LOGS_DIR
    trial_plan, bases = [], {}
    groups: dict[tuple, list[Conversion]] = defaultdict(list)
    for conv in conversions(cfg):
        groups[(conv.prune, conv.estimator)].append(conv)
    if not any(r == 0 for r, _ in groups):  # the unpruned fp32 model is what every drop is measured from
        groups[(0.0, cfg.estimators[0])] = []
    for (ratio, estimator), group in groups.items():
        base = base_conversion(group or [Conversion(ratio, "", "fp32", estimator)])
        bases[(ratio, estimator)] = _planned(cfg, base, base_dir(out, base), sha, eval_images, logs,
                                             evaluate=ratio == 0, seed=False)
    for conv in conversions(cfg):
        trial_plan.append(_planned(cfg, conv, out / conv.name, sha, eval_images, logs, evaluate=True,
                                   seed=conv.uses_shared_ranges))
    return {"trials": trial_plan, "bases": bases, "sha": sha}


def _planned(cfg, conv: Conversion, folder: Path, sha: str, eval_images: int, logs: Path, *, evaluate: bool,
             seed: bool) -> Planned:
    ccfg = convert_config(cfg, conv, folder)
    key = conversion_key(ccfg, sha)
    job = tasks.ConversionJob(ccfg, key, str(logs / f"{folder.name}.log"), evaluate=evaluate, seed_ranges=seed)
    return Planned(conv, job, _finished(folder, key, cfg, eval_images, evaluate, bench=evaluate and not
                                        folder.parent.name == SHARED_DIR))


def _finished(folder: Path, key: str, cfg: SweepConfig, eval_images: int, evaluate: bool, bench: bool) -> bool:
    """Did an earlier run build, evaluate and benchmark this bundle with these very settings?"""
    summary = tasks.existing_manifest(folder, key)
    if summary is None:
        return False
    if evaluate:
        stored = read_result(folder, EVAL_FILE) or {}
        if stored.get("conversion_key") != key or stored.get("data") != cfg.eval_data or \
                stored.get("images") != eval_images:
            return False
    if bench:
        stored = read_result(folder, BENCH_FILE) or {}
        settings = stored.get("settings", {})
        if settings.get("threads") != list(cfg.threads) or settings.get("runs") != cfg.bench_runs or \
                stored.get("host") != (cfg.remote or "local"):
            return False
    return True


def _execute(cfg: SweepConfig, out: Path, plan: dict, runner: TaskRunner) -> tuple[dict, dict]:
    """Submit what is not done; returns the conversions' summaries and the benchmarks, by folder name."""
    built = {p.job.cfg.out: tasks.summary(Path(p.job.cfg.out)) for p in [*plan["bases"].values(), *plan["trials"]]
             if p.done}
    for name in built:
        log(f"[dim]✓ {Path(name).name} (finished in an earlier run, skipped)[/]")
    refs = _submit_conversions(cfg, out, plan, runner, built)
    built.update(runner.gather(refs, "conversions", _report_conversion))
    benches = {p.job.cfg.out: read_result(Path(p.job.cfg.out), BENCH_FILE) for p in plan["trials"] if p.done}
    bench_refs = {}
    for p in plan["trials"]:
        folder = p.job.cfg.out
        if not p.done and "error" not in built[folder] and built[folder]["artifact"]["status"] == "ok":
            bench_refs[folder] = runner.submit(tasks.bench_step, tasks.BenchJob(
                folder, cfg.threads, cfg.bench_runs, cfg.remote, p.job.log), bench=True)
    benches.update(runner.gather(bench_refs, "benchmarks", _report_bench))
    return built, benches


def _submit_conversions(cfg: SweepConfig, out: Path, plan: dict, runner: TaskRunner, built: dict) -> dict:
    """Prune once per ratio, then the base per (ratio, estimator), then the trials, as task dependencies."""
    refs, pruned, first_base = {}, {}, {}
    logs = out / LOGS_DIR
    for (ratio, estimator), base in plan["bases"].items():
        todo = [p for p in plan["trials"] if (p.conversion.prune, p.conversion.estimator) == (ratio, estimator)
                and not p.done]
        if not todo and base.done:
            first_base.setdefault(ratio, built[base.job.cfg.out])  # the reference for this ratio's other bases
            continue
        if ratio and ratio not in pruned:
            key = conversion_key(prune_key_config(cfg, ratio), plan["sha"])
            job = tasks.PruneJob(replace(prune_key_config(cfg, ratio), eval_data=cfg.eval_data,
                                         eval_images=cfg.eval_images),
                                 str(pruned_path(out, ratio, key)), str(logs / f"prune{ratio:g}.log"))
            pruned[ratio] = runner.submit(tasks.prune_step, job)
        source = pruned.get(ratio)
        base_ref = built.get(base.job.cfg.out) if base.done else \
            runner.submit(tasks.conversion_step, base.job, source, first_base.get(ratio))
        first_base.setdefault(ratio, base_ref)
        if not base.done:
            refs[base.job.cfg.out] = base_ref
        for p in todo:
            refs[p.job.cfg.out] = runner.submit(tasks.conversion_step, p.job, source, base_ref)
    return refs


def _report_conversion(folder: str, result: dict) -> None:
    name = Path(folder).name
    if "error" in result:
        log(f"[red]✗ {name} failed:[/] {result['error']}")
    elif result["artifact"]["status"] != "ok":
        log(f"[red]✗ {name} failed:[/] {result['artifact'].get('error')}")
    else:
        top1 = (result.get("eval") or {}).get("top1")
        log(f"✓ {name}" + (f": top-1 {top1:.2f} %" if top1 is not None else ""))


def _report_bench(folder: str, result: dict) -> None:
    if "error" in result:
        log(f"[red]✗ bench {Path(folder).name} failed:[/] {result['error']}")


def _document(cfg: SweepConfig, out: Path, plan: dict, built: dict, benches: dict, engine: dict,
              wall_s: float) -> dict:
    base0 = next(p for (ratio, _), p in plan["bases"].items() if ratio == 0)
    base0_result = built.get(base0.job.cfg.out, {})
    baseline = {"top1": base0_result.get("reference_top1"), "images": base0_result.get("eval_images"),
                "what": "the unpruned fp32 model (ONNX reference), on the --eval images"}
    rows = []
    for trial in trials(cfg):
        folder = str(out / trial.conversion.name)
        rows.append(trial_row(trial, built.get(folder, {"error": "not run"}), benches.get(folder),
                              baseline["top1"]))
    return sweep_document(cfg, engine, rows, baseline, _shared_counts(out), wall_s)


def _shared_counts(out: Path) -> dict:
    """How often each shared step actually ran, in this run and earlier ones (from the steps' logs)."""
    text = "".join(p.read_text(errors="replace") for p in sorted((out / LOGS_DIR).glob("*.log")))
    return {"prune": text.count(tasks.PRUNE_LOG), "export": text.count("exporting the fp32 reference ONNX"),
            "calibrate": text.count("calibrating on ")}
