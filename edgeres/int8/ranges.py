"""Activation ranges once: the fp32 reference ONNX runs over the calibration batches in onnxruntime and
every float activation feeds one of our range estimators (``calibration.estimators``), whose memory is
bounded whatever the number of images."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from edgeres.calibration.errors import DataError
from edgeres.targets.base import TargetError, TargetUnavailable, first_line, release_memory
from edgeres.targets.runners.onnxruntime_runner import ort_cores

# keep one calibration batch of exposed activations (float32) around 256 MB
MAX_CALIB_VALUES_PER_BATCH = 64_000_000


def require_onnxruntime() -> str:
    """onnxruntime's version; the int8 stage runs the reference in it."""
    try:
        import onnxruntime
    except ImportError:
        raise TargetUnavailable("onnxruntime is not installed; int8 calibrates the reference with it: "
                                "pip install 'edgeres[onnx]'") from None
    return onnxruntime.__version__


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
    require_onnxruntime()
    import onnx

    from edgeres.calibration.estimators import make_estimator

    model = onnx.shape_inference.infer_shapes(onnx.load(str(onnx_fp32_path)))
    input_name = model.graph.input[0].name
    names = calibration_tensors(model)
    exposed = [n for n in names if n != input_name]
    try:
        session = exposing_session(model, exposed)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise TargetError(f"{onnx_fp32_path}: onnxruntime cannot run it for calibration ({first_line(e)})") from None
    batch_size = _calib_batch_size(model)
    del model  # the session holds the weights now: the proto (a ResNet-50's 100 MB) goes before the images come
    release_memory()
    try:
        estimators = {n: make_estimator(estimator, **options) for n in names}
    except ValueError as e:
        raise DataError(f"calibration estimator: {e}") from None

    images = 0
    for i, x in enumerate(calib_fn(layout="NCHW", batch_size=batch_size)):
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
            # NaN or Inf anywhere makes the min or the max non-finite: the bounds check every value, and the
            # estimator takes them instead of two more passes over a ResNet-50's ~10 M values per image
            bounds = (float(value.min()), float(value.max())) if value.size else None
            if bounds is not None and not (np.isfinite(bounds[0]) and np.isfinite(bounds[1])):
                raise DataError(f"calibration: activation {name!r} became NaN/Inf on batch {i}; "
                                "check the images and the model weights")
            estimators[name].update(value, bounds)
        images += len(x)
    if images == 0:
        raise DataError("calibration data gave no images; give at least one calibration image with --calib")
    return {name: est.compute() for name, est in estimators.items()}


def exposing_session(model, names: list[str]):
    """An onnxruntime CPU session of ``model`` (an ONNX proto, changed in place) with each tensor in
    ``names`` added to its outputs, so one run returns every activation asked for."""
    import onnx
    import onnxruntime as ort

    existing = {o.name for o in model.graph.output}
    for name in names:
        if name not in existing:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = ort_cores()  # onnxruntime's default pins a thread to every core of the machine
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _calib_batch_size(model) -> int:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    hw = [d.dim_value for d in dims[2:]]
    pixels = (hw[0] * hw[1]) if len(hw) == 2 and all(hw) else 224 * 224
    # summed over its layers ResNet-18 exposes ~230 activation values per input pixel; 800 covers ResNet-50+
    return int(np.clip(MAX_CALIB_VALUES_PER_BATCH // (pixels * 800), 1, 32))


REFERENCE_IMAGES = 2  # calibration images whose activations travel to runtimes that match ranges by value


def reference_activations(onnx_fp32_path: str | Path, calib_fn: Callable[..., Iterable[np.ndarray]], ranges: dict,
                          images: int = REFERENCE_IMAGES):
    """The reference's activations at every tensor of ``ranges`` on the first ``images`` calibration images,
    with the shared ranges (``calibration.matching.ReferenceActivations``): what a runtime with its own graph
    (TFLite) matches its tensors to by value, so the ranges computed once here become its ranges."""
    require_onnxruntime()
    import onnx

    from edgeres.calibration.matching import ReferenceActivations, sample_indices

    model = onnx.load(str(onnx_fp32_path))
    input_name = model.graph.input[0].name
    exposed = [n for n in ranges if n != input_name]
    session = exposing_session(model, exposed)
    del model
    x = np.concatenate([np.asarray(b, np.float32) for b, _ in zip(calib_fn(layout="NCHW", batch_size=images),
                                                                   range(1))])[:images]
    names = [*exposed, input_name] if input_name in ranges else exposed
    parts: dict = {name: [] for name in names}
    for image in x:  # one image at a time, each tensor sampled at once: a ResNet-50's are ~160 MB an image
        outputs = session.run(exposed, {input_name: image[None]})
        for name, value in zip(names, [*outputs, image[None]]):
            flat = np.asarray(value, np.float32).reshape(1, -1)
            parts[name].append((flat[:, sample_indices(flat.shape[1])], flat.shape[1]))
        del outputs
    values = {name: np.ascontiguousarray(np.concatenate([v for v, _ in p])) for name, p in parts.items()}
    sizes = {name: p[0][1] for name, p in parts.items()}
    return ReferenceActivations(x, values, dict(ranges), sizes)
