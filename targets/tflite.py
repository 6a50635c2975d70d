"""TFLite (LiteRT) target: fp32, fp16 weights, dynamic-range int8 and full-integer int8.

Engine: the network rebuilt in Keras from its spec (the ``keras`` source: ``job.source(KERAS)()``) and converted by the
LiteRT converter; full-int8 is calibrated on ``job.calibration(layout="NHWC")``, the same images
every other target uses. After conversion an op report lists every op with its tensor dtypes; a
full-int8 model that still computes in float anywhere is an error, not a warning.

Running needs only numpy and ``ai-edge-litert`` (or ``tflite-runtime``): nothing in the runner path
imports tensorflow, so a bundle's ``.tflite`` runs on a Raspberry Pi as is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

from edgeres.calibration import matching
from edgeres.calibration.errors import DataError
from edgeres.targets.base import (ANY_PRECISION, KERAS, Artifact, shared_reference, CompileJob, Runner, TargetError, TargetInfo, TargetOption, TargetUnavailable, atomic_path,
                          cpu_threads, release_memory)
from edgeres.targets.runners.litert_runner import (LiteRtRunner, litert_dequantize, litert_embedded_normalization,
                                           litert_interpreter_module, litert_quantize, litert_to_pixels,
                                           LITERT_PIXELS_ENTRY)

quantize, dequantize, to_pixels = litert_quantize, litert_dequantize, litert_to_pixels  # the runner's, named as before

PRECISIONS = ("fp32", "fp16", "dynamic", "int8")
ENGINE = "keras-from-spec + LiteRT converter"
IO_TYPES = ("float", "int8", "uint8")
# full-int8 activation ranges: "estimator" = the edgeres estimator the other targets use (job.estimator):
# the shared ranges of the int8 stage (job.reference_activations: the fp32 reference's tensors matched to
# the LiteRT model's by value, the few unmatched derived from the op making them), else measured on the
# LiteRT model's own tensors; "converter" = the LiteRT converter's min/max
RANGE_SOURCES = ("estimator", "converter")
# the TFLite int8 spec, whatever the CPU: int8 activations, symmetric per-channel weights of ±127
LITERT_INT8 = ("int8", False, "LiteRT full-int8: the TFLite int8 spec (symmetric ±127 weights per channel)")
INFO = TargetInfo(
    name="tflite", title="TFLite (LiteRT)", suffixes=(".tflite",), dist="ai-edge-litert", runtime="litert",
    precisions=PRECISIONS, sources={ANY_PRECISION: KERAS}, tools=("tensorflow",), int8_recipe=lambda cpu: LITERT_INT8,
    options=(
        TargetOption("io", str, "float", "full-int8 input/output type", IO_TYPES),
        TargetOption("ranges", str, "estimator", "full-int8 activation ranges: the shared estimator's or the "
                     "converter's own min/max", RANGE_SOURCES),
    ),
)
OPTIONS = tuple(o.name for o in INFO.options)
# ops that only move data between float and integer at the model's edges
EDGE_OPS = ("QUANTIZE", "DEQUANTIZE")
FLOAT_DTYPES = ("float32", "float16", "float64")
CALIB_BATCH = 16
EMBEDDED_KEY = LITERT_PIXELS_ENTRY  # model metadata entry: the normalisation the model does on its pixel input


def available() -> str:
    """The LiteRT interpreter's version (what running needs)."""
    _interpreter_module()
    try:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("ai-edge-litert")
        except PackageNotFoundError:
            return version("tflite-runtime")
    except Exception:  # noqa: BLE001 - version metadata is cosmetic
        return "unknown"


def _interpreter_module():
    """The runner's LiteRT interpreter module, or ``TargetUnavailable`` with the install hint."""
    try:
        return litert_interpreter_module()
    except ImportError:
        raise TargetUnavailable("ai-edge-litert is not installed; pip install ai-edge-litert "
                                "(or pip install 'edgeres[tflite]')") from None


def _converter_modules():
    try:
        import tensorflow as tf
    except ImportError:
        raise TargetUnavailable("tensorflow is needed to convert to TFLite; pip install 'edgeres[tflite]'") from None
    return tf


# -- compile -------------------------------------------------------------------------------------

def compile(job: CompileJob) -> Artifact:  # noqa: A001 - the target interface's verb
    """Convert the Keras network (``job.source(KERAS)()``) to ``tflite/model.<precision>.tflite`` plus its op report and sidecar."""
    with native_stderr_quiet():
        return _compile(job)


DEBUG_ENV = "EDGERES_DEBUG"  # set by `edgeres --debug` (a target cannot import edgeres to ask)


