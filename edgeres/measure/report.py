"""``report DIR``: one table of size, accuracy lost and latency per artifact, plus plots.

Everything comes from what the bundle already stores (``manifest.json``, ``eval.json``,
``bench.json``): a report never re-runs a model. Markdown goes to stdout and ``report.md``; with
``--html`` a self-contained ``report.html`` embeds the plots (PNG, base64) and the PNGs are also
written to ``plots/`` for docs.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass
from pathlib import Path

from edgeres.bundle import read_manifest, read_result, warn, write_text_atomic
from edgeres.measure.describe import labels_text
from edgeres.measure.remote_eval import DEVICE_EVAL_FILE, device_eval_table
from edgeres.errors import InputError
from edgeres.measure.paired import intervals_overlap
from edgeres.measure.records import (Run, artifact_sha, choose_bench, choose_eval, is_partial, latest_per_host_threads,
                                     matches)
from edgeres.tables import fmt, format_table
from edgeres.targets.base import atomic_path

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
PLOTS_DIR = "plots"
RESULTS_SCHEMA = "edgeres-results/1"
HEADERS = ["Target", "Precision", "Size MB", "Top-1", "Drop pp", "Drop 95% CI", "Agree %", "p50 ms", "p90 ms",
           "FPS", "Threads", "Status"]


@dataclass(frozen=True)
class ReportRow:
    """One artifact (or the fp32 reference) with its stored accuracy and latency."""

    target: str
    precision: str
    file: str | None
    size_mb: float | None
    top1: float | None
    top1_drop_pp: float | None
    p50_ms: float | None
    p90_ms: float | None
    fps: float | None
    status: str
    throttled: bool = False
    agreement_pct: float | None = None
    drop_ci95_pp: tuple[float, float] | None = None
    threads: int | None = None
    host: str | None = None

    @property
    def ok(self) -> bool:
        return self.status.startswith("ok")

    @property
    def label(self) -> str:
        return self.target if self.target == "reference" else f"{self.target} {self.precision}"

    @property
    def top1_interval(self) -> tuple[float, float] | None:
        """The 95 % interval of top-1 implied by the drop's (the reference is the fixed point of comparison)."""
        if self.top1 is None:
            return None
        if self.target == "reference":
            return self.top1, self.top1
        if self.drop_ci95_pp is None:
            return None
        ref_top1 = self.top1 + (self.top1_drop_pp or 0.0)
        return ref_top1 - self.drop_ci95_pp[1], ref_top1 - self.drop_ci95_pp[0]


@dataclass(frozen=True)
class ReportData:
    bundle: Path
    manifest: dict
    eval: dict | None
    bench: dict | None
    threads: int | None
    rows: tuple[ReportRow, ...]
    eval_run: Run | None = None
    bench_run: Run | None = None
    eval_runs: tuple[Run, ...] = ()
    bench_runs: tuple[Run, ...] = ()
    layers_run: Run | None = None


def load_report(bundle: str | Path, threads: int | None = None, *, eval_run: str | None = None,
                bench_run: str | None = None) -> ReportData:
    """Read the manifest and the kept eval/bench runs (the most complete / latest, or the ones asked for)."""
    bundle = Path(bundle)
    # verified like every other reader: a report must not describe files that were changed since
    manifest = read_manifest(bundle)
    chosen_eval, evals = choose_eval(bundle, manifest, eval_run)
    chosen_bench, threads, benches = choose_bench(bundle, manifest, bench_run, threads)
    evaluation = chosen_eval.doc if chosen_eval else None
    bench = chosen_bench.doc if chosen_bench else None
    shas = artifact_sha(manifest)
    evals_by = {(a["target"], a["precision"], a.get("file")): a for a in (evaluation or {}).get("artifacts", [])
                if matches(a, shas)}
    benches_by = {(r["target"], r["precision"], r.get("file")): r for r in (bench or {}).get("results", [])
                  if r["threads"] == threads and matches(r, shas)}
    host = (bench or {}).get("host")
    rows = []
    ref = manifest["reference"]
    ref_key = ("reference", ref.get("precision", "fp32"), ref["file"])
    ref_top1 = evaluation["reference"]["top1"] if evaluation else None
    rows.append(_row(*ref_key, ref.get("size_bytes"), "ok", {"top1": ref_top1} if ref_top1 is not None else None,
                     benches_by.get(ref_key), reference=True, host=host))
    for a in manifest["artifacts"]:
        if a.get("status") != "ok":
            rows.append(_row(a["target"], a["precision"], None, None, f"failed: {a.get('error', 'unknown error')}",
                             None, None))
            continue
        key = (a["target"], a["precision"], a["file"])
        rows.append(_row(*key, a.get("size_bytes"), "ok", evals_by.get(key), benches_by.get(key), host=host))
    layers_run = next((r for r in ([chosen_eval] if eval_run else []) + evals[::-1]
                       if r is not None and r.doc.get("layers")), None)
    return ReportData(bundle, manifest, evaluation, bench, threads, tuple(rows), chosen_eval, chosen_bench,
                      tuple(evals), tuple(benches), layers_run)


