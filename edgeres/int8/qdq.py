"""The QDQ ONNX written from the shared ranges: onnxruntime's quantizer places the Q/DQ pairs and
quantises the weights (per channel) with a consumer's recipe; the activation scales and zero points
come from OUR ranges, not from its calibrators."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgeres.calibration.cpu import cpu_features
from edgeres.int8.ranges import require_onnxruntime
from edgeres.int8.recipe import choose_recipe
from edgeres.targets.base import QDQ_RECORD_KEY, TargetError, atomic_path, first_line
from edgeres.targets.base import qdq_record  # noqa: F401 - the int8 stage's face: what quantize_qdq stored


def quantize_qdq(onnx_fp32_path: str | Path, ranges: dict, out_path: str | Path, *, recipe: dict | None = None,
                 consumer=None, options: dict | None = None) -> dict:
    """Write an int8 QDQ ONNX (weights int8 symmetric per channel, activations per tensor with OUR
    ``ranges``) to ``out_path``; returns the record of what was chosen (for the manifest).

    ``recipe``: the consumer's recipe (``choose_recipe``); else chosen here for ``consumer`` (a
    ``TargetInfo``) on this CPU with ``options`` (``int8.*``, whose ``float_nodes`` stay in float)."""
    require_onnxruntime()
    import onnx
    import onnxruntime
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    if recipe is None:
        recipe = choose_recipe(consumer, cpu_features(), options)
    float_nodes = (options or {}).get("float_nodes") or []
    if isinstance(float_nodes, str):
        float_nodes = [n for n in float_nodes.split(",") if n]
    qtype = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    model = onnx.shape_inference.infer_shapes(onnx.load(str(onnx_fp32_path)))
    tensors_range = TensorsData(CalibrationMethod.MinMax, {
        name: TensorData(lowest=np.float32(lo), highest=np.float32(hi))
        for name, (lo, hi) in ranges.items()})
    op_types = sorted(set(QLinearOpsRegistry) | set(QDQRegistry))
    try:
        quantizer = QDQQuantizer(model, recipe["per_channel"], recipe["reduce_range"], QuantType.QInt8,
                                 qtype[recipe["activation_type"]], tensors_range, [], list(float_nodes),
                                 op_types, {})
        quantizer.quantize_model()
        qmodel = quantizer.model.model
    except Exception as e:  # noqa: BLE001 - the quantizer raises bare exceptions
        raise TargetError(f"{onnx_fp32_path}: onnxruntime's QDQ quantizer failed ({first_line(e)})") from None
    quantized = sum(1 for n in qmodel.graph.node if n.op_type == "QuantizeLinear")
    record = {"engine": f"onnxruntime {onnxruntime.__version__} QDQQuantizer with edgeres ranges",
              **recipe, "quantized_tensors": quantized, "float_nodes": list(float_nodes),
              "opset": max(o.version for o in qmodel.opset_import if o.domain in ("", "ai.onnx"))}
    entry = qmodel.metadata_props.add()
    entry.key, entry.value = QDQ_RECORD_KEY, json.dumps(record)
    with atomic_path(Path(out_path)) as tmp:
        onnx.save(qmodel, str(tmp))
    return record