@contextlib.contextmanager
def native_stderr_quiet():
    """Hold back what TensorFlow's C++ side prints to fd 2 (start-up and converter chatter that no
    log level silences) so the user's terminal shows our progress, not pages of I0000 lines."""
    if os.environ.get(DEBUG_ENV):  # `edgeres --debug`: show it all
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """One conversion with its options checked and resolved."""

    job: CompileJob  # options filled in with their defaults
    io: str  # full-int8 input/output type (one of IO_TYPES)
    range_source: str  # full-int8 activation ranges (one of RANGE_SOURCES)

    @property
    def estimator_ranges(self) -> bool:
        """Full-int8 with our estimator's ranges: the converter only calibrates, we quantise."""
        return self.job.precision == "int8" and self.range_source == "estimator"


@dataclasses.dataclass(frozen=True)
class _Converted:
    """The converted model and the calibration images it took."""

    flatbuffer: bytes
    representative_images: int | None  # full-int8 only: calibration images seen
    ranges: dict | None = None  # full-int8 with estimator ranges: where they came from (the artifact's options)
    notes: tuple[str, ...] = ()


OWN_PASS = "edgeres {estimator} estimator on the LiteRT tensors"
SHARED = "edgeres {estimator} estimator on the fp32 reference (the shared ranges), matched to the LiteRT tensors"


def _compile(job: CompileJob) -> Artifact:
    plan = _plan(job)
    job = plan.job
    _interpreter_module()
    tf = _converter_modules()
    converted, options = _convert(plan, tf)
    if job.precision == "int8":
        options["representative_images"] = converted.representative_images
        options.update(converted.ranges or {})
    notes = (f"tflite.io={plan.io} applies to full-int8 only; this {job.precision} model takes float input",) \
        if plan.io != "float" and job.precision != "int8" else converted.notes
    return _write_artifact(job, converted.flatbuffer, plan.io, options, notes)


def pixel_normalization(job: CompileJob) -> dict | None:
    """The preprocessing arithmetic the model does itself, so its input is RGB pixel values 0..255
    (float, or uint8 with scale 1 for full-int8 with tflite.io=uint8): what TFLite Metadata clients
    (MediaPipe Tasks, which has no per-channel normalisation) feed. None (input as the manifest's
    preprocessing makes it) for a BGR model, which the metadata cannot describe."""
    pre = job.preprocess
    if not pre or pre.get("channel_order", "RGB") != "RGB":
        return None
    return {k: pre[k] for k in ("scale", "mean", "std")}


def _with_pixel_input(model, job: CompileJob):
    """``model`` behind a Rescaling layer doing (u·scale − mean)/std per channel (MUL + ADD ops)."""
    norm = pixel_normalization(job)
    if norm is None:
        return model
    import tf_keras as keras

    std = np.asarray(norm["std"], np.float32)
    mul = np.float32(norm["scale"]) / std
    add = -np.asarray(norm["mean"], np.float32) / std
    pixels = keras.Input(shape=model.input_shape[1:], name="pixels")
    # a fixed name: tensor names (model/layer/op) must not depend on how many models were built before
    return keras.Model(pixels, model(keras.layers.Rescaling(mul, add, name="normalize")(pixels)),
                       name=f"{model.name}_pixels")


def _plan(job: CompileJob) -> _Plan:
    """Refuse, before tensorflow loads, a job this target cannot convert."""
    if job.precision not in PRECISIONS:
        raise TargetError(f"tflite: precision {job.precision!r} is not one of {', '.join(PRECISIONS)}")
    job = dataclasses.replace(job, options=INFO.check_options(job.options))
    io = str(job.options.get("io", "float"))
    range_source = str(job.options.get("ranges", "estimator" if job.estimator else "converter"))
    if range_source == "estimator" and not job.estimator:
        raise TargetError("tflite: --option tflite.ranges=estimator needs the pipeline's estimator (job.estimator)")
    job.source(KERAS)  # a TargetError now, before any work, when the pipeline gave no Keras network
    if job.precision == "int8" and job.calibration is None:
        raise TargetError("tflite: full-integer int8 needs calibration images; pass --calib")
    return _Plan(job, io, range_source)


class _RepresentativeDataset:
    """The converter's calibration feed (a generator function, as LiteRT wants); counts the images it gave."""

    def __init__(self, job: CompileJob):
        self.job = job
        self.images = 0

    def __call__(self):
        for batch in _calibration_batches(self.job, CALIB_BATCH):
            self.images += len(batch)
            yield [batch]


def _io_dtype(tf, io: str):
    return {"float": tf.float32, "int8": tf.int8, "uint8": tf.uint8}[io]