def _row(target, precision, file, size_bytes, status, ev, be, reference=False, host=None) -> ReportRow:
    problems = []
    if ev and ev.get("status") == "failed":
        problems.append(f"eval failed: {ev.get('error', '')}")
        ev = None
    if be and be.get("status") != "ok":
        problems.append(f"bench failed: {be.get('error', '')}")
        be = None
    if status == "ok" and problems:
        status = "; ".join(problems)
    elif status == "ok" and be and be.get("throttled"):
        status = "ok (throttled during bench)"
    ev, be = ev or {}, be or {}
    size_mb = size_bytes / 1e6 if size_bytes is not None else be.get("size_mb")
    ci = ev.get("top1_drop_ci95_pp")
    return ReportRow(target, precision, file, size_mb, ev.get("top1"),
                     0.0 if reference and ev else ev.get("top1_drop_pp"),
                     be.get("p50_ms"), be.get("p90_ms"), be.get("fps"), status, bool(be.get("throttled")),
                     agreement_pct=100.0 if reference and ev else ev.get("agreement_pct"),
                     drop_ci95_pp=tuple(ci) if ci else None, threads=be.get("threads"),
                     host=host if be else None)


def fmt_interval(ci: tuple[float, float] | None) -> str:
    return "" if ci is None else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def format_rows(rows) -> list[list[str]]:
    out = []
    for r in rows:
        ref = r.target == "reference" and r.top1 is not None
        out.append([r.target, r.precision, fmt(r.size_mb, ".2f"), fmt(r.top1, ".2f"),
                    "ref" if ref else fmt(r.top1_drop_pp, ".2f"), "" if ref else fmt_interval(r.drop_ci95_pp),
                    "" if ref else fmt(r.agreement_pct, ".2f"), fmt(r.p50_ms, ".2f"), fmt(r.p90_ms, ".2f"),
                    fmt(r.fps, ".1f"), fmt(r.threads, "d"), r.status])
    return out


