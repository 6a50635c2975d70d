"""What one conversion is: every choice (``ConvertConfig``), checked before any work, the
(target, precision) pairs it makes, and the key that says whether a bundle already holds it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from calibration.estimators import ESTIMATORS
from edgeres import __version__
from edgeres.compress.distill import check_finetune_flags
from edgeres.compress.prune import PruneConfig
from edgeres.device.profiles import load_profile
from edgeres.errors import InputError
from edgeres.flags import check_number, check_threads
from targets import get_info
from targets import names as target_names

DEFAULT_CALIB_IMAGES = 300
MIN_CALIB_IMAGES = 10  # fewer cannot estimate activation ranges that generalise
QUANT_PRESETS = ("fast", "accurate")  # accurate: edgeres/compress/quant_accurate.py on the weights first


@dataclass(frozen=True)
class ConvertConfig:
    """Every choice of one conversion; recorded in the manifest so a conversion can be replayed."""

    model: str
    out: str
    arch: str | None = None
    calib: str | None = None
    targets: tuple[str, ...] = field(default_factory=target_names)  # every registered target
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
    prune: float | None = None  # structured pruning ratio before export
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
    known = target_names()
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
    """Every flag checked before any work: a bad one costs nothing and leaves nothing behind."""
    if cfg.prune is not None:
        PruneConfig(cfg.prune, cfg.prune_importance).validate("--prune", "--prune-importance")
    if not cfg.targets:
        raise InputError("--targets: no target given; choose from " + ", ".join(target_names()))
    for t in cfg.targets:
        if t not in target_names():
            raise InputError(f"--targets: unknown target {t!r}; choose from {', '.join(target_names())}")
    known = {p for t in cfg.targets for p in get_info(t).precisions}
    for p in cfg.precisions:
        if p not in known:
            raise InputError(f"--precision: {p!r} is not made by {', '.join(cfg.targets)} (choose from {', '.join(sorted(known))})")
    if not cfg.precisions:
        raise InputError("--precision: no precision given; choose int8, fp16 or fp32")
    if cfg.estimator not in ESTIMATORS:
        raise InputError(f"--estimator: unknown {cfg.estimator!r}; choose from {', '.join(sorted(ESTIMATORS))}")
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
    check_number("--calib-images", cfg.calib_images, at_least=1)
    check_number("--eval-images", cfg.eval_images, at_least=1)
    check_threads("--threads", cfg.threads)
    check_threads("--bench-threads", cfg.bench_threads)
    check_number("--bench-runs", cfg.bench_runs, at_least=1)
    check_number("--epochs", cfg.finetune_epochs, at_least=0)


def plan(cfg: ConvertConfig) -> list[tuple[str, str]]:
    """(target, precision) pairs to build; a precision a target does not make is skipped for it."""
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
