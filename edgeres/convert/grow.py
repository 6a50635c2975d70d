"""A bundle grows: ``convert`` with the same source, calibration and options as an existing bundle but
more targets or precisions adds the missing artifacts and keeps the finished ones (same files, same
records, same kept results), instead of refusing or rebuilding everything with ``--force``.

How: the bundle's own config is replayed to check it was made from exactly this source, data and
options (its conversion key must come out the same today); the new build's staging folder is then
prefilled with the bundle's files and the step records they stand for (export, calibration, each
artifact), the way ``edgeres/sweep`` shares steps, so ``build_bundle`` makes only what is missing and
publishes the grown bundle atomically. The shared QDQ model is rebuilt from the kept
``calibration_ranges.json`` (no calibration pass), so the ranges stay byte for byte those of the old
artifacts. Growth is for ``--quant fast`` bundles; the other presets' tuned weights are not kept in
the bundle, so those rebuild with ``--force``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from edgeres.bundle import MANIFEST, REFERENCE_FILE
from edgeres.convert.build import QDQ_FILE, RANGES_FILE, STEPS_FILE, staging_dir
from edgeres.convert.config import ConvertConfig, conversion_key, plan
from edgeres.errors import InputError
from edgeres.progress import log

_TUPLES = ("targets", "precisions", "bench_threads")


def replayed_config(manifest: dict) -> ConvertConfig | None:
    """The ``ConvertConfig`` a bundle was made with, from its manifest (None: not readable as one)."""
    given = manifest.get("config")
    if not isinstance(given, dict):
        return None
    names = {f.name for f in dataclasses.fields(ConvertConfig)}
    try:
        values = {k: (tuple(v) if k in _TUPLES and isinstance(v, list) else v) for k, v in given.items() if k in names}
        return ConvertConfig(**values)
    except TypeError:
        return None


def _without_plan(cfg: ConvertConfig) -> ConvertConfig:
    return dataclasses.replace(cfg, targets=(), precisions=(), force=False)


def grown_config(cfg: ConvertConfig, manifest: dict, source_sha256: str) -> ConvertConfig | None:
    """The config of the grown bundle (the union of both plans), or None when ``cfg`` asks for nothing
    the bundle lacks. Raises ``InputError`` naming what differs when the bundle cannot grow into it."""
    old = replayed_config(manifest)
    out = cfg.out
    if old is None or conversion_key(old, manifest["source"]["sha256"]) != manifest.get("conversion_key"):
        raise InputError(f"{out}: already holds a bundle whose recorded settings cannot be checked against "
                         "this run (made by another edgeres version, or its --calib data changed since); pass "
                         "--force to replace it or choose another --out")
    differs = _what_differs(old, cfg, manifest["source"]["sha256"], source_sha256)
    if differs:
        raise InputError(f"{out}: already holds a bundle made with another {differs}; pass --force to replace "
                         "it or choose another --out")
    union = dataclasses.replace(
        cfg, targets=tuple(dict.fromkeys([*old.targets, *cfg.targets])),
        precisions=tuple(dict.fromkeys([*old.precisions, *cfg.precisions])))
    have = {(a["target"], a["precision"]) for a in manifest["artifacts"] if a.get("status") == "ok"}
    if set(plan(cfg)) <= have:  # asks for nothing the bundle lacks
        return None
    if old.quant != "fast":
        raise InputError(f"{out}: a --quant {old.quant} bundle cannot grow (its tuned weights are not kept in "
                         "the bundle); pass --force to rebuild it with every target or choose another --out")
    return union


def _what_differs(old: ConvertConfig, new: ConvertConfig, old_sha: str, new_sha: str) -> str | None:
    if old_sha != new_sha:
        return "model (its sha256 differs)"
    if conversion_key(_without_plan(old), old_sha) == conversion_key(_without_plan(new), new_sha):
        return None
    for name, flag in (("arch", "--arch"), ("calib", "--calib"), ("calib_images", "--calib-images"),
                       ("estimator", "--estimator"), ("quant", "--quant"), ("target_options", "--option"),
                       ("prune", "--prune"), ("preprocess", "--preprocess"), ("finetune_data", "--finetune-data"),
                       ("finetune_epochs", "--epochs"), ("seed", "--seed")):
        if getattr(old, name) != getattr(new, name):
            return f"{flag} ({getattr(old, name)!r} there, {getattr(new, name)!r} now)"
    return "--calib data (same path, but the file changed since)"


def prefill(out: Path, manifest: dict, grown: ConvertConfig, key: str) -> None:
    """Put the bundle's files and their step records into the grown build's staging folder."""
    from targets import shared_int8

    staging = staging_dir(out, key)
    if staging.exists():  # an interrupted growth: resume it as it is
        return
    tmp = staging.with_name(staging.name + f".prefill-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(out, tmp, ignore=shutil.ignore_patterns(MANIFEST, "*.lock"))
    steps = {"export": {"seconds": 0.0, "kept_from": str(out)}}
    for artifact in manifest["artifacts"]:
        if artifact.get("status") == "ok":
            steps[f"compile {artifact['target']} {artifact['precision']}"] = artifact
    calibration = manifest.get("calibration")
    shared = shared_int8()
    if calibration and calibration.get("qdq") and (tmp / RANGES_FILE).exists():
        ranges = {k: tuple(v) for k, v in json.loads((tmp / RANGES_FILE).read_text()).items()}
        (tmp / ".work").mkdir(exist_ok=True)
        record = shared.quantize_qdq(tmp / REFERENCE_FILE, ranges, tmp / ".work" / QDQ_FILE,
                                     options=dict(grown.target_options.get(shared.INFO.name, {})))
        if record != calibration["qdq"]:
            shutil.rmtree(tmp, ignore_errors=True)
            raise InputError(f"{out}: its int8 recipe cannot be rebuilt on this machine ({record} here, "
                             f"{calibration['qdq']} in the bundle); pass --force to rebuild it or choose another --out")
        steps["calibrate"] = calibration
    (tmp / STEPS_FILE).write_text(json.dumps(steps, indent=1))
    os.replace(tmp, staging)
    added = [f"{t} {p}" for t, p in plan(grown) if f"compile {t} {p}" not in steps]
    kept = [f"{a['target']} {a['precision']}" for a in manifest["artifacts"] if a.get("status") == "ok"]
    log(f"growing {out}: adding {', '.join(added) or 'nothing'} ({', '.join(kept)} kept)")
