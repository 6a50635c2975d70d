"""int8 latency of the ONNX target vs fp32 and vs onnxruntime's own ``quantize_static`` recipe.

Random-weight torchvision-compatible ResNet-18/50 at 224², batch 1. Three models per arch, timed
interleaved (one run of each in turn) so the shared machine's drift hits all of them alike:

  fp32    the reference ONNX (BatchNorm folded, onnxslim)
  ours    edgeres int8: our ranges (``--estimator``) → QDQ, recipe chosen from the CPU
  native  onnxruntime ``quant_pre_process`` + ``quantize_static`` (QDQ, per-channel, MinMax,
          same activation type / reduce_range as ours) on the same calibration images

Run: ``python benchmarks/onnx_int8.py [--archs resnet18,resnet50] [--threads 1,2] [--runs 40]``.
Targets: int8/fp32 median ≤ 0.65, ours/native median ≤ 1.05.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_models(arch: str, work: Path, calib_images: int, estimator: str) -> dict[str, Path]:
    import onnxruntime as ort
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from benchmarks.native_recipes import ort_quantize_static

    from edgeres.model.export import export_onnx
    from edgeres.model.torch_model import build_torch, randomize_bn
    from edgeres.model.zoo import get_spec
    from edgeres.targets import onnx as onnx_target

    spec = get_spec(arch)
    fp32 = export_onnx(randomize_bn(build_torch(spec)), spec, work / f"{arch}.fp32.onnx")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (calib_images, spec.input_size, spec.input_size, 3), dtype=np.uint8)
    x = spec.preprocess(images)

    def calib_fn(layout="NCHW", batch_size=32):
        return (x[i : i + 4] for i in range(0, len(x), 4))

    t0 = time.perf_counter()
    ranges = onnx_target.compute_ranges(fp32, calib_fn, estimator=estimator)
    record = onnx_target.quantize_qdq(fp32, ranges, work / f"{arch}.ours.onnx", options={})
    t_ours = time.perf_counter() - t0

    t0 = time.perf_counter()
    pre = work / f"{arch}.pre.onnx"
    quant_pre_process(str(fp32), str(pre))
    ort_quantize_static(pre, work / f"{arch}.native.onnx", calib_fn(), reduce_range=record["reduce_range"],
                        activation_type=record["activation_type"])
    t_native = time.perf_counter() - t0
    print(f"{arch}: ours {t_ours:.1f} s ({estimator}, {record['activation_type']}, reduce_range="
          f"{record['reduce_range']}), native {t_native:.1f} s, onnxruntime {ort.__version__}", file=sys.stderr)
    return {"fp32": fp32, "ours": work / f"{arch}.ours.onnx", "native": work / f"{arch}.native.onnx"}


def time_interleaved(paths: dict[str, Path], threads: int, runs: int, warmup: int = 5) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    sessions = {}
    for name, path in paths.items():
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.log_severity_level = 3
        sessions[name] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    shape = [1 if not isinstance(d, int) else d for d in next(iter(sessions.values())).get_inputs()[0].shape]
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    times = {name: [] for name in sessions}
    for i in range(warmup + runs):
        for name, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, {"input": x})
            if i >= warmup:
                times[name].append((time.perf_counter() - t0) * 1000)
    return {name: np.asarray(t) for name, t in times.items()}


def main() -> None:
    from edgeres.convert.config import ConvertConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="resnet18,resnet50")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--calib-images", type=int, default=16)
    ap.add_argument("--estimator", default=ConvertConfig.estimator)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgeres-bench-") as tmp:
        for arch in args.archs.split(","):
            paths = build_models(arch, Path(tmp), args.calib_images, args.estimator)
            for threads in map(int, args.threads.split(",")):
                t = time_interleaved(paths, threads, args.runs)
                med = {k: float(np.median(v)) for k, v in t.items()}
                p90 = {k: float(np.percentile(v, 90)) for k, v in t.items()}
                rows.append([arch, threads, *(f"{med[k]:.1f} / {p90[k]:.1f}" for k in ("fp32", "ours", "native")),
                             f"{med['ours'] / med['fp32']:.2f}", f"{med['ours'] / med['native']:.2f}"])
    from edgeres.tables import print_table

    print(f"batch 1, 224², median / p90 ms over {args.runs} interleaved runs (targets: int8/fp32 ≤ 0.65, ours/native ≤ 1.05)")
    print_table(["arch", "threads", "fp32 ms", "int8 (ours) ms", "int8 (ort native) ms", "int8/fp32", "ours/native"], rows)


if __name__ == "__main__":
    main()
