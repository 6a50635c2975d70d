"""Peak memory of every process of a ResNet-152 conversion (issue 38: ≤ 3 GB in any process).

Makes two ResNet-152 files with random weights (BatchNorm statistics randomised so activations look
trained; nothing is downloaded): Keras' own ``keras.applications.ResNet152(weights=None)`` saved as
``.keras``, and a torchvision-layout state_dict ``.pth`` (the zoo's ResNet-152, whose keys are
torchvision's), plus 64 random 256² images. Each is converted with

    edgeres convert MODEL --calib calib.npz --targets onnx,openvino,tflite --precision int8,fp32 --no-bench

while a thread samples the RSS of every process of the tree every 50 ms (psutil). Per process it keeps
the peak and the progress line (stderr) last printed when it happened, and for the main process the
peak between one progress line and the next (where the memory goes). CPU = user+sys of the
conversion and every process it waited for (``os.wait4``). The sha256 of every artifact is kept, so two
runs (before/after a change) show whether any byte moved. ``--executorch`` converts the ``.pth`` to
ExecuTorch int8+fp32 too (a separate run: its peak is reported, not part of the 3 GB goal).

    python benchmarks/memory_resnet152.py [--models keras,pth] [--executorch] [--work DIR]
                                          [--json benchmarks/results/memory_resnet152.json]
    python benchmarks/memory_resnet152.py --table before=benchmarks/results/memory_resnet152_before.json \
                                                  after=benchmarks/results/memory_resnet152.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL_GB = 3.0
CALIB_IMAGES = 64

MAKE_KERAS = """
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np, keras
m = keras.applications.ResNet152(weights=None)
rng = np.random.default_rng(0)
for layer in m.layers:  # BatchNorm statistics like a trained model's
    if isinstance(layer, keras.layers.BatchNormalization):
        c = layer.get_weights()[0].shape[0]
        layer.set_weights([0.5 + rng.random(c, dtype=np.float32), 0.2 * rng.standard_normal(c).astype(np.float32),
                           0.2 * rng.standard_normal(c).astype(np.float32), 0.5 + rng.random(c, dtype=np.float32)])
m.save(sys.argv[1])
"""

MAKE_PTH = """
import sys, torch
sys.path.insert(0, {root!r})
from edgeres.model.torch_model import build_torch, randomize_bn
from edgeres.model.zoo import get_spec
torch.manual_seed(0)
torch.save(randomize_bn(build_torch(get_spec("resnet152"))).state_dict(), sys.argv[1])
"""


def make_inputs(work: Path) -> dict[str, Path]:
    """The two model files and the calibration images (kept in ``work`` and reused)."""
    import numpy as np

    work.mkdir(parents=True, exist_ok=True)
    files = {"keras": work / "resnet152.keras", "pth": work / "resnet152.pth", "calib": work / "calib.npz"}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if not files["keras"].exists():
        subprocess.run([sys.executable, "-c", MAKE_KERAS, str(files["keras"])], check=True, env=env)
    if not files["pth"].exists():
        subprocess.run([sys.executable, "-c", MAKE_PTH.format(root=str(ROOT)), str(files["pth"])], check=True,
                       env=env)
    if not files["calib"].exists():
        rng = np.random.default_rng(0)
        np.savez(files["calib"], x=rng.integers(0, 256, (CALIB_IMAGES, 256, 256, 3), dtype=np.uint8),
                 y=rng.integers(0, 1000, CALIB_IMAGES))
    return files


def _role(proc, root_pid: int) -> str:
    if proc.pid == root_pid:
        return "main"
    cmd = proc.cmdline()
    for arg in cmd:
        name = Path(arg).name
        if name.startswith("task-") and name.endswith(".json"):  # edgeres.convert.workers' task file
            return "worker " + name[len("task-"):-len(".json")].replace("-", " ", 1)
    return " ".join(Path(c).name for c in cmd[1:4])[:60]


def measured_convert(args: list[str], out: Path) -> dict:
    """Run ``edgeres convert ARGS --out OUT``; wall, CPU, per-process and tree peaks, artifacts' sha256."""
    import psutil

    cmd = [sys.executable, "-m", "edgeres.cli", "convert", *args, "--no-bench", "--force", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    stage = {"line": "(start)"}
    peaks: dict[str, dict] = {}  # role -> {"gb", "during"}
    main_stages: dict[str, float] = {}  # progress line -> the main process's peak while it was the last
    tree = {"gb": 0.0, "during": ""}
    done = threading.Event()

    def sample():
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            total, line = 0, stage["line"]
            for p in procs:
                try:
                    gb, role = p.memory_info().rss / 1e9, _role(p, proc.pid)
                except psutil.Error:
                    continue
                total += gb
                if gb > peaks.get(role, {}).get("gb", 0.0):
                    peaks[role] = {"gb": gb, "during": line}
                if role == "main":
                    main_stages[line] = max(main_stages.get(line, 0.0), gb)
            if total > tree["gb"]:
                tree.update(gb=total, during=line)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    lines = []
    for line in proc.stderr:
        line = line.rstrip()
        if line:
            lines.append(line)
            stage["line"] = line[:120]
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    sampler.join()
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd[3:6])}… failed:\n" + "\n".join(lines[-30:]))
    manifest = json.loads((out / "manifest.json").read_text())
    sha = {manifest["reference"]["file"]: manifest["reference"]["sha256"]}
    for a in manifest["artifacts"]:
        for r in a.get("file_records", []):
            sha[r["file"]] = r["sha256"]
    rnd = lambda v: round(v, 3)  # noqa: E731
    return {"command": "edgeres convert " + " ".join(args) + " --no-bench --out OUT",
            "wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_tree_gb": rnd(tree["gb"]), "peak_tree_during": tree["during"],
            "peak_per_process_gb": {k: {"gb": rnd(v["gb"]), "during": v["during"]}
                                    for k, v in sorted(peaks.items(), key=lambda kv: -kv[1]["gb"])},
            "largest_process_gb": rnd(max(v["gb"] for v in peaks.values())),
            "main_process_by_step_gb": {k: rnd(v) for k, v in main_stages.items()},
            "artifacts_sha256": sha, "timings_s": manifest.get("timings")}


