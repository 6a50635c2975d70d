"""TFLite accuracy drop per precision on the real CIFAR-10 ResNets, end to end through the CLI.

For each model: ``edgeres convert MODEL --calib calib.npz --targets tflite --precision
int8,fp16,dynamic,fp32`` then ``edgeres eval DIR --data dev.npz --json``; plus the TFLite fp32
artifact's logits against the torch fp32 model's (max |Δ| / max |torch logit|). Prints one JSON document.

    python benchmarks/tflite_accuracy.py [--data ../shared/data/cifar10] [--models resnet20,resnet32]
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
sys.path.insert(0, str(ROOT))
LIMITS_PP = {"int8": 0.5, "fp16": 0.05, "dynamic": 0.3, "fp32": 0.0}


def cli(*args) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "edgeres.cli", *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise SystemExit(f"edgeres {' '.join(map(str, args[:2]))} failed:\n{r.stderr[-2000:]}")
    return r.stdout


def torch_relative_error(checkpoint: Path, tflite_path: Path, dev: Path) -> float:
    from edgeres.calibration import open_dataset
    from edgeres.measure.evaluate import collect_logits, torch_runner
    from edgeres.sources.loading import load_model
    from edgeres.targets import tflite

    loaded = load_model(checkpoint)
    ds = open_dataset(dev)
    reference = collect_logits(torch_runner(loaded.to_torch()), ds, loaded.spec.preprocess)
    logits = collect_logits(tflite.load_runner(tflite_path), ds, loaded.spec.preprocess)
    return float(abs(logits - reference).max() / abs(reference).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10"))
    parser.add_argument("--models", default="resnet20,resnet32")
    args = parser.parse_args()
    data = Path(args.data)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            out = Path(tmp) / name
            t0 = time.perf_counter()
            cli("convert", data / f"{name}.th", "--calib", data / "cifar10_calib.npz", "--targets", "tflite",
                "--precision", "int8,fp16,dynamic,fp32", "--out", out)
            convert_s = time.perf_counter() - t0
            evaluation = json.loads(cli("eval", out, "--data", data / "cifar10_dev.npz", "--json"))
            manifest = json.loads((out / "manifest.json").read_text())
            rel = torch_relative_error(data / f"{name}.th", out / "tflite" / "model.fp32.tflite",
                                       data / "cifar10_dev.npz")
            int8_ops = json.loads((out / "tflite" / "model.int8.ops.json").read_text())
            results.append({
                "model": name, "images": evaluation["images"], "reference_top1": evaluation["reference"]["top1"],
                "convert_s": round(convert_s, 1),
                "artifacts": [{**{k: a[k] for k in ("precision", "top1", "top1_drop_pp", "agreement_pct",
                                                     "max_abs_logit_err")},
                               "size_kb": round(next(m["size_bytes"] for m in manifest["artifacts"]
                                                     if m["precision"] == a["precision"]) / 1e3, 1),
                               "within_limit": a["top1_drop_pp"] <= LIMITS_PP[a["precision"]]}
                              for a in evaluation["artifacts"]],
                "fp32_vs_torch_max_rel_err": rel,
                "int8_op_summary": int8_ops["summary"], "int8_float_compute_ops": len(int8_ops["float_compute_ops"]),
            })
    print(json.dumps({"limits_pp": LIMITS_PP, "results": results}, indent=2))


if __name__ == "__main__":
    main()
