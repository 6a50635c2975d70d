"""ExecuTorch target: a ``.pte`` program whose every op runs in the XNNPACK delegate, fp32 and int8.

It compiles from the ``torch_export`` model source (the network rebuilt in torch from its spec + weights
and exported with ``torch.export``): fp32 lowers that program with ``to_edge_transform_and_lower
([XnnpackPartitioner()])``; int8 quantises it first with PT2E and ``XNNPACKQuantizer`` (symmetric
per-channel int8 weights, int8 activations per tensor), with activation ranges from
``--option executorch.ranges``:

- ``shared`` (default): the int8 stage's ranges (the same calibration images and estimator as every other
  target), each PT2E observer taking the range of the fp32 reference tensor that holds the same values on
  the reference images (``calibration.matching``); an observer matching none measures its own with the
  same estimator on the calibration images.
- ``pt2e``: XNNPACKQuantizer's own observers (histogram) calibrated on the same calibration images.

XNNPACK has no strided slice, so the CIFAR "option A" shortcut's 2× subsampling is rewritten as the 1×1
depthwise convolution of stride 2 with unit weights that computes the same values (exact in int8 too: a
weight of 1 is 127 steps of 1/127); a BatchNorm no conv feeds (pre-activation ResNets) becomes the 1×1
depthwise convolution with its scale and shift, and a zero pad the 1×1 depthwise convolution with unit weights
and that padding, both of which XNNPACK quantises (it runs a lone BN and a pad in fp32 only). The op audit after lowering refuses a program with any op left on
ExecuTorch's portable kernels and records what XNNPACK runs. Labels, preprocessing and the audit travel
in ``model.<precision>.json`` beside the ``.pte`` (a ``.pte`` has no metadata of its own).

Imports nothing heavy at module level.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections import Counter
from pathlib import Path

import numpy as np

from edgeres.calibration import matching
from edgeres.targets.base import (ANY_PRECISION, TORCH_EXPORT, Artifact, CompileJob, Runner, TargetError, TargetInfo,
                                  TargetOption, TargetUnavailable, atomic_path, first_line, shared_reference)
from edgeres.targets.tflite import native_stderr_quiet
from edgeres.targets.runners.executorch_runner import EXECUTORCH_SIDECAR, ExecuTorchRunner

PRECISIONS = ("fp32", "int8")
RANGE_SOURCES = ("shared", "pt2e")
DEFAULT_RANGES = "shared"
# XNNPACK's int8 kernels: signed int8 activations (per tensor, asymmetric) and symmetric per-channel ±127 weights
XNNPACK_INT8 = ("int8", False, "XNNPACK int8: int8 activations, symmetric ±127 weights per channel")
INFO = TargetInfo(
    name="executorch", title="ExecuTorch (XNNPACK)", suffixes=(".pte",), companions=(EXECUTORCH_SIDECAR,),
    dist="executorch", runtime="executorch", precisions=PRECISIONS, sources={ANY_PRECISION: TORCH_EXPORT},
    tools=("torchao",), runtime_needs=("torch",), int8_recipe=lambda cpu: XNNPACK_INT8, budget_tunes=("estimator",),
    options=(TargetOption("ranges", str, DEFAULT_RANGES, "int8 activation ranges: the int8 stage's shared ones "
                          "or PT2E's own observers on the same images", RANGE_SOURCES),),
)
CALIB_BATCH = 16
EPS = 2 ** -12  # XNNPACKQuantizer's smallest scale


# The Android app code of ``export-app --kind android`` (edgeres.app.mobile fills in the constants and appends
# its shared code: Geometry (resize/crop), Pixels (the input values), Scores); not compiled here. No iOS
# template: ExecuTorch's iOS API is not written here yet, so ``--kind ios`` offers the other runtimes.
MOBILE = {"android": {
    "title": "ExecuTorch's Android Module (XNNPACK)",
    # the .pte needs a runtime at least as new as the executorch that wrote it
    "dependency": "org.pytorch:executorch-android:{executorch}",
    "code": '''package com.example.edgeres

import android.content.Context
import android.graphics.Bitmap
import org.pytorch.executorch.EValue
import org.pytorch.executorch.Module
import org.pytorch.executorch.Tensor
import java.io.File
import kotlin.math.exp

// @CONSTANTS@

/** Classifies bitmaps with ExecuTorch's Android Module (every op in the XNNPACK delegate), preprocessing as
 *  the bundle did (NCHW float32, batch 1). Module.load takes a file path, so the .pte is copied out of the
 *  APK's assets once. XNNPACK picks its own thread count on Android. */
class ImageClassifier(context: Context) : AutoCloseable {
    val labels: List<String> = context.assets.open(ModelConfig.LABELS_FILE).bufferedReader().readLines()
    private val module: Module

    init {
        val file = File(context.filesDir, ModelConfig.MODEL_FILE)
        if (!file.exists()) {
            context.assets.open(ModelConfig.MODEL_FILE).use { input -> file.outputStream().use { input.copyTo(it) } }
        }
        module = Module.load(file.absolutePath)
    }

    // UPRIGHT IMAGES ONLY: the bitmap is classified as its pixels lie. BitmapFactory ignores the EXIF
    // orientation a phone camera writes (a portrait photo is stored as landscape pixels plus a tag), and
    // edgeres applies it, so rotate first: ExifInterface(path).rotationDegrees (androidx.exifinterface) and
    // Bitmap.createBitmap(bitmap, 0, 0, w, h, Matrix().apply { postRotate(degrees) }, true); from CameraX
    // use imageProxy.imageInfo.rotationDegrees. Alpha is ignored, as edgeres drops it.
    fun classify(bitmap: Bitmap, top: Int = 5): List<Pair<String, Float>> {
        val n = ModelConfig.INPUT_SIZE
        val chw = Pixels.input(Geometry.apply(bitmap))
        val input = Tensor.fromBlob(chw, longArrayOf(1, 3, n.toLong(), n.toLong()))
        val logits = module.forward(EValue.from(input))[0].toTensor().dataAsFloatArray
        return Scores.top(logits, labels, top)
    }

    override fun close() = module.destroy()
}
''',
}}

def available() -> str:
    from importlib import metadata

    try:
        import executorch.version  # noqa: F401 - light: the version file only
        return metadata.version("executorch")  # the package's; executorch.version adds the build tag (+cpu)
    except (ImportError, metadata.PackageNotFoundError):
        raise TargetUnavailable("executorch is not installed; pip install 'edgeres[executorch]'") from None


@contextlib.contextmanager
def _quiet():
    """torchao and executorch print warnings about optional CUDA kernels and experimental APIs on import."""
    import logging
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        level = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(level)


# ---------------------------------------------------------------------------------------------
# compile


def compile(job: CompileJob) -> Artifact:  # noqa: A001 - the target interface's verb
    """Write ``executorch/model.<precision>.pte`` and its ``.json`` sidecar into ``job.out_dir``."""
    version = available()
    options = INFO.check_options(job.options)
    if job.precision not in PRECISIONS:
        raise TargetError(f"executorch: precision {job.precision!r} is not one of {', '.join(PRECISIONS)}")
    with _quiet():
        import torch
        import torchao
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

    rel = Path("executorch") / f"model.{job.precision}.pte"
    dest = job.out_dir / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    program = job.source(TORCH_EXPORT)()
    example = tuple(program.example_inputs[0])
    module = program.module()
    if xnnpack_friendly(module):  # exported again, so every node carries its shapes for PT2E
        module = torch.export.export(module, example).module()
    recorded: dict = {}
    notes: tuple[str, ...] = ()
    with _quiet():
        if job.precision == "int8":
            module, recorded, notes = _quantize(module, example, job, options)
        try:
            exported = torch.export.export(module, example)
            edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
        except Exception as e:  # noqa: BLE001 - export and lowering raise many kinds
            raise TargetError(f"executorch {job.precision}: lowering to XNNPACK failed ({first_line(e, with_type=True)})") from None
        audit = op_audit(edge.exported_program())
        program_bytes = edge.to_executorch().buffer
    with atomic_path(dest) as tmp:
        tmp.write_bytes(program_bytes)
    sidecar = _sidecar(job, audit)
    side_rel = rel.with_suffix(EXECUTORCH_SIDECAR)
    with atomic_path(job.out_dir / side_rel) as tmp:
        tmp.write_text(json.dumps(sidecar, indent=1))
    _check_runs(dest)
    recorded["op_audit"] = audit
    return Artifact("executorch", job.precision, (str(rel), str(side_rel)),
                    engine="torch.export → PT2E XNNPACKQuantizer → XNNPACK" if job.precision == "int8"
                    else "torch.export → XNNPACK", options=recorded, notes=notes,
                    tool_versions={"executorch": version, "torch": torch.__version__.split("+")[0],
                                   "torchao": torchao.__version__})


def _sidecar(job: CompileJob, audit: dict) -> dict:
    """The app metadata (labels, preprocessing, input) as plain JSON, plus the op audit."""
    meta = {k.removeprefix("edgeres."): v for k, v in job.model_metadata(layout="NCHW", dtype="float32").items()}
    for key in ("labels", "preprocess", "input"):
        meta[key] = json.loads(meta[key])
    return {**meta, "precision": job.precision, "io_names": ["x", "output"], "op_audit": audit}


def xnnpack_friendly(gm) -> bool:
    """Rewrite ``gm`` (a ``torch.fx.GraphModule``) in place, each strided spatial slice — XNNPACK has none — made the 1×1
    depthwise convolution with unit weights and that stride, which computes the same values; two in a row
    (rows, then columns) become one; a BatchNorm no conv feeds, the depthwise convolution with its scale and
    shift; a symmetric zero pad, the unit-weight depthwise convolution with that padding. Whether anything changed."""
    import torch

    aten = torch.ops.aten
    graph = gm.graph

    def spatial_step(node):
        if node.op != "call_function" or node.target not in (aten.slice.Tensor, aten.slice_copy.Tensor):
            return None
        dim, start, end, step = (list(node.args[1:]) + [0, None, None, 1][len(node.args) - 1:])[:4]
        shape = node.args[0].meta.get("val").shape if "val" in node.args[0].meta else None
        if shape is None or len(shape) != 4 or dim not in (2, 3, -1, -2) or (start or 0) != 0 or (step or 1) == 1:
            return None
        if end is not None and end < shape[dim]:
            return None
        return (2 if dim in (2, -2) else 3), int(step)

    changed = _lone_batch_norms_as_convs(gm)
    changed = _zero_pads_as_convs(gm) or changed
    for node in reversed(list(graph.nodes)):  # the outer slice first, so it takes the inner one with it
        found = spatial_step(node) if node.users else None
        if found is None:
            continue
        strides, source = [1, 1], node.args[0]
        strides[found[0] - 2] = found[1]
        inner = spatial_step(source)
        if inner is not None and inner[0] != found[0] and len(source.users) == 1:
            strides[inner[0] - 2] = inner[1]
            source = source.args[0]
        channels = int(source.meta["val"].shape[1])
        name = f"_xnnpack_subsample_{node.name}"
        gm.register_buffer(name, torch.ones(channels, 1, 1, 1))
        with graph.inserting_before(node):
            weight = graph.get_attr(name)
            conv = graph.call_function(aten.conv2d.default, (source, weight, None, strides, [0, 0], [1, 1], channels))
        conv.meta = dict(node.meta)
        node.replace_all_uses_with(conv)
        graph.erase_node(node)
        changed = True
    if changed:
        graph.eliminate_dead_code()
        gm.recompile()
    return changed


def _lone_batch_norms_as_convs(gm) -> bool:
    """Rewrite each BatchNorm that no conv feeds (a pre-activation ResNet's preact and post BNs) as the 1×1
    depthwise convolution computing the same per-channel scale and shift: XNNPACK folds a BN into the conv before
    it or decomposes it in fp32 only, and a quantised program keeping one fails in XNNPACK's compiler. Whether
    anything changed."""
    import torch

    aten = torch.ops.aten
    graph = gm.graph

    def value(arg):
        obj = gm
        for part in arg.target.split("."):
            obj = getattr(obj, part)
        return obj.detach().double()

    changed = False
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != aten.batch_norm.default:
            continue
        source = node.args[0]
        if getattr(source, "target", None) in (aten.conv2d.default, aten.convolution.default):
            continue
        if any(getattr(a, "op", None) != "get_attr" for a in node.args[1:5]):
            continue
        weight, bias, mean, var = (value(a) for a in node.args[1:5])
        eps = float(node.args[7]) if len(node.args) > 7 else 1e-5
        scale = weight / torch.sqrt(var + eps)
        name = f"_xnnpack_bn_{node.name}"
        gm.register_buffer(f"{name}_w", scale.float().reshape(-1, 1, 1, 1))
        gm.register_buffer(f"{name}_b", (bias - mean * scale).float())
        with graph.inserting_before(node):
            w, b = graph.get_attr(f"{name}_w"), graph.get_attr(f"{name}_b")
            conv = graph.call_function(aten.conv2d.default, (source, w, b, [1, 1], [0, 0], [1, 1], int(scale.numel())))
        conv.meta = dict(node.meta)
        node.replace_all_uses_with(conv)
        graph.erase_node(node)
        changed = True
    return changed


def _zero_pads_as_convs(gm) -> bool:
    """Rewrite each symmetric spatial zero pad of a 4-D tensor (a pre-activation stem's ZeroPadding2D before its
    max-pool) as the 1×1 depthwise convolution with unit weights and that padding, which computes the same values:
    XNNPACK pads in fp32 only, and a quantised program keeping the pad fails in XNNPACK's compiler. Whether anything
    changed."""
    import torch

    aten = torch.ops.aten
    graph = gm.graph
    changed = False
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target == aten.pad.default:
            args = list(node.args) + [None] * (4 - len(node.args))
            source, pads, mode, fill = args[:4]
            if (mode or "constant") != "constant":
                continue
        elif node.target == aten.constant_pad_nd.default:
            source, pads, fill = (list(node.args) + [0.0])[:3]
        else:
            continue
        shape = source.meta["val"].shape if "val" in getattr(source, "meta", {}) else None
        pads = list(pads)
        if (shape is None or len(shape) != 4 or float(fill or 0.0) != 0.0 or len(pads) != 4 or min(pads) < 0
                or pads[0] != pads[1] or pads[2] != pads[3]):
            continue
        channels = int(shape[1])
        name = f"_xnnpack_pad_{node.name}"
        gm.register_buffer(name, torch.ones(channels, 1, 1, 1))
        with graph.inserting_before(node):
            weight = graph.get_attr(name)
            conv = graph.call_function(aten.conv2d.default,
                                       (source, weight, None, [1, 1], [pads[2], pads[0]], [1, 1], channels))
        conv.meta = dict(node.meta)
        node.replace_all_uses_with(conv)
        graph.erase_node(node)
        changed = True
    return changed


def op_audit(program) -> dict:
    """What XNNPACK runs and what it does not, from a lowered ``ExportedProgram``: a TargetError naming the
    ops left outside the delegate (ExecuTorch would run them on its slow portable kernels)."""
    outside, delegated, calls = Counter(), Counter(), 0
    gm = program.graph_module
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        name = _op_name(node.target)
        if name == "executorch_call_delegate":
            calls += 1
            lowered = getattr(gm, node.args[0].target)
            for inner in lowered.original_module.graph.nodes:
                if inner.op == "call_function" and _op_name(inner.target) != "getitem":
                    delegated[_op_name(inner.target)] += 1
        elif name != "getitem":
            outside[name] += 1
    if outside or not calls:
        left = ", ".join(f"{k} ×{v}" for k, v in sorted(outside.items())) or "everything"
        raise TargetError(f"executorch: ops left outside the XNNPACK delegate (they would run on ExecuTorch's "
                          f"portable kernels): {left}")
    return {"delegate_calls": calls, "ops_outside_delegate": 0, "delegated_ops": dict(sorted(delegated.items()))}


def _op_name(target) -> str:
    name = getattr(target, "__name__", str(target))
    return "executorch_call_delegate" if name.endswith("executorch_call_delegate") else name


def _check_runs(path: Path) -> None:
    """Fail now (exit 3) rather than at eval time if ExecuTorch cannot run the program."""
    runner = load_runner(path)
    shape = runner.input_spec()["dims"]
    if not np.isfinite(runner(np.zeros(shape, np.float32))).all():
        raise TargetError(f"{path}: ExecuTorch gives non-finite outputs on a zero image")


# ---------------------------------------------------------------------------------------------
# int8


def _quantize(module, example: tuple, job: CompileJob, options: dict):
    """(the PT2E-converted module, what to record, notes): XNNPACKQuantizer, ranges per ``options``."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                         get_symmetric_quantization_config)
    from torchao.quantization.pt2e import MinMaxObserver
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if job.calibration is None:
        raise TargetError("executorch int8 needs calibration images; give --calib")
    source = options.get("ranges", DEFAULT_RANGES)
    config = get_symmetric_quantization_config(is_per_channel=True)
    if source == "shared":  # observers that keep the range they are given (set below)
        act = dataclasses.replace(config.input_activation, observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=EPS))
        config = dataclasses.replace(config, input_activation=act, output_activation=act)
    try:
        prepared = prepare_pt2e(module, XNNPACKQuantizer().set_global(config))
    except Exception as e:  # noqa: BLE001
        raise TargetError(f"executorch int8: PT2E cannot prepare the model ({first_line(e, with_type=True)})") from None
    points = _activation_observers(prepared)
    recorded = {"quantizer": "XNNPACKQuantizer symmetric per-channel static", "ranges": source,
                "activation_observers": len(points)}
    notes: tuple[str, ...] = ()
    if source == "pt2e":
        images = _run_batches(prepared, job, {}, lambda *a: None)
        recorded.update({"calibration": "XNNPACKQuantizer's histogram observers", "calibration_images": images})
    else:
        ranges, origin, notes = _shared_ranges(prepared, points, job)
        for name, (lo, hi) in ranges.items():
            observer = getattr(prepared, name)
            observer.min_val = torch_tensor(lo)  # MinMaxObserver widens it to hold 0
            observer.max_val = torch_tensor(hi)
        recorded.update(origin)
    return convert_pt2e(prepared), recorded, notes


