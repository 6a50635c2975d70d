"""ONNX target run by onnxruntime: fp32 (the reference), fp16 and int8 QDQ.

int8 is made once per conversion: ``compute_ranges`` runs the fp32 reference over the calibration
batches and feeds our range estimators; ``quantize_qdq`` writes one QDQ ONNX whose activation
scales and zero points come from those ranges (onnxruntime's quantizer places the Q/DQ pairs and
quantises the weights per channel). ``compile`` ships that file; other targets may compile it too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from calibration.cpu import CpuFeatures, cpu_features
from calibration.errors import DataError
from targets.base import (QDQ_ONNX, Artifact, CompileJob, Runner, TargetError, TargetInfo, TargetOption, TargetUnavailable, atomic_path, first_line)
from targets.runners.onnxruntime_runner import OnnxRuntimeRunner

PRECISIONS = ("fp32", "fp16", "int8")
QDQ_METADATA_KEY = "edgeres.quantization"
ACTIVATION_TYPES = ("uint8", "int8")
INFO = TargetInfo(
    name="onnx", title="ONNX (onnxruntime)", suffixes=(".onnx",), dist="onnxruntime", runtime="onnxruntime",
    precisions=PRECISIONS, consumes=QDQ_ONNX, tools=("onnx",),
    options=(
        TargetOption("activation_type", str, None, "int8 activations: uint8 or int8 [chosen for the CPU]",
                     ACTIVATION_TYPES),
        TargetOption("reduce_range", bool, None, "7-bit weights (x86 without VNNI) [chosen for the CPU]"),
        TargetOption("per_channel", bool, True, "per-channel int8 weights"),
        TargetOption("float_nodes", list, (), "ONNX node names kept in float (comma list)"),
    ),
)
QDQ_OPTIONS = tuple(o.name for o in INFO.options)
# keep one calibration batch of exposed activations (float32) around 256 MB
MAX_CALIB_VALUES_PER_BATCH = 64_000_000


def available() -> str:
    try:
        import onnxruntime
    except ImportError:
        raise TargetUnavailable("onnxruntime is not installed; pip install 'edgeres[onnx]'") from None
    return onnxruntime.__version__


# ---------------------------------------------------------------------------------------------
# calibration: ranges of every activation the QDQ graph quantises


def calibration_tensors(model) -> list[str]:
    """Float activation tensors of ``model`` (inputs and outputs of its nodes, no weights), graph order."""
    from onnx import TensorProto

    initializers = {t.name for t in model.graph.initializer}
    float_names = {v.name for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]
                   if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    seen: dict[str, None] = {}
    for node in model.graph.node:
        for name in [*node.input, *node.output]:
            if name and name in float_names and name not in initializers:
                seen.setdefault(name, None)
    return list(seen)


def compute_ranges(onnx_fp32_path: str | Path, calib_fn: Callable[..., Iterable[np.ndarray]],
                   estimator: str = "percentile", **options) -> dict[str, tuple[float, float]]:
    """Activation ranges {tensor name: (lo, hi)} of the fp32 ONNX over ``calib_fn(layout="NCHW")``
    batches, estimated by ``estimator`` (see ``calibration.estimators``) with ``options``."""
    available()
    import onnx
    import onnxruntime as ort

    from calibration.estimators import make_estimator

    model = onnx.shape_inference.infer_shapes(onnx.load(str(onnx_fp32_path)))
    input_name = model.graph.input[0].name
    names = calibration_tensors(model)
    exposed = [n for n in names if n != input_name]
    existing = {o.name for o in model.graph.output}
    for name in exposed:
        if name not in existing:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise TargetError(f"{onnx_fp32_path}: onnxruntime cannot run it for calibration ({first_line(e)})") from None
    try:
        estimators = {n: make_estimator(estimator, **options) for n in names}
    except ValueError as e:
        raise DataError(f"calibration estimator: {e}") from None

    images = 0
    for i, x in enumerate(calib_fn(layout="NCHW", batch_size=_calib_batch_size(model))):
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 4 or x.shape[0] == 0:
            raise DataError(f"calibration batch {i}: expected N×C×H×W images, got shape {x.shape}")
        if not np.isfinite(x).all():
            raise DataError(f"calibration batch {i}: images contain NaN or Inf; check the data and its preprocessing")
        try:
            outputs = session.run(exposed, {input_name: x})
        except Exception as e:  # noqa: BLE001
            raise DataError(f"calibration batch {i} of shape {x.shape} does not fit the model ({first_line(e)})") from None
        for name, value in zip([input_name, *exposed], [x, *outputs]):
            if name not in estimators:
                continue
            if not np.isfinite(value).all():
                raise DataError(f"calibration: activation {name!r} became NaN/Inf on batch {i}; "
                                "check the images and the model weights")
            estimators[name].update(value)
        images += len(x)
    if images == 0:
        raise DataError("calibration data gave no images; give at least one calibration image with --calib")
    return {name: est.compute() for name, est in estimators.items()}


def _calib_batch_size(model) -> int:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    hw = [d.dim_value for d in dims[2:]]
    pixels = (hw[0] * hw[1]) if len(hw) == 2 and all(hw) else 224 * 224
    # summed over its layers ResNet-18 exposes ~230 activation values per input pixel; 800 covers ResNet-50+
    return int(np.clip(MAX_CALIB_VALUES_PER_BATCH // (pixels * 800), 1, 32))


# ---------------------------------------------------------------------------------------------
# QDQ int8 from our ranges


def choose_int8_recipe(cpu: CpuFeatures, options: dict | None = None) -> dict:
    """activation type and ``reduce_range`` for this CPU (user options override), with the reason.

    onnxruntime's x86 U8S8 kernels without VNNI multiply-add pairs into int16 (vpmaddubsw), which
    saturates with full-range per-channel weights; 7-bit weights (``reduce_range``) avoid that. With
    VNNI (vpdpbusd accumulates into int32) full 8-bit weights are safe. ARM kernels prefer S8S8.
    """
    options = INFO.check_options(dict(options or {}))
    if cpu.arch == "arm":
        activation_type, reduce_range, reason = "int8", False, "ARM: S8S8 kernels"
    elif cpu.vnni:
        activation_type, reduce_range, reason = "uint8", False, "x86 with VNNI: U8S8 accumulates in int32"
    else:
        activation_type, reduce_range, reason = "uint8", True, "x86 without VNNI: U8S8 saturates int16, 7-bit weights"
    if "activation_type" in options:
        activation_type = str(options["activation_type"]).lower()
        reason = "set by option onnx.activation_type"
    if "reduce_range" in options:
        reduce_range, reason = options["reduce_range"], "set by option onnx.reduce_range"
    per_channel = options.get("per_channel", True)
    return {"activation_type": activation_type, "weight_type": "int8", "per_channel": per_channel,
            "reduce_range": reduce_range, "reason": reason, "cpu_features": list(cpu.flags)}


def quantize_qdq(onnx_fp32_path: str | Path, ranges: dict, out_path: str | Path, *,
                 options: dict | None = None) -> dict:
    """Write an int8 QDQ ONNX (weights int8 symmetric per channel, activations per tensor with OUR
    ``ranges``) to ``out_path``; returns the record of what was chosen (for the manifest)."""
    available()
    import onnx
    import onnxruntime
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    recipe = choose_int8_recipe(cpu_features(), options)
    float_nodes = options.get("float_nodes") or [] if options else []
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
    entry.key, entry.value = QDQ_METADATA_KEY, json.dumps(record)
    _save_atomic(qmodel, Path(out_path))
    return record


def qdq_record(path: str | Path) -> dict:
    """The record ``quantize_qdq`` stored in a QDQ ONNX (empty if it was made elsewhere)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == QDQ_METADATA_KEY:
            return json.loads(prop.value)
    return {}


