"""ExecuTorch (XNNPACK) beside onnxruntime: int8 latency of ResNet-18 and ResNet-50 in one run, what the
ExecuTorch compile costs, and (``--accuracy``) its int8 agreement with fp32 on the real models.

speed      random-weight torchvision-layout ResNet-18/50 at 224² (BatchNorm statistics randomised so the
           activations look trained), 32 random calibration images. ``edgeres convert --targets onnx
           --precision int8`` makes the bundle, then ``edgeres convert --targets executorch --precision int8``
           grows it (that command alone is timed: wall, CPU, peak RSS of its largest process, and the
           worker's compile time from the manifest); ``edgeres bench --threads 1,2`` times both artifacts in
           one run.
accuracy   the pretrained CIFAR-10 ResNet-20 on the 5000-image dev half (300 calibration images) and the
           ImageNet Keras ResNet-50 on the 400 dev photos (200 calibration photos): ``convert --targets
           onnx,openvino,tflite,executorch --precision int8,fp32 --eval`` (ResNet-50: onnx + executorch),
           then the ExecuTorch int8 again with ``--option executorch.ranges=pt2e`` (PT2E's own observers on
           the same images) to compare with the shared ranges.

cpu time   (``--cpu-time``, on the speed bundles in ``--work``) the median CPU time of one int8 inference at one
           thread, onnxruntime and ExecuTorch interleaved, best of 3 rounds: on a machine other jobs load, wall
           times measure the scheduler; one thread's CPU time is what the inference costs on an idle core.

Run: ``python benchmarks/executorch.py [--archs resnet18,resnet50] [--runs 30] [--accuracy] [--work DIR]``;
results go to ``benchmarks/results/executorch.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CIFAR = ROOT.parent / "shared" / "data" / "cifar10"
IMAGENET = ROOT.parent / "shared" / "data" / "imagenet"
KERAS_R50 = Path.home() / ".cache" / "edgeres" / "resnet50_imagenet.keras"
RESULTS = ROOT / "benchmarks" / "results" / "executorch.json"


def edgeres(*args, cwd: Path) -> tuple[str, dict]:
    """Run the CLI as a user would, under GNU time: (stdout, {wall_s, cpu_s, peak_rss_mb})."""
    args = [str(a) for a in args]
    print(f"$ edgeres {' '.join(args)}", file=sys.stderr, flush=True)
    stats = cwd / ".time"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(["/usr/bin/time", "-f", "%e %U %S %M", "-o", str(stats), sys.executable, "-m", "edgeres.cli",
                        *args], cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"edgeres {' '.join(args)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    wall, user, system, rss_kb = stats.read_text().split()[-4:]
    return r.stdout, {"wall_s": round(float(wall), 1), "cpu_s": round(float(user) + float(system), 1),
                      "peak_rss_mb": round(int(rss_kb) * 1024 / 1e6)}  # GNU time's %M is KiB


def _artifacts(bundle: Path) -> dict:
    manifest = json.loads((bundle / "manifest.json").read_text())
    return {(a["target"], a["precision"]): a for a in manifest["artifacts"]}


def speed(arch: str, work: Path, runs: int, threads: str) -> dict:
    import torch

    from edgeres.model.torch_model import build_torch, randomize_bn
    from edgeres.model.zoo import get_spec
    from edgeres.sources.loading import save_checkpoint

    spec = get_spec(arch)
    torch.manual_seed(0)
    ckpt = work / f"{arch}.pt"
    save_checkpoint(ckpt, spec, randomize_bn(build_torch(spec)).state_dict())
    rng = np.random.default_rng(0)
    calib = work / f"{arch}.calib.npz"
    np.savez(calib, x=rng.integers(0, 256, (32, 224, 224, 3), dtype=np.uint8), y=np.zeros(32, np.int64))
    bundle = work / arch
    edgeres("convert", ckpt, "--calib", calib, "--targets", "onnx", "--precision", "int8", "--out", bundle,
            "--no-bench", cwd=work)
    _, cost = edgeres("convert", ckpt, "--calib", calib, "--targets", "executorch", "--precision", "int8",
                      "--out", bundle, "--no-bench", cwd=work)
    et = _artifacts(bundle)["executorch", "int8"]
    cost.update({"compile_s": et["compile_s"], "size_mb": round(et["size_bytes"] / 1e6, 2),
                 "ops_outside_delegate": et["options"]["op_audit"]["ops_outside_delegate"]})
    out, _ = edgeres("bench", bundle, "--threads", threads, "--runs", runs, "--json", cwd=work)
    rows = [r for r in json.loads(out)["results"] if r["precision"] == "int8"]
    latency = {f"{r['target']} {r['threads']}t": r["p50_ms"] for r in rows}
    return {"arch": arch, "executorch_int8_conversion": cost, "p50_ms": latency}


CPU_TIMER = """
import sys, time, numpy as np
sys.path.insert(0, sys.argv[1])
from edgeres.targets.runners.{module} import {cls}
runner = {cls}(sys.argv[2], 1)
spec = runner.input_spec()
x = np.random.default_rng(0).standard_normal([d or 1 for d in spec["dims"]]).astype(np.float32)
run = runner.fixed_input_call(x)
for _ in range(3):
    run()
