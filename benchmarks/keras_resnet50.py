"""Issue 12 done-when: a Keras ResNet50 with the classic transfer-learning head goes through
``edgeres convert`` to ONNX / OpenVINO / TFLite, fp32 and int8, and every artifact is compared with
Keras itself on the same preprocessed images.

Model: ``keras.applications.ResNet50(weights=None, include_top=False, input_shape=(224, 224, 3))`` →
Flatten → Dense(256, relu) → Dropout(0.5) → Dense(10, softmax), random weights. So that a random
network still separates images, BatchNorm layers get random non-trivial statistics and gammas, and
the two Dense layers are rescaled on a few images so the logits spread over a few units (a saturated
or uniform softmax would make top-1 agreement meaningless). Images are synthetic (smooth random
colour fields of several scales, uint8 224²); the eval labels are Keras' own top-1, so each artifact's
"top-1" in eval.json is its agreement with Keras.

Reported per artifact: top-1 agreement with Keras, the max absolute probability error and, for fp32,
the max error of the centred logits recovered from the probabilities (log p − mean log p = z − mean z,
exact while no probability underflows) relative to their scale; plus the rebuilt torch model's raw
logits against Keras' pre-softmax logits. int8 artifacts quantise the softmax output itself (TFLite:
steps of 1/256), so their small probabilities are zero and logits cannot be recovered from them.

    python benchmarks/keras_resnet50.py [--work DIR] [--images 200]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def synthetic_images(n: int, seed: int, size: int = 224) -> np.ndarray:
    """Smooth random colour fields (coarse noise upsampled, at 2–28 cells a side) with a random tint."""
    from edgeres.calibration.preprocess import bilinear_resize

    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        cells = int(rng.integers(2, 29))
        coarse = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
        img = bilinear_resize(coarse, size, size).astype(np.float32)
        img = img * rng.uniform(0.3, 1.0) + rng.uniform(0, 120, 3)
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def build_model(keras, seed: int = 0):
    """(model, feature_model, last Dense): feature_model gives the final Dense's input."""
    L = keras.layers
    rng = np.random.default_rng(seed)
    keras.utils.set_random_seed(seed)  # the random initial weights, too
    base = keras.applications.ResNet50(weights=None, include_top=False, input_shape=(224, 224, 3))
    for layer in base.layers:
        if type(layer).__name__ == "BatchNormalization":
            c = layer.get_weights()[0].shape[0]
            layer.set_weights([0.5 + rng.random(c), 0.2 * rng.standard_normal(c), 0.2 * rng.standard_normal(c),
                               0.5 + rng.random(c)])
    inputs = keras.Input((224, 224, 3))
    hidden = L.Dense(256, activation="relu", name="fc256")
    h = L.Dropout(0.5)(hidden(L.Flatten()(base(inputs))))
    last = L.Dense(10, activation="softmax", name="predictions")
    model = keras.Model(inputs, last(h))
    return model, keras.Model(inputs, h), hidden, last


