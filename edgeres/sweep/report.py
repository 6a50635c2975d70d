"""The sweep's report: the trial table (Markdown, ``sweep.md``), and with ``--html`` a page with the
accuracy-drop-vs-latency and -vs-size plots, the Pareto front and the best trial marked."""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

from edgeres.bundle import write_text_atomic
from edgeres.errors import InputError
from edgeres.tables import fmt

SWEEP_MD = "sweep.md"
SWEEP_HTML = "sweep.html"
PLOT = "sweep_pareto.png"
HEADERS = ["trial", "prune", "precision", "target", "threads", "top-1 %", "drop pp", "agree %", "p50 ms", "size MB",
           "status"]


def table(doc: dict) -> tuple[list[str], list[list[str]]]:
    front, best = set(doc["pareto"]), (doc.get("best") or {}).get("name")
    rows = []
    for r in doc["trials"]:
        mark = " ★" if r["name"] == best else (" ◆" if r["name"] in front else "")
        status = "ok" if r["status"] == "ok" else f"failed: {r.get('error') or ''}"
        rows.append([r["name"] + mark, f"{r['prune']:g}", r["precision"], r["target"], str(r["threads"]),
                     fmt(r["top1"], ".2f"), fmt(r["top1_drop_pp"], ".2f"), fmt(r["agreement_pct"], ".1f"),
                     fmt(r["p50_ms"], ".3f"), fmt(r["size_mb"], ".3f"), status])
    return HEADERS, rows


def summary_lines(doc: dict) -> list[str]:
    e, base, best = doc["engine"], doc["baseline"], doc.get("best")
    lines = [f"Ray {e['ray_version']} ({e['mode']}, {e['address']}, {e['nodes']} node(s), {e['cpus']:g} CPUs); "
             f"{len(doc['trials'])} trials in {doc['wall_s']:.0f} s",
             f"drop = top-1 of the unpruned fp32 model ({fmt(base['top1'], '.2f')} % on {base['images']} images) "
             "minus the trial's; ◆ Pareto front (drop vs " + doc["objective"] + "), ★ best"]
    if doc["accuracy_budget_pp"] is None:
        lines.append("no --accuracy-budget given: no best pick")
    elif best is None:
        lines.append(f"no trial is within the {doc['accuracy_budget_pp']:g} pp budget")
    else:
        lines.append(f"best within {doc['accuracy_budget_pp']:g} pp by {doc['objective']}: {best['name']} "
                     f"(drop {best['top1_drop_pp']:.2f} pp, p50 {best['p50_ms']:.3f} ms, {best['size_mb']:.3f} MB)")
    return lines


