"""What one conversion is: every choice (``ConvertConfig``), checked before any work, the
(target, precision) pairs it makes, and the key that says whether a bundle already holds it."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from edgeres.calibration import DataError, Preprocess
from edgeres.calibration.estimators import ESTIMATORS
from edgeres.calibration.preprocess import CHANNEL_ORDERS, FILTERS, RESIZE_MODES
from edgeres.bundle import MAX_IMAGE_SIDE, warn
from edgeres import __version__
from edgeres.compress.distill import check_finetune_flags
from edgeres.compress.prune import PruneConfig
from edgeres.convert.data_digest import data_sha256
from edgeres.device.profiles import load_profile
from edgeres.errors import InputError
from edgeres.model.labels import read_labels
from edgeres.flags import check_number, check_threads
from edgeres.int8 import STAGE as INT8_STAGE
from edgeres.int8 import check_options as check_int8_options
from edgeres.int8 import lift_legacy_options
from edgeres.targets import get_info
from edgeres.targets import names as target_names

DEFAULT_CALIB_IMAGES = 300
MIN_CALIB_IMAGES = 10  # fewer cannot estimate activation ranges that generalise
# accurate: edgeres/compress/quant_accurate.py on the weights first; finetune: edgeres/compress/quant_finetune.py
QUANT_PRESETS = ("fast", "accurate", "finetune")


@dataclass(frozen=True)
class ConvertConfig:
    """Every choice of one conversion; recorded in the manifest so a conversion can be replayed."""

    model: str
    out: str
    arch: str | None = None
    calib: str | None = None
    targets: tuple[str, ...] = field(default_factory=target_names)  # every registered target
    precisions: tuple[str, ...] = ("int8",)
    estimator: str = "mse"  # best top-1 agreement on CIFAR ResNet-20/32 int8 (see docs/accuracy.md)
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
    seed: int = 0  # --quant finetune: data order, augmentation and torch's generator
    preprocess: dict | None = None  # --preprocess override of the model's own: resize, crop, mode, mean, std, scale
    labels: str | None = None  # --labels: a file of class names (one per line, or a TSV/CSV such as classes.tsv)
    jobs: int | None = None  # target compiles at once, each in a worker process (None: from cores and memory; 0: compiles and --eval in this process)
    # a grown bundle: exactly these (target, precision) pairs, not every target × precision (convert/grow.py)
    pairs: tuple[tuple[str, str], ...] | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"], d["precisions"] = list(self.targets), list(self.precisions)
        d["bench_threads"] = list(self.bench_threads)
        d["pairs"] = [list(p) for p in self.pairs] if self.pairs is not None else None
        return d


def parse_target_options(items: list[str] | tuple[str, ...]) -> dict:
    """``["openvino.engine=nncf", "tflite.io=uint8"]`` → ``{"openvino": {"engine": "nncf"}, ...}``."""
    known = (*target_names(), INT8_STAGE)
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
    return _lifted(out)


def _lifted(options: dict) -> dict:
    """``options`` with the int8 stage's settings under ``int8`` (old ``onnx.*`` spellings moved, with a note)."""
    lifted, notes = lift_legacy_options(options)
    for note in notes:
        warn(note)
    return lifted


