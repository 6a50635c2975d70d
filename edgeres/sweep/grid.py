"""What a sweep is: its choices (``SweepConfig``), checked before any work, and the grid they span.

A trial is (prune ratio, precision, target, estimator, threads). Trials that differ only in threads
share one conversion (one bundle, benchmarked at every thread count); conversions of one prune ratio
share the pruned model, and those of one (ratio, estimator) share the fp32 reference and the
calibration ranges, made once in a hidden *base* conversion (``.shared/`` under the sweep folder)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace
from pathlib import Path

from edgeres import targets
from edgeres.convert.config import ConvertConfig, validate
from edgeres.errors import InputError
from edgeres.compress.distill import check_finetune_flags
from edgeres.flags import check_number, check_remote, check_threads

OBJECTIVES = ("latency", "size")
SHARED_DIR = ".shared"
LOGS_DIR = "logs"
RAY_HINT = "pip install 'edgeres[sweep]' (or pip install 'ray>=2.9')"


@dataclass(frozen=True)
class SweepConfig:
    """Every choice of one sweep; recorded in ``sweep.json``."""

    model: str
    out: str
    calib: str
    eval_data: str
    arch: str | None = None
    prune: tuple[float, ...] = (0.0,)
    precisions: tuple[str, ...] = ("int8",)
    targets: tuple[str, ...] = ()
    estimators: tuple[str, ...] = ("mse",)
    threads: tuple[int, ...] = (1,)
    calib_images: int = 300
    eval_images: int | None = None
    prune_importance: str = "l2"
    finetune_data: str | None = None
    finetune_epochs: int = 0
    accuracy_budget_pp: float | None = None
    objective: str = "latency"
    address: str | None = None  # None: an embedded local Ray; "auto" or HOST:PORT: join that cluster
    remote: str | None = None  # benchmark on USER@HOST over ssh instead of on the bench node
    bench_runs: int = 50
    html: bool = False

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class Conversion:
    """One bundle of the sweep: a prune ratio, one target at one precision (and estimator for int8)."""

    prune: float
    target: str
    precision: str
    estimator: str

    @property
    def name(self) -> str:
        tail = f"-{self.estimator}" if self.precision == "int8" else ""
        return f"prune{self.prune:g}-{self.target}-{self.precision}{tail}"

    @property
    def uses_shared_ranges(self) -> bool:
        """Does its build reuse the shared calibration? Every int8 consumer does: the QDQ consumers through the
        QDQ model, the others (TFLite) by matching the shared ranges to their own tensors."""
        return self.precision == "int8" and targets.get_info(self.target).int8_recipe is not None


@dataclass(frozen=True)
class Trial:
    conversion: Conversion
    threads: int


def require_ray() -> None:
    """Ray is an optional dependency: say how to get it, before any work."""
    if importlib.util.find_spec("ray") is None:
        raise InputError(f"edgeres sweep runs its trials on Ray, which is not installed; {RAY_HINT}")


def validate_sweep(cfg: SweepConfig) -> None:
    """Every sweep flag checked before any work (each conversion's own flags by ``convert.validate``)."""
    require_ray()
    for flag, values in (("--prune", cfg.prune), ("--precision", cfg.precisions), ("--targets", cfg.targets),
                         ("--estimator", cfg.estimators), ("--threads", cfg.threads)):
        if not values:
            raise InputError(f"{flag}: no value given; give a comma list")
        if len(set(values)) != len(values):
            raise InputError(f"{flag}: {','.join(map(str, values))} names a value twice; give each once")
    check_threads("--threads", cfg.threads)
    check_number("--bench-runs", cfg.bench_runs, at_least=1)
    if cfg.objective not in OBJECTIVES:
        raise InputError(f"--objective: unknown {cfg.objective!r}; choose {' or '.join(OBJECTIVES)}")
    check_number("--accuracy-budget", cfg.accuracy_budget_pp, at_least=0)
    if cfg.address is not None and cfg.address != "auto" and not _host_port(cfg.address):
        raise InputError(f"--address {cfg.address!r}: expected auto or HOST:PORT of a running Ray cluster "
                         "(e.g. 127.0.0.1:6379, what `ray start --head` printed)")
    check_remote("--remote", cfg.remote)
    check_number("--epochs", cfg.finetune_epochs, at_least=0)
    check_finetune_flags(cfg.finetune_epochs, cfg.finetune_data)  # whatever --prune is: help says it needs it
    if not conversions(cfg):
        raise InputError(f"--precision {','.join(cfg.precisions)}: none of them is made by "
                         f"{','.join(cfg.targets)}; see edgeres doctor")
    for conv in conversions(cfg):
        validate(convert_config(cfg, conv, Path(cfg.out) / conv.name))


def _host_port(address: str) -> bool:
    host, colon, port = address.rpartition(":")
    return bool(colon and host and port.isdigit() and 0 < int(port) < 65536)


def conversions(cfg: SweepConfig) -> list[Conversion]:
    """The distinct bundles, in grid order; a precision a target does not make is left out."""
    out = []
    for ratio in cfg.prune:
        for precision in cfg.precisions:
            for target in cfg.targets:
                if target in targets.names() and precision not in targets.get_info(target).precisions:
                    continue
                estimators = cfg.estimators if precision == "int8" else cfg.estimators[:1]
                out += [Conversion(ratio, target, precision, e) for e in estimators]
    return out


def trials(cfg: SweepConfig) -> list[Trial]:
    return [Trial(conv, t) for conv in conversions(cfg) for t in cfg.threads]


def convert_config(cfg: SweepConfig, conv: Conversion, out: Path) -> ConvertConfig:
    """The ``edgeres convert`` of one conversion: same options, so its bundle key is the one convert makes."""
    return ConvertConfig(model=cfg.model, out=str(out), arch=cfg.arch, calib=cfg.calib, targets=(conv.target,),
                         precisions=(conv.precision,), estimator=conv.estimator, calib_images=cfg.calib_images,
                         eval_data=cfg.eval_data, eval_images=cfg.eval_images, threads=1, bench=False,
                         prune=conv.prune or None, prune_importance=cfg.prune_importance,
                         finetune_data=cfg.finetune_data, finetune_epochs=cfg.finetune_epochs)


def base_conversion(group: list[Conversion]) -> Conversion:
    """What the shared steps of one (ratio, estimator) are made by: the shared QDQ target at int8 when a
    conversion of the group uses the shared ranges, else at fp32 (the reference export only)."""
    first = group[0]
    precision = "int8" if any(c.uses_shared_ranges for c in group) else "fp32"
    return replace(first, target=base_target(), precision=precision)


def base_target() -> str:
    """The base conversion's target: its int8 artifact is the int8 stage's QDQ model with metadata added
    (tasks.summary checks that before trials reuse it)."""
    return targets.shipping_target(targets.QDQ_ONNX)


def base_dir(out: Path, conv: Conversion) -> Path:
    return out / SHARED_DIR / f"base-prune{conv.prune:g}-{conv.estimator}"


def pruned_path(out: Path, ratio: float, key: str) -> Path:
    return out / SHARED_DIR / f"pruned-{ratio:g}-{key}.pt"


def prune_key_config(cfg: SweepConfig, ratio: float) -> ConvertConfig:
    """A canonical conversion whose key depends only on what pruning reads (model, calibration, ratio,
    fine-tuning): its ``conversion_key`` names the shared pruned model."""
    return ConvertConfig(model=cfg.model, out="", arch=cfg.arch, calib=cfg.calib, targets=(), precisions=(),
                         estimator="", calib_images=cfg.calib_images, prune=ratio,
                         prune_importance=cfg.prune_importance, finetune_data=cfg.finetune_data,
                         finetune_epochs=cfg.finetune_epochs)
