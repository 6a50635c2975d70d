"""``convert``: load → (prune) → export the fp32 reference → calibrate once → compile each target →
(evaluate) — written into one bundle atomically and resumable step by step.

Work happens in a hidden sibling folder ``.DIR.partial-<key>`` whose name is derived from everything
that decides the output (source checkpoint, data, options). Each finished step is recorded there, so
re-running the same command after an interruption redoes only what is missing; the folder is renamed
to ``DIR`` only once the manifest is written. Re-running after success finds the manifest's key
unchanged and skips the conversion."""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from calibration import DataError, open_dataset
from edgeres import __version__
from edgeres.bundle import (FORMAT, FORMAT_VERSION, MANIFEST, REFERENCE_FILE, OutputLock, check_output_dir,
                            file_record, publish, read_manifest, read_result, warn, write_json_atomic)
from edgeres.compress.distill import check_finetune_flags
from edgeres.errors import InputError
from edgeres.progress import log

DEFAULT_CALIB_IMAGES = 300
MIN_CALIB_IMAGES = 10  # fewer cannot estimate activation ranges that generalise
ESTIMATORS = ("minmax", "percentile", "entropy", "mse")
QUANT_PRESETS = ("fast", "accurate")  # accurate: edgeres/compress/quant_accurate.py on the weights first
ACCURATE_FP32 = "model.accurate.fp32.onnx"  # improved weights, fp32: what the QDQ model quantises
STEPS_FILE = ".steps.json"
RANGES_FILE = "calibration_ranges.json"


@dataclass(frozen=True)
class ConvertConfig:
    """Every choice of one conversion; recorded in the manifest so a conversion can be replayed."""

    model: str
    out: str
    arch: str | None = None
    calib: str | None = None
    targets: tuple[str, ...] = ("onnx", "openvino", "tflite")
    precisions: tuple[str, ...] = ("int8",)
    estimator: str = "mse"  # best top-1 agreement on CIFAR ResNet-20/32 int8 (see README)
    calib_images: int = DEFAULT_CALIB_IMAGES
    eval_data: str | None = None
    eval_images: int | None = None
    threads: int | None = None
    device: str | None = None
    force: bool = False
    target_options: dict = field(default_factory=dict)
    accuracy_budget_pp: float | None = None
    bench: bool = True
    bench_threads: tuple[int, ...] = (1,)
    bench_runs: int = 50
    prune: float | None = None  # structured pruning ratio before export (issue 7)
    prune_importance: str = "l2"
    finetune_data: str | None = None  # KD recovery after pruning (needs finetune_epochs)
    finetune_epochs: int = 0
    quant: str = "fast"  # preset: fast = plain PTQ, accurate = weight clipping + bias correction first

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"], d["precisions"] = list(self.targets), list(self.precisions)
        d["bench_threads"] = list(self.bench_threads)
        return d


def parse_target_options(items: list[str] | tuple[str, ...]) -> dict:
    """``["openvino.engine=nncf", "tflite.io=uint8"]`` → ``{"openvino": {"engine": "nncf"}, ...}``."""
    from targets import names

    known = names()
    out: dict[str, dict] = {}
    for item in items:
        key, eq, value = item.partition("=")
        target, dot, name = key.partition(".")
        if not eq or not dot or target not in known or not name:
            raise InputError(f"--option {item!r}: expected TARGET.KEY=VALUE with TARGET one of {', '.join(known)}")
        lowered = value.strip().lower()
        parsed = {"true": True, "false": False}.get(lowered, value.strip())
        if isinstance(parsed, str):
            try:
                parsed = int(parsed) if parsed.lstrip("-").isdigit() else float(parsed)
            except ValueError:
                pass
        out.setdefault(target, {})[name] = parsed
    return out


def apply_profile(cfg: ConvertConfig, device: str | None, *, targets_given: bool, precisions_given: bool,
                  threads_given: bool, bench_threads_given: bool = False) -> ConvertConfig:
    """Fill what the user did not choose from the device profile; the user's flags always win."""
    if not device:
        return cfg
    from edgeres.device.profiles import load_profile

    profile = load_profile(device)
    options = {t: dict(o) for t, o in profile.options.items()}
    for t, o in cfg.target_options.items():
        options.setdefault(t, {}).update(o)
    return replace(
        cfg,
        device=profile.name,
        targets=cfg.targets if targets_given else profile.targets,
        precisions=cfg.precisions if precisions_given else profile.precisions,
        threads=cfg.threads if threads_given else profile.threads,
        bench_threads=cfg.bench_threads if bench_threads_given else profile.bench_threads,
        target_options=options,
    )


