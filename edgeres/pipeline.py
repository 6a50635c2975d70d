"""``convert``: load → (prune) → export the fp32 reference → calibrate once → compile each target →
(evaluate) — written into one bundle atomically."""

from __future__ import annotations

import datetime as dt
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from calibration import DataError, open_dataset
from edgeres import __version__
from edgeres.bundle import (FORMAT, FORMAT_VERSION, MANIFEST, REFERENCE_FILE, check_output_dir, file_record,
                            make_staging, publish, write_json_atomic)
from edgeres.errors import InputError
from edgeres.progress import log

DEFAULT_CALIB_IMAGES = 300
ESTIMATORS = ("minmax", "percentile", "entropy", "mse")


@dataclass(frozen=True)
class ConvertConfig:
    """Every choice of one conversion; recorded in the manifest so a conversion can be replayed."""

    model: str
    out: str
    arch: str | None = None
    calib: str | None = None
    targets: tuple[str, ...] = ("onnx", "openvino", "tflite")
    precisions: tuple[str, ...] = ("int8",)
    estimator: str = "percentile"
    calib_images: int = DEFAULT_CALIB_IMAGES
    eval_data: str | None = None
    eval_images: int | None = None
    threads: int | None = None
    force: bool = False
    target_options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        d = asdict(self)
        d["targets"], d["precisions"] = list(self.targets), list(self.precisions)
        return d


def parse_target_options(items: list[str] | tuple[str, ...]) -> dict:
    """``["openvino.engine=nncf", "tflite.io=uint8"]`` → ``{"openvino": {"engine": "nncf"}, ...}``."""
    from targets import TARGETS

    out: dict[str, dict] = {}
    for item in items:
        key, eq, value = item.partition("=")
        target, dot, name = key.partition(".")
        if not eq or not dot or target not in TARGETS or not name:
            raise InputError(f"--option {item!r}: expected TARGET.KEY=VALUE with TARGET one of {', '.join(TARGETS)}")
        lowered = value.strip().lower()
        parsed = {"true": True, "false": False}.get(lowered, value.strip())
        if isinstance(parsed, str):
            try:
                parsed = int(parsed) if parsed.lstrip("-").isdigit() else float(parsed)
            except ValueError:
                pass
        out.setdefault(target, {})[name] = parsed
    return out


def validate(cfg: ConvertConfig) -> None:
    from targets import TARGETS, get_target

    for t in cfg.targets:
        if t not in TARGETS:
            raise InputError(f"--targets: unknown target {t!r}; choose from {', '.join(TARGETS)}")
        known = get_target(t).PRECISIONS
        for p in cfg.precisions:
            if p not in known and not (p == "dynamic" and t != "tflite"):
                raise InputError(f"--precision: {p!r} is not available for {t} (it makes {', '.join(known)})")
    if cfg.estimator not in ESTIMATORS:
        raise InputError(f"--estimator: unknown {cfg.estimator!r}; choose from {', '.join(ESTIMATORS)}")
    if cfg.calib_images < 1:
        raise InputError(f"--calib-images: {cfg.calib_images} must be at least 1")
    if cfg.threads is not None and cfg.threads < 1:
        raise InputError(f"--threads: {cfg.threads} must be at least 1")


def plan(cfg: ConvertConfig) -> list[tuple[str, str]]:
    """(target, precision) pairs to build; ``dynamic`` is TFLite-only and skipped for the others."""
    from targets import get_target

    return [(t, p) for t in cfg.targets for p in cfg.precisions if p in get_target(t).PRECISIONS]