def markdown(doc: dict, plot: str | None = None) -> str:
    headers, rows = table(doc)
    lines = ["# edgeres sweep", "", *(f"- {l}" for l in summary_lines(doc)), "",
             "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
    if plot:
        lines += ["", f"![accuracy drop vs latency and size]({plot})"]
    return "\n".join(lines) + "\n"


def plot_pareto(doc: dict, path: Path) -> bool:
    """Two panels, drop vs p50 latency and drop vs size, every ok trial a point, the front a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in doc["trials"] if r["status"] == "ok" and r["top1_drop_pp"] is not None]
    if not ok:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=90)
    best = (doc.get("best") or {}).get("name")
    for ax, key, label in ((axes[0], "p50_ms", "p50 latency, ms (batch 1)"), (axes[1], "size_mb", "size, MB")):
        for i, r in enumerate(sorted(ok, key=lambda r: (r["top1_drop_pp"], r[key]))):
            ax.scatter(r[key], r["top1_drop_pp"], s=30, color="tab:blue", zorder=3)
            # alternate above/below so neighbours at equal accuracy do not print over each other
            ax.annotate(f"{r['target']} {r['precision']} p{r['prune']:g} t{r['threads']}", (r[key], r["top1_drop_pp"]),
                        textcoords="offset points", xytext=(4, 5 if i % 2 == 0 else -11), fontsize=7)
        front = _front(ok, key)
        ax.step([r[key] for r in front], [r["top1_drop_pp"] for r in front], where="post", color="tab:red",
                lw=1.2, marker="o", markersize=10, markerfacecolor="none", label="Pareto front", zorder=2)
        for r in ok:
            if r["name"] == best:
                ax.scatter(r[key], r["top1_drop_pp"], s=160, marker="*", color="gold", edgecolor="k", zorder=4,
                           label="best within budget")
        if doc["accuracy_budget_pp"] is not None:
            ax.axhline(doc["accuracy_budget_pp"], color="grey", ls="--", lw=0.8, label="accuracy budget")
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 drop vs fp32, pp")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center right")
    fig.suptitle("edgeres sweep: accuracy drop vs latency and size")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _front(rows: list[dict], key: str) -> list[dict]:
    front, best = [], float("inf")
    for r in sorted(rows, key=lambda r: (r[key], r["top1_drop_pp"])):
        if r["top1_drop_pp"] < best:
            front.append(r)
            best = r["top1_drop_pp"]
    return front


def write_sweep_report(out: Path, doc: dict, *, html_out: bool = False) -> dict:
    """``sweep.md`` always; with ``html_out`` also ``sweep.html`` with the plot (and ``sweep_pareto.png``)."""
    out = Path(out)
    plot = None
    if html_out:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise InputError("--html: matplotlib is not installed; pip install 'edgeres[report]'") from None
        tmp = out / f".{PLOT}.tmp.png"
        if plot_pareto(doc, tmp):
            tmp.replace(out / PLOT)
            plot = PLOT
    text = markdown(doc, plot)
    write_text_atomic(out / SWEEP_MD, text)
    paths = {"markdown_text": text, "markdown": out / SWEEP_MD}
    if html_out:
        write_text_atomic(out / SWEEP_HTML, _html(doc, out / PLOT if plot else None))
        paths["html"] = out / SWEEP_HTML
    return paths


def _html(doc: dict, plot: Path | None) -> str:
    esc = html.escape
    headers, rows = table(doc)
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "\n".join(f'<tr class="{"ok" if r["status"] == "ok" else "failed"}">'
                     + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>"
                     for r, cells in zip(doc["trials"], rows))
    img = ""
    if plot is not None:
        img = (f'<figure><img alt="accuracy drop vs latency and size" src="data:image/png;base64,'
               f'{base64.b64encode(plot.read_bytes()).decode("ascii")}"></figure>')
    items = "".join(f"<li>{esc(l)}</li>" for l in summary_lines(doc))
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>edgeres sweep</title><style>'
            "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:3px 7px}tr.failed td{background:#fdecea}img{max-width:100%}"
            f"</style></head><body><h1>edgeres sweep</h1><ul>{items}</ul><table><thead><tr>{head}</tr></thead>"
            f"<tbody>\n{body}\n</tbody></table>{img}</body></html>\n")


def read_sweep(folder: Path) -> dict:
    """``sweep.json`` of a sweep folder (for ``edgeres report DIR``), checked to hold what the report shows."""
    path = Path(folder) / "sweep.json"
    rerun = "re-run the same `edgeres sweep` (finished trials are skipped)"
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot be read ({e}); {rerun}") from None
    problem = sweep_problem(doc)
    if problem:
        raise InputError(f"{path}: damaged ({problem}); {rerun}")
    return doc


# what the report reads of sweep.json: key → (types, may be None); numbers must be finite
_NUMBER, _TEXT, _INT = (int, float), (str,), (int,)
_KIND_NAMES = {_NUMBER: "a finite number", _TEXT: "text", _INT: "an integer", (dict,): "an object", (list,): "a list"}
_TOP = {"engine": ((dict,), False), "baseline": ((dict,), False), "trials": ((list,), False),
        "pareto": ((list,), False), "best": ((dict,), True), "objective": (_TEXT, False),
        "accuracy_budget_pp": (_NUMBER, True), "wall_s": (_NUMBER, False)}
_ENGINE = {"ray_version": (_TEXT, False), "mode": (_TEXT, False), "address": (_TEXT, True), "nodes": (_INT, False),
           "cpus": (_NUMBER, False)}
_BASELINE = {"top1": (_NUMBER, True), "images": (_INT, True)}
_TRIAL = {"name": (_TEXT, False), "status": (_TEXT, False), "prune": (_NUMBER, False), "precision": (_TEXT, False),
          "target": (_TEXT, False), "threads": (_INT, False), "top1": (_NUMBER, True), "top1_drop_pp": (_NUMBER, True),
          "agreement_pct": (_NUMBER, True), "p50_ms": (_NUMBER, True), "size_mb": (_NUMBER, True),
          "error": (_TEXT, True)}
_BEST = {"name": (_TEXT, False), "top1_drop_pp": (_NUMBER, False), "p50_ms": (_NUMBER, False),
         "size_mb": (_NUMBER, False)}


def sweep_problem(doc) -> str | None:
    """What makes ``doc`` unusable as a sweep document (a key missing or of the wrong kind), or None."""
    if not isinstance(doc, dict):
        return "not a JSON object"
    problem = _fields_problem(doc, _TOP, "")
    for key, spec in (("engine", _ENGINE), ("baseline", _BASELINE), ("best", _BEST)):
        problem = problem or (doc[key] is not None and _fields_problem(doc[key], spec, f"{key}."))
    for i, row in enumerate(doc["trials"] if not problem else []):
        problem = problem or (_fields_problem(row, _TRIAL, f"trials[{i}].") if isinstance(row, dict)
                              else f"trials[{i}] is not an object")
    if not problem and not all(isinstance(n, str) for n in doc["pareto"]):
        problem = "pareto is not a list of trial names"
    return problem or None


def _fields_problem(d: dict, spec: dict, where: str) -> str | None:
    for key, (kinds, optional) in spec.items():
        if key not in d:
            return f"{where}{key} is missing"
        v = d[key]
        if v is None and optional:
            continue
        if not isinstance(v, kinds) or isinstance(v, bool) or (isinstance(v, float) and not math.isfinite(v)):
            return f"{where}{key} is {json.dumps(v)[:40]}, not {_KIND_NAMES[kinds]}"
    return None