def validate(cfg: ConvertConfig) -> None:
    from targets import get_info, names

    if cfg.prune is not None:
        from edgeres.compress.prune import PruneConfig

        PruneConfig(cfg.prune, cfg.prune_importance).validate("--prune", "--prune-importance")
    if not cfg.targets:
        raise InputError("--targets: no target given; choose from " + ", ".join(names()))
    for t in cfg.targets:
        if t not in names():
            raise InputError(f"--targets: unknown target {t!r}; choose from {', '.join(names())}")
    known = {p for t in cfg.targets for p in get_info(t).precisions}
    for p in cfg.precisions:
        if p not in known:
            raise InputError(f"--precision: {p!r} is not made by {', '.join(cfg.targets)} (choose from {', '.join(sorted(known))})")
    if not cfg.precisions:
        raise InputError("--precision: no precision given; choose int8, fp16 or fp32")
    if cfg.estimator not in ESTIMATORS:
        raise InputError(f"--estimator: unknown {cfg.estimator!r}; choose from {', '.join(ESTIMATORS)}")
    if cfg.quant not in QUANT_PRESETS:
        raise InputError(f"--quant: unknown preset {cfg.quant!r}; choose from {', '.join(QUANT_PRESETS)}")
    _validate_numbers(cfg)
    for target_name, options in cfg.target_options.items():  # onnx options also shape openvino's QDQ int8
        get_info(target_name).check_options(options)
    if cfg.accuracy_budget_pp is not None and not 0 <= cfg.accuracy_budget_pp < float("inf"):  # NaN too
        raise InputError(f"--accuracy-budget: {cfg.accuracy_budget_pp} pp must be a finite number, zero or more (e.g. 1.0)")
    if cfg.accuracy_budget_pp is not None and cfg.eval_data is None:
        raise InputError("--accuracy-budget needs --eval DATA to measure the drop against")
    if cfg.bench and not cfg.bench_threads:
        raise InputError("--bench-threads: no thread count given; e.g. --bench-threads 1,2")
    if cfg.prune is not None:
        check_finetune_flags(cfg.finetune_epochs, cfg.finetune_data)


def _validate_numbers(cfg: ConvertConfig) -> None:
    from edgeres.flags import check_number, check_threads

    check_number("--calib-images", cfg.calib_images, at_least=1)
    check_number("--eval-images", cfg.eval_images, at_least=1)
    check_threads("--threads", cfg.threads)
    check_threads("--bench-threads", cfg.bench_threads)
    check_number("--bench-runs", cfg.bench_runs, at_least=1)
    check_number("--epochs", cfg.finetune_epochs, at_least=0)


def plan(cfg: ConvertConfig) -> list[tuple[str, str]]:
    """(target, precision) pairs to build; a precision a target does not make is skipped for it."""
    from targets import get_info

    return [(t, p) for t in cfg.targets for p in cfg.precisions if p in get_info(t).precisions]


def _fingerprint(path: str | None) -> list | None:
    """Cheap identity of a data file or folder (size and mtime), so changed data invalidates the cache."""
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        files = [f for f in p.rglob("*") if f.is_file()]
        return [str(p.resolve()), len(files), max((f.stat().st_mtime_ns for f in files), default=0)]
    st = p.stat()
    return [str(p.resolve()), st.st_size, st.st_mtime_ns]


def conversion_key(cfg: ConvertConfig, source_sha256: str) -> str:
    """Hash of everything that decides the bundle's files (not evaluation or threads)."""
    decisive = {
        "edgeres": __version__, "source": source_sha256, "arch": cfg.arch, "calib": _fingerprint(cfg.calib),
        "targets": list(cfg.targets), "precisions": list(cfg.precisions), "estimator": cfg.estimator,
        "calib_images": cfg.calib_images, "options": cfg.target_options,
    }
    if cfg.prune is not None:
        decisive["prune"] = [cfg.prune, cfg.prune_importance, _fingerprint(cfg.finetune_data), cfg.finetune_epochs]
    if cfg.quant != "fast":  # fast keys stay those of bundles made before presets existed
        decisive["quant"] = cfg.quant
    return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()[:16]


