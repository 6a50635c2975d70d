"""``--accuracy-budget PP``: int8 artifacts that lose more top-1 than the budget are re-made with
better settings until they fit or no option is left — first other range estimators, then keeping the
layers with the worst per-layer SQNR in float. Each attempt is a real conversion + evaluation in a
hidden trial bundle, made by the builder and judged by the evaluator the caller hands in (this driver
never runs a whole conversion); an artifact that fits replaces the original in the bundle (atomically)."""

from __future__ import annotations

import functools
import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from edgeres import targets
from edgeres.bundle import (MANIFEST, file_record, publish, read_manifest, read_result, reference_path,
                            write_json_atomic)
from edgeres.int8 import STAGE as INT8_STAGE
from edgeres.measure.bundle_eval import EVAL_FILE
from edgeres.measure.layer_error import layer_sqnr_for_bundle
from edgeres.progress import log

ESTIMATOR_ORDER = ("mse", "entropy", "percentile", "minmax")
FLOAT_LAYER_STEPS = (1, 2, 4)  # how many of the most sensitive layers to keep in float, in turn


def over_budget(evaluated: dict, budget_pp: float) -> list[dict]:
    return [a for a in evaluated["artifacts"]
            if a["precision"] == "int8" and a.get("top1_drop_pp") is not None and a["top1_drop_pp"] > budget_pp]


@dataclass(frozen=True)
class Trial:
    """One better setting to try: another range estimator, or the k most sensitive layers in float."""

    label: str
    estimator: str | None = None
    float_layers: int = 0


def trials_for(cfg) -> list[Trial]:
    trials = [Trial(f"estimator {e}", estimator=e) for e in ESTIMATOR_ORDER if e != cfg.estimator]
    return trials + [Trial(f"{k} most sensitive layer(s) in float", float_layers=k) for k in FLOAT_LAYER_STEPS]


def enforce_accuracy_budget(cfg, budget_pp: float, *, build: Callable, evaluate: Callable, dataset) -> list[dict]:
    """Re-make over-budget int8 artifacts of the bundle at ``cfg.out``; returns what was done.

    ``build(trial_cfg)`` writes a trial bundle at ``trial_cfg.out`` and ``evaluate(path)`` returns its
    ``eval`` document: the caller's builder and evaluator, so trials reuse what the caller has loaded.
    ``dataset`` is the evaluation set (the per-layer error that ranks layers runs on it)."""
    out = Path(cfg.out)
    pending, actions = _pending(out, budget_pp)
    if pending:
        over = ", ".join(f"{t} int8 drops {a['top1_drop_pp']:.2f} pp" for t, a in pending.items())
        log(f"accuracy budget {budget_pp} pp: {over}")
        sensitive = functools.cache(lambda: _sensitive_nodes(out, dataset))
        for i, trial in enumerate(trials_for(cfg)):
            if not pending:
                break
            trial_cfg, label = _trial_config(cfg, out, i, trial, tuple(pending), sensitive)
            log(f"budget: trying {label}…")
            actions += _run_trial(out, trial_cfg, label, pending, budget_pp, build, evaluate)
        actions += [{"target": target, "precision": "int8", "action": "none left",
                     "detail": f"still drops {entry['top1_drop_pp']:.2f} pp after every option", "fits": False}
                    for target, entry in pending.items()]
    return _record(out, budget_pp, actions)


def _pending(out: Path, budget_pp: float) -> tuple[dict, list[dict]]:
    """Over-budget int8 artifacts that a better setting can help, and the actions for those it cannot."""
    pending = {a["target"]: a for a in over_budget(read_result(out, EVAL_FILE), budget_pp)}
    actions = []
    for target in list(pending):
        if not targets.get_info(target).budget_tunes:  # the runtime declares nothing a trial may change
            actions.append({"target": target, "precision": "int8", "action": "none left",
                            "detail": f"{target} declares no int8 setting the budget may tune "
                                      "(its full-int8 keeps every op int8); no better setting to try", "fits": False})
            pending.pop(target)
    return pending, actions