def report_table(bundle: str | Path, threads: int | None = None, **runs) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) of the report table (see ``HEADERS``)."""
    return list(HEADERS), format_rows(load_report(bundle, threads, **runs).rows)


# --- the results document (report --json, the end of convert --json) ----------------------------

def results_document(data: ReportData) -> dict:
    """What the table says, for scripts: per artifact accuracy, drop with its 95 % interval, agreement,
    latency (with threads and host), size; and which kept runs it came from."""
    latest = latest_per_host_threads(list(data.bench_runs))
    shas = artifact_sha(data.manifest)

    def latency(r: ReportRow) -> list[dict]:
        out = []
        for (host, threads), run in sorted(latest.items()):
            row = next((e for e in run.doc.get("results", []) if e["threads"] == threads and matches(e, shas)
                        and (e["target"], e["precision"], e.get("file")) == (r.target, r.precision, r.file)), None)
            if row is not None and row.get("status") == "ok":
                out.append({"host": host, "threads": threads, "p50_ms": row.get("p50_ms"), "p90_ms": row.get("p90_ms"),
                            "fps": row.get("fps"), "bench_run": run.id})
        return out

    def entry(r: ReportRow) -> dict:
        return {"target": r.target, "precision": r.precision, "file": r.file, "status": r.status,
                "size_mb": None if r.size_mb is None else round(r.size_mb, 4), "top1": r.top1,
                "top1_drop_pp": r.top1_drop_pp,
                "top1_drop_ci95_pp": list(r.drop_ci95_pp) if r.drop_ci95_pp else None,
                "agreement_pct": r.agreement_pct, "p50_ms": r.p50_ms, "p90_ms": r.p90_ms, "fps": r.fps,
                "threads": r.threads, "host": r.host, "latency": latency(r)}

    ev, be = data.eval or {}, data.bench or {}
    return {
        "schema": RESULTS_SCHEMA,
        "bundle": str(data.bundle),
        "arch": data.manifest["arch"].get("name"),
        "drop_convention": "top1_drop_pp = reference top-1 − artifact top-1 (positive = accuracy lost)",
        "eval": None if data.eval_run is None else {
            "run": data.eval_run.id, "data": ev.get("data"), "data_fingerprint": ev.get("data_fingerprint"),
            "images": ev.get("images"), "dataset_images": ev.get("dataset_images"), "partial": is_partial(ev),
            "created": ev.get("created"), "ci_method": ev.get("ci_method"),
            "kept_runs": [r.id for r in data.eval_runs]},
        "bench": None if data.bench_run is None else {
            "run": data.bench_run.id, "host": be.get("host"), "threads": data.threads,
            "batch": (be.get("settings") or {}).get("batch"), "created": be.get("created"),
            "kept_runs": [r.id for r in data.bench_runs]},
        "reference": entry(data.rows[0]),
        "artifacts": [entry(r) for r in data.rows[1:]],
    }


# --- prose around the table ----------------------------------------------------------------------

def _accuracy_line(data: ReportData) -> str:
    ev, run = data.eval, data.eval_run
    images = f"{ev.get('images')} of {ev['dataset_images']}" if ev.get("dataset_images") else f"{ev.get('images')}"
    others = len(data.eval_runs) - 1
    line = (f"Accuracy: eval run {run.id} ({ev.get('created') or 'time not recorded'}), {images} images"
            + (f" from `{ev['data']}`" if ev.get("data") else "")
            + (f" (fingerprint {ev['data_fingerprint']})" if ev.get("data_fingerprint") else "")
            + (" — **partial** (`--limit`)" if is_partial(ev) else "")
            + (f"; {others} other run(s) kept (`--eval-run`)" if others > 0 else "")
            + "; drop = fp32 reference top-1 − artifact top-1, in percentage points (positive = accuracy lost), "
              "with its 95 % interval from the paired per-image outcomes (Newcombe's score interval for paired "
              "data); agree = share of images where the artifact's top-1 class equals the reference's; "
              "FPS = batch / mean latency.")
    if data.layers_run is not None and data.layers_run is not run:
        line += f" Per-layer SQNR from eval run {data.layers_run.id}."
    return line



def preprocess_text(pre: dict) -> str:
    from edgeres.calibration import DataError, Preprocess

    try:
        return Preprocess.from_dict(pre).describe()
    except (DataError, TypeError, ValueError):
        return "unreadable"


def context_lines(data: ReportData) -> list[str]:
    m = data.manifest
    arch = m["arch"]
    lines = []
    source = (m.get("source") or {}).get("path")
    macs = (m.get("cost") or {}).get("macs")
    lines.append(f"Model: {arch.get('name', '?')}" + (f" from `{source}`" if source else "")
                 + (f", {macs / 1e6:.1f} M MACs" if macs else "")
                 + f", input {m['preprocess'].get('size', '?')}².")
    lines.append(f"Preprocessing: {preprocess_text(m['preprocess'])}; classes: {labels_text(m.get('labels'), arch.get('num_classes'))}.")
    pruning = m.get("pruning")
    if pruning:
        ratio = pruning.get("ratio")
        lines.append(f"Pruning: ratio {ratio}" + (f", top-1 {pruning['top1_before']:.2f} → {pruning['top1_after']:.2f} %"
                                                    if "top1_before" in pruning and "top1_after" in pruning else "") + ".")
    calib = m.get("calibration")
    if calib:
        lines.append(f"Calibration: {calib.get('images')} images from `{calib.get('source')}`, "
                     f"{calib.get('estimator')} estimator.")
    budget = m.get("accuracy_budget")
    if budget:
        done = [a for a in budget.get("actions", []) if a.get("fits")]
        left = [a for a in budget.get("actions", []) if a.get("action") == "none left"]
        lines.append(f"Accuracy budget: {budget['budget_pp']} pp top-1 per int8 artifact; "
                     + ("; ".join(f"{a['target']} re-made with {a['action']} (drop {a['top1_drop_pp']:.2f} pp)"
                                  for a in done) or "no artifact needed re-making")
                     + "".join(f"; {a['target']} over budget: {a.get('detail', '')}" for a in left) + ".")
    if data.eval:
        lines.append(_accuracy_line(data))
    else:
        lines.append("Accuracy: not measured yet (run `edgeres eval DIR --data DATA`).")
    if data.bench:
        b, s = data.bench, data.bench.get("settings", {})
        system = b.get("system") or {}
        amount = f"{s.get('seconds')} s" if s.get("seconds") else f"{s.get('runs')} runs"
        others = len(data.bench_runs) - 1
        lines.append(f"Latency: bench run {data.bench_run.id} ({b.get('created') or 'time not recorded'}) on "
                     f"{b.get('host')} ({system.get('cpu_model', '?')}, governor "
                     f"{system.get('governor') or 'n/a'}), batch {s.get('batch')}, {data.threads} thread(s), "
                     f"{amount} after {s.get('warmup')} warm-up, one fresh process per artifact"
                     + (f"; {others} other run(s) kept (`--bench-run`, `--threads`)" if others > 0 else "") + ".")
        throttled = sorted({r["target"] + " " + r["precision"] for r in b.get("results", []) if r.get("throttled")})
        if throttled:
            lines.append(f"**Warning:** the device throttled while benchmarking {', '.join(throttled)}; "
                         "those latencies are not representative.")
    else:
        lines.append("Latency: not measured yet (run `edgeres bench DIR`).")
    return lines


def render_markdown(data: ReportData, plots: dict[str, Path] | None = None) -> str:
    name = data.bundle.resolve().name
    parts = [f"# edgeres report: {name}", "", *[f"- {line}" for line in context_lines(data)], "",
             format_table(HEADERS, format_rows(data.rows)), "", *device_section(data.bundle)]
    for title, path in (plots or {}).items():
        parts += [f"![{title}]({path.relative_to(data.bundle).as_posix()})", ""]
    return "\n".join(parts)


def device_section(bundle: Path) -> list[str]:
    """The accuracy measured on a device (``eval --remote``), beside this host's, when there is one."""
    stored = read_result(bundle, DEVICE_EVAL_FILE)
    if not stored:
        return []
    device = stored.get("device") or {}
    note = (" **Emulated** (" + "; ".join((device.get("emulation") or {}).get("evidence", [])) +
            "): the ARM kernels' accuracy, no latency claimed." if stored.get("emulated") else "")
    head = (f"## On the device: {stored.get('host')} ({device.get('machine', '?')}, {device.get('cpu_model', '?')})",
            "", f"- {stored.get('images')} images; top-1, drop and agreement with fp32 measured on the device; "
                f"device=host: the share of images where the device and this host predict the same class.{note}", "")
    return [*head, format_table(*device_eval_table(stored)), ""]


