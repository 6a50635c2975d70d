"""The tables of the README and the docs pages, made by the benchmarks, never typed.

CIFAR-10: all from one run of today's code, so the tables agree with each other.

Runs the README's own commands (the real CLI, in fresh processes) on the pretrained ResNet-20/32 and the
5000-image dev half (the same images, calibration spread evenly over the same 1000 — nothing is random):

  intro      ``convert resnet20.th … --precision int8 --out r20`` (its printed table)
  worked     ``convert … --precision int8,fp32 --out r20-all``, ``eval --layers``, ``bench --threads 1,2``,
             ``report --html --threads 1`` (its table, and docs/accuracy_vs_latency.png)
  estimators ``convert X.th --targets onnx,openvino --precision int8 --estimator E`` for the four estimators

and checks what must agree does: the int8 rows of ``r20`` and ``r20-all``, and the mse row of the estimator
table.

From kept results (no run here): the ``imagenet`` block from ``benchmarks/results/imagenet_resnet50.json``, which
``python benchmarks/imagenet_resnet50.py --json benchmarks/results/imagenet_resnet50.json`` writes (≈10 min, 4 GB), and
``convert_cost`` from ``benchmarks/results/convert_cost.json`` (``benchmarks/convert_cost.py --json``), ``sources``
from ``benchmarks/results/source_formats.json`` (``benchmarks/source_formats.py --json``: tests/test_source_formats.py's results).

``--write`` replaces the marked blocks (``<!-- readme_tables:NAME -->`` … ``<!-- /readme_tables:NAME -->``) in
README.md and every page of docs/ that holds them (each block must be somewhere); without it the blocks are printed.
``--blocks imagenet,convert_cost`` renders only those (no CIFAR run).

Run: ``python benchmarks/readme_tables.py [--work DIR] [--write] [--blocks intro,fp32,worked,estimators,imagenet,convert_cost]``
(the CIFAR blocks need ../shared/data/cifar10; ≈8 min on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "cifar10"
ESTIMATORS = ("minmax", "percentile", "entropy", "mse")
CIFAR_BLOCKS = ("intro", "fp32", "worked", "estimators")
RESULTS = ROOT / "benchmarks" / "results"
IMAGENET_JSON = RESULTS / "imagenet_resnet50.json"
CONVERT_COST_JSON = RESULTS / "convert_cost.json"
SOURCES_JSON = RESULTS / "source_formats.json"
# blocks rendered from a benchmark's kept JSON: name → (file, the script that writes it)
JSON_BLOCKS = {"imagenet": (IMAGENET_JSON, "benchmarks/imagenet_resnet50.py --json"),
               "convert_cost": (CONVERT_COST_JSON, "benchmarks/convert_cost.py --json"),
               "sources": (SOURCES_JSON, "benchmarks/source_formats.py --json")}
BLOCKS = (*CIFAR_BLOCKS, *JSON_BLOCKS)
# Where the blocks live: the README (the headline tables) and the docs pages.
DOC_FILES = ("README.md", "docs/*.md")


def edgeres(*args: str, cwd: Path) -> str:
    """Run the CLI from this checkout as a user would; its stdout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    shown = " ".join(args)
    print(f"$ edgeres {shown}", file=sys.stderr, flush=True)
    r = subprocess.run([sys.executable, "-m", "edgeres.cli", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"edgeres {shown} exited {r.returncode}:\n{r.stderr[-3000:]}")
    return r.stdout


def last_table(text: str) -> str:
    """The last Markdown table in a command's output."""
    blocks = re.findall(r"(?:^\|.*\|\n?)+", text, flags=re.M)
    return blocks[-1].rstrip("\n")


def table_rows(table: str) -> dict[tuple[str, str], list[str]]:
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[(cells[0], cells[1])] = cells
    return rows


def accuracy_cells(table: str) -> dict[tuple[str, str], list[str]]:
    """Top-1, drop, CI and agreement per row (what must agree between tables; latency never does)."""
    return {k: v[3:7] for k, v in table_rows(table).items()}


def intro_and_worked(work: Path, calib: str, dev: str) -> dict[str, str]:
    model = str(DATA / "resnet20.th")
    fp32 = edgeres("eval", model, "--data", dev, cwd=work).strip()
    intro = last_table(edgeres("convert", model, "--calib", calib, "--eval", dev, "--targets", "onnx,openvino,tflite",
                               "--precision", "int8", "--out", "r20", cwd=work))
    edgeres("convert", model, "--calib", calib, "--eval", dev, "--targets", "onnx,openvino,tflite",
            "--precision", "int8,fp32", "--out", "r20-all", cwd=work)
    edgeres("eval", "r20-all", "--data", dev, "--layers", cwd=work)
    edgeres("bench", "r20-all", "--threads", "1,2", "--runs", "100", cwd=work)
    worked = last_table(edgeres("report", "r20-all", "--html", "--threads", "1", cwd=work))
    a, b = accuracy_cells(intro), accuracy_cells(worked)
    mismatched = [k for k in a if a[k] != b.get(k)]
    if mismatched:
        raise SystemExit(f"r20 and r20-all disagree on {mismatched}: {a} vs {b}")
    shutil.copyfile(work / "r20-all" / "plots" / "accuracy_vs_latency.png", ROOT / "docs" / "accuracy_vs_latency.png")
    return {"fp32": fp32, "intro": intro, "worked": worked}


def estimator_rows(work: Path, calib: str, dev: str) -> dict[str, dict]:
    """Per arch: the fp32 reference and, per estimator, the onnx/openvino int8 results documents."""
    out: dict[str, dict] = {}
    for arch in ("resnet20", "resnet32"):
        out[arch] = {}
        for est in ESTIMATORS:
            doc = json.loads(edgeres("convert", str(DATA / f"{arch}.th"), "--calib", calib, "--eval", dev,
                                     "--targets", "onnx,openvino", "--precision", "int8", "--estimator", est,
                                     "--no-bench", "--json", "--out", f"{arch}-{est}", cwd=work))["results"]
            out[arch]["reference"] = doc["reference"]
            out[arch][est] = {a["target"]: a for a in doc["artifacts"]}
    return out


def _pp(v: float) -> str:
    return f"{v:.2f}".replace("-", "−")


def estimator_table(rows: dict[str, dict]) -> str:
    lines = ["| estimator | R20 top-1 % | drop pp | 95 % CI | agree % | R32 top-1 % | drop pp | 95 % CI | agree % |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| fp32 reference | {rows['resnet20']['reference']['top1']:.2f} | | | | "
             f"{rows['resnet32']['reference']['top1']:.2f} | | | |"]
    for est in ESTIMATORS:
        cells = []
        for arch in ("resnet20", "resnet32"):
            a = rows[arch][est]["onnx"]
            lo, hi = a["top1_drop_ci95_pp"]
            cells += [f"{a['top1']:.2f}", _pp(a["top1_drop_pp"]), f"[{_pp(lo)}, {_pp(hi)}]", f"{a['agreement_pct']:.2f}"]
        name = f"**{est}** (default)" if est == "mse" else est
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    ov20, ov32 = rows["resnet20"]["mse"]["openvino"], rows["resnet32"]["mse"]["openvino"]
    lines += ["", f"OpenVINO int8 (qdq, mse): {ov20['top1']:.2f} / {ov32['top1']:.2f} % "
                  f"(drop {_pp(ov20['top1_drop_pp'])} / {_pp(ov32['top1_drop_pp'])} pp, agreement "
                  f"{ov20['agreement_pct']:.2f} / {ov32['agreement_pct']:.2f} %)."]
    return "\n".join(lines)


def check_estimators_agree(intro: str, rows: dict[str, dict]) -> None:
    onnx = table_rows(intro)[("onnx", "int8")]
    mse = rows["resnet20"]["mse"]["onnx"]
    if onnx[3] != f"{mse['top1']:.2f}" or onnx[4] != f"{mse['top1_drop_pp']:.2f}":
        raise SystemExit(f"the intro's onnx int8 row {onnx} disagrees with the mse estimator run {mse}")


def blocks(tables: dict[str, str], rows: dict[str, dict]) -> dict[str, str]:
    intro_cmd = ("$ edgeres convert resnet20.th --calib cifar10_calib.npz --eval cifar10_dev.npz \\\n"
                 "      --targets onnx,openvino,tflite --precision int8 --out r20")
    return {
        "intro": f"```\n{intro_cmd}\n{tables['intro']}\n```",
        "fp32": f"```\n$ edgeres eval resnet20.th --data cifar10_dev.npz          # the fp32 model, architecture "
                f"inferred\n{tables['fp32']}\n```",
        "worked": tables["worked"],
        "estimators": estimator_table(rows),
    }


# (runtime, recipe as the benchmark records it, precision) → recipe as the table shows it, in table order:
# the fp32 rows, then per runtime edgeres' int8 beside the runtime's own recipe.
IMAGENET_ROWS = (
    (("Keras", "the model itself, fed the same pixels", "fp32"), "the model itself, fed the same pixels"),
    (("onnxruntime", "edgeres", "fp32"), "edgeres"),
    (("OpenVINO", "edgeres", "fp32"), "edgeres"),
    (("LiteRT", "edgeres", "fp32"), "edgeres"),
    (("onnxruntime", "edgeres", "int8"), "**edgeres**"),
    (("onnxruntime", "edgeres --quant accurate", "int8"), "**edgeres** `--quant accurate`"),
    (("onnxruntime", "quantize_static MinMax per-channel QDQ", "int8"),
     "`quantize_static`, MinMax, per-channel QDQ, reduce_range"),
    (("OpenVINO", "edgeres", "int8"), "**edgeres** (the same QDQ ranges)"),
    (("OpenVINO", "edgeres --quant accurate", "int8"), "**edgeres** `--quant accurate`"),
    (("OpenVINO", "nncf.quantize defaults", "int8"), "`nncf.quantize` defaults"),
    (("LiteRT", "edgeres", "int8"), "**edgeres**"),
    (("LiteRT", "edgeres --quant accurate", "int8"), "**edgeres** `--quant accurate`"),
    (("LiteRT", "TFLiteConverter full-int8, representative dataset", "int8"),
     "`TFLiteConverter` full-int8, representative dataset"),
)


def imagenet_table(result: dict) -> str:
    """The ImageNet ResNet-50 table from ``imagenet_resnet50.py --json``'s document (edgeres' int8 agreement bold)."""
    rows = {(r["runtime"], r["recipe"], r["precision"]): r for r in result["rows"]}
    missing = [key for key, _ in IMAGENET_ROWS if key not in rows]
    if missing:
        raise SystemExit(f"{IMAGENET_JSON.name} has no row {missing[0]}: re-run benchmarks/imagenet_resnet50.py --json")
    lines = ["| runtime | recipe | precision | top-1 % | agrees with fp32 % |", "|---|---|---|---:|---:|"]
    for key, shown in IMAGENET_ROWS:
        r = rows[key]
        agree = f"{r['agreement_pct']:.2f}"
        if shown.startswith("**edgeres**"):
            agree = f"**{agree}**"
        lines.append(f"| {key[0]} | {shown} | {key[2]} | {r['top1']:.2f} | {agree} |")
    return "\n".join(lines)


CONVERT_COST_RUNS = {  # convert_cost.py's row names → as the table shows them
    "edgeres --jobs 0": "`edgeres convert --jobs 0` (everything in one process)",
    "edgeres --jobs 1": "`edgeres convert --jobs 1` (three int8 artifacts)",
    "edgeres --jobs 2": "`edgeres convert --jobs 2` (TFLite beside export + calibration)",
    "onnxruntime quantize_static": "onnxruntime `quantize_static` (one artifact)",
    "OpenVINO + NNCF quantize": "OpenVINO `convert_model` + `nncf.quantize` (one artifact)",
}


def convert_cost_table(result: dict) -> str:
    """``convert_cost.py --json``'s runs; ``--jobs 2``'s wall time also as a ratio of ``--jobs 1``'s."""
    rows = result["rows"]
    unknown = [name for name in rows if name not in CONVERT_COST_RUNS]
    if unknown:
        raise SystemExit(f"{CONVERT_COST_JSON.name}: unknown run {unknown[0]!r}")
    lines = ["| run | wall s | CPU s | peak RSS, process tree | peak RSS, largest process |", "|---|---:|---:|---:|---:|"]
    for name, shown in CONVERT_COST_RUNS.items():
        if name not in rows:
            continue
        r = rows[name]
        wall = f"{r['wall_s']}"
        if name == "edgeres --jobs 2" and "edgeres --jobs 1" in rows:
            wall += f" ({r['wall_s'] / rows['edgeres --jobs 1']['wall_s']:.2f}×)"
        lines.append(f"| {shown} | {wall} | {r['cpu_s']} | {r['peak_tree_gb']:.2f} GB | {r['peak_main_gb']:.2f} GB |")
    return "\n".join(lines)


def sources_table(result: dict) -> str:
    """``source_formats.py --json``'s rows (the test's results): per source format what is read, the
    preprocessing recorded, and the fp32 artifacts against the framework's own output (– where a row does not
    convert for that target)."""
    targets = ("onnx", "openvino", "tflite", "executorch")
    lines = ["| model file | what edgeres reads | preprocessing | fp32 vs the framework: agreement, max rel. error "
             "(ONNX / OpenVINO / TFLite / ExecuTorch) | int8 built |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        fp32 = [r["targets"].get(f"{t}-fp32") for t in targets]
        agree = " / ".join(f"{v['agreement_pct']:.0f} %" if v else "–" for v in fp32)
        err = " / ".join(f"{v['rel_err']:.0e}" if v else "–" for v in fp32)
        int8 = " ".join(t for t in targets if f"{t}-int8" in r["targets"])
        lines.append(f"| {r['row']} | {r['read']} | {r['preprocess']} | {agree}; {err} | {int8} |")
    return "\n".join(lines)


RENDER = {"imagenet": imagenet_table, "convert_cost": convert_cost_table, "sources": sources_table}


def marked_block(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- readme_tables:{name} -->\n)(.*?\n)?(<!-- /readme_tables:{name} -->)", re.S)


def doc_files() -> list[Path]:
    return [p for pattern in DOC_FILES for p in sorted(ROOT.glob(pattern))]


def blocks_in_docs() -> dict[str, dict[Path, str]]:
    """Per block name, the text between its markers in each file that holds it."""
    found: dict[str, dict[Path, str]] = {}
    for path in doc_files():
        text = path.read_text()
        for name in BLOCKS:
            for m in marked_block(name).finditer(text):
                found.setdefault(name, {})[path] = (m.group(2) or "").rstrip("\n")
    return found


def write_docs(found: dict[str, str]) -> list[Path]:
    """Replace each block in every file holding it; every block must be held somewhere."""
    holders = blocks_in_docs()
    absent = [name for name in found if name not in holders]
    if absent:
        raise SystemExit(f"no <!-- readme_tables:{absent[0]} --> block in {' or '.join(DOC_FILES)}")
    written = []
    for path in doc_files():
        text = path.read_text()
        new = text
        for name, body in found.items():
            new = marked_block(name).sub(lambda m: m.group(1) + body + "\n" + m.group(3), new)
        if new != text:
            path.write_text(new)
            written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="Folder for the bundles (default: a temporary one).")
    parser.add_argument("--write", action="store_true", help="Replace the marked blocks of README.md and docs/*.md.")
    parser.add_argument("--blocks", default=",".join(BLOCKS), help=f"Which blocks (default: all of {','.join(BLOCKS)}).")
    args = parser.parse_args()
    wanted = [b.strip() for b in args.blocks.split(",") if b.strip()]
    unknown = [b for b in wanted if b not in BLOCKS]
    if unknown or not wanted:
        raise SystemExit(f"--blocks {args.blocks!r}: choose from {','.join(BLOCKS)}")
    found: dict[str, str] = {}
    if any(b in CIFAR_BLOCKS for b in wanted):
        if not (DATA / "cifar10_dev.npz").exists():
            raise SystemExit(f"needs the CIFAR-10 data at {DATA}")
        work = args.work or Path(tempfile.mkdtemp(prefix="readme-tables-"))
        work.mkdir(parents=True, exist_ok=True)
        calib, dev = str(DATA / "cifar10_calib.npz"), str(DATA / "cifar10_dev.npz")
        tables = intro_and_worked(work, calib, dev)
        rows = estimator_rows(work, calib, dev)
        check_estimators_agree(tables["intro"], rows)
        found.update({k: v for k, v in blocks(tables, rows).items() if k in wanted})
        print(f"bundles in {work}", file=sys.stderr)
    for name in (b for b in wanted if b in JSON_BLOCKS):
        path, script = JSON_BLOCKS[name]
        if not path.is_file():
            raise SystemExit(f"{path} is missing: run python {script} {path.relative_to(ROOT)}")
        found[name] = RENDER[name](json.loads(path.read_text()))
    if args.write:
        written = write_docs(found)
        where = ", ".join(str(p.relative_to(ROOT)) for p in written)
        print(f"{', '.join(found)}: " + (f"updated {where}" if written else "already up to date"), file=sys.stderr)
    else:
        for name, body in found.items():
            print(f"<!-- readme_tables:{name} -->\n{body}\n<!-- /readme_tables:{name} -->\n")


if __name__ == "__main__":
    main()
