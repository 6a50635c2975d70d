"""Trial rows from the conversions' and benchmarks' results, the Pareto front and the best pick."""

from __future__ import annotations

from pathlib import Path

from edgeres.sweep.grid import SweepConfig, Trial

OBJECTIVE_KEYS = {"latency": "p50_ms", "size": "size_mb"}


def trial_row(trial: Trial, built: dict, bench: dict | None, baseline_top1: float | None) -> dict:
    """One row of ``sweep.json``: the trial's settings, accuracy (vs the unpruned fp32 model), size, latency."""
    conv = trial.conversion
    row = {"name": f"{conv.name}-t{trial.threads}", "status": "failed", "prune": conv.prune,
           "precision": conv.precision, "target": conv.target, "estimator": conv.estimator if conv.precision == "int8"
           else None, "threads": trial.threads, "bundle": str(Path(conv.name)), "top1": None, "top1_drop_pp": None,
           "conversion_drop_pp": None, "agreement_pct": None, "p50_ms": None, "p90_ms": None, "fps": None,
           "size_mb": None, "macs": None, "error": None}
    if "error" in built:
        return {**row, "error": built["error"]}
    artifact, entry = built["artifact"], built.get("eval") or {}
    if artifact["status"] != "ok":
        return {**row, "error": artifact.get("error", "compile failed")}
    row["size_mb"] = round(artifact["size_bytes"] / 1e6, 4)
    row["macs"] = (built.get("pruning") or {}).get("macs_after")
    if entry.get("status", "ok") != "ok" or "top1" not in entry:
        return {**row, "error": entry.get("error", "not evaluated")}
    row.update(top1=entry["top1"], conversion_drop_pp=entry.get("top1_drop_pp"),
               agreement_pct=entry.get("agreement_pct"))
    if baseline_top1 is not None:
        row["top1_drop_pp"] = round(baseline_top1 - entry["top1"], 4)
    if bench is None or "error" in bench:
        return {**row, "error": f"benchmark failed: {(bench or {}).get('error', 'not run')}"}
    measured = next((r for r in bench.get("results", []) if r["target"] == conv.target
                     and r["precision"] == conv.precision and r["threads"] == trial.threads), None)
    if measured is None or measured.get("status") != "ok":
        return {**row, "error": f"benchmark failed: {(measured or {}).get('error', 'no result')}"}
    row.update(p50_ms=measured["p50_ms"], p90_ms=measured.get("p90_ms"), fps=measured.get("fps"), status="ok")
    return row


def pareto(rows: list[dict], objective: str) -> list[dict]:
    """Ok trials no other beats on both accuracy drop and the objective (lower is better), by objective."""
    key = OBJECTIVE_KEYS[objective]
    ok = [r for r in rows if r["status"] == "ok" and r["top1_drop_pp"] is not None and r[key] is not None]
    front, best_drop = [], float("inf")
    for r in sorted(ok, key=lambda r: (r[key], r["top1_drop_pp"])):
        if r["top1_drop_pp"] < best_drop:
            front.append(r)
            best_drop = r["top1_drop_pp"]
    return front


def best_within(rows: list[dict], objective: str, budget_pp: float | None) -> dict | None:
    """The lowest objective among ok trials whose drop is within the budget (ties: smaller drop)."""
    if budget_pp is None:
        return None
    key = OBJECTIVE_KEYS[objective]
    fits = [r for r in pareto(rows, objective) if r["top1_drop_pp"] <= budget_pp]
    return min(fits, key=lambda r: (r[key], r["top1_drop_pp"]), default=None)


def sweep_document(cfg: SweepConfig, engine: dict, rows: list[dict], baseline: dict, shared: dict,
                   wall_s: float) -> dict:
    front = pareto(rows, cfg.objective)
    return {"schema": "edgeres-sweep/1", "engine": engine, "config": cfg.to_dict(), "objective": cfg.objective,
            "accuracy_budget_pp": cfg.accuracy_budget_pp, "baseline": baseline, "shared": shared,
            "wall_s": round(wall_s, 1), "trials": rows, "pareto": [r["name"] for r in front],
            "best": best_within(rows, cfg.objective, cfg.accuracy_budget_pp)}
