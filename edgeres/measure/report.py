"""``report DIR``: one table of size, accuracy lost and latency per artifact, plus plots.

Everything comes from what the bundle already stores (``manifest.json``, ``eval.json``,
``bench.json``): a report never re-runs a model. Markdown goes to stdout and ``report.md``; with
``--html`` a self-contained ``report.html`` embeds the plots (PNG, base64) and the PNGs are also
written to ``plots/`` for docs.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path

from edgeres.measure.bench import BENCH_FILE
from edgeres.bundle import read_manifest, read_result, warn, write_text_atomic
from edgeres.measure.bundle_eval import EVAL_FILE
from edgeres.measure.remote_eval import DEVICE_EVAL_FILE, device_eval_table
from edgeres.errors import InputError
from edgeres.tables import fmt, format_table
from targets.base import atomic_path

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
PLOTS_DIR = "plots"
HEADERS = ["Target", "Precision", "Size MB", "Top-1", "Drop pp", "p50 ms", "p90 ms", "FPS", "Status"]


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

    @property
    def ok(self) -> bool:
        return self.status.startswith("ok")

    @property
    def label(self) -> str:
        return self.target if self.target == "reference" else f"{self.target} {self.precision}"


@dataclass(frozen=True)
class ReportData:
    bundle: Path
    manifest: dict
    eval: dict | None
    bench: dict | None
    threads: int | None
    rows: tuple[ReportRow, ...]


def _bench_threads(bench: dict | None, threads: int | None) -> int | None:
    """The thread count the table shows: the one asked for, else the largest measured (one count for all rows)."""
    if not bench or not bench.get("results"):
        return None
    measured = sorted({r["threads"] for r in bench["results"]})
    if threads is None:
        return measured[-1]
    if threads not in measured:
        raise InputError(f"--threads {threads}: bench.json has results for {', '.join(map(str, measured))} threads; "
                         f"pick one of those or re-run `edgeres bench --threads {threads}`")
    return threads


def load_report(bundle: str | Path, threads: int | None = None) -> ReportData:
    """Read the manifest and the stored eval/bench results into report rows."""
    bundle = Path(bundle)
    # verified like every other reader: a report must not describe files that were changed since
    manifest = read_manifest(bundle)
    evaluation = read_result(bundle, EVAL_FILE)
    bench = read_result(bundle, BENCH_FILE)
    threads = _bench_threads(bench, threads)
    evals = {(a["target"], a["precision"], a.get("file")): a for a in (evaluation or {}).get("artifacts", [])}
    benches = {(r["target"], r["precision"], r.get("file")): r for r in (bench or {}).get("results", [])
               if r["threads"] == threads}

    def measured(target, precision, file):
        return evals.get((target, precision, file)), benches.get((target, precision, file))

    rows = []
    ref = manifest["reference"]
    ref_bench = benches.get(("reference", ref.get("precision", "fp32"), ref["file"]))
    ref_top1 = evaluation["reference"]["top1"] if evaluation else None
    rows.append(_row("reference", ref.get("precision", "fp32"), ref["file"], ref.get("size_bytes"), "ok",
                     {"top1": ref_top1} if ref_top1 is not None else None, ref_bench, reference=True))
    for a in manifest["artifacts"]:
        if a.get("status") != "ok":
            rows.append(_row(a["target"], a["precision"], None, None, f"failed: {a.get('error', 'unknown error')}",
                             None, None))
            continue
        ev, be = measured(a["target"], a["precision"], a["file"])
        rows.append(_row(a["target"], a["precision"], a["file"], a.get("size_bytes"), "ok", ev, be))
    return ReportData(bundle, manifest, evaluation, bench, threads, tuple(rows))


def _row(target, precision, file, size_bytes, status, ev, be, reference=False) -> ReportRow:
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
    size_mb = size_bytes / 1e6 if size_bytes is not None else (be or {}).get("size_mb")
    return ReportRow(target, precision, file, size_mb, (ev or {}).get("top1"),
                     0.0 if reference and ev else (ev or {}).get("top1_drop_pp"),
                     (be or {}).get("p50_ms"), (be or {}).get("p90_ms"), (be or {}).get("fps"), status,
                     bool((be or {}).get("throttled")))


def format_rows(rows) -> list[list[str]]:
    return [[r.target, r.precision, fmt(r.size_mb, ".2f"), fmt(r.top1, ".2f"),
             "ref" if r.target == "reference" and r.top1 is not None else fmt(r.top1_drop_pp, ".2f"),
             fmt(r.p50_ms, ".2f"), fmt(r.p90_ms, ".2f"), fmt(r.fps, ".1f"), r.status] for r in rows]


def report_table(bundle: str | Path, threads: int | None = None) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) of Target | Precision | Size MB | Top-1 | Drop pp | p50 ms | p90 ms | FPS | Status."""
    return list(HEADERS), format_rows(load_report(bundle, threads).rows)


# --- prose around the table ----------------------------------------------------------------------

