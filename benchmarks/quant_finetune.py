"""``--quant finetune`` on real CIFAR-10 ResNets: agreement with fp32 per target, fast / accurate / finetune /
native, and the latency of the finetune artifacts next to the fast ones.

For each arch, from the same calibration images (300) and evaluated on the 5000 dev images:
  edgeres fast / accurate     ``convert --quant fast|accurate``
  edgeres finetune (seed s)   ``convert --quant finetune --finetune-data cifar10_train10k.npz --epochs N --seed s``
  native                      onnxruntime ``quantize_static``, ``nncf.quantize`` defaults, LiteRT min/max
                              (``benchmarks/fidelity.py``)
then, in one process and interleaved round by round, every target's fast and finetune (seed 0) int8
artifacts are timed on the same input at 1 thread (the finetune/fast latency ratio).
``--prune 0.3`` converts the pruned model instead (its KD recovery uses the same data and epochs);
drops are then against the pruned model's own fp32.

    python benchmarks/quant_finetune.py [--archs resnet20,resnet32] [--seeds 0,1,2] [--epochs 3]
        [--prune 0.3] [--work DIR] [--no-native] [--json out.json]

Bundles are kept in ``--work`` and reused when their conversion is up to date (re-running after an
interruption measures only what is missing). Issue 25 targets: finetune agreement ≥ 99.6 % (mean of 3
seeds) and drop ≤ 0.05 pp on every target; latency ratio finetune/fast within noise.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "cifar10"
TARGETS = ("onnx", "openvino", "tflite")


def convert_rows(arch: str, work: Path, quant: str, *, seed: int = 0, epochs: int = 3,
                 prune: float | None = None) -> list[dict]:
    """Convert (or reuse) one bundle and return its per-target eval rows."""
    from edgeres.convert.config import ConvertConfig
    from edgeres.convert.run import convert

    name = f"{arch}{f'.p{prune}' if prune else ''}.{quant}{f'.s{seed}' if quant == 'finetune' else ''}"
    out = work / name
    needs_data = quant == "finetune" or prune is not None
    extra = {"finetune_data": str(DATA / "cifar10_train10k.npz"), "finetune_epochs": epochs} if needs_data else {}
    t0 = time.perf_counter()
    manifest = convert(ConvertConfig(model=str(DATA / f"{arch}.th"), out=str(out), calib=str(DATA / "cifar10_calib.npz"),
                                     eval_data=str(DATA / "cifar10_dev.npz"), targets=TARGETS, precisions=("int8",),
                                     quant=quant, seed=seed, prune=prune, bench=False, **extra))
    wall = time.perf_counter() - t0
    ev = json.loads((out / "eval.json").read_text())
    tuned = ((manifest.get("calibration") or {}).get("finetune") or {}).get("qdq") or {}
    recipe = f"edgeres --quant {quant}" + (f" (seed {seed}, {epochs} epochs)" if quant == "finetune" else "")
    return [{"arch": arch, "target": a["target"], "recipe": recipe, "quant": quant, "seed": seed, "bundle": str(out),
             "top1": a["top1"], "top1_drop_pp": a["top1_drop_pp"], "agreement_pct": a["agreement_pct"],
             "finetune_s": tuned.get("seconds"), "curve": tuned.get("curve"), "convert_wall_s": round(wall, 1)}
            for a in ev["artifacts"]]


def interleaved_latency(bundles: dict[str, Path], size: int, rounds: int, runs: int) -> list[dict]:
    """p50 ms per target and preset at 1 thread, the presets' runs interleaved round by round."""
    from edgeres import targets

    x = np.random.default_rng(1).standard_normal((1, 3, size, size)).astype(np.float32)
    rows = []
    for target in TARGETS:
        runners = {}
        for quant, bundle in bundles.items():
            manifest = json.loads((bundle / "manifest.json").read_text())
            art = next(a for a in manifest["artifacts"] if a["target"] == target and a["precision"] == "int8")
            runners[quant] = targets.get_target(target).load_runner(bundle / art["file"], threads=1)
            runners[quant](x)  # warm-up
        times: dict = {q: [] for q in runners}
        for _ in range(rounds):
            for quant, run in runners.items():
                for _ in range(runs):
                    t0 = time.perf_counter()
                    run(x)
                    times[quant].append((time.perf_counter() - t0) * 1e3)
        med = {q: float(np.median(t)) for q, t in times.items()}
        rows.append({"target": target, **{f"{q}_p50_ms": round(m, 3) for q, m in med.items()},
                     "latency_ratio_p50": round(med["finetune"] / med["fast"], 3)})
    return rows


