"""The README's first accuracy table: the real ImageNet Keras ResNet-50 on the 400 dev photos of
``../shared/data/imagenet``, edgeres int8 per target beside each runtime's own int8 recipe, in one run.

  edgeres            ``edgeres convert MODEL --calib calib/ --eval dev/ --labels classes.tsv`` (defaults:
                     shorter side 256 + centre crop 224, mse ranges), onnx, openvino, tflite in int8 and fp32
  edgeres accurate   the same with ``--quant accurate`` (weight clipping + bias correction first), int8
  onnxruntime        ``quantize_static`` of the bundle's fp32 ONNX: QDQ, per-channel int8 weights, MinMax, U8S8,
                     reduce_range (onnxruntime's Percentile/Entropy calibrators keep every activation: > 22 GB)
  openvino (NNCF)    ``nncf.quantize`` of the fp32 model converted by OpenVINO, every setting left default
  tflite (LiteRT)    ``TFLiteConverter.from_keras_model`` full-int8 with the photos as representative dataset

Every recipe calibrates on the same 200 calib photos with the same preprocessing (the bundle's) and is evaluated
on the same 400 dev photos: top-1 and top-1 agreement with the fp32 reference. Keras itself, fed the same pixels,
is the first row.

Run: ``.venv/bin/python benchmarks/imagenet_resnet50.py [--work DIR] [--json FILE]`` (~10 min, ~4 GB on 2 cores;
reuses ``DIR/bundle`` and ``DIR/bundle-accurate`` when they are there: the artifacts are then re-evaluated, not re-made).
With ``--json benchmarks/results/imagenet_resnet50.json``, ``python benchmarks/readme_tables.py --blocks imagenet
--write`` puts the table into README.md and docs/accuracy.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


RUNTIME = {"onnx": "onnxruntime", "openvino": "OpenVINO", "tflite": "LiteRT"}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def convert(model: Path, data: Path, out: Path, *extra: str, precision: str = "int8,fp32") -> float:
    cmd = [sys.executable, "-m", "edgeres.cli", "convert", str(model), "--calib", str(data / "calib"), "--eval", str(data / "dev"),
           "--labels", str(data / "classes.tsv"), "--targets", "onnx,openvino,tflite", "--precision", precision,
           "--no-bench", "--jobs", "0", "--out", str(out), *extra]
    log("$ edgeres " + " ".join(cmd[3:]))
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return time.perf_counter() - t0


def batches_of(dataset, pre, batch: int = 25):
    xs, ys = [], []
    for x, y in dataset.batches(pre, batch):
        xs.append(x)
        ys.append(y)
    return xs, (np.concatenate(ys) if ys[0] is not None else None)


def predictions(run, xs) -> np.ndarray:
    return np.concatenate([np.asarray(run(x)).reshape(len(x), -1).argmax(1) for x in xs])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/edgeres-imagenet-resnet50")
    ap.add_argument("--json", help="Also write the rows to this JSON file.")
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from tests.imagenet_data import ensure_resnet50, imagenet_dir

    data = imagenet_dir()
    model, why = ensure_resnet50()
    if data is None or model is None:
        log(f"cannot run: {why or 'no ImageNet data'}")
        return 2
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    bundle = work / "bundle"
    seconds = None if (bundle / "eval.json").is_file() else convert(model, data, bundle)
    accurate = work / "bundle-accurate"
    seconds_accurate = (None if (accurate / "eval.json").is_file()
                        else convert(model, data, accurate, "--quant", "accurate", precision="int8"))

    from edgeres.calibration import Preprocess, open_dataset
    from edgeres.measure.evaluate import number_class_folders
    from edgeres.targets import get_target

    manifest = json.loads((bundle / "manifest.json").read_text())
    pre = Preprocess.from_dict(manifest["preprocess"])
    dev = open_dataset(data / "dev")
    number_class_folders(dev, manifest["arch"]["labels"], manifest["arch"].get("label_keys"))
    xs, y = batches_of(dev, pre)
    calib, _ = batches_of(open_dataset(data / "calib"), pre)
    ref_path = bundle / manifest["reference"]["file"]
    fp32 = predictions(get_target("onnx").load_runner(ref_path), xs)
    rows = []

    def add(runtime: str, recipe: str, precision: str, pred: np.ndarray) -> None:
        rows.append({"runtime": runtime, "recipe": recipe, "precision": precision,
                     "top1": round(float((pred == y).mean() * 100), 2),
                     "agreement_pct": round(float((pred == fp32).mean() * 100), 2)})
        log(f"{runtime} {recipe} {precision}: top-1 {rows[-1]['top1']:.2f} %, agrees with fp32 {rows[-1]['agreement_pct']:.2f} %")

    import keras

    keras_model = keras.models.load_model(model, compile=False)
    nhwc = [np.ascontiguousarray(x.transpose(0, 2, 3, 1)) for x in xs]
    add("Keras", "the model itself, fed the same pixels", "fp32",
        np.concatenate([np.asarray(keras_model(x, training=False)).argmax(1) for x in nhwc]))
    add("onnxruntime", "edgeres fp32 reference", "fp32", fp32)
    for a in manifest["artifacts"]:
        if a["status"] == "ok":
            add(RUNTIME[a["target"]], "edgeres", a["precision"], predictions(get_target(a["target"]).load_runner(bundle / a["file"]), xs))
    for a in json.loads((accurate / "manifest.json").read_text())["artifacts"]:
        if a["status"] == "ok":
            add(RUNTIME[a["target"]], "edgeres --quant accurate", a["precision"],
                predictions(get_target(a["target"]).load_runner(accurate / a["file"]), xs))

    log("onnxruntime quantize_static (QDQ, per-channel, MinMax, reduce_range)…")
    import onnxruntime as ort

    from benchmarks.native_recipes import ort_quantize_static

    input_name = ort.InferenceSession(str(ref_path), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    ort_path = ort_quantize_static(ref_path, work / "ort_native.int8.onnx", calib, input_name=input_name)
    add("onnxruntime", "quantize_static MinMax per-channel QDQ", "int8",
        predictions(get_target("onnx").load_runner(ort_path), xs))

    log("nncf.quantize defaults…")
    import nncf
    import openvino as ov

    nncf_xml = work / "nncf_default.int8.xml"
    items = [x[i:i + 1] for x in calib for i in range(len(x))]
    ov.save_model(nncf.quantize(ov.convert_model(str(ref_path)), nncf.Dataset(items)), str(nncf_xml),
                  compress_to_fp16=False)
    add("OpenVINO", "nncf.quantize defaults", "int8", predictions(get_target("openvino").load_runner(nncf_xml), xs))

    log("LiteRT converter full-int8 with the calib photos as representative dataset…")
    import tensorflow as tf

    conv = tf.lite.TFLiteConverter.from_keras_model(keras_model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([np.ascontiguousarray(x[i:i + 1].transpose(0, 2, 3, 1))]
                                           for x in calib for i in range(len(x)))
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    tfl = work / "litert_native.int8.tflite"
    with contextlib.redirect_stdout(sys.stderr):  # the converter prints its SavedModel's signature on stdout
        tfl.write_bytes(conv.convert())
    add("LiteRT", "TFLiteConverter full-int8, representative dataset", "int8",
        predictions(get_target("tflite").load_runner(tfl), xs))

    result = {"model": str(model), "data": str(data), "dev_images": int(len(y)),
              "calib_images": int(sum(len(x) for x in calib)), "preprocess": pre.describe(),
              "convert_seconds": seconds, "convert_seconds_accurate": seconds_accurate, "host": platform.node(), "machine": platform.machine(), "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"ImageNet Keras ResNet-50, {len(y)} dev photos ({pre.describe()}); calibration: "
          f"{result['calib_images']} other photos, the same for every recipe.\n")
    from benchmarks.readme_tables import imagenet_table

    print(imagenet_table(result))  # the table of README.md and docs/accuracy.md (readme_tables.py --blocks imagenet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