def convert(cfg: ConvertConfig) -> dict:
    """Run a conversion; returns the manifest. Raises ``InputError`` before any work on bad input."""
    from edgeres.loading import load_model
    from targets import CompileJob, get_target
    from targets.base import TargetError

    validate(cfg)
    out = Path(cfg.out)
    check_output_dir(out, cfg.force)
    loaded = load_model(cfg.model, cfg.arch)
    spec = loaded.spec
    needs_calib = any(p in ("int8",) for _, p in plan(cfg))
    calib_ds = None
    if cfg.calib is not None:
        calib_ds = open_dataset(cfg.calib)
        calib_ds.check_image_size(spec.preprocess)
    elif needs_calib:
        raise InputError("--calib: int8 needs calibration images; give an .npz or image folder with --calib")
    eval_ds = None
    if cfg.eval_data is not None:
        eval_ds = open_dataset(cfg.eval_data, require_labels=True)
        eval_ds.check_image_size(spec.preprocess)
        if eval_ds.labels.max() >= spec.num_classes or eval_ds.labels.min() < 0:
            raise InputError(f"{cfg.eval_data}: labels run {eval_ds.labels.min()}..{eval_ds.labels.max()} "
                             f"but the model has {spec.num_classes} classes; check the data matches the model")

    staging = make_staging(out)
    done = False
    timings: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        log(f"[bold]edgeres convert[/] {loaded.source} ({spec.name}, {spec.cost()['macs'] / 1e6:.1f} M MACs) → {out}")
        from edgeres.export import export_onnx

        export_onnx(loaded.to_torch(), spec, staging / REFERENCE_FILE)
        timings["export_s"] = round(time.perf_counter() - t0, 3)

        calib_fn, calibration_record, ranges, qdq_path = None, None, None, None
        if calib_ds is not None:
            pre = spec.preprocess

            def calib_fn(layout: str = "NCHW", batch_size: int = 32):
                p = pre.with_layout(layout)
                return (x for x, _ in calib_ds.batches(p, batch_size, cfg.calib_images))

            n_calib = len(calib_ds.spread(cfg.calib_images))
            calibration_record = {"source": str(cfg.calib), "images": n_calib, "estimator": cfg.estimator}
            if needs_calib:
                t1 = time.perf_counter()
                log(f"calibrating on {n_calib} images with the {cfg.estimator} estimator")
                from targets import onnx as onnx_target

                try:
                    ranges = onnx_target.compute_ranges(staging / REFERENCE_FILE, calib_fn, estimator=cfg.estimator)
                except DataError:
                    raise
                except Exception as e:  # noqa: BLE001
                    if isinstance(e, TargetError):
                        raise InputError(f"{cfg.calib}: calibration failed ({e})") from None
                    raise
                write_json_atomic(staging / "calibration_ranges.json",
                                  {k: [float(v[0]), float(v[1])] for k, v in ranges.items()})
                timings["calibrate_s"] = round(time.perf_counter() - t1, 3)
                # one QDQ int8 ONNX from those ranges; the onnx target ships it, openvino compiles it
                qdq_path = staging / ".work" / "model.qdq.onnx"
                qdq_path.parent.mkdir()
                qdq_record = onnx_target.quantize_qdq(staging / REFERENCE_FILE, ranges, qdq_path,
                                                      options=dict(cfg.target_options.get("onnx", {})))
                calibration_record["qdq"] = qdq_record

        keras_fn = None
        if "tflite" in cfg.targets:
            def keras_fn():
                from edgeres.keras_model import build_keras

                return build_keras(spec, loaded.state_dict)

        artifacts = []
        for target_name, precision in plan(cfg):
            t1 = time.perf_counter()
            target = get_target(target_name)
            options = dict(cfg.target_options.get(target_name, {}))
            if cfg.threads:
                options.setdefault("threads", cfg.threads)
            job = CompileJob(onnx_fp32=staging / REFERENCE_FILE, out_dir=staging, precision=precision,
                             calibration=calib_fn, ranges=ranges, qdq_onnx=qdq_path, keras_model=keras_fn,
                             options=options)
            log(f"compiling {target_name} {precision}…")
            try:
                artifact = target.compile(job)
                record = artifact.to_dict()
                record["file_records"] = [file_record(staging, f) for f in artifact.files]
                record["size_bytes"] = sum(r["size_bytes"] for r in record["file_records"])
                record["sha256"] = record["file_records"][0]["sha256"]
                record["status"] = "ok"
            except (TargetError, DataError, InputError) as e:
                record = {"target": target_name, "precision": precision, "status": "failed", "error": str(e),
                          "files": [], "file_records": []}
                log(f"[red]{target_name} {precision} failed:[/] {e}")
            record["compile_s"] = round(time.perf_counter() - t1, 3)
            artifacts.append(record)

        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "edgeres_version": __version__,
            "source": {"path": loaded.source, "sha256": loaded.sha256, "format": loaded.format},
            "arch": spec.to_dict(),
            "cost": spec.cost(),
            "preprocess": spec.preprocess.to_dict(),
            "labels": list(spec.labels) if spec.labels else None,
            "pruning": (loaded.extra or {}).get("pruning"),
            "calibration": calibration_record,
            "reference": {**file_record(staging, REFERENCE_FILE), "precision": "fp32", "engine": "onnxruntime"},
            "artifacts": artifacts,
            "config": cfg.to_dict(),
            "timings": timings,
        }
        shutil.rmtree(staging / ".work", ignore_errors=True)
        write_json_atomic(staging / MANIFEST, manifest)
        publish(staging, out)
        done = True
    finally:
        if not done:
            shutil.rmtree(staging, ignore_errors=True)

    if eval_ds is not None:
        from edgeres.bundle_eval import evaluate_bundle

        evaluate_bundle(out, eval_ds, limit=cfg.eval_images, threads=cfg.threads)
    return manifest