def apply_profile(cfg: ConvertConfig, device: str | None, *, targets_given: bool, precisions_given: bool,
                  threads_given: bool, bench_threads_given: bool = False) -> ConvertConfig:
    """Fill what the user did not choose from the device profile; the user's flags always win."""
    if not device:
        return cfg
    profile = load_profile(device)
    options = {t: dict(o) for t, o in profile.options.items()}
    for t, o in cfg.target_options.items():
        options.setdefault(t, {}).update(o)
    options = _lifted(options)
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
    for target_name, options in cfg.target_options.items():
        if target_name == INT8_STAGE:  # the int8 stage's own: they shape every runtime's int8
            check_int8_options(options)
        else:
            get_info(target_name).check_options(options)
    if cfg.accuracy_budget_pp is not None and not 0 <= cfg.accuracy_budget_pp < float("inf"):  # NaN too
        raise InputError(f"--accuracy-budget: {cfg.accuracy_budget_pp} pp must be a finite number, zero or more (e.g. 1.0)")
    if cfg.accuracy_budget_pp is not None and cfg.eval_data is None:
        raise InputError("--accuracy-budget needs --eval DATA to measure the drop against")
    if cfg.bench and not cfg.bench_threads:
        raise InputError("--bench-threads: no thread count given; e.g. --bench-threads 1,2")
    if cfg.prune is not None:
        check_finetune_flags(cfg.finetune_epochs, cfg.finetune_data)
    if cfg.quant == "finetune" and cfg.finetune_data is None:
        raise InputError("--quant finetune: needs training images; give --finetune-data DATA (.npz or image folder)")
    if cfg.preprocess is not None:
        check_preprocess_override(cfg.preprocess)
    if cfg.labels is not None:
        read_labels(cfg.labels)  # the count is checked once the model is loaded


def _validate_numbers(cfg: ConvertConfig) -> None:
    check_number("--calib-images", cfg.calib_images, at_least=1)
    check_number("--eval-images", cfg.eval_images, at_least=1)
    check_threads("--threads", cfg.threads)
    check_threads("--bench-threads", cfg.bench_threads)
    check_number("--bench-runs", cfg.bench_runs, at_least=1)
    check_number("--epochs", cfg.finetune_epochs, at_least=0)
    check_number("--seed", cfg.seed, at_least=0)
    check_number("--jobs", cfg.jobs, at_least=0, at_most=64, why="more parallel compiles than that only costs memory")


def plan(cfg: ConvertConfig) -> list[tuple[str, str]]:
    """(target, precision) pairs to build; a precision a target does not make is skipped for it."""
    if cfg.pairs is not None:
        return [(t, p) for t, p in cfg.pairs]
    return [(t, p) for t in cfg.targets for p in cfg.precisions if p in get_info(t).precisions]


def data_digests(cfg: ConvertConfig) -> dict:
    """The data files' content sha256 that the key uses (recorded in the manifest, so a bundle's key can
    be checked later without its data files being where they were)."""
    return {"calib": data_sha256(cfg.calib), "finetune_data": data_sha256(cfg.finetune_data),
            "labels": _labels_sha256(cfg.labels)}


def _labels_sha256(path: str | None) -> str | None:
    """The names (and keys) a --labels file gives, by what they are, not how the file is laid out."""
    if path is None:
        return None
    names = read_labels(path)
    given = [list(names.names), [list(k) for k in names.keys] if names.keys else None]
    return hashlib.sha256(json.dumps(given).encode()).hexdigest()


def conversion_key(cfg: ConvertConfig, source_sha256: str, digests: dict | None = None) -> str:
    """Hash of everything that decides the bundle's files (not evaluation or threads); data by content
    (``digests``, as ``data_digests`` gives; computed from ``cfg``'s paths when not given)."""
    digests = data_digests(cfg) if digests is None else digests
    decisive = {
        "edgeres": __version__, "source": source_sha256, "arch": cfg.arch, "calib": digests.get("calib"),
        "targets": list(cfg.targets), "precisions": list(cfg.precisions), "estimator": cfg.estimator,
        "calib_images": cfg.calib_images, "options": cfg.target_options,
    }
    if cfg.pairs is not None:  # keys of bundles that were never grown stay as they were
        decisive["pairs"] = [list(p) for p in cfg.pairs]
    if cfg.prune is not None:
        decisive["prune"] = [cfg.prune, cfg.prune_importance, digests.get("finetune_data"), cfg.finetune_epochs]
    if cfg.quant != "fast":  # fast keys stay those of bundles made before presets existed
        decisive["quant"] = cfg.quant
    if cfg.quant == "finetune":
        decisive["quant_finetune"] = [digests.get("finetune_data"), cfg.finetune_epochs, cfg.threads, cfg.seed]
    if cfg.preprocess is not None:  # likewise for bundles made without an override
        decisive["preprocess"] = cfg.preprocess
    if cfg.labels is not None:  # the names go into every artifact's metadata
        decisive["labels"] = digests.get("labels")
    return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()[:16]


