"""Every artifact describes itself in its runtime's own metadata, read back with that runtime's library alone."""

from __future__ import annotations

import json

import numpy as np
import pytest


def _manifest(bundle):
    return json.loads((bundle / "manifest.json").read_text())


def _artifact(bundle, target, precision):
    return next(a for a in _manifest(bundle)["artifacts"] if a["target"] == target and a["precision"] == precision)


def test_bundle_has_labels_txt_hashed_in_the_manifest(app_bundle):
    manifest = _manifest(app_bundle)
    labels = (app_bundle / "labels.txt").read_text().splitlines()
    assert labels == manifest["labels"] and len(labels) == manifest["arch"]["num_classes"]
    assert "labels.txt" in {r["file"] for r in manifest["data_files"]}


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_onnx_metadata_props_carry_labels_and_preprocessing(app_bundle, precision):
    import onnx

    manifest = _manifest(app_bundle)
    model = onnx.load(str(app_bundle / _artifact(app_bundle, "onnx", precision)["file"]))
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["edgeres.labels"]) == manifest["labels"]
    pre = json.loads(props["edgeres.preprocess"])
    assert pre == {**manifest["preprocess"], "layout": "NCHW"}
    assert props["edgeres.version"] == manifest["edgeres_version"]
    assert props["edgeres.source_sha256"] == manifest["source"]["sha256"]
    assert json.loads(props["edgeres.input"]) == {"layout": "NCHW", "dtype": "float32"}


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_openvino_rt_info_carries_labels_and_preprocessing(app_bundle, precision):
    import openvino as ov

    manifest = _manifest(app_bundle)
    model = ov.Core().read_model(str(app_bundle / _artifact(app_bundle, "openvino", precision)["file"]))
    info = {k: model.get_rt_info(["edgeres", k]).astype(str) for k in ("labels", "preprocess", "version", "source_sha256")}
    assert json.loads(info["labels"]) == manifest["labels"]
    assert json.loads(info["preprocess"])["mean"] == manifest["preprocess"]["mean"]
    assert info["version"] == manifest["edgeres_version"] and info["source_sha256"] == manifest["source"]["sha256"]


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_tflite_carries_standard_image_classifier_metadata(app_bundle, precision):
    from edgeres.targets import tflite_metadata
    from edgeres.targets.tflite_metadata_schema import AssociatedFileType, ProcessUnitOptions

    manifest = _manifest(app_bundle)
    artifact = _artifact(app_bundle, "tflite", precision)
    assert artifact["options"]["tflite_metadata"] is True
    read = tflite_metadata.read(app_bundle / artifact["file"])
    subgraph = read["metadata"].subgraphMetadata[0]
    (unit,) = subgraph.inputTensorMetadata[0].processUnits
    assert unit.optionsType == ProcessUnitOptions.NormalizationOptions
    # the model normalises per channel itself (MediaPipe has no per-channel normalisation): it takes pixels
    assert list(unit.options.mean) == [0.0] * 3 and list(unit.options.std) == [1.0] * 3
    embedded = json.loads(tflite_metadata.entry((app_bundle / artifact["file"]).read_bytes(), "edgeres.input"))
    pre = manifest["preprocess"]
    assert embedded == {"input": "pixels", "normalization": {k: pre[k] for k in ("scale", "mean", "std")}}
    (labels_file,) = subgraph.outputTensorMetadata[0].associatedFiles
    assert labels_file.type == AssociatedFileType.TENSOR_AXIS_LABELS
    assert read["files"][labels_file.name.decode()].decode().splitlines() == manifest["labels"]


def test_the_reference_carries_the_metadata_and_the_fp32_onnx_is_a_copy_of_it(app_bundle):
    import onnx

    manifest = _manifest(app_bundle)
    reference = onnx.load(str(app_bundle / manifest["reference"]["file"]))
    assert json.loads({p.key: p.value for p in reference.metadata_props}["edgeres.labels"]) == manifest["labels"]
    assert _artifact(app_bundle, "onnx", "fp32")["sha256"] == manifest["reference"]["sha256"]  # bench runs it once
