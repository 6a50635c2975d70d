"""Plain-text tables for stdout (results, not progress)."""

from __future__ import annotations

import unicodedata
from pathlib import Path

# right-to-left/left-to-right overrides and isolates: they reorder what follows on the line
BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def printable(text: str) -> str:
    """``text`` for a terminal: control characters (ESC, CR, BEL…), bidi overrides, line separators and the
    undecodable bytes of a file name shown as Python escapes (``\\x1b``), so a label or file name cannot
    clear the screen, rewrite a line or reorder it. JSON output keeps the exact text."""
    if text.isprintable():
        return text
    return "".join(ascii(c)[1:-1] if unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp") or c in BIDI_CONTROLS
                   else c for c in text)


def printable_lines(text: str) -> str:
    """A multi-line document for a terminal: each line through ``printable``, the line breaks kept."""
    return "\n".join(printable(line) for line in text.split("\n"))


def format_table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table (readable in a terminal, pasteable into docs)."""
    cells = [[printable(str(h)) for h in headers]] + [["" if c is None else printable(str(c)) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells[1:])])


def print_table(headers: list[str], rows: list[list]) -> None:
    """``format_table`` on stdout (cells escaped by ``printable``)."""
    print(format_table(headers, rows))


def fmt(value, spec: str = ".2f") -> str:
    """A number formatted for a table cell; blank when there is none."""
    return "" if value is None else format(value, spec)


def print_eval(result: dict) -> None:
    ref = result["reference"]
    print(f"fp32 reference: top-1 {ref['top1']:.2f} %  top-5 {ref['top5']:.2f} %  ({result['images']} images)")
    rows = [[a["target"], a["precision"], fmt(a.get("top1")), fmt(a.get("top1_drop_pp")),
             "" if not a.get("top1_drop_ci95_pp") else "[{:.2f}, {:.2f}]".format(*a["top1_drop_ci95_pp"]),
             fmt(a.get("agreement_pct")), fmt(a.get("max_abs_logit_err"), ".4f"), a.get("error", "ok")]
            for a in result["artifacts"]]
    print_table(["target", "precision", "top-1 %", "drop pp", "drop 95% CI", "agree %", "max |Δlogit|", "status"], rows)
    print("drop = reference top-1 − artifact top-1 (positive = accuracy lost)"
          + (f"; kept as eval run {result['run']}" if result.get("run") else "")
          + (f"; partial: {result['images']} of {result['dataset_images']} images" if result.get("partial") else ""))
    rows = [{"target": "reference", "precision": "fp32", **ref}, *result["artifacts"]]
    ties = [f"{a['target']} {a['precision']} {a['top1_tied_images']}" for a in rows if a.get("top1_tied_images")]
    if ties:  # int8 logits tie often; say how many top-1s the tie rule decided
        print(f"top score tied (top-1 = the lowest tied class index) on {', '.join(ties)} of {result['images']} images")
    print_layers(result.get("layers", []), result.get("layer_targets", []))


LAYERS_SHOWN = 10  # per artifact: the worst


def print_layers(layers: list[dict], coverage: list[dict]) -> None:
    """``eval --layers``: the worst layers of each int8 artifact, then how its tensors were matched."""
    if not layers:
        return
    gains = any("gain_db" in row for row in layers)
    shown = [row for key in dict.fromkeys((r.get("target"), r.get("precision")) for r in layers)
             for row in [r for r in layers if (r.get("target"), r.get("precision")) == key][:LAYERS_SHOWN]]
    print_table(["target", "precision", "SQNR dB", *(["gain dB"] if gains else []), "op", "runtime op", "layer"],
                [[row.get("target", ""), row.get("precision", ""), fmt(row["sqnr_db"], ".1f"),
                  *([fmt(row.get("gain_db"), "+.1f")] if gains else []), row.get("op", ""), row.get("runtime_op", ""),
                  printable(row["name"])] for row in shown])
    if gains:
        print("gain dB = SQNR of --quant accurate minus that of the same model quantised plainly (vs --quant fast)")
    for c in coverage:
        if c.get("status") == "ok":
            print(f"{c['target']} {c['precision']}: {c['matched_by_name']} tensors matched to fp32 by name, "
                  f"{c['matched_by_value']} by value, {c['unmatched']} unmatched; logits SQNR {c['logits_sqnr_db']:.1f} dB")
        else:
            print(f"{c['target']} {c['precision']}: per-layer SQNR failed: {c.get('error')}")


def print_bundle(out: str | Path, manifest: dict) -> None:
    rows = [[a["target"], a["precision"], a.get("file", ""), fmt(a.get("size_bytes", 0) / 1e6, ".3f"),
             a.get("engine", ""), a["status"] if a["status"] == "ok" else f"failed: {a.get('error', '')}"]
            for a in manifest["artifacts"]]
    print(f"bundle {printable(str(out))}")
    print_table(["target", "precision", "file", "size MB", "engine", "status"], rows)