def context_lines(data: ReportData) -> list[str]:
    m = data.manifest
    arch = m["arch"]
    lines = []
    source = (m.get("source") or {}).get("path")
    macs = (m.get("cost") or {}).get("macs")
    lines.append(f"Model: {arch.get('name', '?')}" + (f" from `{source}`" if source else "")
                 + (f", {macs / 1e6:.1f} M MACs" if macs else "")
                 + f", input {m['preprocess'].get('size', '?')}².")
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
        lines.append(f"Accuracy: {data.eval.get('images')} images" +
                     (f" from `{data.eval['data']}`" if data.eval.get("data") else "") +
                     "; drop = fp32 reference top-1 − artifact top-1, in percentage points (positive = accuracy lost); "
                     "FPS = batch / mean latency.")
    else:
        lines.append("Accuracy: not measured yet (run `edgeres eval DIR --data DATA`).")
    if data.bench:
        b, s = data.bench, data.bench.get("settings", {})
        system = b.get("system") or {}
        amount = f"{s.get('seconds')} s" if s.get("seconds") else f"{s.get('runs')} runs"
        lines.append(f"Latency: on {b.get('host')} ({system.get('cpu_model', '?')}, governor "
                     f"{system.get('governor') or 'n/a'}), batch {s.get('batch')}, {data.threads} thread(s), "
                     f"{amount} after {s.get('warmup')} warm-up, one fresh process per artifact.")
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

def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not beaten on both latency (lower) and accuracy (higher), by increasing latency."""
    front, best = [], float("-inf")
    for lat, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if acc > best:
            front.append((lat, acc))
            best = acc
    return front


def _figure(width=6.4, height=4.2):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height), dpi=110)
    return plt, fig, ax


def _save(plt, fig, path: Path) -> bool:
    """Write the figure and free it (pyplot keeps every open figure alive otherwise)."""
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_accuracy_vs_latency(data: ReportData, path: Path) -> bool:
    rows = [r for r in data.rows if r.top1 is not None and r.p50_ms is not None]
    if not rows:
        return False
    plt, fig, ax = _figure()
    for i, r in enumerate(sorted(rows, key=lambda r: r.p50_ms)):
        ax.scatter(r.p50_ms, r.top1, s=40, zorder=3, marker="x" if r.throttled else "o")
        # alternate above/below so neighbours at equal accuracy do not print over each other
        ax.annotate(r.label, (r.p50_ms, r.top1), textcoords="offset points", xytext=(5, 4 if i % 2 == 0 else -11),
                    fontsize=8)
    front = pareto_front([(r.p50_ms, r.top1) for r in rows])
    # rings as well as the line: a front of one point (one artifact beats all) has no line to see
    ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="tab:red", lw=1.2,
            marker="o", markersize=12, markerfacecolor="none", label="Pareto front", zorder=2)
    ax.set_xlabel(f"p50 latency, ms (batch {data.bench['settings'].get('batch')}, {data.threads} thread(s))")
    ax.set_ylabel("top-1 accuracy, %")
    ax.set_title("Accuracy vs latency")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(plt, fig, path)


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
        else:
            delta = end - start
            ax.bar(x, delta, bottom=start, width=0.6, color="tab:red" if delta < 0 else "tab:green")
            ax.annotate(f"{delta:+.2f} pp", (x, max(start, end)), ha="center", va="bottom", fontsize=8)
    values = [v for _, start, end, level in bars for v in ((end,) if level else (start, end))]
    lo, hi = min(values), max(values)
    pad = max(1.0, (hi - lo) * 0.3)
    ax.set_ylim(max(0.0, lo - pad), min(100.0, hi + pad))  # zoomed: the drops are fractions of a point
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("top-1 accuracy, %")
    ax.set_title("Accuracy lost per step (each target's quantisation starts at the fp32 reference)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    return _save(plt, fig, path)


def plot_layer_sqnr(data: ReportData, path: Path) -> bool:
    layers = (data.eval or {}).get("layers") or []
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
            with atomic_path(out_dir / name) as tmp:
                drawn = plot(data, tmp)
            if drawn:
                written[title] = out_dir / name
            else:
                (out_dir / name).unlink(missing_ok=True)  # a stale plot would contradict the table
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
# lets a headless browser (and a test) see that every embedded image decoded
SCRIPT = """window.addEventListener('load',function(){var imgs=Array.prototype.slice.call(document.images);
var ok=imgs.filter(function(i){return i.complete&&i.naturalWidth>0}).length;
document.body.setAttribute('data-images-decoded',ok+'/'+imgs.length);});"""


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


def write_report(bundle: str | Path, *, html_out: bool = False, threads: int | None = None) -> dict:
    """Write ``report.md`` (and with ``html_out`` ``report.html`` + ``plots/*.png``); returns the Markdown and paths.

    A read-only bundle still gets its Markdown returned (to print), with one warning that it was not
    stored; ``--html`` has nothing to give without writing, so there it is an error."""
    data = load_report(bundle, threads)
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
    return {"markdown_text": markdown, **paths}
