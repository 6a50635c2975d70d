"""Cost of converting a random-weight ResNet-50 (224²) to full-int8 TFLite via Keras-from-spec.

Wall time depends on how busy the machine is; ``cpu_s`` (user + system of the child) and
``load_avg_1min`` are printed beside it so a slow run on a shared machine can be told apart.

Each run happens in a fresh child process so its peak RSS (ru_maxrss, read by the parent with
``os.wait4``) covers TensorFlow's import, the Keras build, calibration and conversion, and nothing
else. Prints one JSON document.

    python benchmarks/tflite_convert.py [--arch resnet50] [--images 64] [--runs 1]
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

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
t_start = time.perf_counter()
sys.path.insert(0, {root!r})
from pathlib import Path
import numpy as np
import torch
from edgeres.model.keras_model import build_keras
from edgeres.model.torch_model import build_torch, randomize_bn
from edgeres.model.zoo import get_spec
from edgeres.targets import tflite
from edgeres.targets.base import KERAS, CompileJob

torch.manual_seed(0)
spec = get_spec({arch!r})
model = randomize_bn(build_torch(spec))
state_dict = model.state_dict()
rng = np.random.default_rng(0)
images = rng.integers(0, 256, ({images}, spec.input_size, spec.input_size, 3), dtype=np.uint8)

def calibration(layout="NCHW", batch_size=32):
    pre = spec.preprocess.with_layout(layout)
    for i in range(0, len(images), batch_size):
        yield pre(images[i:i + batch_size])

import tensorflow  # noqa: F401 - imported here so its cost is timed apart from the conversion
t_ready = time.perf_counter()
out = Path({out!r})
job = CompileJob(onnx_fp32=out / "unused.onnx", out_dir=out, precision="int8", calibration=calibration,
                 sources={KERAS: lambda: build_keras(spec, state_dict)}, preprocess=spec.preprocess.to_dict())
artifact = tflite.compile(job)
t_done = time.perf_counter()
report = json.loads((out / artifact.files[1]).read_text())
print(json.dumps({{"setup_s": t_ready - t_start, "convert_s": t_done - t_ready,
                  "size_mb": (out / artifact.file).stat().st_size / 1e6,
                  "float_compute_ops": len(report["float_compute_ops"]), "summary": report["summary"],
                  "representative_images": artifact.options["representative_images"]}}))
"""


def run_once(arch: str, images: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        code = CHILD.format(root=str(ROOT), arch=arch, images=images, out=tmp)
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True)
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        wall_s = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"conversion child failed (exit {os.waitstatus_to_exitcode(status)})")
    child = json.loads(stdout.strip().splitlines()[-1])
    return {"wall_s": round(wall_s, 1), "setup_s": round(child["setup_s"], 1), "convert_s": round(child["convert_s"], 1),
            # CPU seconds barely depend on how busy the shared machine is; wall seconds do
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 2),  # ru_maxrss is in KiB on Linux
            "size_mb": round(child["size_mb"], 1), "float_compute_ops": child["float_compute_ops"],
            "summary": child["summary"], "representative_images": child["representative_images"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--images", type=int, default=64, help="representative images")
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    runs = [dict(run_once(args.arch, args.images), load_avg_1min=round(os.getloadavg()[0], 1))
            for _ in range(args.runs)]
    walls = sorted(r["wall_s"] for r in runs)
    result = {"arch": args.arch, "images": args.images, "runs": runs,
              "median_wall_s": walls[len(walls) // 2], "max_peak_rss_gb": max(r["peak_rss_gb"] for r in runs),
              "targets": {"wall_s": 120, "peak_rss_gb": 4.0}, "cpu_count": os.cpu_count()}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
