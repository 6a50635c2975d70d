"""Does `edgeres bench` measure what each runtime's own benchmark tool measures?

Builds one bundle with ResNet-18 (random weights, 224², batch 1) as ONNX fp32/int8, OpenVINO
fp32/int8 and TFLite fp32/int8 artifacts, then, round after round, runs each row exactly as
`edgeres bench` runs it (edgeres.measure.bench.LocalExecutor: bench_runner.py in a fresh process) and
each runtime's native recipe back to back, same thread count, alternating which goes first:

  onnx      a plain `session.run` loop in a fresh process (onnxruntime_perf_test is not in the wheel)
  openvino  benchmark_app -hint none -nstreams 1 -nireq 1 -api sync -nthreads T
  tflite    litert-benchmark --num_threads T, and a plain Interpreter.invoke loop

It prints the median over rounds of each p50 and of the paired ratios edgeres / native of the p50
and of the fastest run (the contention-robust one on a busy machine), peak RSS
per artifact, and finally runs `edgeres bench --json` once end to end. The machine is shared and
noisy: only the ratio within a pair is meaningful.

    python benchmarks/bench_vs_native.py --out /tmp/r18-bench --threads 1,2 --runs 50 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- the bundle ----------------------------------------------------------------------------------

def keras_resnet18(size: int = 224):
    """ResNet-18 in Keras (NHWC, random weights): only latency matters here."""
    import tensorflow as tf

    L = tf.keras.layers

    def conv_bn(x, filters, kernel, stride, relu=True):
        x = L.Conv2D(filters, kernel, stride, padding="same", use_bias=False)(x)
        x = L.BatchNormalization()(x)
        return L.ReLU()(x) if relu else x

    inp = tf.keras.Input((size, size, 3))
    x = conv_bn(inp, 64, 7, 2)
    x = L.MaxPooling2D(3, 2, padding="same")(x)
    for stage, width in enumerate((64, 128, 256, 512)):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            shortcut = x if stride == 1 and x.shape[-1] == width else conv_bn(x, width, 1, stride, relu=False)
            y = conv_bn(x, width, 3, stride)
            y = conv_bn(y, width, 3, 1, relu=False)
            x = L.ReLU()(L.Add()([y, shortcut]))
    x = L.GlobalAveragePooling2D()(x)
    return tf.keras.Model(inp, L.Dense(1000)(x))


def build_bundle(out: Path, calib_images: int = 8) -> None:
    import numpy as np
    import torch

    from edgeres.bundle import FORMAT, FORMAT_VERSION, MANIFEST, REFERENCE_FILE, file_record, write_json_atomic
    from edgeres.model.export import export_onnx
    from edgeres.model.torch_model import build_torch
    from edgeres.model.zoo import get_spec

    staging = Path(tempfile.mkdtemp(prefix=".r18-", dir=out.parent))
    staging.chmod(0o755)
    spec = get_spec("resnet18")
    torch.manual_seed(0)
    log("exporting ResNet-18 fp32 ONNX…")
    export_onnx(build_torch(spec).eval(), spec, staging / REFERENCE_FILE)
    rng = np.random.default_rng(0)
    calib = [rng.standard_normal((1, 3, 224, 224)).astype(np.float32) for _ in range(calib_images)]
    for d in ("onnx", "openvino", "tflite"):
        (staging / d).mkdir()
    artifacts = []

    def add(target, precision, files, engine):
        records = [file_record(staging, f) for f in files]
        artifacts.append({"target": target, "precision": precision, "file": files[0], "files": files,
                          "engine": engine, "file_records": records, "status": "ok",
                          "size_bytes": sum(r["size_bytes"] for r in records), "sha256": records[0]["sha256"]})

    shutil.copyfile(staging / REFERENCE_FILE, staging / "onnx/model.fp32.onnx")
    add("onnx", "fp32", ["onnx/model.fp32.onnx"], "torch.onnx.export")

    log("onnxruntime quantize_static (QDQ, U8S8, per-channel, reduce_range)…")
    from benchmarks.native_recipes import ort_quantize_static

    ort_quantize_static(staging / REFERENCE_FILE, staging / "onnx/model.int8.onnx", calib)
    add("onnx", "int8", ["onnx/model.int8.onnx"], "onnxruntime.quantize_static")

    log("OpenVINO IR fp32 and int8 (from the QDQ ONNX)…")
    import openvino as ov

    for precision, src in (("fp32", REFERENCE_FILE), ("int8", "onnx/model.int8.onnx")):
        ov.save_model(ov.convert_model(str(staging / src)), str(staging / f"openvino/model.{precision}.xml"),
                      compress_to_fp16=False)
        add("openvino", precision, [f"openvino/model.{precision}.xml", f"openvino/model.{precision}.bin"],
            "openvino.convert_model")

    log("TFLite fp32 and full-int8 from a Keras ResNet-18…")
    import tensorflow as tf

    model = keras_resnet18()
    (staging / "tflite/model.fp32.tflite").write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    add("tflite", "fp32", ["tflite/model.fp32.tflite"], "tf.lite.TFLiteConverter")
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([x.transpose(0, 2, 3, 1)] for x in calib)
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    (staging / "tflite/model.int8.tflite").write_bytes(conv.convert())
    add("tflite", "int8", ["tflite/model.int8.tflite"], "tf.lite.TFLiteConverter full-int8")

    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "arch": spec.to_dict(), "cost": spec.cost(),
                "preprocess": spec.preprocess.to_dict(), "labels": None, "pruning": None, "calibration": None,
                "source": {"path": "random weights (torch.manual_seed(0))"},
                "reference": {**file_record(staging, REFERENCE_FILE), "precision": "fp32", "engine": "onnxruntime"},
                "artifacts": artifacts}
    write_json_atomic(staging / MANIFEST, manifest)
    os.replace(staging, out)


# --- native recipes ------------------------------------------------------------------------------

PLAIN_ONNX = textwrap.dedent("""
    import sys, time, numpy as np, onnxruntime as ort
    path, threads, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    o = ort.SessionOptions(); o.intra_op_num_threads = threads; o.inter_op_num_threads = 1
    s = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
    x = {s.get_inputs()[0].name: np.random.rand(1, 3, 224, 224).astype(np.float32)}
    for _ in range(10): s.run(None, x)
    t = []
    for _ in range(runs):
        t0 = time.perf_counter(); s.run(None, x); t.append((time.perf_counter() - t0) * 1000)
    print(float(np.median(t)), float(np.min(t)))