def _by_role(run: dict) -> dict[str, float]:
    """{column: GB} of a run's per-process peaks (a forked child before its exec shows the parent's pages: left out)."""
    cols: dict[str, float] = {}
    for role, peak in run["peak_per_process_gb"].items():
        col = ("main" if role == "main" else "Keras mapping" if "keras_process" in role
               else role.replace("worker ", "") if role.startswith("worker ") else None)
        if col and col.startswith("openvino"):
            col = "openvino (each)"
        if col:
            cols[col] = max(cols.get(col, 0.0), peak["gb"])
    return cols


def table(results: list[tuple[str, dict]]) -> str:
    """The docs' markdown table: per run, the largest RSS of each kind of process, the tree's, wall and CPU."""
    cols = ["main", "Keras mapping", "tflite int8", "tflite fp32", "openvino (each)", "executorch int8",
            "executorch fp32"]
    rows = [(label, name, run) for label, result in results for name, run in result["runs"].items()]
    used = [c for c in cols if any(c in _by_role(run) for _, _, run in rows)]
    lines = ["| run | " + " | ".join(used) + " | tree | largest | wall s | CPU s |",
             "|---|" + "---:|" * (len(used) + 4)]
    for label, name, run in rows:
        by = _by_role(run)
        cells = [f"{by[c]:.2f}" if c in by else "—" for c in used]
        lines.append(f"| {name}, {label} | " + " | ".join(cells) + f" | {run['peak_tree_gb']:.2f} | "
                     f"**{run['largest_process_gb']:.2f}** | {run['wall_s']:.0f} | {run['cpu_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="keras,pth", help="comma list of keras, pth")
    ap.add_argument("--executorch", action="store_true", help="also convert the .pth to ExecuTorch int8+fp32")
    ap.add_argument("--work", default="/tmp/edgeres-memory-resnet152", help="model files, images, bundles")
    ap.add_argument("--json", help="write the results here (e.g. benchmarks/results/memory_resnet152.json)")
    ap.add_argument("--label", default="", help="what this run measures (kept in the JSON)")
    ap.add_argument("--table", nargs="+", metavar="LABEL=JSON",
                    help="only print the docs' table of earlier results, e.g. before=a.json after=b.json")
    args = ap.parse_args()
    if args.table:
        print(table([(a.split("=", 1)[0], json.loads(Path(a.split("=", 1)[1]).read_text())) for a in args.table]))
        return

    work = Path(args.work)
    files = make_inputs(work)
    calib = ["--calib", str(files["calib"])]
    plan = {f"{model} three targets": ([str(files[model]), *calib, "--targets", "onnx,openvino,tflite",
                                        "--precision", "int8,fp32"], work / f"out-{model}")
            for model in args.models.split(",")}
    if args.executorch:
        plan["pth executorch"] = ([str(files["pth"]), *calib, "--targets", "executorch", "--precision", "int8,fp32"],
                                  work / "out-et")
    result = {"label": args.label, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "cores": os.cpu_count(), "load_before": [round(v, 2) for v in os.getloadavg()],
              "goal_gb_any_process": GOAL_GB, "calib_images": CALIB_IMAGES, "runs": {}}
    for name, (convert_args, out) in plan.items():
        run = result["runs"][name] = measured_convert(convert_args, out)
        ok = "meets" if run["largest_process_gb"] <= GOAL_GB else "MISSES"
        print(f"{name}: largest process {run['largest_process_gb']} GB ({ok} the {GOAL_GB} GB goal), "
              f"tree {run['peak_tree_gb']} GB, {run['wall_s']} s wall, {run['cpu_s']} s CPU", flush=True)
        result["load_after"] = [round(v, 2) for v in os.getloadavg()]
        if args.json:  # after every run: a long series leaves what it measured
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
