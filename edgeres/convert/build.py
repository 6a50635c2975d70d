"""The bundle builder: export the fp32 reference → calibrate once → compile each (target, precision),
in a hidden staging folder, published atomically.

Work happens in a sibling folder ``.DIR.partial-<key>`` whose name is derived from everything that
decides the output (source checkpoint, data, options). Each finished step is recorded there, so
re-running the same command after an interruption redoes only what is missing; the folder is renamed
to ``DIR`` only once the manifest is written. What a target compiles from comes from its record
(``targets.infos()``): the shared QDQ ONNX, or the network rebuilt in Keras. The caller holds the
output's ``OutputLock``."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgeres.calibration import DataError
from edgeres.calibration import matching
from edgeres.calibration.cpu import cpu_features
from edgeres import __version__
from edgeres.bundle import (FORMAT, FORMAT_VERSION, MANIFEST, REFERENCE_FILE, file_record, label_names,
                            listed_files, publish, warn, write_json_atomic, write_text_atomic)
from edgeres.compress.quant_accurate import improve_for_int8
from edgeres.compress.quant_finetune import (DEFAULT_EPOCHS, QuantFinetuneConfig, check_finetune_data,
                                             quantization_aware_finetune, tuned_onnx_ranges)
from edgeres.convert.config import ConvertConfig, data_digests, plan
from edgeres.errors import InputError
from edgeres.model.export import export_onnx
from edgeres.model.torch_model import build_torch
from edgeres.convert.model_sources import SourceRequest, get_source, make_files, open_files
from edgeres.convert.workers import CALIB_FILE, Compiles, WorkerTask, compile_record, default_jobs, write_calibration
from edgeres.progress import log, step
from edgeres.targets.base import LABELS_FILE, app_metadata, release_memory
from edgeres.int8 import STAGE as INT8_STAGE
from edgeres.int8 import compute_ranges, quantize_qdq, recipes_for, reference_activations
from edgeres.int8.ranges import require_onnxruntime
from edgeres.int8.recipe import same_qdq, weight_levels
from edgeres.targets import (BUILTIN, QDQ_ONNX, CompileJob, TargetError, TargetUnavailable, get_info, get_target,
                             info_for_file)

STEPS_FILE = ".steps.json"
RANGES_FILE = "calibration_ranges.json"
QDQ_FILE = "model.qdq.onnx"
# the reference's activations on a few calibration images + the shared ranges, for int8 targets with a graph
# of their own (TFLite): they take the ranges by matching their tensors to these values (ranges once)
REFERENCE_ACTIVATIONS_FILE = "reference_activations.npz"
ACCURATE_FP32 = "model.accurate.fp32.onnx"  # improved weights, fp32: what the QDQ model quantises
FINETUNE_FP32 = "model.finetune.fp32.onnx"  # quantisation-aware tuned weights (on their grid), fp32


class StepCache:
    """Finished steps of one conversion, persisted in the work folder. A damaged record (a crash
    while it was written, a full disk) only costs redoing those steps."""

    def __init__(self, work: Path):
        self.path = work / STEPS_FILE
        self.done: dict = self._load()

    def _load(self) -> dict:
        if not self.path.exists():
            return {}
        try:
            done = json.loads(self.path.read_text())
            problem = None if isinstance(done, dict) else "not a JSON object"
        except (OSError, ValueError) as e:
            done, problem = {}, f"cannot be parsed: {e}"
        if problem:
            warn(f"ignored damaged {self.path} ({problem}); redoing every step")
            return {}
        damaged = [name for name, record in done.items() if not _step_record_ok(name, record)]
        if damaged:
            warn(f"ignored damaged records in {self.path}; redoing: {', '.join(damaged)}")
        return {name: record for name, record in done.items() if name not in damaged}

    def get(self, name: str):
        if name in self.done:
            log(f"[dim]✓ {name} (done in an earlier run, skipped)[/]")
        return self.done.get(name)

    def finish(self, name: str, record) -> None:
        self.done[name] = record
        write_json_atomic(self.path, self.done)


def _step_record_ok(name: str, record) -> bool:
    """Does a stored step record have what resuming reads from it?"""
    if not isinstance(record, dict):
        return False
    if not name.startswith("compile "):
        return True
    files, records = record.get("files"), record.get("file_records")
    return (record.get("status") == "ok" and isinstance(files, list) and bool(files)
            and all(isinstance(f, str) for f in files) and isinstance(records, list)
            and all(isinstance(r, dict) for r in records))


@dataclass(frozen=True)
class CalibrationSource:
    """The calibration images as batches in any layout, and what the manifest says about them."""

    batches: Callable  # (layout="NCHW", batch_size=32) -> iterator of float32 batches
    record: dict


@dataclass(frozen=True)
class Int8Inputs:
    """What int8 compiles start from: improved weights per int8 source (``--quant accurate|finetune``;
    none: the model as given), the shared QDQ model (when a QDQ consumer makes int8; its ranges are in
    the bundle's calibration_ranges.json), the calibration record."""

    weights: dict
    qdq_onnx: Path | None
    calibration: dict | None
    tuned: dict = dataclasses.field(default_factory=dict)  # consumer -> ReferenceActivations (--quant finetune)
    recipes: dict = dataclasses.field(default_factory=dict)  # int8 target -> its recipe (edgeres.int8)


def build_bundle(cfg: ConvertConfig, loaded, key: str, calib_ds, *, reference: Path | None = None,
                 keep_results: bool = False) -> dict:
    """Build (or resume) the bundle at ``cfg.out`` from ``loaded``; returns its manifest.

    ``reference``: an fp32 reference ONNX of this very model to copy instead of exporting it again
    (the accuracy budget's trials). ``keep_results``: the bundle at ``cfg.out`` grows (or retries what
    failed), so the results kept in it are carried into the new one when it is published."""
    out, spec = Path(cfg.out), loaded.spec
    steps_plan = plan(cfg)
    with _staging(out, key, cfg.force) as (work, steps):
        log(f"[bold]edgeres convert[/] {loaded.source} ({spec.name}, {spec.cost()['macs'] / 1e6:.1f} M MACs) → {out}")
        source = _calibration_source(cfg, spec, calib_ds)
        jobs = _jobs(cfg, steps_plan)
        early = _start_early_compiles(cfg, loaded, work, steps, steps_plan, source, jobs)
        try:
            _export_reference(loaded, work, steps, reference)
            int8 = _int8_inputs(cfg, loaded, work, steps, source, steps_plan)
            artifacts = _compile_all(cfg, loaded, work, steps, steps_plan, source, int8, jobs, early)
        except BaseException:
            if early is not None:
                early[0].stop()
            raise
        write_text_atomic(work / LABELS_FILE, "".join(f"{name}\n" for name in label_names(spec)))
        manifest = _manifest(cfg, loaded, key, work, steps, int8, artifacts)
        shutil.rmtree(work / ".work", ignore_errors=True)
        (work / STEPS_FILE).unlink(missing_ok=True)
        _drop_unlisted(work, manifest)
        write_json_atomic(work / MANIFEST, manifest)
        publish(work, out, keep_results=keep_results)
        return manifest


def _drop_unlisted(work: Path, manifest: dict) -> None:
    """What a failed compile left (a worker killed or out of disk space half way) is not published."""
    listed = {r["file"] for r in listed_files(manifest)}
    for path in sorted(work.rglob("*"), reverse=True):  # files before the folders holding them
        rel = path.relative_to(work).as_posix()
        if path.is_dir() and not path.is_symlink():
            if not any(path.iterdir()):
                path.rmdir()
        elif rel not in listed:
            path.unlink()


@contextlib.contextmanager
def _staging(out: Path, key: str, force: bool):
    """The work folder and its step cache; kept after an interruption (to resume), gone otherwise."""
    work = staging_dir(out, key)
    if force and work.exists():
        shutil.rmtree(work)
    resumed = work.exists()
    try:
        work.mkdir(exist_ok=True)
    except OSError as e:
        raise InputError(f"{out}: cannot create a folder in {work.parent} ({e.strerror}); choose a writable --out") from None
    steps = StepCache(work)
    if resumed:
        log(f"reusing the finished steps in {work.name} (an interrupted run, a growing bundle or a sweep)")
    keep_for_resume = False
    try:
        yield work, steps
    except KeyboardInterrupt:
        keep_for_resume = True
        log(f"interrupted: {out} was not written; finished steps are kept in {work.name} — re-run to resume")
        raise
    except OSError as e:
        raise InputError(f"{out}: writing the bundle failed ({os_reason(e)}); nothing was replaced — free disk "
                         "space or choose another --out") from None
    finally:
        # only an interruption is worth resuming; after any error (or after publishing) nothing may stay behind
        if not keep_for_resume:
            shutil.rmtree(work, ignore_errors=True)


def _export_reference(loaded, work: Path, steps: StepCache, reference: Path | None) -> None:
    if steps.get("export") is not None and (work / REFERENCE_FILE).exists():
        return
    t0 = time.perf_counter()
    if reference is not None:
        shutil.copyfile(reference, work / REFERENCE_FILE)
    else:
        log("exporting the fp32 reference ONNX…")
        # the reference carries what an app needs too, so the fp32 ONNX artifact stays a byte copy of it
        export_onnx(loaded.to_torch(), loaded.spec, work / REFERENCE_FILE, metadata=app_metadata(
            label_names(loaded.spec), loaded.spec.preprocess.to_dict(), layout="NCHW", dtype="float32",
            version=__version__, source_sha256=loaded.sha256))
    steps.finish("export", {"seconds": round(time.perf_counter() - t0, 3)})
    release_memory()  # what torch's exporter left goes back before calibration


def _calibration_source(cfg: ConvertConfig, spec, calib_ds) -> CalibrationSource | None:
    if calib_ds is None:
        return None

    def batches(layout: str = "NCHW", batch_size: int = 32):
        p = spec.preprocess.with_layout(layout)
        return (x for x, _ in calib_ds.batches(p, batch_size, cfg.calib_images))

    return CalibrationSource(batches, {"source": str(cfg.calib), "images": len(calib_ds.spread(cfg.calib_images)),
                                       "estimator": cfg.estimator, "quant": cfg.quant})


def _int8_inputs(cfg: ConvertConfig, loaded, work: Path, steps: StepCache, source: CalibrationSource | None,
                 steps_plan) -> Int8Inputs:
    """Weights (improved with ``--quant accurate|finetune``), then — once for every int8 consumer — the
    shared ranges, the reference's activations for the consumers that match them by value (TFLite, with
    the weights as given) and the QDQ model for the QDQ consumers."""
    recipes = int8_recipes(cfg, steps_plan)
    levels = _weight_levels(recipes)
    consumers = set(levels)
    weights: dict = {}  # source -> improved weights (--quant accurate|finetune); the model as given otherwise
    fp32_for_qdq = work / REFERENCE_FILE
    record = source.record if source else None
    if cfg.quant == "accurate" and consumers:
        weights, fp32_for_qdq, improved = _improve_weights(loaded, work, source, levels)
        record = {**record, "accurate": improved}
    tuned: dict = {}
    if cfg.quant == "finetune" and consumers:
        weights, fp32_for_qdq, tuned, finetuned = _finetune_weights(cfg, loaded, work, source, levels)
        record = {**record, "finetune": finetuned}
    matched = any(_matches_ranges(cfg, t, p, source) for t, p in steps_plan)
    if QDQ_ONNX not in consumers:
        if matched:
            record = _share_ranges(cfg, work, steps, source, record)
        return Int8Inputs(weights, None, record, tuned, recipes)
    qdq_path = work / ".work" / QDQ_FILE
    done = steps.get("calibrate")
    if done is None or not qdq_path.exists():
        done = _calibrate(cfg, work, source.batches, qdq_path, record, fp32_for_qdq, _qdq_recipe(recipes),
                          tuned.get(QDQ_ONNX), matched=matched)
        steps.finish("calibrate", done)
    elif matched and not (work / ".work" / REFERENCE_ACTIVATIONS_FILE).exists():  # a grown bundle: ranges kept
        done = _reference_from_kept_ranges(work, source.batches, done)
        steps.finish("calibrate", done)
    return Int8Inputs(weights, qdq_path, done, tuned, recipes)


def _matches_ranges(cfg: ConvertConfig, target: str, precision: str, source: CalibrationSource | None) -> bool:
    """Does this compile take the shared ranges by matching its own tensors to the reference's activations?
    An int8 target compiling from a source other than the QDQ model, with the model's weights as given
    (improved weights give other activations, so their ranges are measured on its own model)."""
    info = get_info(target)
    return (precision == "int8" and source is not None and cfg.quant == "fast" and info.int8_recipe is not None
            and info.consumes != QDQ_ONNX)


def _share_ranges(cfg: ConvertConfig, work: Path, steps: StepCache, source: CalibrationSource, record: dict) -> dict:
    """Ranges once without a QDQ consumer: the reference's ranges and activations for the matching
    consumers; without onnxruntime (which runs the reference) they measure their own (the file says so)."""
    done = steps.get("calibrate")
    if done is not None and (work / ".work" / REFERENCE_ACTIVATIONS_FILE).exists():
        return done
    try:
        require_onnxruntime()
    except TargetUnavailable as e:
        (work / ".work").mkdir(exist_ok=True)
        matching.save_unavailable(work / ".work" / REFERENCE_ACTIVATIONS_FILE, str(e))
        return record
    if done is not None and (work / RANGES_FILE).exists():  # a grown bundle: its ranges are kept
        done = _reference_from_kept_ranges(work, source.batches, done)
        steps.finish("calibrate", done)
        return done
    done = _calibrate(cfg, work, source.batches, None, record, work / REFERENCE_FILE, None, matched=True)
    steps.finish("calibrate", done)
    return done


def _reference_from_kept_ranges(work: Path, batches, record: dict) -> dict:
    """The reference's activations on a few calibration images beside the ranges a bundle already holds
    (a grow adding a consumer that matches ranges by value): no estimator pass again."""
    ranges = {k: tuple(v) for k, v in json.loads((work / RANGES_FILE).read_text()).items()}
    log("reference activations for the kept ranges…")
    reference = reference_activations(work / REFERENCE_FILE, batches, ranges)
    (work / ".work").mkdir(exist_ok=True)
    matching.save(work / ".work" / REFERENCE_ACTIVATIONS_FILE, reference)
    return {**record, "reference_images": len(reference.images)}


def _improve_weights(loaded, work: Path, source: CalibrationSource, levels: dict):
    """``--quant accurate``: weights clipped and biases corrected once for each int8 weight grid in use
    (``levels``: steps a side per source, from its consumers' recipe: the QDQ model's 64 with
    reduce_range, the Keras network's 127). The fp32 reference keeps the original weights; the improved
    ones go to an internal fp32 ONNX that the QDQ model quantises and to every other int8 source."""
    t0 = time.perf_counter()
    log("quant accurate: clipping weights and correcting biases on the calibration images…")
    by_grid = {grid: improve_for_int8(loaded.spec, loaded.state_dict, source.batches("NCHW"), levels=grid)
               for grid in sorted(set(levels.values()), reverse=True)}
    weights = {name: by_grid[grid][0] for name, grid in levels.items()}
    record = {name: by_grid[grid][1] for name, grid in levels.items()}
    fp32_for_qdq = work / REFERENCE_FILE
    if QDQ_ONNX in levels:
        fp32_for_qdq = work / ".work" / ACCURATE_FP32
        if not fp32_for_qdq.exists():
            _export_weights(loaded, weights[QDQ_ONNX], fp32_for_qdq)
    record["seconds"] = round(time.perf_counter() - t0, 3)
    return weights, fp32_for_qdq, record


def _export_weights(loaded, weights: dict, path: Path) -> None:
    """An internal fp32 ONNX of the network with ``weights`` (what the QDQ model quantises)."""
    model = build_torch(loaded.spec)
    model.load_state_dict(weights)
    path.parent.mkdir(exist_ok=True)
    export_onnx(model, loaded.spec, path)


def _finetune_weights(cfg: ConvertConfig, loaded, work: Path, source: CalibrationSource, levels: dict):
    """``--quant finetune``: quantisation-aware KD once per int8 weight grid in use (``levels``: steps a
    side per consumer, from its recipe). Returns the tuned weights per consumer, the fp32 ONNX the QDQ
    model quantises, the ranges' carriers per consumer, the record."""
    t0 = time.perf_counter()
    dataset = check_finetune_data(cfg.finetune_data, loaded.spec, cfg.finetune_epochs)
    recipe = QuantFinetuneConfig(epochs=cfg.finetune_epochs or DEFAULT_EPOCHS, estimator=cfg.estimator,
                                 threads=cfg.threads or 2, seed=cfg.seed)
    consumers = set(levels)
    by_grid = {}
    for grid in sorted(set(levels.values())):
        log(f"quant finetune: {recipe.epochs} epoch(s) of quantisation-aware KD on {cfg.finetune_data} "
            f"(int8 weights ±{grid})…")
        by_grid[grid] = quantization_aware_finetune(loaded.spec, loaded.state_dict, source.batches("NCHW"), dataset,
                                                    dataclasses.replace(recipe, weight_levels=grid))
    weights = {c: by_grid[levels[c]].state_dict for c in consumers}
    fp32_for_qdq = work / REFERENCE_FILE
    if QDQ_ONNX in consumers:
        fp32_for_qdq = work / ".work" / FINETUNE_FP32
        _export_weights(loaded, weights[QDQ_ONNX], fp32_for_qdq)
    record = {c: by_grid[levels[c]].record for c in consumers}
    record["seconds"] = round(time.perf_counter() - t0, 3)
    return weights, fp32_for_qdq, {c: by_grid[levels[c]].reference for c in consumers}, record


def int8_options(cfg: ConvertConfig) -> dict:
    """The int8 stage's own ``--option int8.*`` settings."""
    return dict(cfg.target_options.get(INT8_STAGE, {}))


def int8_recipes(cfg: ConvertConfig, steps_plan) -> dict[str, dict]:
    """The int8 recipe of each int8 target of the plan on this CPU (``edgeres.int8``); the ``int8.*``
    options shape the QDQ model, so they go on top of its consumers' recipes only."""
    infos = [get_info(t) for t, p in steps_plan if p == "int8" and get_info(t).int8_recipe is not None]
    cpu, options = cpu_features(), int8_options(cfg)
    return {**recipes_for([i for i in infos if i.consumes == QDQ_ONNX], cpu, options),
            **recipes_for([i for i in infos if i.consumes != QDQ_ONNX], cpu, {})}


def qdq_recipe(cfg: ConvertConfig) -> dict | None:
    """The recipe of the QDQ model for the QDQ consumers among ``cfg.targets`` (None without one)."""
    recipes = int8_recipes(cfg, [(t, "int8") for t in cfg.targets if get_info(t).consumes == QDQ_ONNX])
    return _qdq_recipe(recipes) if recipes else None


def _weight_levels(recipes: dict[str, dict]) -> dict[str, int]:
    """The int8 weight grid of each kind of consumer (what ``--quant accurate|finetune`` fit weights to)."""
    if any(get_info(t).consumes == QDQ_ONNX for t in recipes):
        _qdq_recipe(recipes)  # every QDQ consumer shares one QDQ model, hence one grid
    return {get_info(t).consumes: weight_levels(r) for t, r in recipes.items()}


def _qdq_recipe(recipes: dict[str, dict]) -> dict:
    """The recipe of the one QDQ model every QDQ consumer compiles from: the first consumer's; the
    others must make the same QDQ model with theirs."""
    qdq = [(t, r) for t, r in recipes.items() if get_info(t).consumes == QDQ_ONNX]
    first_target, first = qdq[0]
    for target, recipe in qdq[1:]:
        if not same_qdq(first, recipe):
            raise TargetError(f"int8: {first_target} and {target} need different int8 recipes on this CPU "
                              f"({first['reason']}; {recipe['reason']}); convert them into separate bundles or "
                              "set --option int8.activation_type / int8.reduce_range")
    return first


def _calibrate(cfg: ConvertConfig, work: Path, batches, qdq_path: Path | None, record: dict, onnx_fp32: Path,
               recipe: dict | None, tuned=None, *, matched: bool = False) -> dict:
    """Ranges once from the calibration set (those ``tuned`` by ``--quant finetune`` replacing them
    where they apply); with ``matched``, the reference's activations on a few of the images for the
    consumers that match ranges by value (written first: a compile started beside this waits for them);
    then (``qdq_path``) one QDQ int8 ONNX with ``recipe`` that every QDQ consumer reuses."""
    t0 = time.perf_counter()
    try:
        with step(f"calibrating on {record['images']} images with the {cfg.estimator} estimator"):
            ranges = compute_ranges(onnx_fp32, batches, estimator=cfg.estimator)
    except TargetError as e:
        raise InputError(f"{cfg.calib}: calibration failed ({e})") from None
    except DataError as e:
        raise DataError(f"{cfg.calib}: {e}") from None
    if tuned is not None:
        tuned_ranges = tuned_onnx_ranges(onnx_fp32, tuned)
        ranges.update(tuned_ranges)
        record = {**record, "tuned_ranges": len(tuned_ranges)}
    write_json_atomic(work / RANGES_FILE, {k: [float(v[0]), float(v[1])] for k, v in ranges.items()})
    (work / ".work").mkdir(exist_ok=True)
    release_memory()  # the calibration session's buffers go before the next step's
    if matched:
        reference = reference_activations(onnx_fp32, batches, ranges)
        matching.save(work / ".work" / REFERENCE_ACTIVATIONS_FILE, reference)
        record = {**record, "reference_images": len(reference.images)}
        del reference
        release_memory()
    if qdq_path is not None:
        record = {**record, "qdq": quantize_qdq(onnx_fp32, ranges, qdq_path, recipe=recipe, options=int8_options(cfg))}
    return {**record, "ranges_file": RANGES_FILE, "seconds": round(time.perf_counter() - t0, 3)}


def _usable_record(steps: StepCache, work: Path, target: str, precision: str, *, say: bool = True) -> dict | None:
    """The record of an earlier run's compile when it can stand (failed, or ok with its files there)."""
    name = f"compile {target} {precision}"
    record = steps.get(name) if say else steps.done.get(name)
    files_there = record is not None and all((work / f).exists() for f in record["files"])
    return record if record is not None and (record["status"] != "ok" or files_there) else None


def _jobs(cfg: ConvertConfig, steps_plan) -> int:
    """Worker processes at once: ``--jobs``, or as many as cores and free memory allow (decided once
    per conversion); 0 compiles every target in this process."""
    if cfg.jobs is not None:
        return cfg.jobs
    return default_jobs(sum(1 for t, _ in steps_plan if t in BUILTIN and not get_info(t).compile_here))


def _start_early_compiles(cfg: ConvertConfig, loaded, work: Path, steps: StepCache, steps_plan,
                          source: CalibrationSource | None, jobs: int):
    """With room for two processes and plain PTQ, the compiles whose source needs neither the export nor
    the int8 stage (TFLite's Keras network: it measures its ranges on its own model) start in a worker
    now, while this process exports and calibrates the shared QDQ model — the two longest steps side by
    side. (Compiles, pairs), or None."""
    needs_qdq = any(p == "int8" and get_info(t).consumes == QDQ_ONNX for t, p in steps_plan)
    if cfg.quant != "fast" or jobs == 0 or not needs_qdq or steps.done.get("calibrate") is not None:
        return None
    pairs = [(t, p) for t, p in steps_plan if get_source(get_info(t).source_for(p)).after == ""
             and _in_worker(jobs, t, None) and _usable_record(steps, work, t, p, say=False) is None]
    if jobs < 2 or not pairs:
        return None
    plain = Int8Inputs({}, None, None)  # --quant fast: every source reads the given weights
    tasks = [_worker_task(cfg, loaded, work, t, p, source, plain) for t, p in pairs]
    # one core stays with this process (export and calibration run beside them)
    return Compiles(tasks, work / ".work", jobs - 1, labelled=True), pairs


def _compile_all(cfg: ConvertConfig, loaded, work: Path, steps: StepCache, steps_plan, source: CalibrationSource | None,
                 int8: Int8Inputs, jobs: int, early=None) -> list[dict]:
    """The artifact record of every (target, precision), in plan order: from an earlier run if its files
    are there; else compiled — a ``compile_here`` target here (a file copy), every other target in a
    worker process (``--jobs`` at once; ``--jobs 0``, or tuned activations from --quant finetune, compile
    here). ``early``: compiles already running (``_start_early_compiles``)."""
    started = early[1] if early is not None else []
    records: dict[tuple[str, str], dict] = {}
    todo = []
    for target, precision in steps_plan:
        if (target, precision) in started:
            continue
        record = _usable_record(steps, work, target, precision)
        if record is not None:
            records[target, precision] = record
        else:
            todo.append((target, precision))
    tuned = {(t, p): int8.tuned.get(get_info(t).consumes) if p == "int8" else None for t, p in todo}
    here = [(t, p) for t, p in todo if not _in_worker(jobs, t, tuned[t, p])]
    away = [(t, p) for t, p in todo if _in_worker(jobs, t, tuned[t, p])]
    for target, precision in here:
        records[target, precision] = compile_record(target, _job(cfg, loaded, work, target, precision, source, int8))
    if away:
        tasks = [_worker_task(cfg, loaded, work, target, precision, source, int8) for target, precision in away]
        release_memory()  # what calibration and export left behind is given back before the workers start
        running = Compiles(tasks, work / ".work", max(1, jobs - 1) if started else jobs, labelled=jobs > 1)
        for pair, record in zip(away, running.results()):
            records[pair] = record
    if early is not None:
        records.update(zip(started, early[0].results()))
    for target, precision in [*todo, *started]:  # failures are retried on the next run
        if records[target, precision]["status"] == "ok":
            steps.finish(f"compile {target} {precision}", records[target, precision])
    return [records[pair] for pair in steps_plan]


def _source_files(loaded, work: Path, target: str, precision: str, int8: Int8Inputs) -> dict[str, dict]:
    """{source name: its files} for what ``target`` reads at ``precision`` (made now if need be). int8
    compiles read the weights improved for their source's grid (``--quant accurate|finetune``); the fp32
    artifact is the model as given."""
    name = get_info(target).source_for(precision)
    improved = int8.weights.get(name) if precision == "int8" else None
    request = SourceRequest(spec=loaded.spec, weights=improved if improved is not None else loaded.state_dict,
                            weights_tag="int8" if improved is not None and improved is not loaded.state_dict else "fp32",
                            precision=precision, reference=work / REFERENCE_FILE, qdq=int8.qdq_onnx,
                            scratch=work / ".work")
    files = make_files(name, request)
    return {name: files} if files else {}


def _job_data(cfg: ConvertConfig, loaded, work: Path, target: str, precision: str,
              source: CalibrationSource | None) -> dict:
    """The plain-data fields of a target's ``CompileJob``."""
    spec = loaded.spec
    shared = work / ".work" / REFERENCE_ACTIVATIONS_FILE
    return dict(onnx_fp32=work / REFERENCE_FILE, out_dir=work, precision=precision,
                reference_activations=str(shared) if _matches_ranges(cfg, target, precision, source) else None,
                options=dict(cfg.target_options.get(target, {})), preprocess=spec.preprocess.to_dict(),
                labels=spec.labels, estimator=cfg.estimator, producer_version=__version__,
                source_sha256=loaded.sha256, num_classes=spec.num_classes)


def _job(cfg: ConvertConfig, loaded, work: Path, target: str, precision: str, source: CalibrationSource | None,
         int8: Int8Inputs) -> CompileJob:
    """The compile of ``target`` at ``precision`` in this process."""
    files = _source_files(loaded, work, target, precision, int8)
    return CompileJob(**_job_data(cfg, loaded, work, target, precision, source),
                      sources={name: open_files(name, f) for name, f in files.items()},
                      calibration=source.batches if source else None,
                      tuned_activations=int8.tuned.get(get_info(target).consumes) if precision == "int8" else None)


def _in_worker(jobs: int, target: str, tuned) -> bool:
    """Here: ``--jobs 0``, a ``compile_here`` target (a copy of what the int8 stage made), tuned
    activations (an object, not files), and a plugin target whose module a fresh process cannot import."""
    return jobs != 0 and not get_info(target).compile_here and tuned is None and _plugin(target) != (None, None)


def _plugin(target: str) -> tuple[str | None, str | None]:
    """(module, the folder it imports from) of a target registered from outside targets/; ("", "") for a
    built-in; (None, None) when a worker could not import it (a module made in memory)."""
    if target in BUILTIN:
        return "", ""
    module = get_target(target)
    path = getattr(module, "__file__", None)
    if not path or module.__name__ == "__main__":
        return None, None
    root = Path(path).resolve().parent
    for _ in range(module.__name__.count(".") + (Path(path).name == "__init__.py")):
        root = root.parent
    return module.__name__, str(root)


def _worker_task(cfg: ConvertConfig, loaded, work: Path, target: str, precision: str,
                 source: CalibrationSource | None, int8: Int8Inputs) -> WorkerTask:
    """The compile as files: the job's plain data as JSON, its source's files, calibration images as .npy."""
    data = _job_data(cfg, loaded, work, target, precision, source)
    data["onnx_fp32"], data["out_dir"] = str(data["onnx_fp32"]), str(data["out_dir"])
    data["labels"] = list(data["labels"]) if data["labels"] is not None else None
    plugin, root = _plugin(target)
    task = WorkerTask(target, precision, data, _source_files(loaded, work, target, precision, int8),
                      plugin=plugin or None, plugin_root=root or None)
    scratch = work / ".work"
    scratch.mkdir(exist_ok=True)
    if source is not None and precision == "int8":
        task.calibration_file = str(scratch / CALIB_FILE)
        write_calibration(scratch / CALIB_FILE, source.batches)
    return task


def _manifest(cfg: ConvertConfig, loaded, key: str, work: Path, steps: StepCache, int8: Int8Inputs,
              artifacts: list[dict]) -> dict:
    spec = loaded.spec
    int8_record = {"options": int8_options(cfg), "recipes": int8.recipes,
                   "ranges_file": RANGES_FILE if (work / RANGES_FILE).exists() else None} if int8.recipes else None
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "edgeres_version": __version__,
        "conversion_key": key,
        "device": cfg.device,
        "source": {"path": loaded.source, "sha256": loaded.sha256, "format": loaded.format},
        "arch": spec.to_dict(),
        "cost": spec.cost(),
        "preprocess": spec.preprocess.to_dict(),
        "labels": list(spec.labels) if spec.labels else None,
        "pruning": (loaded.extra or {}).get("pruning"),
        "calibration": int8.calibration,
        "int8": int8_record,
        "reference": {**file_record(work, REFERENCE_FILE), "precision": "fp32",
                      "engine": info_for_file(REFERENCE_FILE).dist},
        "data_files": [file_record(work, f) for f in (RANGES_FILE, LABELS_FILE) if (work / f).exists()],
        "artifacts": artifacts,
        "config": cfg.to_dict(),
        "data_sha256": data_digests(cfg),  # what the key hashed for --calib/--finetune-data (checked on a grow)
        "timings": {name: r.get("seconds", r.get("compile_s")) for name, r in steps.done.items()
                    if isinstance(r, dict)},
    }


# --- for drivers that share finished steps between conversions (edgeres/sweep) ---------------------

STAGED_QDQ = Path(".work") / QDQ_FILE  # the calibrate step's QDQ model, relative to the staging folder


def os_reason(e: OSError) -> str:
    """The reason of a failed write in a few words: ``shutil.copytree``'s ``Error`` lists every file it
    could not copy (hundreds on a full disk); its first one says why."""
    if e.strerror:
        return e.strerror
    if isinstance(e, shutil.Error) and e.args and isinstance(e.args[0], list) and e.args[0]:
        return str(e.args[0][0][-1])
    return str(e)


def staging_dir(out: Path, key: str) -> Path:
    """The work folder ``build_bundle`` resumes ``out`` from for ``key``: a driver may put finished steps
    there (``StepCache.finish`` plus their files) so the build reuses them instead of redoing them."""
    return Path(out).resolve().parent / f".{Path(out).name}.partial-{key}"
