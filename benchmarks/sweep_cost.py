"""What does a sweep cost against the same conversions run one by one with `edgeres convert`?

Runs `edgeres sweep` (embedded Ray) over prune × precision × targets on a real model, then, for each
of its conversions, the `edgeres convert` command that makes the same bundle (same options, same
eval images, same benchmark runs), one after another, each in its own process as a user would. Prints
both wall times, their ratio, and `uptime` before and after (the machine is shared: a loaded machine
stretches both, not necessarily equally). The goal is sweep ≤ 1.1× the one-by-one time on 2 cores.

    python benchmarks/sweep_cost.py --model ../shared/data/cifar10/resnet20.th \
        --calib ../shared/data/cifar10/cifar10_calib.npz --eval /tmp/dev500.npz --out /tmp/sweep-cost
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], log: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    with open(log, "a") as f:
        proc = subprocess.run([sys.executable, "-m", "edgeres.cli", *args], stdout=f, stderr=subprocess.STDOUT, env=env,
                              cwd=ROOT)
    if proc.returncode not in (0, 3):
        sys.exit(f"{' '.join(args[:2])} failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - t0


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--eval", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--prune", default="0,0.3")
    ap.add_argument("--precision", default="int8,fp32")
    ap.add_argument("--targets", default="onnx,tflite")
    ap.add_argument("--calib-images", default="100")
    ap.add_argument("--bench-runs", default="20")
    a = ap.parse_args()
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    log = out / "log.txt"
    common = ["--calib", a.calib, "--eval", a.eval, "--calib-images", a.calib_images]
    print("before:", uptime())
    sweep_s = run(["sweep", a.model, *common, "--prune", a.prune, "--precision", a.precision, "--targets",
                   a.targets, "--bench-runs", a.bench_runs, "--accuracy-budget", "1.0", "--out", str(out / "sweep")],
                  log)
    doc = json.loads((out / "sweep" / "sweep.json").read_text())
    print(f"sweep: {len(doc['trials'])} trials, {sum(t['status'] == 'ok' for t in doc['trials'])} ok, "
          f"{sweep_s:.1f} s wall; shared steps run: {doc['shared']}")
    print("middle:", uptime())
    one_by_one = 0.0
    for t in {t["bundle"]: t for t in doc["trials"]}.values():
        args = ["convert", a.model, *common, "--targets", t["target"], "--precision", t["precision"],
                "--bench-runs", a.bench_runs, "--bench-threads", str(t["threads"]), "--out", str(out / "convert" / t["bundle"])]
        if t["estimator"]:
            args += ["--estimator", t["estimator"]]
        if t["prune"]:
            args += ["--prune", str(t["prune"])]
        (out / "convert").mkdir(exist_ok=True)
        seconds = run(args, log)
        one_by_one += seconds
        print(f"convert {t['bundle']}: {seconds:.1f} s")
    print("after:", uptime())
    print(f"one by one: {one_by_one:.1f} s; sweep: {sweep_s:.1f} s; sweep / one-by-one = {sweep_s / one_by_one:.2f}")


if __name__ == "__main__":
    main()