def _configure(converter, plan: _Plan, feed: _RepresentativeDataset | None, tf) -> dict:
    """Set the converter up for the plan's precision; returns the options the artifact records.
    Full-int8 with estimator ranges converts to float here; ``_convert`` quantises it with our ranges."""
    precision = plan.job.precision
    options: dict = {"io": plan.io if precision == "int8" else "float"}
    if precision == "fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
        options["weights"] = "float16"
    elif precision == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]  # no dataset: int8 weights, float activations
        options["weights"] = "int8 per-channel"
        options["activations"] = "float, quantised on the fly"
    elif precision == "int8":
        if not plan.estimator_ranges:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = feed
            # builtin int8 kernels only: an op without one fails conversion instead of silently staying float
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = _io_dtype(tf, plan.io)
            converter.inference_output_type = _io_dtype(tf, plan.io)
        options.update(weights="int8 per-channel", activations="int8 per-tensor", supported_ops="TFLITE_BUILTINS_INT8",
                       calibration=OWN_PASS.format(estimator=plan.job.estimator)
                       if plan.range_source == "estimator" else "min/max (LiteRT converter)")
    return options


def _convert(plan: _Plan, tf) -> tuple[_Converted, dict]:
    """Run the converter (and, for estimator ranges, quantise with them); its failures become TargetErrors.
    The Keras model and the converter are let go before the estimator pass, so the process holds one
    of them at a time: the converter's peak, not the converter plus the calibration."""
    job = plan.job
    feed = _RepresentativeDataset(job) if job.precision == "int8" and not plan.estimator_ranges else None
    saved = tempfile.TemporaryDirectory(prefix="edgeres-tflite-")
    try:
        converter = _keras_converter(lambda: _with_pixel_input(job.source(KERAS)(), job), saved.name, tf)
        options = _configure(converter, plan, feed, tf)
        with warnings.catch_warnings():
            # the converter takes the input's range from calibration; this note says so and means no harm
            warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
            flatbuffer = converter.convert()
            del converter
            saved.cleanup()
            # the converter's state goes before anything else is built beside the flatbuffer
            _release_keras()
            images = feed.images if feed is not None else None
            origin, notes = None, ()
            if plan.estimator_ranges:
                # the float model quantised with every activation range our estimator finds on its own
                # tensors (no name mapping to the ONNX graph; TFLite gets the statistic every target gets)
                # instead of the converter's calibrator, which would hold a second copy of the model
                from tensorflow.lite.python import convert as tfl_convert

                ranges, images, origin, notes = _int8_ranges(flatbuffer, job, tf)
                ranges, dead = _live_ranges(flatbuffer, ranges)
                if dead:
                    origin = {**origin, "ranges_of_always_zero_tensors": dead}
                calibrated = _with_ranges(flatbuffer, ranges)
                del flatbuffer
                release_memory()
                io_dtype = _io_dtype(tf, plan.io)
                flatbuffer = tfl_convert.mlir_quantize(calibrated, input_data_type=io_dtype, output_data_type=io_dtype)
    except (TargetError, DataError):  # raised by our representative dataset: keep their meaning
        raise
    except Exception as e:  # noqa: BLE001 - the converter raises many types (ConverterError, ValueError...)
        first = str(e).strip().splitlines()[0][:240] if str(e).strip() else type(e).__name__
        raise TargetError(f"tflite: LiteRT converter failed for {plan.job.precision} ({first})") from None
    finally:
        saved.cleanup()
    return _Converted(flatbuffer, images, origin, notes), options


def _keras_converter(build, folder: str, tf):
    """The LiteRT converter of the Keras model ``build()`` makes: the model's serving function (Keras' own
    signature: its input names and shapes, its outputs keyed by its output names) and its variables written
    as a SavedModel with debug info, converted from there, with the record in the model saying it came from
    Keras. ``TFLiteConverter.from_keras_model`` writes the whole Keras object graph instead (every layer's
    traced functions, which the converter then loads and discards) and holds the model through the whole
    conversion; here the model goes before the converter runs (a ResNet-152's worker peaked at 3.13 GB with
    ``from_keras_model``, 2.63 GB this way). The same bytes; a ResNet-20's conversion 2.9 → 1.2 s, a Keras
    ResNet-152's to three targets 212 → 102 s (docs/convert.md)."""
    from tensorflow.lite.python import conversion_metadata_schema_py_generated as metadata_schema

    model = build()  # only this frame holds it, so it can go here
    inputs = [tf.TensorSpec(t.shape, t.dtype, name=name) for t, name in zip(model.inputs, model.input_names)]
    outputs = list(model.output_names)

    def serve(*x):
        y = model(list(x) if len(x) > 1 else x[0], training=False)
        return dict(zip(outputs, y if isinstance(y, (list, tuple)) else [y]))

    module = tf.Module()
    module.weights = list(model.variables)  # tracked, so the SavedModel holds them
    module.serve = tf.function(serve, input_signature=inputs)
    tf.saved_model.save(module, folder, signatures={"serving_default": module.serve.get_concrete_function()},
                        options=tf.saved_model.SaveOptions(save_debug_info=True))
    del model, module, serve
    _release_keras()
    converter = tf.lite.TFLiteConverter.from_saved_model(folder)
    converter._metadata.environment.modelType = metadata_schema.ModelType.KERAS_MODEL  # noqa: SLF001 - see above
    return converter


