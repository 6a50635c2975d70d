"""What a three-target int8 conversion of a big model costs: wall time, CPU time and peak memory of
``edgeres convert`` with its compiles in this process (``--jobs 0``, as before worker processes), in
one worker at a time (``--jobs 1``) and two at once (``--jobs 2``), beside the runtimes' own int8
recipes on the same fp32 ONNX and images (onnxruntime ``quantize_static``, OpenVINO + NNCF).

Every run is a child process; its CPU time is the user+sys of it and every process it waited for
(``os.wait4``), its peak memory the largest sum of RSS over the whole process tree, sampled every
20 ms (``psutil``), and the largest single process's peak (``ru_maxrss``). A ResNet-50 with random
weights (BatchNorm statistics randomised so activations look trained) and 64 random 224² images.

    python benchmarks/convert_cost.py [--arch resnet50] [--calib-images 64] [--json out.json]

Issue 26 targets: peak (tree) ≤ 2.0 GB and CPU ≤ 90 s for three-target int8; --jobs 2 wall ≤ 0.7×
--jobs 1 wall on an otherwise idle 2-core machine (the load is printed: judge the ratio by it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.openvino_int8 import build_inputs  # noqa: E402 - random-weight checkpoint + calibration npz
from benchmarks.readme_tables import convert_cost_table  # noqa: E402

TARGETS = ("onnx", "openvino", "tflite")

_IMAGES = """
import sys, numpy as np
sys.path.insert(0, {root!r})
from edgeres.calibration import open_dataset
from edgeres.model.zoo import get_spec
pre = get_spec({arch!r}).preprocess  # edgeres' own preprocessing of the same images (resize, crop, normalise)
b = np.concatenate([x for x, _ in open_dataset({calib!r}).batches(pre, 16, None)]).astype(np.float32)
"""

NATIVE_ORT = _IMAGES + """
from benchmarks.native_recipes import ort_quantize_static
ort_quantize_static({src!r}, {dst!r}, (b[i:i + 1] for i in range(len(b))))
"""

NATIVE_NNCF = _IMAGES + """
import openvino as ov, nncf
model = ov.convert_model({src!r})
q = nncf.quantize(model, nncf.Dataset([b[i:i + 1] for i in range(len(b))]), subset_size=len(b))
ov.save_model(q, {dst!r})
"""


def measured(cmd: list[str], **kw) -> dict:
    """Run ``cmd``; wall, CPU (it and its waited-for children), peak RSS of the tree and of one process."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kw)
    peak = {"tree": 0}
    done = threading.Event()

    def sample():
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                peak["tree"] = max(peak["tree"], total)
            except psutil.Error:
                pass
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    sampler.join()
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd[:4])}… failed:\n{stderr[-3000:]}")
    # ru_maxrss of wait4 is the child's own peak; the workers' peaks are in RUSAGE_CHILDREN of the child,
    # which the tree sampling covers
    return {"wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_tree_gb": round(peak["tree"] / 1e9, 2), "peak_main_gb": round(usage.ru_maxrss * 1024 / 1e9, 2),
            "stderr": stderr}


def load() -> str:
    return "load average " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--calib-images", type=int, default=64)
    ap.add_argument("--jobs", default="0,1,2", help="comma list of --jobs values to measure")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="edgeres-convert-cost-"))
    ckpt, calib = build_inputs(args.arch, work, args.calib_images)
    rows, before = {}, load()
    print(f"{args.arch}, {args.calib_images} calibration images, targets {','.join(TARGETS)} int8; {before}")
    manifests = {}
    for jobs in args.jobs.split(","):
        out = work / f"bundle-jobs{jobs}"
        cmd = [sys.executable, str(ROOT / "cli.py"), "convert", str(ckpt), "--arch", args.arch, "--calib", str(calib),
               "--calib-images", str(args.calib_images), "--targets", ",".join(TARGETS), "--precision", "int8",
               "--no-bench", "--jobs", jobs, "--out", str(out)]
        rows[f"edgeres --jobs {jobs}"] = measured(cmd, cwd=ROOT)
        manifests[jobs] = json.loads((out / "manifest.json").read_text())
        print(f"  --jobs {jobs}: {rows[f'edgeres --jobs {jobs}']['wall_s']} s wall ({load()})", flush=True)
    any_manifest = next(iter(manifests.values()))
    src = str(work / f"bundle-jobs{next(iter(manifests))}" / any_manifest["reference"]["file"])
    fmt = {"root": str(ROOT), "calib": str(calib), "arch": args.arch, "src": src}
    rows["onnxruntime quantize_static"] = measured(
        [sys.executable, "-c", NATIVE_ORT.format(**fmt, dst=str(work / "ort.qdq.onnx"))], cwd=ROOT)
    rows["OpenVINO + NNCF quantize"] = measured(
        [sys.executable, "-c", NATIVE_NNCF.format(**fmt, dst=str(work / "nncf.xml"))], cwd=ROOT)
    after = load()

    result = {"arch": args.arch, "calib_images": args.calib_images, "load_before": before, "load_after": after,
              "rows": {k: {x: y for x, y in v.items() if x != "stderr"} for k, v in rows.items()},
              "timings": {j: m["timings"] for j, m in manifests.items()}}
    print("\n" + convert_cost_table(result))  # the table docs/convert.md shows (readme_tables.py --blocks convert_cost)
    print(f"\nbefore: {before}; after: {after}; {os.cpu_count()} cores")
    print("\nsteps (seconds, from the manifest's timings):")
    for jobs, m in manifests.items():
        print(f"  --jobs {jobs}: " + ", ".join(f"{k} {v}" for k, v in m["timings"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