class _Steps:
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
    from edgeres.sources.loading import load_model

    validate(cfg)
    out = Path(cfg.out)
    loaded = load_model(cfg.model, cfg.arch)
    spec = loaded.spec
    steps_plan = plan(cfg)
    needs_calib = any(p == "int8" for _, p in steps_plan)
    calib_ds = eval_ds = None
    if cfg.calib is not None:
        calib_ds = open_dataset(cfg.calib, min_images=MIN_CALIB_IMAGES if needs_calib else 1)
        calib_ds.check_image_size(spec.preprocess)
    elif needs_calib:
        raise InputError("--calib: int8 needs calibration images; give an .npz or image folder with --calib")
    if cfg.eval_data is not None:
        from edgeres.measure.evaluate import check_labels

        eval_ds = open_dataset(cfg.eval_data)
        eval_ds.check_image_size(spec.preprocess)
        check_labels(eval_ds, spec.num_classes, spec.labels)

    key = conversion_key(cfg, loaded.sha256)
    existing = _existing_manifest(out)
    if existing is not None and existing.get("conversion_key") == key and not cfg.force:
        log(f"[green]✓ {out} is up to date[/] (same model, data and options): conversion skipped")
        manifest = existing
    else:
        check_output_dir(out, cfg.force)
        if cfg.prune is not None:
            from edgeres.compress.prune import prune_into_loaded

            loaded = prune_into_loaded(loaded, cfg, calib_ds, eval_ds)
        manifest = _build(cfg, loaded, key, calib_ds, needs_calib, steps_plan)

    if eval_ds is not None:
        from edgeres.measure.bundle_eval import EVAL_FILE, evaluate_bundle

        stored = read_result(out, EVAL_FILE)
        wanted = {"data": str(cfg.eval_data), "images": len(eval_ds.spread(cfg.eval_images))}
        if (stored and not cfg.force and stored.get("conversion_key") == key
                and {k: stored.get(k) for k in wanted} == wanted):
            log("[dim]✓ eval (done in an earlier run, skipped)[/]")
        else:
            evaluate_bundle(out, eval_ds, limit=cfg.eval_images, threads=cfg.threads)
        if cfg.accuracy_budget_pp is not None:
            from edgeres.convert.budget import enforce_accuracy_budget

            enforce_accuracy_budget(replace(cfg, accuracy_budget_pp=None), cfg.accuracy_budget_pp)
            manifest = read_manifest(out)
    if cfg.bench and any(a["status"] == "ok" for a in manifest["artifacts"]):
        _bench_locally(cfg, out, skip_if_done=existing is manifest)
    from edgeres.measure.report import write_report

    write_report(out)
    return manifest


def _bench_locally(cfg: ConvertConfig, out: Path, skip_if_done: bool) -> None:
    """A short local benchmark so the report has latency; ``edgeres bench`` measures properly."""
    from edgeres.measure.bench import BENCH_FILE, BenchConfig, bench_bundle

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


