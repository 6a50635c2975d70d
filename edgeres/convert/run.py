"""``convert``: check every flag → load → (prune) → build the bundle → (evaluate, accuracy budget) →
(benchmark) → report. Re-running after success finds the manifest's key unchanged and skips the build;
re-running after an interruption resumes it (``convert.build``)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path

from edgeres.calibration import ImageDataset, open_dataset
from edgeres.bundle import MANIFEST, OutputLock, check_output_dir, read_manifest, read_result, reference_path
from edgeres.compress.prune import prune_into_loaded
from edgeres.compress.quant_finetune import check_finetune_data
from edgeres.convert.budget import enforce_accuracy_budget
from edgeres.convert.build import build_bundle
from edgeres.convert.grow import grown_config, ok_pairs, prefill
from edgeres.convert.config import (MIN_CALIB_IMAGES, ConvertConfig, apply_preprocess_override, conversion_key, plan,
                                    validate)
from edgeres.errors import InputError
from edgeres.targets import BUILTIN
from edgeres.measure.bench import BENCH_FILE, BenchConfig, bench_bundle
from edgeres.measure.bundle_eval import EVAL_FILE, evaluate_bundle
from edgeres.measure.evaluate import check_labels
from edgeres.measure.report import write_report
from edgeres.model.labels import check_label_count, read_labels
from edgeres.progress import log
from edgeres.sources.loading import load_model


@dataclass(frozen=True)
class ConvertData:
    """The images a conversion reads: calibration (int8) and evaluation (``--eval``), checked up front."""

    calib: ImageDataset | None
    eval: ImageDataset | None


def _holding_output_lock(run):
    """The whole run, from the first look at --out to the report, holds the output's lock, so a
    second run on the same --out fails at once instead of sharing staging or replacing the bundle."""

    @functools.wraps(run)
    def locked(cfg: ConvertConfig) -> dict:
        with OutputLock(cfg.out):
            return run(cfg)

    return locked


@_holding_output_lock
def convert(cfg: ConvertConfig) -> dict:
    """Run (or resume) a conversion; returns the manifest. Bad input fails before any work."""
    validate(cfg)
    out = Path(cfg.out)
    loaded = load_model(cfg.model, cfg.arch)
    if cfg.preprocess is not None:  # the override serves calibration, eval, the manifest and the app alike
        spec = loaded.spec
        pre = apply_preprocess_override(spec.preprocess, cfg.preprocess, size_fixed_by=loaded.input_size_fixed_by())
        try:
            loaded = replace(loaded, spec=replace(spec, preprocess=pre))
        except InputError as e:  # e.g. order=L for a colour model: the spec names what does not fit
            raise InputError(f"--preprocess: {e}") from None
    if cfg.labels is not None:  # the names travel with the spec: labels.txt, every artifact's metadata, the apps
        names = read_labels(cfg.labels)
        check_label_count(names, loaded.spec.num_classes, f"--labels {cfg.labels}")
        loaded = replace(loaded, spec=replace(loaded.spec, labels=names.names, label_keys=names.keys))
    data = _open_data(cfg, loaded.spec)
    key = conversion_key(cfg, loaded.sha256)
    # pruning (and its fine-tuning) runs once, and only when something is built from the pruned model
    prepared = functools.cache(lambda: prune_into_loaded(loaded, cfg, data.calib, data.eval)
                               if cfg.prune is not None else loaded)
    existing = _existing_manifest(out)
    same = (existing is not None and not cfg.force and existing.get("conversion_key") == key
            and set(plan(cfg)) <= ok_pairs(existing))  # a failed artifact is never up to date: it is retried
    # another plan on the same source, data and options, or failed artifacts: the bundle grows (refused,
    # naming what differs, if it cannot)
    grown = grown_config(cfg, existing, loaded.sha256) if existing is not None and not cfg.force and not same else None
    if existing is not None and not cfg.force and grown is None:
        log(f"[green]✓ {out} is up to date[/] "
            f"({'same model, data and options' if same else 'it has every artifact asked for'}): conversion skipped")
        manifest, key = existing, existing["conversion_key"]
    elif grown is not None:
        cfg, key = grown, conversion_key(grown, loaded.sha256)
        if cfg.quant == "fast":  # other presets retry a failed artifact by rebuilding (their tuned weights are not kept)
            prefill(out, existing, grown, key)
        manifest = build_bundle(cfg, prepared(), key, data.calib, keep_results=True)
    else:
        check_output_dir(out, cfg.force)
        manifest = build_bundle(cfg, prepared(), key, data.calib)
    if data.eval is not None:
        _evaluate(cfg, out, key, data.eval)
        if cfg.accuracy_budget_pp is not None:
            _enforce_budget(cfg, out, data, prepared, loaded.sha256)
            manifest = read_manifest(out)
    if cfg.bench and any(a["status"] == "ok" for a in manifest["artifacts"]):
        _bench_locally(cfg, out, skip_if_done=existing is manifest)
    write_report(out)
    return manifest


def _open_data(cfg: ConvertConfig, spec) -> ConvertData:
    needs_calib = any(p == "int8" for _, p in plan(cfg))
    if cfg.quant != "fast" and needs_calib and spec.preact:
        # their improvements pair each conv with the BatchNorm after it; a pre-activation block's BNs come first
        raise InputError(f"--quant {cfg.quant}: {spec.name} is a pre-activation ResNet (v2), whose convs the weight "
                         "improvements do not cover yet; use --quant fast (the default)")
    calib_ds = eval_ds = None
    if cfg.calib is not None:
        calib_ds = open_dataset(cfg.calib, min_images=MIN_CALIB_IMAGES if needs_calib else 1)
        calib_ds.check_image_size(spec.preprocess)
    elif needs_calib:
        raise InputError("--calib: int8 needs calibration images; give an .npz or image folder with --calib")
    if cfg.quant == "finetune" and needs_calib:
        check_finetune_data(cfg.finetune_data, spec, cfg.finetune_epochs)
    if cfg.eval_data is not None:
        eval_ds = open_dataset(cfg.eval_data)
        eval_ds.check_image_size(spec.preprocess)
        check_labels(eval_ds, spec.num_classes, spec.labels, spec.label_keys)
    return ConvertData(calib_ds, eval_ds)


def _evaluate(cfg: ConvertConfig, out: Path, key: str, eval_ds: ImageDataset) -> None:
    stored = read_result(out, EVAL_FILE)
    wanted = {"data": str(cfg.eval_data), "images": len(eval_ds.spread(cfg.eval_images))}
    if (stored and not cfg.force and stored.get("conversion_key") == key
            and {k: stored.get(k) for k in wanted} == wanted):
        log("[dim]✓ eval (done in an earlier run, skipped)[/]")
    elif cfg.eval_data is not None and cfg.jobs != 0 and \
            all(a["target"] in BUILTIN for a in read_manifest(out)["artifacts"]):
        _evaluate_apart(cfg, out)
    else:  # --jobs 0: no process but this one; a plugin's target may exist only in this process
        evaluate_and_check(out, eval_ds, cfg.eval_images, cfg.threads)


def evaluate_and_check(out: Path, eval_ds: ImageDataset, limit: int | None, threads: int | None) -> None:
    """Evaluate the bundle and check its preprocessing convention (what ``convert --eval`` does)."""
    result = evaluate_bundle(out, eval_ds, limit=limit, threads=threads)
    _check_preprocessing(limit, threads, out, eval_ds, result)


def _evaluate_apart(cfg: ConvertConfig, out: Path) -> None:
    """``evaluate_and_check`` in a fresh process (``edgeres.convert.eval_process``): this one holds torch,
    TensorFlow and the model, which eval's runtimes would sit beside. Its errors are raised here as theirs."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    from edgeres.bundle import write_json_atomic
    from edgeres.calibration import DataError
    from edgeres.convert.workers import PARENT_ENV
    from edgeres.targets import TargetError

    with tempfile.TemporaryDirectory(prefix="edgeres-eval-") as tmp:
        task, result = Path(tmp) / "task.json", Path(tmp) / "result.json"
        write_json_atomic(task, {"out": str(out), "data": str(cfg.eval_data), "limit": cfg.eval_images,
                                 "threads": cfg.threads, "result_file": str(result)})
        proc = subprocess.Popen([sys.executable, "-m", "edgeres.convert.eval_process", str(task)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", env={**os.environ, PARENT_ENV: str(os.getpid())})
        try:
            for line in proc.stdout:  # its progress and warnings, on this process's stderr (where callers read them)
                print(line, end="", file=sys.stderr, flush=True)
            proc.wait()
        except BaseException:  # Ctrl-C or a closed stderr: the eval process goes too
            proc.kill()
            proc.wait()
            raise
        try:
            record = json.loads(result.read_text())
        except (OSError, ValueError):
            raise RuntimeError(f"the eval process ended without a result (exit code {proc.returncode}); "
                               "re-run with --debug") from None
    if not record.get("ok"):
        kind = {"DataError": DataError, "InputError": InputError}.get(record.get("type"), TargetError)
        raise kind(record.get("error", "evaluation failed"))


def _check_preprocessing(eval_images: int | None, threads: int | None, out: Path, eval_ds: ImageDataset,
                         evaluated: dict) -> None:
    """One line on stderr when another standard preprocessing convention beats the recorded one by > 1 pp.
    ``evaluated``: this bundle's eval just made; on the same images its reference run is the recorded row."""
    import numpy as np

    from edgeres.bundle import store_result, warn
    from edgeres.measure.paired import unpack_bits
    from edgeres.measure.preprocess_check import CHECK_FILE, CONVERT_CHECK_IMAGES, check_bundle, warning

    limit = min(eval_images or CONVERT_CHECK_IMAGES, CONVERT_CHECK_IMAGES)
    same_images = np.array_equal(eval_ds.spread(limit), eval_ds.spread(eval_images))
    recorded = unpack_bits(evaluated["reference"]["correct_bits"], evaluated["images"]) if same_images else None
    result = check_bundle(out, eval_ds, limit=limit, threads=threads, recorded_correct=recorded)
    store_result(out, CHECK_FILE, result)
    line = warning(result)
    if line:
        warn(line)


def _enforce_budget(cfg: ConvertConfig, out: Path, data: ConvertData, prepared, source_sha256: str) -> None:
    """The budget driver gets this run's builder and evaluator: its trials reuse the loaded (pruned)
    model, the calibration set and the fp32 reference instead of converting from scratch."""
    reference = reference_path(out, read_manifest(out))

    def build(trial_cfg: ConvertConfig) -> dict:
        with OutputLock(trial_cfg.out):
            return build_bundle(trial_cfg, prepared(), conversion_key(trial_cfg, source_sha256), data.calib,
                                reference=reference)

    def evaluate(bundle: Path) -> dict:
        return evaluate_bundle(bundle, data.eval, limit=cfg.eval_images, threads=cfg.threads)

    enforce_accuracy_budget(cfg, cfg.accuracy_budget_pp, build=build, evaluate=evaluate, dataset=data.eval)


def _bench_locally(cfg: ConvertConfig, out: Path, skip_if_done: bool) -> None:
    """A short local benchmark so the report has latency; ``edgeres bench`` measures properly."""
    bench_cfg = BenchConfig(threads=tuple(cfg.bench_threads), runs=cfg.bench_runs, warmup=5)
    stored = read_result(out, BENCH_FILE)
    if skip_if_done and stored and stored.get("settings", {}).get("threads") == list(bench_cfg.threads) \
            and stored.get("settings", {}).get("runs") == bench_cfg.runs and stored.get("host") == "local":
        log("[dim]✓ bench (done in an earlier run, skipped)[/]")
        return
    bench_bundle(out, bench_cfg)


def _existing_manifest(out: Path) -> dict | None:
    if not (out / MANIFEST).exists():
        return None
    try:
        return read_manifest(out)
    except InputError:
        return None  # damaged: rebuilt only with --force (check_output_dir says so)
