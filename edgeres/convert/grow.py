"""A bundle grows: ``convert`` with the same source, calibration and options as an existing bundle but
more targets or precisions adds exactly the (target, precision) pairs asked for and keeps the finished
ones (same files, same records), instead of refusing or rebuilding everything with ``--force``. The
same path retries the artifacts of an earlier run that failed (a killed worker): a failed row is never
"up to date".

How: the bundle's own config is replayed with the data digests its manifest records, to check it was
made from exactly this source, data (by content) and options; the new build's staging folder is then
prefilled with the bundle's hashed files and the step records they stand for (export, calibration, each
artifact), the way ``edgeres/sweep`` shares steps, so ``build_bundle`` makes only what is missing. It
publishes with ``keep_results``: every other file of the bundle — evaluations and benchmarks kept
while it grew, even after an interrupted grow — is carried over at the moment of publishing. The
shared QDQ model is rebuilt from the kept ``calibration_ranges.json`` (no calibration pass), so the
ranges stay byte for byte those of the old artifacts. Growth is for ``--quant fast`` bundles; the other
presets' tuned weights are not kept in the bundle, so those rebuild with ``--force`` (or, to retry a
failed artifact of the same plan, rebuild in full, keeping their results).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from edgeres.bundle import REFERENCE_FILE, listed_files
from edgeres.convert.build import QDQ_FILE, RANGES_FILE, STEPS_FILE, int8_options, os_reason, qdq_recipe, staging_dir
from edgeres.convert.config import ConvertConfig, conversion_key, data_digests, plan
from edgeres.errors import InputError
from edgeres.int8 import quantize_qdq
from edgeres.progress import log

_TUPLES = ("targets", "precisions", "bench_threads")
# the plan (what a grow adds) and the data (compared by content) are not settings that must match
_COMPARED_APART = {"targets", "precisions", "pairs", "force", "calib", "finetune_data", "labels"}
_FLAGS = {"arch": "--arch", "calib_images": "--calib-images", "estimator": "--estimator", "quant": "--quant",
          "target_options": "--option", "prune": "--prune", "prune_importance": "--prune-importance",
          "preprocess": "--preprocess", "finetune_epochs": "--epochs", "seed": "--seed", "threads": "--threads"}
_DATA_FLAGS = {"calib": "--calib", "finetune_data": "--finetune-data", "labels": "--labels"}


def replayed_config(manifest: dict) -> ConvertConfig | None:
    """The ``ConvertConfig`` a bundle was made with, from its manifest (None: not readable as one)."""
    given = manifest.get("config")
    if not isinstance(given, dict):
        return None
    names = {f.name for f in dataclasses.fields(ConvertConfig)}
    try:
        values = {k: (tuple(v) if k in _TUPLES and isinstance(v, list) else v) for k, v in given.items() if k in names}
        if values.get("pairs") is not None:
            values["pairs"] = tuple((str(t), str(p)) for t, p in values["pairs"])
        return ConvertConfig(**values)
    except (TypeError, ValueError):
        return None


def _without_plan(cfg: ConvertConfig) -> ConvertConfig:
    return dataclasses.replace(cfg, targets=(), precisions=(), pairs=None, force=False)


def ok_pairs(manifest: dict) -> set[tuple[str, str]]:
    return {(a["target"], a["precision"]) for a in manifest["artifacts"] if a.get("status") == "ok"}


def grown_config(cfg: ConvertConfig, manifest: dict, source_sha256: str,
                 digests: dict | None = None) -> ConvertConfig | None:
    """The config of the grown bundle — the bundle's (target, precision) pairs plus those ``cfg`` asks
    for, nothing else — or None when ``cfg`` asks for nothing the bundle lacks (a failed artifact is
    lacking: it is retried). Raises ``InputError`` naming what differs when the bundle cannot grow into it.
    ``digests``: ``data_digests(cfg)`` when the caller has them."""
    old = replayed_config(manifest)
    out = cfg.out
    old_digests = manifest.get("data_sha256")
    old_key = manifest.get("conversion_key")
    if (old is None or not isinstance(old_digests, dict)
            or conversion_key(old, manifest["source"]["sha256"], old_digests) != old_key):
        raise InputError(f"{out}: already holds a bundle whose recorded settings cannot be checked against "
                         "this run (made by another edgeres version); pass --force to replace it or choose "
                         "another --out")
    digests = data_digests(cfg) if digests is None else digests
    differs = _what_differs(old, cfg, manifest["source"]["sha256"], source_sha256, old_digests, digests)
    if differs:
        raise InputError(f"{out}: already holds a bundle made with another {differs}; pass --force to replace "
                         "it or choose another --out")
    if set(plan(cfg)) <= ok_pairs(manifest):  # asks for nothing the bundle lacks
        return None
    pairs = list(dict.fromkeys([*plan(old), *plan(cfg)]))
    grown = dataclasses.replace(
        cfg, targets=tuple(dict.fromkeys([*old.targets, *cfg.targets])),
        precisions=tuple(dict.fromkeys([*old.precisions, *cfg.precisions])), pairs=None)
    if set(plan(grown)) != set(pairs):  # every target × precision would be more than asked for
        grown = dataclasses.replace(grown, pairs=tuple(pairs))
    if old.quant != "fast" and conversion_key(grown, source_sha256, digests) != old_key:
        raise InputError(f"{out}: a --quant {old.quant} bundle cannot grow (its tuned weights are not kept in "
                         "the bundle); pass --force to rebuild it with every target or choose another --out")
    return grown


def _what_differs(old: ConvertConfig, new: ConvertConfig, old_sha: str, new_sha: str, old_digests: dict,
                  new_digests: dict) -> str | None:
    if old_sha != new_sha:
        return "model (its sha256 differs)"
    if (conversion_key(_without_plan(old), old_sha, old_digests)
            == conversion_key(_without_plan(new), new_sha, new_digests)):
        return None
    for name, flag in _DATA_FLAGS.items():
        was, now = old_digests.get(name), new_digests.get(name)
        if was != now:
            if was is None or now is None:
                return f"{flag} ({getattr(old, name)!r} there, {getattr(new, name)!r} now)"
            return (f"{flag} data (its content differs: sha256 {was[:12]}… there, {getattr(new, name)} is "
                    f"{now[:12]}… now)")
    base = conversion_key(_without_plan(old), old_sha, old_digests)
    for f in dataclasses.fields(ConvertConfig):  # the first setting that alone changes the key
        was, now = getattr(old, f.name), getattr(new, f.name)
        if f.name in _COMPARED_APART or was == now:
            continue
        if conversion_key(dataclasses.replace(_without_plan(old), **{f.name: now}), old_sha, old_digests) != base:
            return f"{_FLAGS.get(f.name, '--' + f.name.replace('_', '-'))} ({was!r} there, {now!r} now)"
    return "combination of settings (the conversion key differs)"


def prefill(out: Path, manifest: dict, grown: ConvertConfig, key: str) -> None:
    """Put the bundle's hashed files and their step records into the grown build's staging folder (its
    kept results come over when it is published). On a full disk: one line, nothing left behind."""
    staging = staging_dir(out, key)
    for stale in staging.parent.glob(f"{staging.name}.prefill-*"):  # a killed grow's (we hold the output lock)
        shutil.rmtree(stale, ignore_errors=True)
    if staging.exists():  # an interrupted growth: resume it as it is
        return
    tmp = staging.with_name(staging.name + f".prefill-{os.getpid()}")
    try:
        steps = _prefill_into(tmp, out, manifest, grown)
        os.replace(tmp, staging)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise InputError(f"{out}: growing it needs a copy of its artifacts beside it in {tmp.parent}, and writing "
                         f"that failed ({os_reason(e)}); the bundle is unchanged — free disk space or choose "
                         "another --out") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    added = [f"{t} {p}" for t, p in plan(grown) if f"compile {t} {p}" not in steps]
    kept = [f"{a['target']} {a['precision']}" for a in manifest["artifacts"] if a.get("status") == "ok"]
    log(f"growing {out}: adding {', '.join(added) or 'nothing'} ({', '.join(kept) or 'nothing'} kept)")


def _prefill_into(tmp: Path, out: Path, manifest: dict, grown: ConvertConfig) -> dict:
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for record in listed_files(manifest):  # read_manifest verified them all
        dst = tmp / record["file"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(out / record["file"], dst)
    steps = {"export": {"seconds": 0.0, "kept_from": str(out)}}
    for artifact in manifest["artifacts"]:
        if artifact.get("status") == "ok":
            steps[f"compile {artifact['target']} {artifact['precision']}"] = artifact
    calibration = manifest.get("calibration")
    recipe = qdq_recipe(grown)
    if calibration and calibration.get("qdq") and recipe is not None and (tmp / RANGES_FILE).exists():
        ranges = {k: tuple(v) for k, v in json.loads((tmp / RANGES_FILE).read_text()).items()}
        (tmp / ".work").mkdir(exist_ok=True)
        record = quantize_qdq(tmp / REFERENCE_FILE, ranges, tmp / ".work" / QDQ_FILE, recipe=recipe,
                              options=int8_options(grown))
        if record != calibration["qdq"]:
            raise InputError(f"{out}: its int8 recipe cannot be rebuilt on this machine ({record} here, "
                             f"{calibration['qdq']} in the bundle); pass --force to rebuild it or choose another --out")
        steps["calibrate"] = calibration
    elif calibration and calibration.get("ranges_file") and (tmp / RANGES_FILE).exists():
        steps["calibrate"] = calibration  # the kept ranges serve consumers that match them by value
    (tmp / STEPS_FILE).write_text(json.dumps(steps, indent=1))
    return steps