def _release_keras() -> None:
    """Drop the Keras graph state and give the freed heap back to the system (glibc keeps it otherwise)."""
    import tf_keras as keras

    keras.backend.clear_session()
    release_memory()


def _write_artifact(job: CompileJob, flatbuffer: bytes, io: str, options: dict, notes: tuple[str, ...]) -> Artifact:
    """Write the model, then its op report (full-int8 must hold no float compute) and sidecar."""
    rel = Path("tflite") / f"model.{job.precision}.tflite"
    path = job.out_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    flatbuffer, metadata_note = _with_metadata(job, flatbuffer, io)
    notes = (*notes, metadata_note) if metadata_note else notes
    options = {**options, "tflite_metadata": metadata_note is None}
    _write_atomic(path, flatbuffer)
    del flatbuffer  # the file holds it now; the op report reads it from there
    release_memory()

    report = op_report(path)
    if job.precision == "int8":
        check_full_int8(report, io=io, source=str(rel))
    _check_loads(path, rel)
    ops_rel = rel.with_name(f"model.{job.precision}.ops.json")
    _write_atomic(job.out_dir / ops_rel, json.dumps(report, indent=1).encode())
    sidecar_rel = rel.with_suffix(".json")
    _write_atomic(job.out_dir / sidecar_rel, json.dumps(sidecar(path, job, report), indent=2).encode())
    return Artifact("tflite", job.precision, (str(rel), str(ops_rel), str(sidecar_rel)), engine=ENGINE,
                    input_layout="NHWC", input_dtype=report["input"]["dtype"], options=options,
                    tool_versions=_versions(), notes=notes)


def _with_metadata(job: CompileJob, flatbuffer: bytes, io: str) -> tuple[bytes, str | None]:
    """The model with standard TFLite Metadata (image classifier) and, for the runner, the
    normalisation it does inside; or as it is with the reason why not."""
    from edgeres.targets import tflite_metadata

    norm = pixel_normalization(job)
    if norm is None:
        return flatbuffer, ("no TFLite Metadata: the model takes BGR input and the metadata can only say RGB"
                            if job.preprocess else "no TFLite Metadata: the pipeline gave no preprocessing")
    entries = {EMBEDDED_KEY: json.dumps({"input": "pixels", "normalization": norm}).encode()}
    note = None
    if io == "int8" and job.precision == "int8":
        note = ("no TFLite Metadata: int8 input (pixels − 128) is not an image type its clients feed; "
                "tflite.io=uint8 or float makes one they read")
    else:
        labels = job.label_names()
        entries[tflite_metadata.METADATA_FIELD_NAME] = tflite_metadata.image_classifier_metadata(
            name=f"image classifier ({job.precision})", version=job.producer_version or "",
            description=f"{len(labels)}-class image classifier converted by edgeres"
                        + (f" from a model with sha256 {job.source_sha256}" if job.source_sha256 else ""),
            labels=labels, mean=None, std=None, size=int(job.preprocess["size"]))
    return tflite_metadata.attach(flatbuffer, entries, job.label_names() if note is None else None), note


# the estimator pass keeps every tensor of the graph (experimental_preserve_all_tensors): summed over
# its layers a ResNet-50 holds ~800 values per input pixel, so 16 images at 224 held ~3 GB; batches
# shrink with the image size (the ONNX calibration's rule) and stay 16 at CIFAR's 32×32
ESTIMATOR_VALUES_PER_BATCH = 64_000_000