def spread_logits(model_parts, x_nhwc: np.ndarray, target_std: float = 3.0) -> None:
    """Rescale both Dense kernels so hidden units and logits have a useful spread on ``x_nhwc``."""
    import keras

    model, features, hidden, last = model_parts
    flat = keras.Model(model.inputs, hidden.input)
    f = np.asarray(flat(x_nhwc, training=False))
    w, b = hidden.get_weights()
    pre = f @ w
    w = w / (pre.std() + 1e-12)
    hidden.set_weights([w, (-np.median(f @ w, axis=0)).astype(np.float32)])  # about half the units active
    h = np.asarray(features(x_nhwc, training=False))
    w, b = last.get_weights()
    z = h @ w
    last.set_weights([(w * target_std / (z.std() + 1e-12)).astype(np.float32), np.zeros_like(b)])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/edgeres-keras-resnet50")
    ap.add_argument("--images", type=int, default=200)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    from edgeres.sources.keras_import import keras_caffe_preprocess

    t0 = time.perf_counter()
    pre = keras_caffe_preprocess(224).with_layout("NHWC")
    calib_images = synthetic_images(args.images + 56, seed=1)
    eval_images = synthetic_images(args.images, seed=2)
    parts = build_model(keras)
    model, features, _hidden, last = parts
    spread_logits(parts, pre(calib_images[:64]))
    model_path = work / "resnet50_flatten_head.keras"
    model.save(model_path)
    x_eval = pre(eval_images)
    keras_probs = np.concatenate([np.asarray(model(x_eval[i:i + 20], training=False)) for i in range(0, len(x_eval), 20)])
    w, b = last.get_weights()
    keras_logits = np.concatenate([np.asarray(features(x_eval[i:i + 20], training=False)) for i in range(0, len(x_eval), 20)]) @ w + b
    labels = keras_logits.argmax(1)
    np.savez(work / "calib.npz", x=calib_images, y=np.zeros(len(calib_images), np.int64))
    np.savez(work / "eval.npz", x=eval_images, y=labels)
    top2 = np.sort(keras_logits, 1)[:, -2:]
    print(f"model built and saved in {time.perf_counter() - t0:.0f} s: {model_path} "
          f"({model_path.stat().st_size / 1e6:.0f} MB); Keras top-1 over {len(labels)} eval images uses "
          f"{len(set(labels.tolist()))}/10 classes, logit std {keras_logits.std():.2f}, "
          f"median top-1/top-2 logit margin {np.median(top2[:, 1] - top2[:, 0]):.3f}, "
          f"min {np.min(top2[:, 1] - top2[:, 0]):.4f}")

    out = work / "bundle"
    cmd = [sys.executable, "-m", "edgeres.cli", "convert", str(model_path), "--calib", str(work / "calib.npz"),
           "--calib-images", str(len(calib_images)), "--targets", "onnx,openvino,tflite", "--precision", "fp32,int8",
           "--eval", str(work / "eval.npz"), "--out", str(out), "--no-bench", "--force"]
    print("$ edgeres " + " ".join(cmd[3:]))
    t1 = time.perf_counter()
    r = subprocess.run(cmd, check=False, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    print(f"convert exit {r.returncode} in {time.perf_counter() - t1:.0f} s")
    if r.returncode != 0:
        print(r.stderr[-3000:])
        return 1

    from dataclasses import replace

    import torch

    from edgeres.sources.loading import load_model
    from edgeres.targets import get_target

    loaded = load_model(model_path)
    print(f"spec {loaded.spec.name}: stem {loaded.spec.stem}, {loaded.spec.block}, stride_on {loaded.spec.stride_on}, "
          f"head {loaded.spec.head_layers}, preprocess {loaded.spec.preprocess.channel_order} mean "
          f"{loaded.spec.preprocess.mean} scale {loaded.spec.preprocess.scale}")
    raw = replace(loaded.spec, head_layers=replace(loaded.spec.head_layers, softmax=False))
    from edgeres.model.torch_model import build_torch

    torch_model = build_torch(raw)
    torch_model.load_state_dict(loaded.state_dict)
    with torch.no_grad():
        torch_logits = np.concatenate([torch_model.eval()(torch.from_numpy(x_eval[i:i + 20].transpose(0, 3, 1, 2).copy())).numpy()
                                       for i in range(0, len(x_eval), 20)])
    scale = max(1.0, float(np.abs(keras_logits).max()))
    print(f"rebuilt torch (pre-softmax) vs Keras pre-softmax logits: agreement "
          f"{(torch_logits.argmax(1) == labels).mean() * 100:.1f} %, max rel err "
          f"{np.abs(torch_logits - keras_logits).max() / scale:.2e}")

    manifest = json.loads((out / "manifest.json").read_text())
    evaluation = json.loads((out / "eval.json").read_text())
    by_file = {a["file"]: a for a in evaluation["artifacts"]}
    keras_centred = keras_logits - keras_logits.mean(1, keepdims=True)
    centred_scale = max(1.0, float(np.abs(keras_centred).max()))
    x_nchw = np.ascontiguousarray(x_eval.transpose(0, 3, 1, 2))
    print(f"\n{'artifact':16} {'agree vs Keras':>14} {'max |Δp|':>10} {'rel Δ logits':>13} {'eval.json top-1':>16}")
    for a in manifest["artifacts"]:
        if a["status"] != "ok":
            print(f"{a['target']} {a['precision']}: {a['status']} {a.get('error')}")
            continue
        runner = get_target(a["target"]).load_runner(out / a["files"][0], threads=2)
        probs = np.concatenate([runner(x_nchw[i:i + 20]) for i in range(0, len(x_nchw), 20)]).astype(np.float64)
        agree = (probs.argmax(1) == labels).mean() * 100
        logit_err = "–"
        if a["precision"] == "fp32" and probs.min() > 0:
            logp = np.log(probs)
            centred = logp - logp.mean(1, keepdims=True)
            logit_err = f"{np.abs(centred - keras_centred).max() / centred_scale:.2e}"
        print(f"{a['target'] + ' ' + a['precision']:16} {agree:13.1f} % {np.abs(probs - keras_probs).max():10.2e} "
              f"{logit_err:>13} {by_file[a['files'][0]]['top1']:15.1f} %")
    print(f"\nreference (fp32 ONNX) top-1 vs Keras labels: {evaluation['reference']['top1']:.1f} % on "
          f"{evaluation['images']} images; total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