def _trial_config(cfg, out: Path, i: int, trial: Trial, pending: tuple[str, ...], sensitive: Callable):
    trial_cfg = replace(cfg, out=str(out.parent / f".{out.name}.budget-{i}"), targets=pending,
                        precisions=("int8",), bench=False, force=True, accuracy_budget_pp=None)
    if trial.estimator:
        return replace(trial_cfg, estimator=trial.estimator), trial.label
    nodes = sensitive()[: trial.float_layers]
    options = {t: dict(o) for t, o in cfg.target_options.items()}
    # float nodes are an int8 stage setting: the QDQ model every QDQ consumer compiles from keeps them
    options.setdefault(INT8_STAGE, {})["float_nodes"] = nodes
    return replace(trial_cfg, target_options=options), f"{trial.label}: {', '.join(nodes)}"


def _run_trial(out: Path, trial_cfg, label: str, pending: dict, budget_pp: float, build: Callable,
               evaluate: Callable) -> list[dict]:
    """Build and evaluate one trial bundle; splice what fits into ``out`` (and drop it from ``pending``)."""
    actions = []
    try:
        build(trial_cfg)
        for entry in evaluate(Path(trial_cfg.out))["artifacts"]:
            target = entry["target"]
            if target not in pending or entry.get("top1_drop_pp") is None:
                continue
            fits = entry["top1_drop_pp"] <= budget_pp
            actions.append({"target": target, "precision": "int8", "action": label,
                            "top1_drop_pp": entry["top1_drop_pp"], "fits": fits})
            if fits:
                _splice(out, Path(trial_cfg.out), target, entry, label)
                pending.pop(target)
    finally:
        shutil.rmtree(trial_cfg.out, ignore_errors=True)
    return actions


def _sensitive_nodes(bundle: Path, dataset) -> list[str]:
    """fp32 node names behind the quantised tensors with the lowest SQNR, worst first."""
    import onnx

    reference = reference_path(bundle, read_manifest(bundle))
    producer = {o: n for n in onnx.load(str(reference)).graph.node for o in n.output}
    nodes: list[str] = []
    for row in layer_sqnr_for_bundle(bundle, dataset):
        node = producer.get(row["name"])
        if node is None:
            continue
        if node.op_type == "Relu" and node.input[0] in producer:  # Conv+Relu is quantised as one
            node = producer[node.input[0]]
        if node.name and node.name not in nodes:
            nodes.append(node.name)
    return nodes


def _splice(out: Path, trial: Path, target: str, eval_entry: dict, label: str) -> None:
    """Put ``target``'s int8 artifact from the trial bundle into ``out`` (copy, then swap atomically)."""
    staging = out.parent / f".{out.name}.splice"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(out, staging)
    manifest = json.loads((staging / MANIFEST).read_text())
    new = next(a for a in read_manifest(trial)["artifacts"] if a["target"] == target and a["precision"] == "int8")
    for i, old in enumerate(manifest["artifacts"]):
        if old["target"] == target and old["precision"] == "int8":
            for rec in old.get("file_records", []):
                (staging / rec["file"]).unlink(missing_ok=True)
            for rel in new["files"]:
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(trial / rel, staging / rel)
            new = {**new, "file_records": [file_record(staging, f) for f in new["files"]],
                   "budget_action": label}
            manifest["artifacts"][i] = new
    write_json_atomic(staging / MANIFEST, manifest)
    evaluated = json.loads((staging / EVAL_FILE).read_text())
    evaluated["artifacts"] = [eval_entry if (a["target"], a["precision"]) == (target, "int8") else a
                              for a in evaluated["artifacts"]]
    write_json_atomic(staging / EVAL_FILE, evaluated)
    publish(staging, out)


def _record(out: Path, budget_pp: float, actions: list[dict]) -> list[dict]:
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["accuracy_budget"] = {"budget_pp": budget_pp, "actions": actions}
    write_json_atomic(out / MANIFEST, manifest)
    for a in actions:
        verdict = "fits" if a["fits"] else "does not fit"
        outcome = (f" → drop {a['top1_drop_pp']:.2f} pp ({verdict})" if "top1_drop_pp" in a
                   else f" ({a.get('detail', '')})")
        log(f"budget: {a['target']} int8 — {a['action']}{outcome}")
    return actions
