"""OpenVINO int8 latency: our int8 IR vs the fp32 IR vs NNCF's default recipe, and our timing vs benchmark_app.

Random-weight ResNet-18/50 at 224² (BN statistics randomised so activations look trained). Per model:

1. ``edgeres convert`` (the real pipeline: calibrate once → QDQ ONNX → OpenVINO) writes the fp32 and
   int8 IRs ("ours", with the target's default engine unless --engine is given);
2. NNCF's default recipe: ``nncf.quantize(fp32 IR, same images)`` with every setting left default;
3. the three IRs are timed in-process (``targets.openvino.load_runner``, batch 1, LATENCY hint, f32
   inference precision) in interleaved rounds, so machine drift hits all of them alike;
4. ``benchmark_app`` times the fp32 and our int8 IR with the same threads, hint and precision.

Targets from issue 5: int8/fp32 median ≤ 0.55, ours/NNCF-default ≤ 1.05, ours vs benchmark_app within 10 %.

    python benchmarks/openvino_int8.py [--models resnet18,resnet50] [--threads 1] [--rounds 15] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_inputs(name: str, work: Path, calib_images: int) -> tuple[Path, Path]:
    """A random-weight checkpoint of ``name`` and an npz of random calibration images."""
    import torch

    from edgeres.sources.loading import save_checkpoint
    from edgeres.model.torch_model import build_torch, randomize_bn
    from edgeres.model.zoo import get_spec

    torch.manual_seed(0)
    spec = get_spec(name)
    model = randomize_bn(build_torch(spec))
    ckpt = work / f"{name}.pt"
    save_checkpoint(ckpt, spec, model.state_dict())
    rng = np.random.default_rng(0)
    size = spec.preprocess.resize or spec.preprocess.size
    x = rng.integers(0, 256, (calib_images, size, size, 3), dtype=np.uint8)
    data = work / "calib.npz"
    np.savez(data, x=x, y=np.zeros(calib_images, np.int64))
    return ckpt, data


def convert_ours(ckpt: Path, data: Path, out: Path, calib_images: int, engine: str | None) -> dict:
    from edgeres.convert.config import ConvertConfig
    from edgeres.convert.run import convert

    options = {"openvino": {"engine": engine}} if engine else {}
    cfg = ConvertConfig(model=str(ckpt), out=str(out), calib=str(data), targets=("openvino",),
                        precisions=("fp32", "int8"), calib_images=calib_images, target_options=options, force=True,
                        bench=False)
    return convert(cfg)


def nncf_default(fp32_onnx: Path, data: Path, preprocess: dict, out_xml: Path, calib_images: int) -> float:
    """NNCF's default recipe on the same images; returns the seconds it took."""
    import nncf
    import openvino as ov

    from edgeres.calibration import Preprocess, open_dataset

    t0 = time.perf_counter()
    pre = Preprocess.from_dict(preprocess)
    items = [x[i : i + 1] for x, _ in open_dataset(data).batches(pre, 32, calib_images) for i in range(len(x))]
    model = nncf.quantize(ov.convert_model(str(fp32_onnx)), nncf.Dataset(items))
    ov.save_model(model, str(out_xml), compress_to_fp16=False)
    return time.perf_counter() - t0


def time_interleaved(paths: dict[str, Path], shape: tuple, threads: int, rounds: int, per_round: int) -> dict:
    from edgeres.targets.openvino import load_runner

    runners = {k: load_runner(p, threads=threads, hint="LATENCY") for k, p in paths.items()}
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    for r in runners.values():  # warm-up
        for _ in range(3):
            r.run_native(x)
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for k, r in runners.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                r.run_native(x)
                times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: {"median_ms": round(float(np.median(v)), 3), "p90_ms": round(float(np.percentile(v, 90)), 3),
                "runs": len(v)} for k, v in times.items()}