def torch_tensor(value: float):
    import torch

    return torch.tensor(float(value))


def _activation_observers(prepared) -> dict[str, list[str]]:
    """{observer module name: the graph nodes it observes, in order}: every activation observer (weights'
    observers read a constant)."""
    out: dict[str, list[str]] = {}
    for node in prepared.graph.nodes:
        if node.op == "call_module" and node.target.startswith("activation_post_process_") \
                and node.args and getattr(node.args[0], "op", None) != "get_attr":
            out.setdefault(node.target, []).append(node.name)
    return out


def _run_batches(prepared, job: CompileJob, observers: dict, collect) -> int:
    """Run the calibration images through ``prepared`` (its observers see them); ``collect(name, k, value)``
    gets the k-th input of each named observer per image batch. The number of images."""
    import torch

    handles = [_hook(getattr(prepared, name), name, collect) for name in observers]
    images = 0
    try:
        with torch.no_grad():
            for batch in job.calibration(layout="NCHW", batch_size=CALIB_BATCH):
                x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
                for i in range(len(x)):  # the program is exported at batch 1
                    prepared(x[i:i + 1])
                images += len(x)
    finally:
        for h in handles:
            h.remove()
    if images == 0:
        raise TargetError("executorch int8: the calibration set yielded no images")
    return images