# ---------------------------------------------------------------------------------------------
# compile


def compile(job: CompileJob) -> Artifact:  # noqa: A001 - the target interface's verb
    """Write ``onnx/model.<precision>.onnx`` carrying the app metadata (labels, preprocessing) in its
    ``metadata_props``, so onnxruntime's ``get_modelmeta()`` tells an app what it needs."""
    available()
    import onnx

    if job.precision not in PRECISIONS:
        raise TargetError(f"onnx: precision {job.precision!r} is not one of {', '.join(PRECISIONS)}")
    rel = Path("onnx") / f"model.{job.precision}.onnx"
    dest = job.out_dir / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    if job.precision == "int8" and (job.qdq_onnx is None or not Path(job.qdq_onnx).exists()):
        raise TargetError("onnx int8: no QDQ model was made; int8 needs --calib images")
    if job.precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(onnx.load(str(job.onnx_fp32)), keep_io_types=True)
    else:
        model = onnx.load(str(job.qdq_onnx if job.precision == "int8" else job.onnx_fp32))
    metadata = job.model_metadata(layout="NCHW", dtype="float32")
    if job.precision == "fp32" and _has_metadata(model, metadata):
        shutil.copyfile(job.onnx_fp32, dest)  # byte-identical to the reference, so bench runs it once
    else:
        add_metadata(model, metadata)
        _save_atomic(model, dest)
    if job.precision != "fp32":
        _check_runs(dest)
    if job.precision == "fp32":
        return Artifact("onnx", "fp32", (str(rel),), engine="torch.onnx.export + onnxslim",
                        tool_versions=_versions())
    if job.precision == "fp16":
        return Artifact("onnx", "fp16", (str(rel),), engine="onnxruntime.transformers.float16 (float32 I/O)",
                        options={"keep_io_types": True}, tool_versions=_versions())
    record = qdq_record(dest)
    return Artifact("onnx", "int8", (str(rel),), engine=record.get("engine", "QDQ ONNX"),
                    options={k: v for k, v in record.items() if k != "engine"}, tool_versions=_versions())