# --- plots ---------------------------------------------------------------------------------------

def pareto_front(points: list[tuple]) -> list[tuple]:
    """Points no other beats, by increasing latency. A point is ``(latency, accuracy)`` or
    ``(latency, accuracy, (low, high))`` with the accuracy's interval: A beats B when A is at least as
    fast and *surely* more accurate (intervals apart), or faster and not surely less accurate
    (intervals overlap) — so noise within the intervals never makes a point better."""
    def interval(p):
        return p[2] if len(p) > 2 and p[2] is not None else (p[1], p[1])

    def beats(a, b) -> bool:
        ia, ib = interval(a), interval(b)
        surely_better = ia[0] > ib[1]
        return (a[0] <= b[0] and surely_better) or (a[0] < b[0] and intervals_overlap(ia, ib))

    return sorted((p for p in points if not any(beats(q, p) for q in points if q is not p)),
                  key=lambda p: (p[0], -p[1]))


def _figure(width=6.4, height=4.2):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height), dpi=110)
    return plt, fig, ax


def _save(plt, fig, path: Path) -> bool:
    """Write the figure and free it (pyplot keeps every open figure alive otherwise)."""
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return True


def point_id(r: ReportRow) -> str:
    return re.sub(r"[^a-z0-9]+", "-", r.label.lower()).strip("-")


