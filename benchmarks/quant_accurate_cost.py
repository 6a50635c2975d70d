"""What ``--quant accurate`` costs on a big model: conversion time and artifact latency vs ``--quant fast``.

A random-weight ResNet-50 (224², BatchNorm statistics randomised so activations look trained) is
converted to int8 for onnx, openvino and tflite twice — ``--quant fast`` then ``--quant accurate`` —
each in its own ``edgeres convert`` child process (wall time and the child's CPU time). Then, in
one process and interleaved round by round, every target's fast and accurate artifacts are timed
on the same input (1 thread), so the accurate/fast latency ratio is free of machine drift.

    python benchmarks/quant_accurate_cost.py [--arch resnet50] [--calib-images 64] [--rounds 15]

Issue 8 targets: conversion time accurate ≤ 2× fast; latency ratio accurate/fast ≤ 1.02.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.openvino_int8 import build_inputs  # noqa: E402 - random-weight checkpoint + calibration npz
TARGETS = ("onnx", "openvino", "tflite")


def timed_convert(ckpt: Path, calib: Path, out: Path, quant: str) -> dict:
    cmd = [sys.executable, str(ROOT / "cli.py"), "convert", str(ckpt), "--calib", str(calib), "--targets",
           ",".join(TARGETS), "--precision", "int8", "--quant", quant, "--out", str(out), "--no-bench", "--force"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"convert --quant {quant} failed:\n{err[-2000:]}")
    return {"quant": quant, "wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "load_avg_1min": os.getloadavg()[0]}


def interleaved_latency(bundles: dict[str, Path], size: int, rounds: int, runs: int) -> list[dict]:
    from edgeres.targets import onnx as onnx_target
    from edgeres.targets import openvino as ov_target
    from edgeres.targets import tflite as tflite_target

    loaders = {"onnx": onnx_target, "openvino": ov_target, "tflite": tflite_target}
    x = np.random.default_rng(1).standard_normal((1, 3, size, size)).astype(np.float32)
    rows = []
    for target in TARGETS:
        runners = {}
        for quant, bundle in bundles.items():
            manifest = json.loads((bundle / "manifest.json").read_text())
            art = next(a for a in manifest["artifacts"] if a["target"] == target and a["precision"] == "int8")
            runners[quant] = loaders[target].load_runner(bundle / art["file"], threads=1)
            runners[quant](x)  # warm-up
        times = {q: [] for q in runners}
        for _ in range(rounds):
            for quant, run in runners.items():
                for _ in range(runs):
                    t0 = time.perf_counter()
                    run(x)
                    times[quant].append((time.perf_counter() - t0) * 1e3)
        med = {q: float(np.median(t)) for q, t in times.items()}
        p90 = {q: float(np.percentile(t, 90)) for q, t in times.items()}
        rows.append({"target": target, "fast_p50_ms": round(med["fast"], 2), "accurate_p50_ms": round(med["accurate"], 2),
                     "fast_p90_ms": round(p90["fast"], 2), "accurate_p90_ms": round(p90["accurate"], 2),
                     "latency_ratio_p50": round(med["accurate"] / med["fast"], 3)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--calib-images", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgeres-qcost-") as tmp:
        work = Path(tmp)
        ckpt, calib = build_inputs(args.arch, work, args.calib_images)
        bundles = {q: work / f"bundle.{q}" for q in ("fast", "accurate")}
        converts = [timed_convert(ckpt, calib, bundles[q], q) for q in bundles]
        from edgeres.model.zoo import get_spec

        latency = interleaved_latency(bundles, get_spec(args.arch).input_size, args.rounds, args.runs)
    result = {"arch": args.arch, "calib_images": args.calib_images, "convert": converts,
              "convert_time_ratio": round(converts[1]["wall_s"] / converts[0]["wall_s"], 2),
              "convert_cpu_ratio": round(converts[1]["cpu_s"] / converts[0]["cpu_s"], 2), "latency": latency}
    print(json.dumps(result, indent=1))
    print(f"\nconvert wall fast {converts[0]['wall_s']} s, accurate {converts[1]['wall_s']} s "
          f"(ratio {result['convert_time_ratio']}, CPU ratio {result['convert_cpu_ratio']})")
    for r in latency:
        print(f"{r['target']:9s} p50 fast {r['fast_p50_ms']:8.2f} ms  accurate {r['accurate_p50_ms']:8.2f} ms  "
              f"ratio {r['latency_ratio_p50']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