def _build(cfg: ConvertConfig, loaded, key: str, calib_ds, needs_calib: bool, steps_plan) -> dict:
    from targets import CompileJob, get_target
    from targets.base import TargetError

    out, spec = Path(cfg.out), loaded.spec
    work = out.resolve().parent / f".{out.name}.partial-{key}"
    if cfg.force and work.exists():
        shutil.rmtree(work)
    resumed = work.exists()
    try:
        work.mkdir(exist_ok=True)
    except OSError as e:
        raise InputError(f"{out}: cannot create a folder in {work.parent} ({e.strerror}); choose a writable --out") from None
    steps = _Steps(work)
    if resumed:
        log(f"resuming an interrupted conversion from {work.name}")
    keep_for_resume = False
    try:
        log(f"[bold]edgeres convert[/] {loaded.source} ({spec.name}, {spec.cost()['macs'] / 1e6:.1f} M MACs) → {out}")
        if steps.get("export") is None or not (work / REFERENCE_FILE).exists():
            t0 = time.perf_counter()
            from edgeres.model.export import export_onnx

            log("exporting the fp32 reference ONNX…")
            export_onnx(loaded.to_torch(), spec, work / REFERENCE_FILE)
            steps.finish("export", {"seconds": round(time.perf_counter() - t0, 3)})

        calib_fn = calibration_record = ranges = qdq_path = None
        if calib_ds is not None:
            pre = spec.preprocess

            def calib_fn(layout: str = "NCHW", batch_size: int = 32):
                p = pre.with_layout(layout)
                return (x for x, _ in calib_ds.batches(p, batch_size, cfg.calib_images))

            calibration_record = {"source": str(cfg.calib), "images": len(calib_ds.spread(cfg.calib_images)),
                                  "estimator": cfg.estimator, "quant": cfg.quant}
        int8_sd = {"qdq": loaded.state_dict, "tflite": loaded.state_dict}  # weights the int8 builds start from
        int8_onnx = work / REFERENCE_FILE
        if cfg.quant == "accurate" and needs_calib:
            int8_sd, int8_onnx, improved = _improve_weights(cfg, loaded, work, calib_fn, steps_plan)
            calibration_record["accurate"] = improved
        # TFLite full-int8 calibrates inside the LiteRT converter on these same images (calib_fn);
        # the ONNX ranges and QDQ model are needed only when an ONNX-based target makes int8
        if any(p == "int8" and t != "tflite" for t, p in steps_plan):
            qdq_path = work / ".work" / "model.qdq.onnx"
            done = steps.get("calibrate")
            if done is None or not qdq_path.exists():
                done = _calibrate(cfg, work, calib_fn, qdq_path, calibration_record, int8_onnx)
                steps.finish("calibrate", done)
            calibration_record = done
            ranges = {k: tuple(v) for k, v in json.loads((work / RANGES_FILE).read_text()).items()}

        keras_fn = None
        if "tflite" in cfg.targets:
            def keras_fn():
                from edgeres.model.keras_model import build_keras

                return build_keras(spec, int8_sd["tflite"])

        artifacts = []
        for target_name, precision in steps_plan:
            step = f"compile {target_name} {precision}"
            record = steps.get(step)
            if record is None or (record["status"] == "ok" and not all((work / f).exists() for f in record["files"])):
                record = _compile_one(get_target(target_name), target_name, precision, work, cfg, CompileJob,
                                      TargetError, dict(calib_fn=calib_fn, ranges=ranges, qdq_path=qdq_path,
                                                        keras_fn=keras_fn, preprocess=spec.preprocess.to_dict(),
                                                        labels=spec.labels))
                if record["status"] == "ok":  # failures are retried on the next run
                    steps.finish(step, record)
            artifacts.append(record)

        manifest = {
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
            "calibration": calibration_record,
            "reference": {**file_record(work, REFERENCE_FILE), "precision": "fp32", "engine": "onnxruntime"},
            "data_files": [file_record(work, f) for f in (RANGES_FILE,) if (work / f).exists()],
            "artifacts": artifacts,
            "config": cfg.to_dict(),
            "timings": {name: r.get("seconds", r.get("compile_s")) for name, r in steps.done.items()
                        if isinstance(r, dict)},
        }
        shutil.rmtree(work / ".work", ignore_errors=True)
        (work / STEPS_FILE).unlink(missing_ok=True)
        write_json_atomic(work / MANIFEST, manifest)
        publish(work, out)
        return manifest
    except KeyboardInterrupt:
        keep_for_resume = True
        log(f"interrupted: {out} was not written; finished steps are kept in {work.name} — re-run to resume")
        raise
    except OSError as e:
        raise InputError(f"{out}: writing the bundle failed ({e.strerror or e}); free disk space or choose another --out") from None
    finally:
        # only an interruption is worth resuming; after any error (or after publishing) nothing may stay behind
        if not keep_for_resume:
            shutil.rmtree(work, ignore_errors=True)