def _has_metadata(model, values: dict[str, str]) -> bool:
    props = {p.key: p.value for p in model.metadata_props}
    return all(props.get(k) == v for k, v in values.items())


def stamp_metadata(path: str | Path, values: dict[str, str]) -> None:
    """Write ``values`` into an ONNX file's ``metadata_props`` (the pipeline's fp32 reference)."""
    import onnx

    model = onnx.load(str(path))
    add_metadata(model, values)
    _save_atomic(model, Path(path))


def add_metadata(model, values: dict[str, str]) -> None:
    """Set ``values`` in an ONNX model's ``metadata_props`` (replacing entries of the same key)."""
    keep = [(p.key, p.value) for p in model.metadata_props if p.key not in values]
    del model.metadata_props[:]
    for key, value in [*keep, *values.items()]:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def _check_runs(path: Path) -> None:
    """Fail now (exit 3) rather than at eval time if onnxruntime cannot run the artifact."""
    runner = OnnxRunner(path)
    shape = [d if isinstance(d, int) else 1 for d in runner.session.get_inputs()[0].shape]
    out = runner(np.zeros(shape, np.float32))
    if not np.isfinite(out).all():
        raise TargetError(f"{path}: onnxruntime gives non-finite outputs on a zero image")


def _save_atomic(model, path: Path) -> None:
    import onnx

    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))


def _versions() -> dict:
    import onnx
    import onnxruntime

    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


# ---------------------------------------------------------------------------------------------
# run


class OnnxRunner(OnnxRuntimeRunner, Runner):
    """``targets.runners.onnxruntime_runner`` with this target's errors."""

    def __init__(self, path: str | Path, threads: int | None = None):
        available()
        try:
            super().__init__(str(path), threads)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise TargetError(f"{path}: onnxruntime cannot load it ({first_line(e)})") from None
        self.path = Path(path)  # named when its outputs are unusable (edgeres.measure.evaluate)


def load_runner(path: str | Path, threads: int | None = None) -> OnnxRunner:
    return OnnxRunner(path, threads)