def _hook(observer, name: str, collect):
    calls = {"k": 0}

    def pre(_module, args):
        collect(name, calls["k"], args[0])
        calls["k"] += 1

    handle = observer.register_forward_pre_hook(pre)
    return _Handle(handle, calls)


@dataclasses.dataclass
class _Handle:
    handle: object
    calls: dict

    def remove(self):
        self.handle.remove()


def _shared_ranges(prepared, points: dict[str, list[str]], job: CompileJob):
    """({observer: (lo, hi)}, where they came from, notes): the int8 stage's ranges matched by value on
    the reference images; those matching none (and all, without shared ranges) from the same estimator
    run here over the calibration images."""
    import torch

    from edgeres.calibration.estimators import make_estimator

    reference = shared_reference(job)
    found: dict[str, tuple[float, float]] = {}
    matched = 0
    if isinstance(reference, matching.ReferenceActivations):
        values: dict[str, list] = {name: [] for name in points}
        handles = [_hook(getattr(prepared, n), n, lambda n, k, v: values[n].append(v.detach().numpy().copy()))
                   for n in points]
        try:
            with torch.no_grad():
                x = torch.from_numpy(np.ascontiguousarray(reference.images, dtype=np.float32))
                per_image = [[] for _ in range(len(x))]
                for i in range(len(x)):
                    for v in values.values():
                        v.clear()
                    prepared(x[i:i + 1])
                    per_image[i] = {n: list(v) for n, v in values.items()}
        finally:
            for h in handles:
                h.remove()
        tensors = {(n, k): np.concatenate([per_image[i][n][k] for i in range(len(x))])
                   for n, nodes in points.items() for k in range(len(per_image[0][n]))}
        keyed = reference.match({f"{n}#{k}": v for (n, k), v in tensors.items()}, layout="NCHW")
        for key, (lo, hi) in keyed.items():
            name = key.rsplit("#", 1)[0]
            old = found.get(name)
            found[name] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))
        matched = len(found)
    missing = [n for n in points if n not in found]
    notes: tuple[str, ...] = ()
    if missing:
        estimators = {n: make_estimator(job.estimator or "mse") for n in missing}
        images = _run_batches(prepared, job, {n: None for n in missing},
                              lambda n, k, v: estimators[n].update(v.detach().numpy()))
        found.update({n: tuple(float(v) for v in est.compute()) for n, est in estimators.items()})
        why = reference if isinstance(reference, str) else "they match no tensor of the fp32 reference"
        if isinstance(reference, matching.ReferenceActivations):
            notes = (f"executorch: {len(missing)} of {len(points)} activation observers match no tensor of the fp32 "
                     f"reference; their ranges come from this target's own {job.estimator} pass over {images} images",)
        elif reference is not None:
            notes = (f"executorch: no shared ranges ({why}); ranges measured on the PT2E model's own observers",)
    origin = {"ranges_from": "shared" if matched else "own estimator pass", "estimator": job.estimator,
              "ranges_matched": matched, "ranges_own_pass": len(missing)}
    return found, origin, notes


# ---------------------------------------------------------------------------------------------
# run


class ExecuTorchTargetRunner(ExecuTorchRunner, Runner):
    """``targets.runners.executorch_runner`` with this target's errors."""

    def __init__(self, path: str | Path, threads: int | None = None):
        available()
        try:
            with _quiet(), native_stderr_quiet():  # XNNPACK's cpuinfo lines on every load
                super().__init__(str(path), threads)
        except Exception as e:  # noqa: BLE001 - the runtime raises its own kinds
            raise TargetError(f"{path}: ExecuTorch cannot load it ({first_line(e)})") from None
        self.path = Path(path)

    def intermediate_tensors(self):
        """None to give: per-layer error (``eval --layers``) needs the tensors inside the network."""
        raise TargetError("the XNNPACK delegate runs the whole network as one call, so ExecuTorch exposes no "
                          "tensor inside it (the per-layer error of the same ranges: see the onnx int8 rows)")


def load_runner(path: str | Path, threads: int | None = None) -> ExecuTorchTargetRunner:
    return ExecuTorchTargetRunner(path, threads)
