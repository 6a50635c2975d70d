"""Per-layer error of the int8 ONNX artifact: SQNR of every quantised activation against fp32.

The int8 values are read where the QDQ graph quantises them (the outputs of its QuantizeLinear
nodes, which onnxruntime's fused int8 kernels produce) and dequantised with the graph's own scale
and zero point, so the error includes clipping, rounding and everything accumulated upstream.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

import targets
from calibration import ImageDataset, Preprocess
from edgeres.bundle import artifact_path, data_file_path, ok_artifacts, read_manifest, reference_path, warn
from edgeres.errors import InputError
from edgeres.int8 import qdq_record, quantize_qdq

# what quantize_qdq's record holds of the recipe it was made with
QDQ_RECIPE_KEYS = ("activation_type", "weight_type", "per_channel", "reduce_range", "reason", "cpu_features")

QUANTIZE_INPUT_SUFFIX = "_QuantizeLinear_Input"  # the quantiser's rename of a graph output it quantises
EXACT_SQNR_DB = 999.0  # reported when the int8 tensor equals fp32 exactly


def layer_sqnr_for_bundle(bundle_dir: str | Path, dataset: ImageDataset, images: int = 32) -> list[dict]:
    """[{"name", "op", "sqnr_db"}] for each quantised activation of the bundle's onnx int8 model,
    worst (lowest SQNR) first, on ``images`` images of ``dataset`` spread over the set."""
    bundle = Path(bundle_dir)
    manifest = read_manifest(bundle)
    shared = targets.shipping_target(targets.QDQ_ONNX)  # its int8 artifact is the int8 stage's QDQ ONNX itself
    int8 = [a for a in ok_artifacts(manifest) if a["target"] == shared and a["precision"] == "int8"]
    if not int8:
        raise InputError(f"{bundle}: has no {shared} int8 artifact; --layers needs one "
                         f"(convert with --targets {shared} --precision int8)")
    pre = Preprocess.from_dict(manifest["preprocess"])
    x = next(dataset.batches(pre, batch_size=images, limit=images))[0]
    reference, qdq = reference_path(bundle, manifest), artifact_path(bundle, int8[0])
    rows = layer_sqnr(reference, qdq, x)
    calibration = manifest.get("calibration") or {}
    if calibration.get("quant") == "accurate" and calibration.get("ranges_file"):
        ranges = data_file_path(bundle, manifest, calibration["ranges_file"])
        if ranges is None:
            warn(f"{bundle}: the manifest does not hash {calibration['ranges_file']}, so the "
                "gain over plain int8 is not shown (re-run `edgeres convert --force` to record it)")
        else:
            add_gain_over_fast(rows, reference, qdq, ranges, x)
    return rows


def add_gain_over_fast(rows: list[dict], fp32_path: Path, qdq_path: Path, ranges_path: Path, x: np.ndarray) -> None:
    """Add ``fast_sqnr_db`` and ``gain_db`` to ``rows`` of a ``--quant accurate`` model: the same
    reference quantised plainly (same ranges, same recipe) is what the accurate weights improve on."""
    import json
    import tempfile

    recipe = qdq_record(qdq_path)
    options = {"float_nodes": list(recipe["float_nodes"])} if recipe.get("float_nodes") else {}
    ranges = {k: tuple(v) for k, v in json.loads(ranges_path.read_text()).items()}
    with tempfile.TemporaryDirectory(prefix="edgeres-fast-qdq-") as tmp:
        fast_path = Path(tmp) / "fast.qdq.onnx"
        quantize_qdq(fp32_path, ranges, fast_path, recipe={k: recipe[k] for k in QDQ_RECIPE_KEYS}, options=options)
        fast = {r["name"]: r["sqnr_db"] for r in layer_sqnr(fp32_path, fast_path, x)}
    for row in rows:
        if row["name"] in fast:
            row["fast_sqnr_db"] = fast[row["name"]]
            row["gain_db"] = round(row["sqnr_db"] - fast[row["name"]], 2)


def layer_sqnr(fp32_path: Path, qdq_path: Path, x: np.ndarray) -> list[dict]:
    """SQNR (dB) of each quantised activation of ``qdq_path`` vs the same tensor of ``fp32_path``."""
    import onnx
    from onnx import numpy_helper

    fp32 = onnx.load(str(fp32_path))
    qdq = onnx.load(str(qdq_path))
    producer = {out: node for node in fp32.graph.node for out in node.output}
    constants = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}

    # fp32 tensor name → (int8 tensor name, scale, zero point)
    quantised: dict[str, tuple[str, float, float]] = {}
    for node in qdq.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in constants:
            continue
        name = node.input[0]
        if name not in producer and name.endswith(QUANTIZE_INPUT_SUFFIX):
            name = name[: -len(QUANTIZE_INPUT_SUFFIX)]
        scale = constants.get(node.input[1])
        zero_point = constants.get(node.input[2]) if len(node.input) > 2 else np.zeros((), np.uint8)
        if name in producer and scale is not None and scale.size == 1:
            quantised.setdefault(name, (node.output[0], float(scale), float(zero_point)))
    if not quantised:
        raise InputError(f"{qdq_path}: has no quantised activations to compare; is it a QDQ int8 model?")

    names = list(quantised)
    ref = dict(zip(names, _run_with_outputs(fp32, names, x)))
    q_values = _run_with_outputs(qdq, [quantised[n][0] for n in names], x)
    rows = []
    for name, q in zip(names, q_values):
        _, scale, zero_point = quantised[name]
        deq = (q.astype(np.float64) - zero_point) * scale
        signal = float(np.sum(ref[name].astype(np.float64) ** 2))
        noise = float(np.sum((ref[name] - deq) ** 2))
        if signal == 0.0 and noise == 0.0:
            continue
        sqnr = EXACT_SQNR_DB if noise == 0.0 else 10.0 * math.log10(max(signal, 1e-30) / noise)
        rows.append({"name": name, "op": _op_label(name, producer), "sqnr_db": round(sqnr, 2)})
    return sorted(rows, key=lambda r: r["sqnr_db"])


def _op_label(name: str, producer: dict) -> str:
    node = producer.get(name)
    if node is None:
        return "input"
    if node.op_type == "Relu" and node.input[0] in producer:
        return f"{producer[node.input[0]].op_type}+Relu"  # the quantiser fuses the Relu into its producer
    return node.op_type


def _run_with_outputs(model, names: list[str], x: np.ndarray) -> list[np.ndarray]:
    import onnx
    import onnxruntime as ort

    model = onnx.ModelProto.FromString(model.SerializeToString())
    outputs = {o.name for o in model.graph.output}
    inputs = {i.name for i in model.graph.input}
    for name in names:
        if name not in outputs and name not in inputs:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feed_name = session.get_inputs()[0].name
    fetch = [n for n in names if n not in inputs]
    got = dict(zip(fetch, session.run(fetch, {feed_name: x})))
    return [x if n in inputs else got[n] for n in names]