@dataclass(frozen=True)
class ChartLayout:
    """What covers what on the accuracy-vs-latency chart, measured in matplotlib's own display geometry."""

    points: int
    error_bars: int
    hidden: tuple[str, ...]  # points a label or the legend overlaps


# label positions tried in turn (offset in points, alignment), the first that covers nothing wins
LABEL_SPOTS = ((6, 5, "left", "bottom"), (6, -5, "left", "top"), (-6, 5, "right", "bottom"),
               (-6, -5, "right", "top"), (0, 9, "center", "bottom"), (0, -9, "center", "top"),
               (10, 0, "left", "center"), (-10, 0, "right", "center"))


def draw_accuracy_vs_latency(data: ReportData):
    """(plt, fig, layout) of top-1 vs p50 with the 95 % intervals as error bars, or None without data."""
    rows = sorted((r for r in data.rows if r.top1 is not None and r.p50_ms is not None), key=lambda r: r.p50_ms)
    if not rows:
        return None
    plt, fig, ax = _figure(7.6, 4.4)
    bars = 0
    for i, r in enumerate(rows):
        lo_hi = r.top1_interval
        if lo_hi is not None and r.target != "reference":
            eb = ax.errorbar(r.p50_ms, r.top1, yerr=[[r.top1 - lo_hi[0]], [lo_hi[1] - r.top1]], fmt="none",
                             ecolor="0.45", elinewidth=1, capsize=3, zorder=2)
            eb.lines[2][0].set_gid(f"errorbar-{point_id(r)}")
            bars += 1
        sc = ax.scatter(r.p50_ms, r.top1, zorder=4, **_marker_style(r, color=f"C{i % 10}"))
        sc.set_gid(f"point-{point_id(r)}")
    front = pareto_front([(r.p50_ms, r.top1, r.top1_interval) for r in rows])
    # rings as well as the line: a front of one point (one artifact beats all) has no line to see
    ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="tab:red", lw=1.2,
            marker="o", markersize=12, markerfacecolor="none", label="Pareto front (95 % intervals apart)", zorder=3)
    ax.set_xlabel(f"p50 latency, ms (batch {data.bench['settings'].get('batch')}, {data.threads} thread(s), "
                  f"{data.bench.get('host')})")
    ax.set_ylabel("top-1 accuracy, % (bars: 95 % interval)")
    ax.set_title("Accuracy vs latency")
    ax.grid(alpha=0.3)
    ax.margins(x=0.15, y=0.2)
    # outside the axes, so it can never cover a point
    legend = ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, borderaxespad=0)
    legend.set_gid("legend")
    fig.tight_layout()
    hidden = _place_labels(fig, ax, rows, legend)
    return plt, fig, ChartLayout(len(rows), bars, hidden)


SHAPES = ("o", "s", "^", "v", "P", "X")  # one per runtime, in targets.names() order; the reference is "D"


def _shape(target: str) -> str:
    from edgeres import targets

    names = targets.names()
    if target == "reference" or target not in names:
        return "D" if target == "reference" else "o"
    return SHAPES[names.index(target) % len(SHAPES)]


def _marker_style(r: ReportRow, color: str) -> dict:
    """A shape per runtime and filled for int8, hollow otherwise, so artifacts that measure the same
    (an fp32 ONNX and an fp32 TFLite at equal accuracy and latency) still show as two marks."""
    if r.throttled:
        return {"marker": "x", "s": 45, "color": color}
    color = "black" if r.target == "reference" else color
    filled = r.precision == "int8"
    return {"marker": _shape(r.target), "s": 42 if filled else 70, "linewidths": 1.4,
            "facecolors": color if filled else "none", "edgecolors": color}


