"""int8 fidelity on real CIFAR-10 ResNets: ``--quant fast`` vs ``--quant accurate`` vs the native recipes.

For each arch, in one run and from the same calibration images:
  edgeres fast / accurate   ``edgeres convert --quant …`` → onnx, openvino, tflite int8, evaluated on dev
  onnxruntime native        ``quantize_static`` QDQ, per-channel, MinMax, U8S8, reduce_range
  openvino native           ``nncf.quantize`` with every setting left default
  tflite native             the LiteRT converter's own min/max calibration (``tflite.ranges=converter``)
Reported per artifact: top-1, top-1 drop vs fp32 (pp) and top-1 agreement with fp32 (%).

Run: ``python benchmarks/fidelity.py [--archs resnet20,resnet32] [--no-native] [--json out.json]``
(needs ../shared/data/cifar10). Target (issue 8): accurate agreement ≥ 99.5 %, drop ≤ 0.1 pp.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "cifar10"


def edgeres_rows(arch: str, quant: str, work: Path, calib_images: int, *, targets: tuple[str, ...] | None = None,
                 target_options: dict | None = None, recipe: str | None = None) -> list[dict]:
    from edgeres.convert.config import ConvertConfig
    from edgeres.convert.run import convert

    out = work / f"{arch}.{quant}{'.' + '-'.join(targets) if targets else ''}"
    extra = {"targets": targets} if targets else {}
    convert(ConvertConfig(model=str(DATA / f"{arch}.th"), out=str(out), calib=str(DATA / "cifar10_calib.npz"),
                          eval_data=str(DATA / "cifar10_dev.npz"), precisions=("int8",), calib_images=calib_images,
                          quant=quant, bench=False, force=True, target_options=target_options or {}, **extra))
    ev = json.loads((out / "eval.json").read_text())
    return [{"arch": arch, "target": a["target"], "recipe": recipe or f"edgeres --quant {quant}", "top1": a["top1"],
             "top1_drop_pp": a["top1_drop_pp"], "agreement_pct": a["agreement_pct"]} for a in ev["artifacts"]]


def litert_native_rows(arch: str, work: Path, calib_images: int) -> list[dict]:
    """The LiteRT converter's own calibration (min/max) on the same Keras model and images."""
    return edgeres_rows(arch, "fast", work, calib_images, targets=("tflite",),
                        target_options={"tflite": {"ranges": "converter"}},
                        recipe="LiteRT converter min/max calibration (same Keras model)")


def native_rows(arch: str, work: Path, calib_images: int) -> list[dict]:
    """Native recipes from the fast bundle's fp32 reference ONNX, scored like ``edgeres eval``."""
    import nncf
    import openvino as ov

    from benchmarks.native_recipes import ort_quantize_static
    from edgeres.calibration import Preprocess, open_dataset
    from edgeres.targets import onnx as onnx_target
    from edgeres.targets import openvino as ov_target

    bundle = work / f"{arch}.fast"
    manifest = json.loads((bundle / "manifest.json").read_text())
    pre = Preprocess.from_dict(manifest["preprocess"])
    ref_onnx = bundle / manifest["reference"]["file"]
    calib = [x for x, _ in open_dataset(DATA / "cifar10_calib.npz").batches(pre, 32, calib_images)]

    ort_path = ort_quantize_static(ref_onnx, work / f"{arch}.ort_native.onnx", calib)
    nncf_xml = work / f"{arch}.nncf_default.xml"
    items = [x[i : i + 1] for x in calib for i in range(len(x))]
    ov.save_model(nncf.quantize(ov.convert_model(str(ref_onnx)), nncf.Dataset(items)), str(nncf_xml),
                  compress_to_fp16=False)

    xs, ys = zip(*open_dataset(DATA / "cifar10_dev.npz").batches(pre, 250, None))
    y = np.concatenate(ys)

    def predict(runner):
        return np.concatenate([runner(x).argmax(1) for x in xs])

    ref = predict(onnx_target.load_runner(ref_onnx))
    ref_top1 = float((ref == y).mean() * 100)
    rows = []
    for target, recipe, runner in (("onnx", "onnxruntime quantize_static (MinMax, per-channel, reduce_range)",
                                    onnx_target.load_runner(ort_path)),
                                   ("openvino", "nncf.quantize defaults", ov_target.load_runner(nncf_xml))):
        pred = predict(runner)
        top1 = float((pred == y).mean() * 100)
        rows.append({"arch": arch, "target": target, "recipe": recipe, "top1": round(top1, 2),
                     "top1_drop_pp": round(ref_top1 - top1, 2), "agreement_pct": round(float((pred == ref).mean() * 100), 2)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="resnet20,resnet32")
    ap.add_argument("--calib-images", type=int, default=300)
    ap.add_argument("--native", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--json", dest="json_out", default=None)
    args = ap.parse_args()
    if not (DATA / "cifar10_dev.npz").exists():
        sys.exit(f"{DATA}: real CIFAR-10 data not found (needs ../shared beside the repo)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for arch in args.archs.split(","):
            for quant in ("fast", "accurate"):
                rows += edgeres_rows(arch, quant, work, args.calib_images)
            if args.native:
                rows += native_rows(arch, work, args.calib_images)
                rows += litert_native_rows(arch, work, args.calib_images)
    rows.sort(key=lambda r: (r["arch"], r["target"], r["recipe"]))
    print("| arch | target | recipe | top-1 % | drop pp | agreement % |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arch']} | {r['target']} | {r['recipe']} | {r['top1']:.2f} | {r['top1_drop_pp']:+.2f} | "
              f"{r['agreement_pct']:.2f} |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