# -- --preprocess ----------------------------------------------------------------------------------------

PREPROCESS_FLAG_KEYS = ("resize", "crop", "mode", "filter", "antialias", "order", "mean", "std", "scale")
PREPROCESS_EXAMPLE = "e.g. --preprocess resize=256,crop=224,filter=bicubic,mean=0.485,0.456,0.406"


def parse_preprocess_override(text: str | None) -> dict | None:
    """``resize=256,crop=224,mode=direct,mean=a,b,c,std=a,b,c`` (or a JSON file with those keys) →
    the override dict, checked; ``None`` when the flag is not given."""
    if text is None:
        return None
    if text.strip().lower().endswith(".json") or Path(text).is_file():
        try:
            given = json.loads(Path(text).read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise InputError(f"--preprocess {text}: cannot read it as JSON ({e}); give a JSON object such as "
                             '{"resize": 256, "crop": 224, "mode": "shorter_side_crop"}') from None
        if not isinstance(given, dict):
            raise InputError(f"--preprocess {text}: the JSON is not an object of {', '.join(PREPROCESS_FLAG_KEYS)}")
    else:
        given = _key_values(text)
    override = {key: _preprocess_value(key, value) for key, value in given.items()}
    check_preprocess_override(override)
    return override


def _key_values(text: str) -> dict:
    """``a=1,b=2,3,4`` → ``{"a": "1", "b": ["2", "3", "4"]}``: a part without ``=`` continues the value before."""
    out: dict = {}
    key = None
    for part in text.split(","):
        name, eq, value = part.partition("=")
        if eq:
            key = name.strip()
            if key in out:
                raise InputError(f"--preprocess: {key} is given twice; give each key once ({PREPROCESS_EXAMPLE})")
            out[key] = [value.strip()]
        elif key is None:
            raise InputError(f"--preprocess {text!r}: expected KEY=VALUE pairs ({PREPROCESS_EXAMPLE})")
        else:
            out[key].append(part.strip())
    return {k: v[0] if len(v) == 1 else v for k, v in out.items()}


def _preprocess_value(key: str, value):
    """A string (or JSON) value as its type; range checks are check_preprocess_override's."""
    if key not in PREPROCESS_FLAG_KEYS:
        raise InputError(f"--preprocess: unknown key {key!r}; the keys are {', '.join(PREPROCESS_FLAG_KEYS)} "
                         f"({PREPROCESS_EXAMPLE})")
    try:
        if key in ("mean", "std"):
            values = value if isinstance(value, list) else [value]
            return [float(v) for v in values]
        if key in ("mode", "filter"):
            return str(value)
        if key == "order":
            return str(value).upper()
        if key == "antialias":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "1", "yes", "on"):
                return True
            if text in ("false", "0", "no", "off"):
                return False
            raise ValueError(value)
        if key == "resize" and (value is None or str(value).lower() == "none"):
            return None
        number = float(value)
        if key == "scale":
            return number
        return int(number) if math.isfinite(number) and number == int(number) else number
    except (TypeError, ValueError):
        raise InputError(f"--preprocess {key}={value!r}: not a number; {_what(key)}") from None


def _what(key: str) -> str:
    return {"resize": "resize is the shorter side in pixels before the crop (e.g. resize=256)",
            "crop": "crop is the model's input side in pixels (e.g. crop=224)",
            "mean": "mean is one number per channel: three (e.g. mean=0.485,0.456,0.406), one for a greyscale model",
            "std": "std is one positive number per channel: three (e.g. std=0.229,0.224,0.225), one for greyscale",
            "scale": "scale multiplies the 0..255 pixel values before mean/std (e.g. scale=0.00392156862745098)",
            "mode": f"mode is one of {', '.join(RESIZE_MODES)}",
            "filter": f"filter is one of {', '.join(FILTERS)}",
            "antialias": "antialias is true or false (widen the filter when downscaling, as Pillow and torchvision do)",
            "order": "order is RGB, BGR or L (the channels the model takes; L: one grey channel)"}[key]


