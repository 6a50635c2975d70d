"""Does pruning make the device faster? Random-weight ResNet-18 / ResNet-50 at 224², pruned at ratio 0.3,
exported to fp32 ONNX and timed with onnxruntime: unpruned and pruned runs interleaved in one process,
so machine noise hits both alike. Prints MACs ratio and latency ratio (median, p90) per model.

    python benchmarks/prune_speed.py [--ratio 0.3] [--runs 30] [--threads 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(arch: str, ratio: float, importance: str, tmp: Path):
    import torch

    from edgeres.model.export import export_onnx
    from edgeres.compress.prune import PruneConfig, prune
    from edgeres.model.torch_model import build_torch, randomize_bn
    from edgeres.model.zoo import get_spec

    torch.manual_seed(0)
    spec = get_spec(arch)
    model = randomize_bn(build_torch(spec))
    t0 = time.perf_counter()
    pruned = prune(model, spec, PruneConfig(ratio=ratio, importance=importance))
    prune_s = time.perf_counter() - t0
    base_onnx = export_onnx(model, spec, tmp / f"{arch}.onnx")
    pruned_onnx = export_onnx(pruned.model, pruned.spec, tmp / f"{arch}-pruned.onnx")
    return spec, pruned.spec, base_onnx, pruned_onnx, prune_s


def session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def time_interleaved(sessions: list, x: np.ndarray, runs: int, warmup: int = 3) -> list[list[float]]:
    """Milliseconds per run for each session; run i of every session happens back to back."""
    for s in sessions:
        for _ in range(warmup):
            s.run(None, {"input": x})
    times = [[] for _ in sessions]
    for _ in range(runs):
        for k, s in enumerate(sessions):
            t0 = time.perf_counter()
            s.run(None, {"input": x})
            times[k].append((time.perf_counter() - t0) * 1e3)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="resnet18,resnet50")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--importance", default="l2")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", default="1")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for arch in args.archs.split(","):
            spec, pspec, base_onnx, pruned_onnx, prune_s = build(arch, args.ratio, args.importance, tmp)
            x = np.random.default_rng(0).standard_normal((1, 3, spec.input_size, spec.input_size)).astype(np.float32)
            for threads in (int(t) for t in args.threads.split(",")):
                base_t, pruned_t = time_interleaved([session(base_onnx, threads), session(pruned_onnx, threads)], x, args.runs)
                b_med, p_med = float(np.median(base_t)), float(np.median(pruned_t))
                b_p90, p_p90 = float(np.percentile(base_t, 90)), float(np.percentile(pruned_t, 90))
                macs_b, macs_p = spec.cost()["macs"], pspec.cost()["macs"]
                rows.append({
                    "arch": arch, "threads": threads, "ratio": args.ratio, "importance": args.importance,
                    "stage_widths_after": list(pspec.stage_widths),
                    "params_before": spec.cost()["params"], "params_after": pspec.cost()["params"],
                    "macs_before": macs_b, "macs_after": macs_p, "macs_ratio": round(macs_b / macs_p, 3),
                    "median_ms_before": round(b_med, 2), "median_ms_after": round(p_med, 2),
                    "p90_ms_before": round(b_p90, 2), "p90_ms_after": round(p_p90, 2),
                    "latency_speedup_median": round(b_med / p_med, 3), "latency_speedup_p90": round(b_p90 / p_p90, 3),
                    "prune_s": round(prune_s, 1), "runs": args.runs,
                })
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    import onnxruntime

    print(f"onnxruntime {onnxruntime.__version__} fp32, batch 1, 224², ratio {args.ratio} ({args.importance}), "
          f"{args.runs} interleaved runs; median / p90 ms")
    print("| model | threads | MACs before → after (G) | MACs ratio | latency before | latency after | speed-up median | speed-up p90 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arch']} | {r['threads']} | {r['macs_before'] / 1e9:.2f} → {r['macs_after'] / 1e9:.2f} | "
              f"{r['macs_ratio']:.2f}× | {r['median_ms_before']:.1f} / {r['p90_ms_before']:.1f} | "
              f"{r['median_ms_after']:.1f} / {r['p90_ms_after']:.1f} | {r['latency_speedup_median']:.2f}× | "
              f"{r['latency_speedup_p90']:.2f}× |")


if __name__ == "__main__":
    main()
