"""Bundles assembled by hand (manifest + files as ``edgeres.bundle`` expects) for bench/report tests,
so these tests do not depend on every target's compiler."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from edgeres.bundle import FORMAT, FORMAT_VERSION, MANIFEST, REFERENCE_FILE, file_record, write_json_atomic


def _artifact(bundle: Path, target: str, precision: str, files: list[str], layout="NCHW", dtype="float32") -> dict:
    records = [file_record(bundle, f) for f in files]
    return {"target": target, "precision": precision, "files": files, "file": files[0], "engine": "handmade",
            "input_layout": layout, "input_dtype": dtype, "options": {}, "tool_versions": {}, "notes": [],
            "file_records": records, "size_bytes": sum(r["size_bytes"] for r in records),
            "sha256": records[0]["sha256"], "status": "ok"}


def write_tiny_tflite_int8(path: Path, size: int = 16) -> None:
    """A tiny full-int8 TFLite model with an int8 input (not the ResNet: only its runtime matters here)."""
    import tensorflow as tf

    inp = tf.keras.Input((size, size, 3))
    x = tf.keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    model = tf.keras.Model(inp, tf.keras.layers.Dense(10)(x))
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    rng = np.random.default_rng(0)
    conv.representative_dataset = lambda: ([rng.random((1, size, size, 3), dtype=np.float32)] for _ in range(8))
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    path.write_bytes(conv.convert())


def build_bundle(bundle: Path, spec, model, targets=("onnx", "openvino", "tflite")) -> dict:
    """Reference + an fp32 ONNX copy, an fp32 OpenVINO IR and an int8 TFLite file, with a verified manifest."""
    from edgeres.model.export import export_onnx

    bundle.mkdir(parents=True)
    export_onnx(model, spec, bundle / REFERENCE_FILE)
    artifacts = []
    if "onnx" in targets:
        (bundle / "onnx").mkdir()
        shutil.copyfile(bundle / REFERENCE_FILE, bundle / "onnx" / "model.fp32.onnx")
        artifacts.append(_artifact(bundle, "onnx", "fp32", ["onnx/model.fp32.onnx"]))
    if "openvino" in targets:
        from edgeres.targets.runners.openvino_runner import openvino_by_consent

        ov = openvino_by_consent()
        (bundle / "openvino").mkdir()
        ov.save_model(ov.convert_model(str(bundle / REFERENCE_FILE)), str(bundle / "openvino" / "model.fp32.xml"),
                      compress_to_fp16=False)
        artifacts.append(_artifact(bundle, "openvino", "fp32", ["openvino/model.fp32.xml", "openvino/model.fp32.bin"]))
    if "tflite" in targets:
        (bundle / "tflite").mkdir()
        write_tiny_tflite_int8(bundle / "tflite" / "model.int8.tflite", spec.preprocess.size)
        artifacts.append(_artifact(bundle, "tflite", "int8", ["tflite/model.int8.tflite"], "NHWC", "int8"))
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "arch": spec.to_dict(), "cost": spec.cost(),
        "preprocess": spec.preprocess.to_dict(), "labels": None, "pruning": None, "calibration": None,
        "reference": {**file_record(bundle, REFERENCE_FILE), "precision": "fp32", "engine": "onnxruntime"},
        "artifacts": artifacts,
    }
    write_json_atomic(bundle / MANIFEST, manifest)
    return manifest


def add_failed_artifact(bundle: Path, target: str, precision: str, error: str) -> None:
    import json

    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["artifacts"].append({"target": target, "precision": precision, "status": "failed", "error": error,
                                  "files": [], "file_records": []})
    write_json_atomic(bundle / MANIFEST, manifest)


def shared_bundle(tmp_path_factory, tiny_model) -> Path:
    """One handmade ONNX + OpenVINO + TFLite bundle per test session (built on first use; treat as read-only)."""
    bundle = tmp_path_factory.getbasetemp() / "handmade-bundle" / "bundle"
    if not (bundle / MANIFEST).exists():
        spec, model = tiny_model
        build_bundle(bundle, spec, model)
    return bundle


def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