def check_preprocess_override(override: dict) -> None:
    """Every --preprocess value in range and the combination possible, before any work."""
    for key, value in override.items():
        if key not in PREPROCESS_FLAG_KEYS:
            raise InputError(f"--preprocess: unknown key {key!r}; the keys are {', '.join(PREPROCESS_FLAG_KEYS)}")
        bad = _bad_value(key, value)
        if bad:
            raise InputError(f"--preprocess {key}={bad}; {_what(key)}")
    resize, crop = override.get("resize"), override.get("crop")
    if resize is not None and crop is not None and crop > resize:
        raise InputError(f"--preprocess crop={crop} is larger than resize={resize}; the crop is taken from the image "
                         "resized to its shorter side, so give resize at least crop (e.g. resize=256,crop=224)")
    if override.get("mode") == "direct" and resize is not None:
        raise InputError(f"--preprocess resize={resize} with mode=direct: direct resizes straight to crop×crop; "
                         "leave resize out (or use mode=shorter_side_crop)")


def _bad_value(key: str, value) -> str | None:
    """How ``value`` is wrong for ``key`` (shown after ``key=``), or None."""
    if key == "mode":
        return None if value in RESIZE_MODES else f"{value!r} is not a resize mode"
    if key == "filter":
        return None if value in FILTERS else f"{value!r} is not a resize filter"
    if key == "order":
        return None if value in CHANNEL_ORDERS else f"{value!r} is not a channel order"
    if key == "antialias":
        return None if isinstance(value, bool) else f"{value!r} is not true or false"
    if key in ("mean", "std"):
        if not isinstance(value, list) or len(value) not in (1, 3) or not all(isinstance(v, (int, float)) for v in value):
            return f"{value!r} is not three numbers (or one)"
        if not all(math.isfinite(v) for v in value):
            return f"{','.join(map(str, value))} is not finite"
        if key == "std" and any(v <= 0 for v in value):
            return f"{','.join(map(str, value))} has a value that is not positive"
        return None
    if key == "resize" and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"{value!r} is not a finite number"
    if key == "scale":
        return None if value > 0 else f"{value:g} is not positive"
    if not isinstance(value, int) or not 1 <= value <= MAX_IMAGE_SIDE:
        return f"{value!r} is not a whole number of pixels from 1 to {MAX_IMAGE_SIDE}"
    return None


def apply_preprocess_override(pre: Preprocess, override: dict | None, *, size_fixed_by: str | None = None) -> Preprocess:
    """The model's preprocessing with the --preprocess keys given replacing its own. ``crop`` sets the
    input size unless ``size_fixed_by`` says what fixes it (a graph's input shape, a Flatten head); a new
    size without ``resize`` keeps the crop fraction, floored as timm does (160 at 224/256 → 182)."""
    if not override:
        return pre
    crop = override.get("crop", pre.size)
    if crop != pre.size:
        if size_fixed_by:
            raise InputError(f"--preprocess crop={crop}: the model takes {pre.size}×{pre.size} inputs ({size_fixed_by}); "
                             f"give crop={pre.size} or leave crop out")
        from edgeres.model.zoo import resized_preprocess

        pre = resized_preprocess(pre, crop, override.get("resize"))
    mode = override.get("mode", pre.resize_mode)
    resize = None if mode == "direct" else override.get("resize", pre.resize if pre.resize_mode == mode else None)
    changes = {"resize_mode": mode, "resize": resize}
    for key in ("mean", "std"):
        if key in override:
            changes[key] = tuple(override[key])
    if "scale" in override:
        changes["scale"] = override["scale"]
    for key, field_name in (("filter", "filter"), ("antialias", "antialias"), ("order", "channel_order")):
        if key in override:
            changes[field_name] = override[key]
    try:
        return replace(pre, **changes)
    except DataError as e:
        raise InputError(f"--preprocess: {e}") from None