def _estimator_batch(job: CompileJob) -> int:
    size = int((job.preprocess or {}).get("size") or 224)
    return int(np.clip(ESTIMATOR_VALUES_PER_BATCH // (size * size * 800), 1, CALIB_BATCH))


def _calibration_batches(job: CompileJob, batch_size: int = CALIB_BATCH):
    """The job's calibration images as contiguous float32 NHWC batches, shape checked."""
    norm = pixel_normalization(job)
    for batch in job.calibration(layout="NHWC", batch_size=batch_size):
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 4 or batch.shape[-1] not in (1, 3):
            raise TargetError(f"tflite: calibration batches must be N×H×W×3 (or ×1 greyscale, NHWC), got {batch.shape}")
        yield batch if norm is None else to_pixels(batch, norm)


def _activation_tensors(model: bytes) -> list[int]:
    """Indices of the float tensors that hold activations (no constant data): what int8 needs a range for."""
    from tensorflow.lite.python import schema_py_generated as schema

    root = schema.Model.GetRootAs(model, 0)
    graph = root.Subgraphs(0)
    return [i for i in range(graph.TensorsLength())
            if (t := graph.Tensors(i)).Type() == schema.TensorType.FLOAT32 and root.Buffers(t.Buffer()).DataLength() == 0]


def _estimator_ranges(float_model: bytes, job: CompileJob, tf) -> tuple[dict, int]:
    """({tensor index: (lo, hi)} for every activation of the float model, images seen): the job's
    estimator over the calibration images, run by LiteRT with every tensor kept."""
    from edgeres.calibration.estimators import make_estimator

    stats = _activation_tensors(float_model)
    with warnings.catch_warnings():  # tf.lite's interpreter warns it is deprecated and that all tensors are kept
        warnings.simplefilter("ignore", UserWarning)
        interp = tf.lite.Interpreter(model_content=float_model, experimental_preserve_all_tensors=True,
                                     num_threads=cpu_threads())
    inp = interp.get_input_details()[0]
    estimators = {i: make_estimator(job.estimator) for i in stats}
    shape, images = None, 0
    for batch in _calibration_batches(job, _estimator_batch(job)):
        images += len(batch)
        if batch.shape != shape:
            interp.resize_tensor_input(inp["index"], list(batch.shape))
            interp.allocate_tensors()
            shape = batch.shape
        interp.set_tensor(inp["index"], batch)
        interp.invoke()
        for i in stats:
            estimators[i].update(interp.get_tensor(i))
    found = {i: estimators[i].compute() for i in stats}
    if job.tuned_activations is not None:
        found.update(_tuned_ranges(interp, inp, stats, job.tuned_activations, pixel_normalization(job)))
    if inp["index"] in found and pixel_normalization(job) is not None:
        found[inp["index"]] = (0.0, 255.0)  # pixels: uint8 input with scale 1, zero point 0 is the raw image
    return found, images


def _int8_ranges(float_model: bytes, job: CompileJob, tf) -> tuple[dict, int | None, dict, tuple[str, ...]]:
    """({tensor index: (lo, hi)} of every activation, calibration images this compile ran itself (None:
    none), where the ranges came from, notes). The shared ranges when the int8 stage gave them
    (``job.reference_activations``): each LiteRT tensor takes the range of the reference tensor holding
    the same values on the reference's images; a tensor matching none gets a range derived from the op
    that makes it (``_derived_ranges``); only what is still left is measured by this target's own
    estimator pass. Without shared ranges (or with --quant finetune's tuned ones) that pass gives them all."""
    reference = _shared_reference(job)
    if job.tuned_activations is not None or not isinstance(reference, matching.ReferenceActivations):
        ranges, images = _estimator_ranges(float_model, job, tf)
        notes = (f"tflite: no shared ranges ({reference}); ranges measured on the LiteRT model's own tensors",) \
            if isinstance(reference, str) else ()
        return ranges, images, {"ranges_from": "own estimator pass"}, notes
    norm = pixel_normalization(job)
    stats = _activation_tensors(float_model)
    interp, inp = _keep_all_interpreter(float_model, tf)
    found = reference.match(_values_on(interp, inp, stats, reference.images, norm), layout="NHWC")
    del interp
    matched = len(found)
    if norm is not None:
        found[inp["index"]] = (0.0, 255.0)  # pixels: uint8 input with scale 1, zero point 0 is the raw image
    found.update(_derived_ranges(float_model, found, stats))
    missing = [i for i in stats if i not in found]
    origin = {"ranges_from": "shared", "calibration": SHARED.format(estimator=job.estimator),
              "ranges_matched": matched, "ranges_derived": len(found) - matched, "ranges_own_pass": len(missing)}
    if not missing:
        return {i: found[i] for i in stats}, None, origin, ()
    own, images = _estimator_ranges(float_model, job, tf)
    found.update({i: own[i] for i in missing})
    note = (f"tflite: {len(missing)} of {len(stats)} activation tensors match no tensor of the fp32 reference and "
            "no rule derives them; their ranges come from this target's own estimator pass")
    return {i: found[i] for i in stats}, images, origin, (note,)


_shared_reference = shared_reference  # the int8 stage's reference activations (targets.base)


def _keep_all_interpreter(float_model: bytes, tf):
    with warnings.catch_warnings():  # tf.lite's interpreter warns it is deprecated and that all tensors are kept
        warnings.simplefilter("ignore", UserWarning)
        interp = tf.lite.Interpreter(model_content=float_model, experimental_preserve_all_tensors=True,
                                     num_threads=cpu_threads())
    return interp, interp.get_input_details()[0]


def _values_on(interp, inp: dict, stats: list[int], images_nchw: np.ndarray, norm: dict | None) -> dict:
    """{tensor index: its values} of the model on ``images_nchw`` (the pipeline's NCHW input; given as
    pixels when the model normalises its input itself)."""
    images = np.ascontiguousarray(np.asarray(images_nchw).transpose(0, 2, 3, 1), dtype=np.float32)
    images = images if norm is None else to_pixels(images, norm)
    interp.resize_tensor_input(inp["index"], list(images.shape))
    interp.allocate_tensors()
    interp.set_tensor(inp["index"], images)
    interp.invoke()
    # views of the interpreter's own buffers (it keeps every tensor), not copies: a ResNet-152's are ~0.45 GB
    # for two images; they are read before the interpreter runs again or goes
    return {i: interp.tensor(i)() for i in stats}


# ops whose output range follows from their activation input's: the same values moved, some dropped
# (a max, a slice), or zeros added (the torch-exact padding's PAD)
SAME_RANGE_OPS = ("RESHAPE", "SQUEEZE", "EXPAND_DIMS", "TRANSPOSE", "MAX_POOL_2D", "STRIDED_SLICE", "SLICE",
                  "DEPTH_TO_SPACE", "SPACE_TO_DEPTH")
WITH_ZERO_OPS = ("PAD", "PADV2")


def _derived_ranges(float_model: bytes, known: dict, stats: list[int]) -> dict:
    """{tensor index: range} for activations without one, derived in graph order from the op making each:
    data movement keeps its input's range (PAD adds 0), RELU clips it, MUL/ADD/SUB by a constant
    compute it (interval arithmetic, per channel)."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(float_model)  # read only: no writable copy
    graph = model.subgraphs[0]
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    wanted, out = set(stats), {}
    ranges = dict(known)

    def constant(i: int):
        t = graph.tensors[i]
        data = model.buffers[t.buffer].data if t.buffer < len(model.buffers) else None
        if data is None or len(data) == 0 or t.type != schema.TensorType.FLOAT32:
            return None
        return np.frombuffer(bytes(data), np.float32)

    for op in graph.operators:
        code = model.operatorCodes[op.opcodeIndex]
        name = names.get(max(int(code.builtinCode), int(code.deprecatedBuiltinCode)), "")
        outputs = [o for o in op.outputs if o in wanted and o not in ranges]
        activations = [i for i in op.inputs if i >= 0 and i in wanted]
        if len(outputs) != 1 or len(activations) != 1 or activations[0] not in ranges:
            continue
        lo, hi = ranges[activations[0]]
        consts = [c for i in op.inputs if i >= 0 and i not in wanted and (c := constant(i)) is not None]
        if name in SAME_RANGE_OPS:
            derived = (lo, hi)
        elif name in WITH_ZERO_OPS:
            derived = (min(lo, 0.0), max(hi, 0.0))
        elif name == "RELU":
            derived = (max(lo, 0.0), max(hi, 0.0))
        elif name in ("MUL", "ADD", "SUB") and len(consts) == 1 and consts[0].size:
            c = consts[0].astype(np.float64)
            ends = {"MUL": (lo * c, hi * c), "ADD": (lo + c, hi + c), "SUB": (lo - c, hi - c)}[name]
            derived = (float(min(e.min() for e in ends)), float(max(e.max() for e in ends)))
        else:
            continue
        ranges[outputs[0]] = out[outputs[0]] = derived
    return out


def _live_ranges(float_model: bytes, ranges: dict) -> tuple[dict, int]:
    """(``ranges`` with every empty one — an activation that was 0 on every calibration image, such as a dead
    ReLU — given the range of the activation its op reads, how many there were). LiteRT's quantiser widens an
    empty range to 2e-6 (scale 7.8e-9); XNNPACK then refuses the model when it loads (a conv's requantisation
    scale ≥ 256: "failed to create XNNPACK runtime"). Any range holds the zeros exactly; the input's keeps the
    scale ratios of the ops around it as in a live layer. With no such input: (0, 1)."""
    from tensorflow.lite.tools import flatbuffer_utils

    if all(hi > lo for lo, hi in ranges.values()):
        return ranges, 0
    graph = flatbuffer_utils.read_model_from_bytearray(float_model).subgraphs[0]
    fixed, dead = dict(ranges), 0
    for op in graph.operators:  # graph order: an input fixed here is live for the ops after it
        for o in op.outputs:
            if o not in fixed or fixed[o][1] > fixed[o][0]:
                continue
            inputs = [fixed[i] for i in op.inputs if i >= 0 and i in fixed and fixed[i][1] > fixed[i][0]]
            fixed[o] = inputs[0] if inputs else (0.0, 1.0)
            dead += 1
    for i, (lo, hi) in fixed.items():  # a graph input, or a tensor no op makes
        if hi <= lo:
            fixed[i], dead = (0.0, 1.0), dead + 1
    return fixed, dead


def _with_ranges(float_model: bytes, ranges: dict) -> bytes:
    """The float model with ``ranges`` as its tensors' min/max and its conversion metadata saying full
    int8 — what the LiteRT converter's calibrator hands its quantiser (``mlir_quantize``)."""
    from tensorflow.lite.python import conversion_metadata_schema_py_generated as metadata_schema
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.python import util
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(float_model)  # its buffers are views: packed, not changed
    tensors = model.subgraphs[0].tensors
    for i, (lo, hi) in ranges.items():
        if tensors[i].quantization is None:
            tensors[i].quantization = schema.QuantizationParametersT()
        tensors[i].quantization.min, tensors[i].quantization.max = [float(lo)], [float(hi)]
    for entry in model.metadata or ():
        if entry.name == util.CONVERSION_METADATA_FIELD_NAME.encode():
            raw = bytearray(model.buffers[entry.buffer].data)
            metadata = metadata_schema.ConversionMetadataT.InitFromObj(
                metadata_schema.ConversionMetadata.GetRootAs(raw, 0))
            metadata.options.modelOptimizationModes = [metadata_schema.ModelOptimizationMode.PTQ_FULL_INTEGER]
            model = util.populate_conversion_metadata(model, metadata)
    return _packed(model, len(float_model))


def _packed(model, size_hint: int) -> bytes:
    """The ``.tflite`` bytes of a model object — ``flatbuffer_utils.convert_object_to_bytearray``'s, built in one
    buffer of about the final size and copied out once (it grows one from 1 KB by doubling and copies the result
    twice: ~4× a ResNet-152's 240 MB at once)."""
    import flatbuffers

    builder = flatbuffers.Builder(size_hint + (1 << 20))
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(memoryview(builder.Bytes)[builder.Head():])


def _tuned_ranges(interp, inp: dict, stats: list[int], reference, norm: dict | None) -> dict:
    """{tensor index: range tuned by --quant finetune} for the tensors holding one of the tuned model's
    activations (``calibration.matching.ReferenceActivations``), found by running its images (as pixels
    when the model normalises its input itself)."""
    images = np.ascontiguousarray(reference.images.transpose(0, 2, 3, 1), dtype=np.float32)
    images = images if norm is None else to_pixels(images, norm)
    interp.resize_tensor_input(inp["index"], list(images.shape))
    interp.allocate_tensors()
    interp.set_tensor(inp["index"], images)
    interp.invoke()
    tuned = reference.match({i: interp.get_tensor(i) for i in stats}, layout="NHWC")
    if not tuned:
        raise TargetError("tflite: no tensor of the converted model matches the fine-tuned model's activations; "
                          "its tuned ranges cannot be applied")
    return tuned


def _write_atomic(path: Path, data: bytes) -> None:
    try:
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
    except OSError as e:
        raise TargetError(f"{path}: cannot write ({e.strerror}); check the folder is writable and has space") from None


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("tensorflow-cpu", "tensorflow", "tf-keras", "ai-edge-litert"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


# -- op report -----------------------------------------------------------------------------------

def op_report(path: str | Path) -> dict:
    """Every op of a ``.tflite`` with its input/output tensor dtypes, a per-type summary and the ops
    that compute in float (anything but QUANTIZE/DEQUANTIZE touching a float tensor)."""
    module = _interpreter_module()
    try:
        interp = module.Interpreter(model_path=str(path),
                                    experimental_op_resolver_type=module.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    except (ValueError, RuntimeError) as e:
        raise TargetError(f"{path}: LiteRT cannot load it ({str(e).splitlines()[0][:200]})") from None
    tensors = {t["index"]: t for t in interp.get_tensor_details()}

    def dtypes(indices) -> list[str]:
        return [np.dtype(tensors[i]["dtype"]).name for i in indices if i >= 0]

    ops, summary, float_ops = [], {}, []
    for op in interp._get_ops_details():  # noqa: SLF001 - the only API listing nodes with their tensors
        entry = {"index": int(op["index"]), "op": op["op_name"], "inputs": dtypes(op["inputs"]),
                 "outputs": dtypes(op["outputs"])}
        ops.append(entry)
        compute = _compute_dtype(entry)
        by_type = summary.setdefault(entry["op"], {})
        by_type[compute] = by_type.get(compute, 0) + 1
        if entry["op"] not in EDGE_OPS and compute in FLOAT_DTYPES:
            float_ops.append(entry)
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    return {"model": Path(path).name, "ops": ops, "summary": summary, "float_compute_ops": float_ops,
            "input": _io_record(inp), "output": _io_record(out)}


def _check_loads(path: Path, source) -> None:
    """Raise ``TargetError`` unless LiteRT loads the model with its default delegate (XNNPACK) through the runner
    ``edgeres eval`` and the exported apps use: the converter can write a model whose quantisation XNNPACK refuses."""
    _interpreter_module()  # no LiteRT at all: TargetUnavailable with the install hint, not a load failure
    try:
        with native_stderr_quiet():
            LiteRtRunner(str(path), 1)
    except (ValueError, RuntimeError) as e:
        raise TargetError(f"{source}: LiteRT cannot load the converted model with XNNPACK "
                          f"({' '.join(str(e).split())[:200]})") from None


def _compute_dtype(entry: dict) -> str:
    """The arithmetic an op does: float if any tensor it touches is float, else its output dtype;
    QUANTIZE/DEQUANTIZE are shown as their conversion (``float32->int8``)."""
    if entry["op"] in EDGE_OPS and entry["inputs"] and entry["outputs"]:
        return f"{entry['inputs'][0]}->{entry['outputs'][0]}"
    touched = entry["inputs"] + entry["outputs"]
    floats = [d for d in touched if d in FLOAT_DTYPES]
    if floats:
        return "float32" if "float32" in floats else floats[0]
    return entry["outputs"][0] if entry["outputs"] else "none"


def _io_record(detail: dict) -> dict:
    scale, zero_point = detail.get("quantization", (0.0, 0))
    quantized = np.dtype(detail["dtype"]).kind in "iu" and scale != 0.0
    return {"name": detail["name"], "shape": [int(v) for v in detail.get("shape_signature", detail["shape"])],
            "dtype": np.dtype(detail["dtype"]).name,
            "quantization": {"scale": float(scale), "zero_point": int(zero_point)} if quantized else None}


def check_full_int8(report: dict, *, io: str = "float", source: str = "model") -> None:
    """Raise ``TargetError`` unless every compute op is integer and the I/O has the requested type."""
    if report["float_compute_ops"]:
        names = sorted({f"{o['op']}({'/'.join(o['inputs'])})" for o in report["float_compute_ops"]})
        raise TargetError(f"{source}: full-int8 model still computes in float: {len(report['float_compute_ops'])} "
                          f"op(s) {', '.join(names[:5])}; the converter could not quantise them")
    want = {"float": "float32", "int8": "int8", "uint8": "uint8"}[io]
    for side in ("input", "output"):
        got = report[side]["dtype"]
        if got != want:
            raise TargetError(f"{source}: full-int8 model {side} is {got}, expected {want} (tflite.io={io})")


def sidecar(path: Path, job: CompileJob, report: dict | None = None) -> dict:
    """What a device needs beside the ``.tflite``: labels, preprocessing (NHWC) and I/O quantisation
    (from ``report``, its op report, when the caller has it)."""
    report = report if report is not None else op_report(path)
    preprocess = dict(job.preprocess or {})
    if preprocess:
        preprocess["layout"] = "NHWC"
    norm = pixel_normalization(job)
    return {"model": path.name, "precision": job.precision, "layout": "NHWC",
            "input_size": preprocess.get("size"), "preprocess": preprocess or None,
            # the model does scale/mean/std itself: feed RGB pixel values 0..255 (resize/crop stay the app's)
            "takes_pixels": norm is not None,
            "labels": list(job.labels) if job.labels is not None else None,
            "input": report["input"], "output": report["output"]}


# -- run -----------------------------------------------------------------------------------------

class TFLiteRunner(LiteRtRunner, Runner):
    """``targets.runners.litert_runner`` with this target's errors: runs a ``.tflite`` on NCHW float32
    batches (transposed to NHWC, quantised if the model's input is integer) and returns float32 logits."""

    def __init__(self, path: str | Path, threads: int | None = None):
        _interpreter_module()
        try:
            # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." is printed by the C++ runtime on fd 2
            with native_stderr_quiet():
                super().__init__(str(path), threads)
        except (ValueError, RuntimeError) as e:
            raise TargetError(f"{path}: LiteRT cannot load it ({str(e).splitlines()[0][:200]})") from None
        self.path = Path(path)
        # a model that normalises its pixel input itself gets eval's normalised batches back as pixels
        self._normalization = embedded_normalization(self.path) or {}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        try:
            return super().__call__(x)
        except ValueError as e:
            if np.ndim(x) != 4:
                raise TargetError(f"{self.path}: {e}") from None
            raise


def embedded_normalization(path: Path) -> dict | None:
    """The normalisation a ``.tflite`` made by edgeres does on its pixel input (None: it takes the
    normalised input, as models from elsewhere or from before it did)."""
    try:
        return litert_embedded_normalization(path)
    except ImportError as e:  # no flatbuffers schema beside the interpreter (tflite-runtime alone)
        raise TargetUnavailable(f"{path}: {e}") from None
    except (OSError, ValueError, IndexError, AttributeError, TypeError):
        raise TargetError(f"{path}: LiteRT cannot load it (not a readable .tflite flatbuffer)") from None


def load_runner(path: str | Path, threads: int | None = None) -> TFLiteRunner:
    return TFLiteRunner(path, threads)