def _place_labels(fig, ax, rows: list[ReportRow], legend) -> tuple[str, ...]:
    """Put each label at the first spot that covers no point, error bar or earlier label; returns the
    points still covered (none unless the chart is too crowded for every spot)."""
    renderer = fig.canvas.get_renderer()
    pts = [ax.transData.transform((r.p50_ms, r.top1)) for r in rows]
    radius = 6.0  # pixels around a marker's centre that a label may not touch
    obstacles = [_box(x - radius, y - radius, x + radius, y + radius) for x, y in pts]
    for r, (x, _) in zip(rows, pts):  # error bars too, so a label does not sit across one
        lo_hi = r.top1_interval
        if lo_hi is not None and lo_hi[0] != lo_hi[1]:
            y0, y1 = ax.transData.transform((r.p50_ms, lo_hi[0]))[1], ax.transData.transform((r.p50_ms, lo_hi[1]))[1]
            obstacles.append(_box(x - 3, y0, x + 3, y1))
    axes_box = ax.get_window_extent(renderer)
    placed = []
    for r in rows:
        best = None
        for dx, dy, ha, va in LABEL_SPOTS:
            text = ax.annotate(r.label, (r.p50_ms, r.top1), textcoords="offset points", xytext=(dx, dy), ha=ha,
                               va=va, fontsize=8, zorder=5)
            box = text.get_window_extent(renderer)
            clash = sum(box.overlaps(o) for o in obstacles + placed) + (not _inside(box, axes_box))
            if best is None or clash < best[0]:
                if best is not None:
                    best[1].remove()
                best = (clash, text, box)
            else:
                text.remove()
            if clash == 0:
                break
        best[1].set_gid(f"label-{point_id(r)}")
        placed.append(best[2])
    return layout_hidden(fig, ax, rows, legend)


def _box(x0, y0, x1, y1):
    from matplotlib.transforms import Bbox

    return Bbox([[x0, y0], [x1, y1]])


def _inside(box, outer) -> bool:
    return box.x0 >= outer.x0 and box.x1 <= outer.x1 and box.y0 >= outer.y0 and box.y1 <= outer.y1


def layout_hidden(fig, ax, rows: list[ReportRow], legend) -> tuple[str, ...]:
    """Labels of points whose marker a text (label) or the legend overlaps, in display coordinates."""
    renderer = fig.canvas.get_renderer()
    covers = [legend.get_window_extent(renderer)] + [t.get_window_extent(renderer) for t in ax.texts]
    hidden = []
    for r in rows:
        x, y = ax.transData.transform((r.p50_ms, r.top1))
        marker = _box(x - 3, y - 3, x + 3, y + 3)
        if any(marker.overlaps(c) for c in covers):
            hidden.append(r.label)
    return tuple(hidden)


def plot_accuracy_vs_latency(data: ReportData, path: Path, svg: Path | None = None) -> bool:
    drawn = draw_accuracy_vs_latency(data)
    if drawn is None:
        return False
    plt, fig, layout = drawn
    fig.savefig(path, format="png")
    if svg is not None:
        fig.savefig(svg, format="svg")
    plt.close(fig)
    return True


def waterfall_bars(data: ReportData) -> list[tuple[str, float, float, bool]]:
    """(label, bottom, top-1 after, is_level) per bar: levels are absolute accuracies, the rest are steps.

    Pruning (and fine-tuning) chain from the original model to the reference; each target's
    quantisation is an alternative branch, so every one of those starts again at the reference.
    """
    bars = []
    pruning = data.manifest.get("pruning") or {}
    if "top1_before" in pruning and "top1_after" in pruning:
        after_prune = pruning.get("top1_after_prune", pruning["top1_after"])
        bars.append(("original fp32", 0.0, pruning["top1_before"], True))
        bars.append(("pruning", pruning["top1_before"], after_prune, False))
        if after_prune != pruning["top1_after"]:
            bars.append(("fine-tune", after_prune, pruning["top1_after"], False))
    ref = next((r for r in data.rows if r.target == "reference"), None)
    if ref is None or ref.top1 is None:
        return bars
    bars.append(("fp32 reference", 0.0, ref.top1, True))
    bars += [(r.label, ref.top1, r.top1, False) for r in data.rows if r.target != "reference" and r.top1 is not None]
    return bars


