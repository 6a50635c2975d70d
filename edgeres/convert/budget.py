"""``--accuracy-budget PP``: int8 artifacts that lose more top-1 than the budget are re-made with
better settings until they fit or no option is left — first other range estimators, then keeping the
layers with the worst per-layer SQNR in float. Each attempt is a real conversion + evaluation in a
hidden trial bundle; an artifact that fits replaces the original in the bundle (atomically)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import targets
from edgeres.bundle import MANIFEST, file_record, publish, read_manifest, read_result, write_json_atomic
from edgeres.progress import log

ESTIMATOR_ORDER = ("mse", "entropy", "percentile", "minmax")
FLOAT_LAYER_STEPS = (1, 2, 4)  # how many of the most sensitive layers to keep in float, in turn


def over_budget(evaluated: dict, budget_pp: float) -> list[dict]:
    return [a for a in evaluated["artifacts"]
            if a["precision"] == "int8" and a.get("top1_drop_pp") is not None and a["top1_drop_pp"] > budget_pp]


def enforce_accuracy_budget(cfg, budget_pp: float) -> list[dict]:
    """Re-make over-budget int8 artifacts of the bundle at ``cfg.out``; returns what was done."""
    from edgeres.measure.bundle_eval import EVAL_FILE
    from calibration import open_dataset

    out = Path(cfg.out)
    actions: list[dict] = []
    evaluated = read_result(out, EVAL_FILE)
    pending = {a["target"]: a for a in over_budget(evaluated, budget_pp)}
    for target in list(pending):
        if targets.get_info(target).consumes != targets.QDQ_ONNX:  # only the shared QDQ model takes these options
            actions.append({"target": target, "precision": "int8", "action": "none left",
                            "detail": f"{target} full-int8 keeps every op int8 and calibrates in its converter; "
                                      "no better setting to try", "fits": False})
            pending.pop(target)
    if not pending:
        return _record(out, budget_pp, actions)
    over = ", ".join(f"{t} int8 drops {a['top1_drop_pp']:.2f} pp" for t, a in pending.items())
    log(f"accuracy budget {budget_pp} pp: {over}")

    trials: list[tuple[str, dict]] = [(f"estimator {e}", {"estimator": e}) for e in ESTIMATOR_ORDER if e != cfg.estimator]
    sensitive: list[str] | None = None
    for k in FLOAT_LAYER_STEPS:
        trials.append((f"{k} most sensitive layer(s) in float", {"float_layers": k}))

    for i, (label, change) in enumerate(trials):
        if not pending:
            break
        trial_cfg = replace(cfg, out=str(out.parent / f".{out.name}.budget-{i}"), targets=tuple(pending),
                            precisions=("int8",), bench=False, force=True)
        if "estimator" in change:
            trial_cfg = replace(trial_cfg, estimator=change["estimator"])
        else:
            if sensitive is None:
                sensitive = _sensitive_nodes(out, open_dataset(cfg.eval_data))
            nodes = sensitive[: change["float_layers"]]
            options = {t: dict(o) for t, o in cfg.target_options.items()}
            # the shared QDQ model (which every QDQ consumer compiles from) takes its recipe's options
            options.setdefault(targets.shared_int8().INFO.name, {})["float_nodes"] = nodes
            trial_cfg = replace(trial_cfg, target_options=options)
            label = f"{label}: {', '.join(nodes)}"
        log(f"budget: trying {label}…")
        from edgeres.convert.pipeline import convert

        try:
            convert(trial_cfg)
            trial_eval = read_result(Path(trial_cfg.out), EVAL_FILE)
            for entry in trial_eval["artifacts"]:
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
    for target, entry in pending.items():
        actions.append({"target": target, "precision": "int8", "action": "none left",
                        "detail": f"still drops {entry['top1_drop_pp']:.2f} pp after every option", "fits": False})
    return _record(out, budget_pp, actions)


def _sensitive_nodes(bundle: Path, dataset) -> list[str]:
    """fp32 node names behind the quantised tensors with the lowest SQNR, worst first."""
    import onnx

    from edgeres.bundle import reference_path
    from edgeres.measure.layer_error import layer_sqnr_for_bundle

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
    from edgeres.measure.bundle_eval import EVAL_FILE

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
