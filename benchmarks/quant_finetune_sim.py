"""Does the fake-quantised torch model of ``--quant finetune`` agree with what each runtime runs?

Converts one model with ``--quant finetune`` (recipe fields overridable, ``--epochs 0`` allowed: the
untrained fake-quant model), keeps the ``TunedInt8`` the conversion lowered, then on the same dev images
compares the torch fake-quant model's logits with the ONNX Runtime / OpenVINO / TFLite int8 artifacts':
top-1 agreement sim-vs-runtime, logit RMS / max error, and each one's agreement with fp32.

    python benchmarks/quant_finetune_sim.py --arch resnet20 --epochs 0 --images 2000 --work /tmp/qft \
        [--recipe '{"lr": 1e-5}'] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "cifar10"
TARGETS = ("onnx", "openvino", "tflite")


def convert_capturing(arch: str, out: Path, epochs: int, recipe: dict, seed: int, *, eval_images: int | None,
                      quant: str = "finetune", model: str | None = None):
    """Convert with ``--quant finetune`` (recipe overrides applied) and return the ``TunedInt8``."""
    import dataclasses

    from edgeres.convert import build
    from edgeres.convert.config import ConvertConfig
    from edgeres.convert.run import convert

    captured = {}
    original = build.quantization_aware_finetune

    def capture(spec, state_dict, calib_batches, dataset, cfg):
        cfg = dataclasses.replace(cfg, epochs=epochs, **recipe)
        tuned = original(spec, state_dict, calib_batches, dataset, cfg)
        captured[cfg.weight_levels] = tuned
        return tuned

    build.quantization_aware_finetune = capture
    try:
        t0 = time.perf_counter()
        convert(ConvertConfig(model=model or str(DATA / f"{arch}.th"), out=str(out),
                              calib=str(DATA / "cifar10_calib.npz"),
                              eval_data=str(DATA / "cifar10_dev.npz"), eval_images=eval_images, targets=TARGETS,
                              precisions=("int8",), quant=quant, seed=seed, bench=False, force=True,
                              finetune_data=str(DATA / "cifar10_train10k.npz") if quant == "finetune" else None,
                              finetune_epochs=max(epochs, 1)))
        wall = time.perf_counter() - t0
    finally:
        build.quantization_aware_finetune = original
    return captured, wall


def dev_batch(spec, n: int) -> np.ndarray:
    from dataclasses import replace

    from edgeres.calibration import open_dataset

    ds = open_dataset(str(DATA / "cifar10_dev.npz"))
    idx = np.arange(min(n, len(ds)))
    images = ds.read(idx, spec.preprocess)
    return replace(spec.preprocess, resize=None)(images, ds.source)


def compare(spec, tuned, bundle: Path, x: np.ndarray, state_dict: dict) -> dict:
    import torch

    from edgeres import targets
    from edgeres.compress.quant_finetune import fake_quant_model
    from edgeres.model.torch_model import build_torch

    torch.set_num_threads(2)
    teacher = build_torch(spec)
    teacher.load_state_dict(state_dict)
    teacher.eval()
    fq = fake_quant_model(spec, tuned)
    with torch.no_grad():
        fp32 = np.concatenate([teacher(torch.from_numpy(x[s:s + 500])).numpy() for s in range(0, len(x), 500)])
        sim = np.concatenate([fq(torch.from_numpy(x[s:s + 500])).numpy() for s in range(0, len(x), 500)])
    manifest = json.loads((bundle / "manifest.json").read_text())
    out = {"images": len(x), "sim_vs_fp32_pct": round(100 * float((sim.argmax(1) == fp32.argmax(1)).mean()), 2),
           "sim_logit_rms_vs_fp32": round(float(np.sqrt(((sim - fp32) ** 2).mean())), 4), "targets": {}}
    for target in TARGETS:
        art = next(a for a in manifest["artifacts"] if a["target"] == target and a["precision"] == "int8")
        run = targets.get_target(target).load_runner(bundle / art["file"], threads=2)
        y = np.concatenate([run(x[s:s + 250]) for s in range(0, len(x), 250)])
        err = y - sim
        out["targets"][target] = {
            "runtime_vs_sim_top1_pct": round(100 * float((y.argmax(1) == sim.argmax(1)).mean()), 2),
            "runtime_vs_fp32_pct": round(100 * float((y.argmax(1) == fp32.argmax(1)).mean()), 2),
            "logit_rms_vs_sim": round(float(np.sqrt((err ** 2).mean())), 4),
            "logit_max_vs_sim": round(float(np.abs(err).max()), 4),
            "logit_rms_vs_fp32": round(float(np.sqrt(((y - fp32) ** 2).mean())), 4)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet20")
    ap.add_argument("--epochs", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--recipe", default="{}", help="JSON overrides of QuantFinetuneConfig fields")
    ap.add_argument("--images", type=int, default=2000, help="dev images for the sim-vs-runtime comparison")
    ap.add_argument("--eval-images", type=int, default=None, help="dev images for convert's own eval (all)")
    ap.add_argument("--work", required=True)
    ap.add_argument("--json", dest="json_out", default=None)
    args = ap.parse_args()
    from edgeres.sources.loading import load_model

    work = Path(args.work)
    recipe = json.loads(args.recipe)
    captured, wall = convert_capturing(args.arch, work, args.epochs, recipe, args.seed, eval_images=args.eval_images)
    (work / "tuned.pkl").write_bytes(pickle.dumps(captured))
    tuned = captured[max(captured)]
    ev = json.loads((work / "eval.json").read_text())
    loaded = load_model(str(DATA / f"{args.arch}.th"))
    x = dev_batch(loaded.spec, args.images)
    result = {"arch": args.arch, "epochs": args.epochs, "seed": args.seed, "recipe": recipe,
              "convert_wall_s": round(wall, 1), "finetune_s": tuned.record["seconds"], "curve": tuned.record["curve"],
              "eval": {a["target"]: {"agreement_pct": a["agreement_pct"], "top1_drop_pp": a["top1_drop_pp"]}
                       for a in ev["artifacts"]},
              **compare(loaded.spec, tuned, work, x, loaded.state_dict)}
    print(json.dumps(result, indent=1))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
