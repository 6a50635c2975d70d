"""What keeping the model input in float (first conv unquantised) costs onnxruntime.

Issue 8's noise budget names the model input as one of the int8 error sources; the obvious fix is
mixed precision there. This measures its price: a random-weight ResNet-50 (224²) is converted to int8
ONNX once (``--quant fast``), then the same graph with the input QuantizeLinear/DequantizeLinear pair
removed (onnxruntime then runs the first conv in float) is timed against it, interleaved in one
process (run i of each graph back to back), 1 thread, batch 1; medians and p90.

    python benchmarks/float_input_cost.py [--runs 40] [--arch resnet50]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.openvino_int8 import build_inputs  # random-weight checkpoint + calibration npz
from benchmarks.prune_speed import session, time_interleaved  # 1-thread onnxruntime, runs back to back


def without_input_qdq(model):
    """The model with the Q→DQ pair on the graph input removed (consumers read the float input)."""
    graph = model.graph
    name = graph.input[0].name
    q = next(n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == name)
    dq = next(n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0])
    for node in graph.node:
        for i, inp in enumerate(node.input):
            if inp == dq.output[0]:
                node.input[i] = name
    graph.node.remove(q)
    graph.node.remove(dq)
    return model


def main() -> None:
    import onnx

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--runs", type=int, default=40)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt, calib = build_inputs(args.arch, work, 32)
        subprocess.run([sys.executable, str(ROOT / "cli.py"), "convert", str(ckpt), "--calib", str(calib), "--targets",
                        "onnx", "--precision", "int8", "--out", str(work / "bundle"), "--no-bench"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        manifest = json.loads((work / "bundle" / "manifest.json").read_text())
        rel = next(a["file"] for a in manifest["artifacts"] if a["target"] == "onnx" and a["precision"] == "int8")
        int8 = work / "bundle" / rel
        mixed = work / "float_input.onnx"
        onnx.save(without_input_qdq(onnx.load(str(int8))), str(mixed))
        sessions = {"int8": session(int8, 1), "float input": session(mixed, 1)}
        size = int(sessions["int8"].get_inputs()[0].shape[2])
        x = np.random.default_rng(1).standard_normal((1, 3, size, size)).astype(np.float32)
        times = dict(zip(sessions, time_interleaved(list(sessions.values()), x, args.runs)))
    p50 = {k: float(np.median(v)) for k, v in times.items()}
    print(f"{args.arch} {size}², onnxruntime, 1 thread, {args.runs} interleaved runs each\n")
    print("| graph | p50 ms | p90 ms |\n|---|---|---|")
    for k, v in times.items():
        print(f"| {k} | {p50[k]:.2f} | {np.percentile(v, 90):.2f} |")
    print(f"\nfloat input / int8 (p50): {p50['float input'] / p50['int8']:.3f}")


if __name__ == "__main__":
    main()