def plot_waterfall(data: ReportData, path: Path) -> bool:
    bars = waterfall_bars(data)
    if not any(not level for *_, level in bars):
        return False
    plt, fig, ax = _figure(max(6.4, 0.9 * len(bars) + 2), 4.2)
    for x, (label, start, end, level) in enumerate(bars):
        if level:
            ax.bar(x, end, color="tab:blue")
            ax.annotate(f"{end:.2f}", (x, end), ha="center", va="bottom", fontsize=8)
        else:  # the one sign convention: drop pp, positive = accuracy lost
            drop = start - end
            ax.bar(x, end - start, bottom=start, width=0.6, color="tab:red" if drop > 0 else "tab:green")
            ax.annotate(f"drop {drop:.2f} pp", (x, max(start, end)), ha="center", va="bottom", fontsize=8)
    values = [v for _, start, end, level in bars for v in ((end,) if level else (start, end))]
    lo, hi = min(values), max(values)
    pad = max(1.0, (hi - lo) * 0.3)
    ax.set_ylim(max(0.0, lo - pad), min(100.0, hi + pad))  # zoomed: the drops are fractions of a point
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("top-1 accuracy, %")
    ax.set_title("Accuracy lost per step (drop pp, positive = lost)\n"
                 "each target's quantisation starts at the fp32 reference", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    return _save(plt, fig, path)


def plot_layer_sqnr(data: ReportData, path: Path) -> bool:
    layers = (data.layers_run.doc if data.layers_run else {}).get("layers") or []
    layers = [layer for layer in layers if layer.get("sqnr_db") is not None]
    if not layers:
        return False
    plt, fig, ax = _figure(6.4, max(3.0, 0.22 * len(layers) + 1.2))
    values = [layer["sqnr_db"] for layer in layers]
    worst = min(range(len(values)), key=values.__getitem__)
    colors = ["tab:red" if i == worst else "tab:blue" for i in range(len(values))]
    ax.barh(range(len(layers)), values, color=colors)
    ax.set_yticks(range(len(layers)), [f"{layer['name']} ({layer.get('op', '?')})" for layer in layers], fontsize=7)
    ax.invert_yaxis()  # first listed on top (eval lists the worst first)
    ax.set_xlabel("SQNR vs fp32, dB (higher is better)")
    ax.annotate(f" worst: {values[worst]:.1f} dB", (values[worst], worst), va="center", fontsize=8)
    ax.set_title("Per-layer SQNR, int8 vs fp32", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return _save(plt, fig, path)


PLOTS = (("Accuracy vs latency", "accuracy_vs_latency.png", plot_accuracy_vs_latency),
         ("Accuracy lost per step", "accuracy_waterfall.png", plot_waterfall),
         ("Per-layer SQNR (int8)", "layer_sqnr.png", plot_layer_sqnr))


def write_plots(data: ReportData) -> dict[str, Path]:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError("report --html: matplotlib is not installed; pip install 'edgeres[report]'") from None
    out_dir = data.bundle / PLOTS_DIR
    written = {}
    try:
        out_dir.mkdir(exist_ok=True)
        for title, name, plot in PLOTS:
            svg = out_dir / Path(name).with_suffix(".svg").name
            with atomic_path(out_dir / name) as tmp, atomic_path(svg) as svg_tmp:
                drawn = plot(data, tmp, svg_tmp) if plot is plot_accuracy_vs_latency else plot(data, tmp)
            if drawn:
                written[title] = out_dir / name
            else:
                (out_dir / name).unlink(missing_ok=True)  # a stale plot would contradict the table
            if not drawn or plot is not plot_accuracy_vs_latency:
                svg.unlink(missing_ok=True)
    except OSError as e:
        raise InputError(f"{out_dir}: cannot write the plots ({e.strerror}); report --html needs a writable "
                         "bundle (copy it somewhere writable)") from None
    return written


# --- HTML ----------------------------------------------------------------------------------------

CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,td:nth-child(2),td:last-child,th:first-child,th:nth-child(2),
th:last-child{text-align:left}
tr.failed td{background:#fdecea}figure{margin:1.5em 0}img{max-width:100%}code{background:#f5f5f5}"""
# lets a headless browser (and a test) see that every embedded image decoded, and — in the inline SVG
# chart, as the browser laid it out — how many error bars it shows and whether a label or the legend
# covers any point
SCRIPT = """window.addEventListener('load',function(){var imgs=Array.prototype.slice.call(document.images);
var ok=imgs.filter(function(i){return i.complete&&i.naturalWidth>0}).length;
document.body.setAttribute('data-images-decoded',ok+'/'+imgs.length);
var q=function(s){return Array.prototype.slice.call(document.querySelectorAll(s))};
var pts=q('svg [id^="point-"]'),covers=q('svg [id^="label-"]').concat(q('svg #legend'));
var hit=function(a,b){return a.left<b.right&&b.left<a.right&&a.top<b.bottom&&b.top<a.bottom};
var hidden=pts.filter(function(p){var r=p.getBoundingClientRect();var c={left:(r.left+r.right)/2-3,
right:(r.left+r.right)/2+3,top:(r.top+r.bottom)/2-3,bottom:(r.top+r.bottom)/2+3};
return covers.some(function(k){return hit(c,k.getBoundingClientRect())})}).map(function(p){return p.id});
document.body.setAttribute('data-points',pts.length);
document.body.setAttribute('data-error-bars',q('svg [id^="errorbar-"]').length);
document.body.setAttribute('data-hidden-points',hidden.join(' ')||'none');});"""


def render_html(data: ReportData, plots: dict[str, Path]) -> str:
    esc = html.escape
    name = esc(data.bundle.resolve().name)
    head = "".join(f"<th>{esc(h)}</th>" for h in HEADERS)
    body = []
    for row, cells in zip(data.rows, format_rows(data.rows)):
        cls = "ok" if row.ok else "failed"
        tds = "".join(f"<td>{esc(c)}</td>" for c in cells)
        body.append(f'<tr class="{cls}" data-target="{esc(row.target)}" data-precision="{esc(row.precision)}">{tds}</tr>')
    context = "".join(f"<li>{_inline_markup(esc(line))}</li>" for line in context_lines(data))
    figures = []
    for title, path in plots.items():
        svg = path.with_suffix(".svg")
        if svg.exists():  # inline, so the page (and a browser test) can see the chart's parts
            text = svg.read_text(encoding="utf-8")
            body_svg = text[text.index("<svg"):]
            figures.append(f'<figure role="img" aria-label="{esc(title)}">{body_svg}'
                           f"<figcaption>{esc(title)}</figcaption></figure>")
            continue
        b64 = base64.b64encode(path.read_bytes()).decode("ascii")
        figures.append(f'<figure><img alt="{esc(title)}" src="data:image/png;base64,{b64}">'
                       f"<figcaption>{esc(title)}</figcaption></figure>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>edgeres report: {name}</title>'
            f"<style>{CSS}</style></head>\n<body><h1>edgeres report: {name}</h1><ul>{context}</ul>\n"
            f'<table id="results"><thead><tr>{head}</tr></thead><tbody>\n' + "\n".join(body) +
            "\n</tbody></table>\n" + "\n".join(figures) + f"\n<script>{SCRIPT}</script></body></html>\n")


def _inline_markup(text: str) -> str:
    """The two Markdown marks the context lines use: `code` and **strong**."""
    parts = text.split("`")
    text = "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
    parts = text.split("**")
    return "".join(f"<strong>{p}</strong>" if i % 2 else p for i, p in enumerate(parts))


def write_report(bundle: str | Path, *, html_out: bool = False, threads: int | None = None,
                 eval_run: str | None = None, bench_run: str | None = None) -> dict:
    """Write ``report.md`` (and with ``html_out`` ``report.html`` + ``plots/*.png``); returns the Markdown and paths.

    A read-only bundle still gets its Markdown returned (to print), with one warning that it was not
    stored; ``--html`` has nothing to give without writing, so there it is an error."""
    data = load_report(bundle, threads, eval_run=eval_run, bench_run=bench_run)
    plots = write_plots(data) if html_out else {}
    markdown = render_markdown(data, plots)
    paths = {"markdown": data.bundle / REPORT_MD, "plots": plots}
    try:
        write_text_atomic(data.bundle / REPORT_MD, markdown)
    except InputError as e:
        if html_out:
            raise
        warn(f"{e} — the report was printed but not stored in the bundle")
        paths["markdown"] = None
    if html_out:
        write_text_atomic(data.bundle / REPORT_HTML, render_html(data, plots))
        paths["html"] = data.bundle / REPORT_HTML
    return {"markdown_text": markdown, "results": results_document(data), **paths}