def benchmark_app_median_ms(xml: Path, shape: tuple, threads: int, iterations: int) -> float:
    exe = shutil.which("benchmark_app") or str(Path(sys.executable).parent / "benchmark_app")
    # benchmark_app refuses -nthreads with a hint; -hint none + 1 stream + 1 sync request is what LATENCY sets
    cmd = [exe, "-m", str(xml), "-d", "CPU", "-hint", "none", "-nstreams", "1", "-nireq", "1", "-api", "sync",
           "-nthreads", str(threads), "-infer_precision", "f32",
           "-shape", "[" + ",".join(map(str, shape)) + "]", "-niter", str(iterations)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    m = re.search(r"Median:\s+([\d.]+)\s+ms", r.stdout)
    if r.returncode != 0 or not m:
        raise RuntimeError(f"benchmark_app failed ({r.returncode}): {(r.stderr or r.stdout)[-400:]}")
    return float(m.group(1))


def beside_benchmark_app(paths: dict[str, Path], shape: tuple, threads: int, args) -> tuple[dict, dict]:
    """Alternate chunks of benchmark_app and our in-process loop on each IR, so drift hits both alike;
    returns the median over chunks of each tool's median, per IR."""
    chunks = 3
    iterations = max(10, args.rounds * args.per_round // chunks)
    ba: dict[str, list[float]] = {k: [] for k in paths}
    ours: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(chunks):
        for k, p in paths.items():
            ours[k].append(time_interleaved({k: p}, shape, threads, 1, iterations)[k]["median_ms"])
            ba[k].append(benchmark_app_median_ms(p, shape, threads, iterations))
    return ({k: round(float(np.median(v)), 3) for k, v in ba.items()},
            {k: round(float(np.median(v)), 3) for k, v in ours.items()})


def bench_model(name: str, args, work: Path) -> dict:
    ckpt, data = build_inputs(name, work, args.calib_images)
    bundle = work / f"{name}-bundle"
    t0 = time.perf_counter()
    manifest = convert_ours(ckpt, data, bundle, args.calib_images, args.engine)
    convert_s = time.perf_counter() - t0
    ir = {a["precision"]: a for a in manifest["artifacts"] if a["target"] == "openvino" and a.get("status") == "ok"}
    if set(ir) != {"fp32", "int8"}:
        failed = [a.get("error") for a in manifest["artifacts"] if a.get("status") != "ok"]
        raise RuntimeError(f"{name}: convert did not make both OpenVINO IRs: {failed}")
    nncf_xml = work / f"{name}.nncf_default.xml"
    nncf_s = nncf_default(bundle / "model.fp32.onnx", data, manifest["preprocess"], nncf_xml, args.calib_images)
    size = manifest["preprocess"]["size"]
    shape = (1, 3, size, size)
    paths = {"fp32": bundle / ir["fp32"]["file"], "int8_ours": bundle / ir["int8"]["file"], "int8_nncf_default": nncf_xml}
    results = {}
    for threads in args.threads:
        t = time_interleaved(paths, shape, threads, args.rounds, args.per_round)
        ba, inproc = beside_benchmark_app({k: paths[k] for k in ("fp32", "int8_ours")}, shape, threads, args)
        results[f"{threads}t"] = {
            "latency": t,
            "int8_over_fp32": round(t["int8_ours"]["median_ms"] / t["fp32"]["median_ms"], 3),
            "ours_over_nncf_default": round(t["int8_ours"]["median_ms"] / t["int8_nncf_default"]["median_ms"], 3),
            "benchmark_app_median_ms": ba,
            "inprocess_median_ms_beside_benchmark_app": inproc,
            "inprocess_over_benchmark_app": {k: round(inproc[k] / ba[k], 3) for k in ba},
        }
    return {"model": name, "engine": ir["int8"]["engine"], "int8_options": ir["int8"].get("options"),
            "convert_s": round(convert_s, 1), "nncf_default_s": round(nncf_s, 1),
            "sizes_mb": {k: round(sum((bundle / f).stat().st_size for f in ir[k]["files"]) / 1e6, 2) for k in ir},
            "results": results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,resnet50")
    ap.add_argument("--threads", default="1", help="comma list, e.g. 1,2")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--per-round", type=int, default=4)
    ap.add_argument("--calib-images", type=int, default=64)
    ap.add_argument("--engine", choices=("qdq", "nncf"), default=None, help="our int8 engine (default: the target's)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    args.threads = [int(t) for t in args.threads.split(",")]
    import openvino

    report = {"openvino": openvino.__version__, "threads": args.threads, "models": []}
    with tempfile.TemporaryDirectory(prefix="ov-int8-bench-") as tmp:
        for name in args.models.split(","):
            work = Path(tmp) / name
            work.mkdir()
            entry = bench_model(name, args, work)
            report["models"].append(entry)
            print(json.dumps(entry, indent=1), file=sys.stderr, flush=True)
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