cpu, wall = [], []
for _ in range(int(sys.argv[3])):
    c0, w0 = time.process_time(), time.perf_counter()
    run()
    cpu.append(time.process_time() - c0)
    wall.append(time.perf_counter() - w0)
print(1000 * float(np.median(cpu)), 1000 * float(np.median(wall)))
"""
RUNNER_CLASSES = {"onnx": ("onnxruntime_runner", "OnnxRuntimeRunner"),
                  "executorch": ("executorch_runner", "ExecuTorchRunner")}


def cpu_ms(bundle: Path, runs: int) -> dict:
    """Median CPU time of one inference at one thread (what the wall time would be on an idle core: the
    shared machine's load does not count), int8 artifacts interleaved per round, 3 rounds."""
    out: dict = {}
    for round_ in range(3):
        for target, (module, cls) in RUNNER_CLASSES.items():
            code = CPU_TIMER.format(module=module, cls=cls)
            path = bundle / _artifacts(bundle)[target, "int8"]["file"]
            r = subprocess.run([sys.executable, "-c", code, str(ROOT), str(path), str(runs)], capture_output=True,
                               text=True, check=True)
            cpu, wall = map(float, r.stdout.split()[-2:])
            out.setdefault(target, []).append((cpu, wall))
    return {t: {"cpu_ms_1t": round(min(c for c, _ in v), 2), "wall_p50_ms_1t": round(min(w for _, w in v), 2)}
            for t, v in out.items()}


def accuracy(work: Path) -> dict:
    results = {}
    cases = [("resnet20", ["convert", CIFAR / "resnet20.th", "--calib", CIFAR / "cifar10_calib.npz",
                           "--eval", CIFAR / "cifar10_dev.npz"], "onnx,openvino,tflite,executorch")]
    if KERAS_R50.exists() and (IMAGENET / "dev").is_dir():
        cases.append(("resnet50_imagenet", ["convert", KERAS_R50, "--calib", IMAGENET / "calib", "--eval",
                                            IMAGENET / "dev", "--labels", IMAGENET / "classes.tsv"], "onnx,executorch"))
    for name, command, targets in cases:
        bundle = work / name
        edgeres(*command, "--targets", targets, "--precision", "int8,fp32", "--out", bundle, "--no-bench", cwd=work)
        evaluated = json.loads((bundle / "eval.json").read_text())
        rows = {f"{a['target']} {a['precision']}": {k: a.get(k) for k in ("top1", "top1_drop_pp", "top1_drop_ci95_pp",
                                                                          "agreement_pct")}
                for a in evaluated["artifacts"]}
        other = work / f"{name}-pt2e"
        edgeres(*command, "--targets", "executorch", "--precision", "int8", "--option", "executorch.ranges=pt2e",
                "--out", other, "--no-bench", cwd=work)
        pt2e = next(a for a in json.loads((other / "eval.json").read_text())["artifacts"]
                    if a["target"] == "executorch" and a["precision"] == "int8")
        rows["executorch int8 (ranges=pt2e)"] = {k: pt2e.get(k) for k in ("top1", "top1_drop_pp", "top1_drop_ci95_pp",
                                                                         "agreement_pct")}
        et = _artifacts(bundle)["executorch", "int8"]["options"]
        rows["executorch int8"]["ranges"] = {k: et.get(k) for k in ("ranges_from", "ranges_matched", "ranges_own_pass")}
        results[name] = rows
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="resnet18,resnet50")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--accuracy", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--cpu-time", action="store_true",
                        help="only the CPU time per inference of the int8 artifacts of WORK/<arch> (made before)")
    parser.add_argument("--work", type=Path)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="edgeres-et-"))
    work.mkdir(parents=True, exist_ok=True)
    doc = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    doc["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.cpu_time:
        doc["cpu_time"] = {a: cpu_ms(work / a, args.runs) for a in args.archs.split(",")}
    elif not args.skip_speed:
        doc["speed"] = [speed(a, work, args.runs, args.threads) for a in args.archs.split(",")]
    if args.accuracy:
        doc["accuracy"] = accuracy(work)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