def _improve_weights(cfg: ConvertConfig, loaded, work: Path, calib_fn, steps_plan):
    """``--quant accurate``: weights clipped and biases corrected for each int8 weight grid in use.

    The QDQ ONNX (onnx, openvino) uses onnxruntime's grid (64 steps a side with reduce_range); TFLite
    always 127. The fp32 reference keeps the original weights; the improved ones go to an internal
    fp32 ONNX that the QDQ model quantises and to the Keras model."""
    from edgeres.compress.quant_accurate import improve_for_int8
    from targets import onnx as onnx_target
    from calibration.cpu import cpu_features

    t0 = time.perf_counter()
    log("quant accurate: clipping weights and correcting biases on the calibration images…")
    out_sd, record = {"qdq": loaded.state_dict, "tflite": loaded.state_dict}, {}
    int8_onnx = work / REFERENCE_FILE
    if any(p == "int8" and t != "tflite" for t, p in steps_plan):
        recipe = onnx_target.choose_int8_recipe(cpu_features(), dict(cfg.target_options.get("onnx", {})))
        levels = 64 if recipe["reduce_range"] else 127
        out_sd["qdq"], record["qdq"] = improve_for_int8(loaded.spec, loaded.state_dict, calib_fn("NCHW"), levels=levels)
        int8_onnx = work / ".work" / ACCURATE_FP32
        if not int8_onnx.exists():
            from edgeres.model.export import export_onnx
            from edgeres.model.torch_model import build_torch

            model = build_torch(loaded.spec)
            model.load_state_dict(out_sd["qdq"])
            int8_onnx.parent.mkdir(exist_ok=True)
            export_onnx(model, loaded.spec, int8_onnx)
    if ("tflite", "int8") in steps_plan:
        if record.get("qdq", {}).get("weight_levels") == 127:  # same grid: same improved weights
            out_sd["tflite"], record["tflite"] = out_sd["qdq"], record["qdq"]
        else:
            out_sd["tflite"], record["tflite"] = improve_for_int8(loaded.spec, loaded.state_dict, calib_fn("NCHW"),
                                                                  levels=127)
    record["seconds"] = round(time.perf_counter() - t0, 3)
    return out_sd, int8_onnx, record


def _calibrate(cfg: ConvertConfig, work: Path, calib_fn, qdq_path: Path, record: dict,
               onnx_fp32: Path | None = None) -> dict:
    """Ranges once from the calibration set, then one QDQ int8 ONNX that every int8 target reuses."""
    from targets import onnx as onnx_target
    from targets.base import TargetError

    t0 = time.perf_counter()
    log(f"calibrating on {record['images']} images with the {cfg.estimator} estimator…")
    try:
        onnx_fp32 = onnx_fp32 or work / REFERENCE_FILE
        ranges = onnx_target.compute_ranges(onnx_fp32, calib_fn, estimator=cfg.estimator)
    except TargetError as e:
        raise InputError(f"{cfg.calib}: calibration failed ({e})") from None
    except DataError as e:
        raise DataError(f"{cfg.calib}: {e}") from None
    write_json_atomic(work / RANGES_FILE, {k: [float(v[0]), float(v[1])] for k, v in ranges.items()})
    qdq_path.parent.mkdir(exist_ok=True)
    qdq = onnx_target.quantize_qdq(onnx_fp32, ranges, qdq_path,
                                   options=dict(cfg.target_options.get("onnx", {})))
    return {**record, "qdq": qdq, "ranges_file": RANGES_FILE,
            "seconds": round(time.perf_counter() - t0, 3)}


def _compile_one(target, target_name, precision, work, cfg, CompileJob, TargetError, ctx) -> dict:
    t0 = time.perf_counter()
    options = dict(cfg.target_options.get(target_name, {}))
    job = CompileJob(onnx_fp32=work / REFERENCE_FILE, out_dir=work, precision=precision,
                     calibration=ctx["calib_fn"], ranges=ctx["ranges"], qdq_onnx=ctx["qdq_path"],
                     keras_model=ctx["keras_fn"], options=options, preprocess=ctx["preprocess"],
                     labels=ctx["labels"], estimator=cfg.estimator)
    log(f"compiling {target_name} {precision}…")
    try:
        artifact = target.compile(job)
        record = artifact.to_dict()
        record["file_records"] = [file_record(work, f) for f in artifact.files]
        record["size_bytes"] = sum(r["size_bytes"] for r in record["file_records"])
        record["sha256"] = record["file_records"][0]["sha256"]
        record["status"] = "ok"
    except (TargetError, DataError, InputError) as e:
        record = {"target": target_name, "precision": precision, "status": "failed", "error": str(e),
                  "files": [], "file_records": []}
        log(f"[red]{target_name} {precision} failed:[/] {e}")
    record["compile_s"] = round(time.perf_counter() - t0, 3)
    return record