def agreement_table(rows: list[dict]) -> list[str]:
    """Markdown: per arch and target, agreement % (drop pp) of fast, accurate, finetune (mean of seeds), native."""
    lines = ["| arch | target | fast | accurate | finetune (mean of seeds) | finetune per seed | native |",
             "|---|---|---|---|---|---|---|"]
    for arch in sorted({r["arch"] for r in rows}):
        for target in TARGETS:
            mine = [r for r in rows if r["arch"] == arch and r["target"] == target]

            def cell(quant):
                got = [r for r in mine if r.get("quant") == quant]
                if not got:
                    return "–"
                agree = np.mean([r["agreement_pct"] for r in got])
                drop = np.mean([r["top1_drop_pp"] for r in got])
                return f"{agree:.2f} % ({drop:+.2f} pp)"

            seeds = ", ".join(f"{r['agreement_pct']:.2f}" for r in mine if r.get("quant") == "finetune")
            native = [r for r in mine if r.get("quant") is None]
            native_cell = "; ".join(f"{r['agreement_pct']:.2f} % ({r['top1_drop_pp']:+.2f} pp)" for r in native) or "–"
            lines.append(f"| {arch} | {target} | {cell('fast')} | {cell('accurate')} | {cell('finetune')} | {seeds} | "
                         f"{native_cell} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="resnet20,resnet32")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--prune", type=float, default=None)
    ap.add_argument("--work", default=None, help="keep (and reuse) bundles here")
    ap.add_argument("--native", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--accurate", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", dest="json_out", default=None)
    args = ap.parse_args()
    if not (DATA / "cifar10_dev.npz").exists():
        sys.exit(f"{DATA}: real CIFAR-10 data not found (needs ../shared beside the repo)")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = run(args, work)
    print("\n".join(agreement_table(result["rows"])))
    for r in result["latency"]:
        print(f"{r['arch']} {r['target']:9s} p50 fast {r['fast_p50_ms']:.3f} ms  finetune {r['finetune_p50_ms']:.3f} ms  "
              f"ratio {r['latency_ratio_p50']:.3f}")
    for arch, minutes in result["finetune_minutes"].items():
        print(f"{arch}: quantisation-aware fine-tuning {minutes:.1f} min per conversion (mean over seeds)")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1))


def run(args, work: Path) -> dict:
    from edgeres.model.zoo import get_spec

    rows, latency, minutes = [], [], {}
    seeds = [int(s) for s in args.seeds.split(",")]
    for arch in args.archs.split(","):
        presets = ["fast"] + (["accurate"] if args.accurate else [])
        for quant in presets:
            rows += convert_rows(arch, work, quant, prune=args.prune)
        tuned = [row for seed in seeds
                 for row in convert_rows(arch, work, "finetune", seed=seed, epochs=args.epochs, prune=args.prune)]
        rows += tuned
        minutes[arch] = float(np.mean([r["finetune_s"] for r in tuned if r["finetune_s"]])) / 60
        if args.native and args.prune is None:
            from benchmarks.fidelity import litert_native_rows, native_rows

            rows += native_rows(arch, work, 300) + litert_native_rows(arch, work, 300)
        fast = next(r["bundle"] for r in rows if r["arch"] == arch and r.get("quant") == "fast")
        first = next(r["bundle"] for r in tuned)
        latency += [{"arch": arch, **r} for r in interleaved_latency({"fast": Path(fast), "finetune": Path(first)},
                                                                        get_spec(arch).input_size, args.rounds, args.runs)]
    return {"epochs": args.epochs, "seeds": seeds, "prune": args.prune, "rows": rows, "latency": latency,
            "finetune_minutes": minutes}


if __name__ == "__main__":
    main()