""")

PLAIN_TFLITE = textwrap.dedent("""
    import sys, time, numpy as np
    from ai_edge_litert.interpreter import Interpreter
    path, threads, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    it = Interpreter(model_path=path, num_threads=threads); it.allocate_tensors()
    d = it.get_input_details()[0]
    it.set_tensor(d["index"], np.zeros(d["shape"], d["dtype"]))
    for _ in range(10): it.invoke()
    t = []
    for _ in range(runs):
        t0 = time.perf_counter(); it.invoke(); t.append((time.perf_counter() - t0) * 1000)
    print(float(np.median(t)), float(np.min(t)))
""")


def _run(cmd: list[str], timeout: float = 900) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])}… exited {out.returncode}: {out.stderr.strip()[-500:]}")
    return out.stdout


def plain_loop(code: str, path: Path, threads: int, runs: int) -> tuple[float, float]:
    p50, fastest = _run([sys.executable, "-c", code, str(path), str(threads), str(runs)]).strip().splitlines()[-1].split()
    return float(p50), float(fastest)


def benchmark_app(path: Path, threads: int, runs: int) -> tuple[float, float]:
    exe = BIN / "benchmark_app"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "openvino.tools.benchmark.main"]
    text = _run(cmd + ["-m", str(path), "-d", "CPU", "-hint", "none", "-nstreams", "1", "-nireq", "1", "-api", "sync",
                       "-nthreads", str(threads), "-niter", str(runs), "-shape", "[1,3,224,224]"])
    values = []
    for name in ("Median", "Min"):
        m = re.search(name + r":\s+([\d.]+)\s+(ms|us)", text)
        if not m:
            raise RuntimeError(f"benchmark_app printed no {name}")
        values.append(float(m.group(1)) / (1000 if m.group(2) == "us" else 1))
    return values[0], values[1]


def litert_benchmark(path: Path, threads: int, runs: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as d:
        result = Path(d) / "r.json"
        _run([str(BIN / "litert-benchmark"), "--model", str(path), "--num_threads", str(threads), "--num_runs",
              str(runs), "--warmup_runs", "10", "--result_json", str(result)])
        latency = json.loads(result.read_text())["latency"]
        return float(latency["median_ms"]), float(latency["min_ms"])


NATIVE = {
    "onnx": [("plain session.run loop", lambda p, t, n: plain_loop(PLAIN_ONNX, p, t, n))],
    "openvino": [("benchmark_app", benchmark_app)],
    "tflite": [("litert-benchmark", litert_benchmark),
               ("plain Interpreter loop", lambda p, t, n: plain_loop(PLAIN_TFLITE, p, t, n))],
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "edgeres-r18-bench"))
    p.add_argument("--threads", default="1,2")
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    out = Path(args.out)
    threads = tuple(int(t) for t in args.threads.split(","))
    if not (out / "manifest.json").exists():
        build_bundle(out)

    from edgeres.measure.bench import BenchConfig, LocalExecutor, plan_items
    from edgeres.bundle import read_manifest

    manifest = read_manifest(out)
    # LocalExecutor.run is exactly what `edgeres bench` does per row: bench_runner.py in a fresh process
    executor = LocalExecutor(out, BenchConfig(threads=threads, warmup=10, runs=args.runs))
    pairs: dict[tuple, list[tuple[float, float]]] = {}
    rss: dict[tuple, list[float]] = {}
    system = None
    for r in range(args.rounds):
        for item in plan_items(manifest):
            for t in threads:
                for tool, fn in NATIVE[item.target]:
                    log(f"round {r + 1}/{args.rounds}: {item.target} {item.precision} {t}t, edgeres vs {tool}")

                    def ours(item=item, t=t):
                        row = executor.run(item, t)
                        if row["status"] != "ok":
                            raise RuntimeError(f"edgeres bench failed on {item.file}: {row['error']}")
                        rss.setdefault((item.target, item.precision, t), []).append(row["peak_rss_mb"])
                        return row

                    # back to back, alternating who goes first, so drift on a shared machine hits both alike
                    if r % 2 == 0:
                        row, theirs = ours(), fn(out / item.file, t, args.runs)
                    else:
                        theirs, row = fn(out / item.file, t, args.runs), ours()
                    system = row["system"]
                    pairs.setdefault((item.target, item.precision, t, tool), []).append(
                        (row["p50_ms"], theirs[0], row["min_ms"], theirs[1]))

    log("one end-to-end `edgeres bench --json` run…")
    doc = json.loads(_run([sys.executable, "-m", "edgeres.cli", "bench", str(out), "--threads", args.threads, "--runs",
                           str(args.runs), "--json"]))
    assert all(row["status"] == "ok" for row in doc["results"]), doc

    print(f"ResNet-18 (random weights), 224², batch 1, {args.runs} timed runs after 10 warm-up; {args.rounds} rounds, "
          f"each pair back to back; cpu: {system['cpu_model']} ({system['cpu_count']} cores), "
          f"loadavg at the end {system['loadavg']}\n")
    print("| runtime | precision | threads | edgeres p50 ms | native p50 ms | native tool | p50 ratio "
          "| min ratio |")
    print("|---|---|---|---|---|---|---|---|")
    worst = worst_min = 0.0
    for (target, precision, t, tool), values in pairs.items():
        mine = statistics.median(v[0] for v in values)
        theirs = statistics.median(v[1] for v in values)
        ratio = statistics.median(v[0] / v[1] for v in values)  # paired: both ran under the same load
        # the fastest run is the one least disturbed by other processes: robust on a busy machine
        min_ratio = statistics.median(v[2] / v[3] for v in values)
        worst = max(worst, abs(ratio - 1))
        worst_min = max(worst_min, abs(min_ratio - 1))
        print(f"| {target} | {precision} | {t} | {mine:.2f} | {theirs:.2f} | {tool} | {ratio:.3f} | {min_ratio:.3f} |")
    print(f"\nlargest deviation from 1 of the median paired ratio: p50 {worst * 100:.1f} %, "
          f"min {worst_min * 100:.1f} %\n")
    print("| runtime | precision | threads | size MB | peak RSS MB (median) |")
    print("|---|---|---|---|---|")
    sizes = {(a["target"], a["precision"]): a["size_bytes"] / 1e6 for a in manifest["artifacts"]}
    for (target, precision, t), values in rss.items():
        print(f"| {target} | {precision} | {t} | {sizes[(target, precision)]:.1f} | {statistics.median(values):.0f} |")
    print("\n`edgeres bench --json` end-to-end (p50 ms / peak RSS MB): " + ", ".join(
        f"{row['target']} {row['precision']} {row['threads']}t {row['p50_ms']:.1f}/{row['peak_rss_mb']:.0f}"
        for row in doc["results"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
