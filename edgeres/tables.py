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
    for layer in result.get("layers", [])[:10]:
        gain = f"  ({layer['gain_db']:+.1f} dB vs --quant fast)" if "gain_db" in layer else ""
        print(f"  SQNR {layer['sqnr_db']:6.1f} dB{gain}  {printable(layer['name'])}")


def print_bundle(out: str | Path, manifest: dict) -> None:
    rows = [[a["target"], a["precision"], a.get("file", ""), fmt(a.get("size_bytes", 0) / 1e6, ".3f"),
             a.get("engine", ""), a["status"] if a["status"] == "ok" else f"failed: {a.get('error', '')}"]
            for a in manifest["artifacts"]]
    print(f"bundle {printable(str(out))}")
    print_table(["target", "precision", "file", "size MB", "engine", "status"], rows)
