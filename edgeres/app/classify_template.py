#!/usr/bin/env python3
"""Classify images with the model beside this script.

Made by `edgeres export-app`; needs only numpy, Pillow and the model's runtime (requirements.txt),
plus OpenCV for --camera. Usage:

    python classify.py IMAGE... | FOLDER [--top K] [--json] [--threads N]
    python classify.py --camera 0        (needs: pip install opencv-python)

The preprocessing below is the bundle's, written out: decode with Pillow by edgeres' own rule (EXIF
orientation applied; 16-bit, greyscale, palette, CMYK and alpha images as edgeres reads them), resize
with Pillow's filter the bundle names (antialiased as torchvision does, unless it says not), scale,
mean/std, layout.
"""

from __future__ import annotations

import argparse
import json
import sys
import unicodedata
from pathlib import Path

import numpy as np
from PIL import Image

CONFIG: dict = {}  # written by edgeres export-app: runtime, model, labels, preprocess, input
HERE = Path(__file__).resolve().parent
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")  # the formats decoded


# -- preprocessing --------------------------------------------------------------------------------

FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """Pillow's resize with the bundle's filter; not antialiased: the filter sampled at output pixel centres."""
    if img.shape[:2] == (h, w):
        return img
    if img.ndim == 3 and img.shape[2] == 1:  # greyscale: Pillow resizes an L image
        return _resize(img[:, :, 0], h, w)[:, :, None]
    pre = CONFIG["preprocess"]
    name = pre.get("filter", "bilinear")
    if pre.get("antialias", True) or name == "nearest":
        return np.asarray(Image.fromarray(img).resize((w, h), FILTERS[name]))
    src_h, src_w = img.shape[:2]
    return np.asarray(Image.fromarray(img).transform((w, h), Image.AFFINE, (src_w / w, 0, 0, 0, src_h / h, 0),
                                                     FILTERS[name]))


def geometry(img: np.ndarray) -> np.ndarray:
    """H×W×3 uint8 → size×size×channels uint8 as the model was trained (or ValueError naming the size)."""
    pre = CONFIG["preprocess"]
    if pre["channel_order"] == "L":  # a greyscale model: grey first, as Image.convert("L") at load time
        img = np.asarray(Image.fromarray(img).convert("L"))[:, :, None]
    size, resize, h, w = pre["size"], pre.get("resize"), img.shape[0], img.shape[1]
    if pre.get("resize_mode", "shorter_side_crop") == "direct":
        return _resize(img, size, size)
    if resize is None:
        if (h, w) != (size, size):
            raise ValueError(f"image is {h}×{w} but the model takes {size}×{size} images as they are")
        return img
    nh, nw = (resize, max(size, int(resize * w / h))) if h <= w else (max(size, int(resize * h / w)), resize)
    out = _resize(img, nh, nw)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    return out[top : top + size, left : left + size]


def model_input(pixels: np.ndarray) -> np.ndarray:
    """size×size×channels uint8 pixels → the model's 1×… input."""
    pre, spec = CONFIG["preprocess"], CONFIG["input"]
    if spec["pixels"]:  # the model normalises inside: it takes the pixel values
        x = pixels.astype(np.uint8 if spec["dtype"] == "uint8" else np.float32)[None]
    else:
        x = pixels[None].astype(np.float32) * np.float32(pre["scale"])
        if pre["channel_order"] == "BGR":
            x = x[..., ::-1]
        x = (x - np.asarray(pre["mean"], np.float32)) / np.asarray(pre["std"], np.float32)
    if spec["layout"] == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x)


# -- image files: edgeres' own decoding rule (EXIF orientation, 16-bit, size and format checks) ---------

from edgeres.calibration.image_file import ImageRefused, decode_image  # export-app puts that module's source here


# -- runtimes: the runner of each, as edgeres runs it (its targets/runners modules, written in) ------------

# >>> runners: assembled from targets/runners by `python -m edgeres.targets.runners.assemble FILE`; edit there, not here

# --- targets/runners/onnxruntime_runner.py ---
"""onnxruntime: run an ``.onnx`` on NCHW float32 batches (numpy + onnxruntime only; copied verbatim into
the standalone runners, so no edgeres imports and no module-level name shared with the other runners).

onnxruntime reports usage to Microsoft (and keeps a device ID under ``~/.cache/Microsoft``) unless
``ORT_DISABLE_TELEMETRY=1`` when it starts: set here, before onnxruntime is imported, unless the user has set it."""


import os

import numpy as np

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # the standalone runners' copy of edgeres/__init__.py's line

ORT_INPUT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
                   "tensor(uint8)": "uint8", "tensor(int8)": "int8", "tensor(int32)": "int32",
                   "tensor(int64)": "int64"}
ORT_QUANTIZE_INPUT_SUFFIX = "_QuantizeLinear_Input"  # onnxruntime's quantizer renames a graph output it quantises


def ort_cores() -> int:
    """Physical cores (SMT siblings counted once, as onnxruntime counts them) among those this process may use."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        topology = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
        try:
            with open(topology + "physical_package_id") as package, open(topology + "core_id") as core:
                cores.add((package.read().strip(), core.read().strip()))
        except OSError:
            cores.add(("cpu", cpu))
    return max(1, len(cores))


class OnnxRuntimeRunner:
    """One ``InferenceSession`` on the CPU. ``spin=False``: idle threads yield the CPU (long evaluations)."""

    runtime = "onnxruntime"
    suffix, companions = ".onnx", ()
    missing = "onnxruntime is not installed for this python; pip install onnxruntime"
    input_layout = tensor_layout = "NCHW"  # its input; its intermediate tensors
    takes_pixels = False

    def __init__(self, path, threads: int | None = None, *, spin: bool = True):
        import onnxruntime as ort

        self.path = path
        self.version = ort.__version__
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        # no count given: the physical cores among those this process may use. onnxruntime's own default is a
        # thread per physical core of the machine, each pinned to its core, so under taskset or a container's
        # cpuset it ran on cores it was not given
        opts.intra_op_num_threads = int(threads or ort_cores())
        opts.inter_op_num_threads = 1
        if not spin:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._options = opts
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def input_spec(self) -> dict:
        """The first input: name, dims (None where dynamic), numpy dtype name (None if not a plain
        tensor type) and the runtime's type string."""
        inp = self.session.get_inputs()[0]
        dims = [d if isinstance(d, int) and d > 0 else None for d in inp.shape]
        return {"name": inp.name, "dims": dims, "dtype": ORT_INPUT_TYPES.get(inp.type), "type": inp.type}

    def io_names(self) -> tuple[str, str]:
        return self.input_name, self.session.get_outputs()[0].name

    def reshape(self, shape) -> None:
        """A static input shape (onnxruntime takes any shape the graph allows: nothing to do)."""

    def fixed_input_call(self, x: np.ndarray):
        """A call running the model on ``x`` (the model's own input) as a user's loop would, for timing."""
        feed = {self.input_name: x}  # onnxruntime wraps the numpy buffer without copying
        return lambda: self.session.run(None, feed)

    def run_native(self, x: np.ndarray) -> np.ndarray:
        """The first output for the model's own input."""
        return np.asarray(self.session.run(None, {self.input_name: x})[0], np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Logits (float32) of an N×C×H×W float32 batch."""
        return self.run_native(np.asarray(x, np.float32))

    def intermediate_tensors(self):
        """``run(x)`` giving each activation the graph computes, as float32, for a batch ``x`` (NCHW
        float32): in a QDQ graph the outputs of its QuantizeLinear nodes (what the fused int8 kernels
        produce), dequantised with the node's own scale and zero point and named by the float tensor they
        quantise; in a float graph every float node output. Entries: name, op (the producer's type,
        ``+Relu`` when a Relu follows it), value. A second session fetches them; needs ``onnx``."""
        import onnx
        import onnxruntime as ort
        from onnx import numpy_helper

        model = onnx.load(str(self.path))
        graph = model.graph
        constants = {t.name: t for t in graph.initializer}
        producer = {out: node for node in graph.node for out in node.output}
        points = _ort_quantised_points(graph, constants, producer) or _ort_float_points(model, constants)
        existing = {o.name for o in graph.output}
        inputs = {i.name for i in graph.input}
        for point in points:
            if point["fetch"] not in existing and point["fetch"] not in inputs:
                graph.output.append(onnx.ValueInfoProto(name=point["fetch"]))
        session = ort.InferenceSession(model.SerializeToString(), self._options, providers=["CPUExecutionProvider"])
        fetch = [p["fetch"] for p in points if p["fetch"] not in inputs]
        grids = {p["name"]: tuple(np.float32(numpy_helper.to_array(constants[p[k]])) for k in ("scale", "zero_point"))
                 for p in points if p.get("scale") is not None}
        ops = {p["name"]: _ort_op_label(p["name"], producer) for p in points}

        def run(x: np.ndarray) -> list[dict]:
            x = np.asarray(x, np.float32)
            got = dict(zip(fetch, session.run(fetch, {self.input_name: x})))
            out = []
            for p in points:
                value = x if p["fetch"] in inputs else got[p["fetch"]]
                if p["name"] in grids:
                    scale, zero_point = grids[p["name"]]
                    value = (value.astype(np.float32) - zero_point) * scale
                out.append({"name": p["name"], "op": ops[p["name"]], "value": np.asarray(value, np.float32)})
            return out
        return run


def _ort_quantised_points(graph, constants: dict, producer: dict) -> list[dict]:
    """The activations a QDQ graph quantises: (float tensor name, QuantizeLinear output, scale, zero point)."""
    points, seen = [], set()
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in constants:
            continue
        name = node.input[0]
        if name not in producer and name.endswith(ORT_QUANTIZE_INPUT_SUFFIX):
            name = name[: -len(ORT_QUANTIZE_INPUT_SUFFIX)]
        scale = constants.get(node.input[1])
        zero_point = node.input[2] if len(node.input) > 2 and node.input[2] in constants else None
        if name in seen or scale is None or int(np.prod(scale.dims)) != 1 or zero_point is None:
            continue
        seen.add(name)
        points.append({"name": name, "fetch": node.output[0], "scale": node.input[1], "zero_point": zero_point})
    return points


def _ort_float_points(model, constants: dict) -> list[dict]:
    """Every float activation of a float graph (its input and node outputs, no weights), graph order."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    floats = {v.name for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
              if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    names: dict[str, None] = {}
    for node in model.graph.node:
        for name in [*node.input, *node.output]:
            if name and name in floats and name not in constants:
                names.setdefault(name, None)
    return [{"name": n, "fetch": n} for n in names]


def _ort_op_label(name: str, producer: dict) -> str:
    node = producer.get(name)
    if node is None:
        return "input"
    if node.op_type == "Relu" and node.input[0] in producer:
        return f"{producer[node.input[0]].op_type}+Relu"  # the quantiser fuses the Relu into its producer
    return node.op_type


# --- targets/runners/openvino_runner.py ---
"""OpenVINO: run an IR (``.xml`` + ``.bin``) on NCHW float32 batches (numpy + openvino only; copied verbatim
into the standalone runners, so no edgeres imports and no module-level name shared with the other runners).

The runtime settings travel in the IR's rt_info (``edgeres/hint``, ``edgeres/inference_precision``): f32
unless the IR says otherwise, because OpenVINO's CPU default is bf16 on CPUs with avx512_bf16/AMX, which
would silently run an "fp32" IR in bf16. An IR with embedded preprocessing (``edgeres/input_preprocess``)
takes uint8 NHWC images; its runner turns the NCHW float batches back into them (exact for inputs made
from uint8 images).

OpenVINO is imported through ``openvino_by_consent``: its usage telemetry goes out only where the user said yes.
"""


import json

import numpy as np

OPENVINO_RT_INFO_KEY = "edgeres"


def openvino_by_consent():
    """``import openvino``, its usage reports sent only where the user agreed to them.

    OpenVINO's converter (imported with ``openvino`` itself) and NNCF report usage to Google Analytics unless the
    user declined with OpenVINO's ``opt_in_out`` tool: no consent file (``~/intel/openvino_telemetry``) counts
    as yes; they then write a client ID into ``~/intel`` and fork the whole process for each event. From here on,
    in this process, they report only where that file says yes (the user opted in with that tool); it is read, never
    written. A reporter made before this (NNCF makes one when imported) is asked again too."""
    try:
        from openvino_telemetry import Telemetry
        from openvino_telemetry.utils.opt_in_checker import ConsentCheckResult, OptInChecker
    except ImportError:  # no openvino-telemetry: nothing is reported
        pass
    else:
        check = OptInChecker.check
        if not getattr(check, "edgeres_by_consent", False):
            def by_consent(self, enable_opt_in_dialog, disable_in_ci=False):
                found = check(self, enable_opt_in_dialog, disable_in_ci)
                return found if found == ConsentCheckResult.ACCEPTED else ConsentCheckResult.DECLINED

            by_consent.edgeres_by_consent = True
            OptInChecker.check = by_consent
        made = getattr(Telemetry, "_SingletonMetaClass__single_instance", None)
        if made is not None and getattr(made, "consent", False):
            made.consent = OptInChecker().check(enable_opt_in_dialog=False) == ConsentCheckResult.ACCEPTED
    import openvino

    return openvino


class OpenVinoIrRunner:
    """An IR compiled for the CPU on first use (or by ``compile()``); ``reshape`` before that fixes its input shape."""

    runtime = "openvino"
    suffix, companions = ".xml", (".bin",)
    missing = "openvino is not installed for this python; pip install openvino"
    tensor_layout = "NCHW"  # of its intermediate tensors

    def __init__(self, path, threads: int | None = None, *, hint: str | None = None,
                 inference_precision: str | None = None, streams: int | None = None):
        ov = openvino_by_consent()

        self.path = path
        self.version = ov.__version__
        self.threads, self.streams = threads, streams
        self.core = ov.Core()
        self.model = self.core.read_model(str(path))
        self.hint = (hint or _openvino_rt_info(self.model, "hint") or "LATENCY").upper()
        self.inference_precision = inference_precision or _openvino_rt_info(self.model, "inference_precision") or "f32"
        stored = _openvino_rt_info(self.model, "input_preprocess")
        self.raw_preprocess = json.loads(stored) if stored else None
        self.takes_pixels = self.raw_preprocess is not None
        self.input_layout, self.input_dtype = ("NHWC", "uint8") if self.takes_pixels else ("NCHW", "float32")
        self.compiled = self.request = None

    def config(self) -> dict:
        config = {"PERFORMANCE_HINT": self.hint, "INFERENCE_PRECISION_HINT": self.inference_precision}
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = int(self.threads)
        if self.streams:
            config["NUM_STREAMS"] = int(self.streams)
        return config

    def compile(self):
        if self.compiled is None:
            self.compiled = self.core.compile_model(self.model, "CPU", self.config())
            self.request = self.compiled.create_infer_request()
        return self

    def input_spec(self) -> dict:
        port = self.model.inputs[0]
        dims = [d.get_length() if d.is_static else None for d in port.get_partial_shape()]
        dtype = np.dtype(port.get_element_type().to_dtype()).name
        return {"name": port.get_any_name(), "dims": dims, "dtype": dtype, "type": dtype}

    def reshape(self, shape) -> None:
        """A static input shape, so the CPU plugin picks its kernels ahead of time (benchmark_app does the same)."""
        import openvino as ov  # imported by __init__, through openvino_by_consent

        port = self.model.inputs[0]
        partial = port.get_partial_shape()
        if partial.is_dynamic or [d.get_length() for d in partial] != list(shape):
            if self.compiled is not None:
                raise RuntimeError("reshape after compile")
            self.model.reshape({port.get_any_name(): ov.PartialShape(list(shape))})

    def io_names(self) -> tuple[str, str]:
        self.compile()
        return self.compiled.input(0).get_any_name(), self.compiled.output(0).get_any_name()

    def fixed_input_call(self, x: np.ndarray):
        import openvino as ov  # imported by __init__, through openvino_by_consent

        self.compile()
        self.request.set_input_tensor(ov.Tensor(x))
        return self.request.infer

    def run_native(self, x: np.ndarray) -> np.ndarray:
        """The first output for the IR's own input (NCHW float32, or uint8 NHWC images when preprocessing is embedded)."""
        self.compile()
        self.request.infer({0: x})
        return np.array(self.request.get_output_tensor(0).data, dtype=np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Logits (float32) of an N×C×H×W float32 batch."""
        x = np.asarray(x, dtype=np.float32)
        if self.raw_preprocess is not None:
            x = self.to_uint8_images(x)
        return self.run_native(np.ascontiguousarray(x))

    def to_uint8_images(self, x: np.ndarray) -> np.ndarray:
        """Undo float preprocessing: exact for inputs made from uint8 images, others round to the nearest level."""
        p = self.raw_preprocess
        v = x.transpose(0, 2, 3, 1) * np.asarray(p["std"], np.float32) + np.asarray(p["mean"], np.float32)
        if p["channel_order"] == "BGR":
            v = v[..., ::-1]
        return np.clip(np.rint(v / np.float32(p["scale"])), 0, 255).astype(np.uint8)

    def intermediate_tensors(self):
        """``run(x)`` giving each quantised activation of an int8 IR (the outputs of its FakeQuantize ops
        on activations, float as the IR defines them), or each float op output of a float IR, for a batch
        ``x`` (NCHW float32). Entries: name (a tensor name of the activation it quantises, as the source
        graph named it), names (all of them), op (the producer's type), value. The IR is compiled afresh
        with the extra outputs (``model.add_outputs``); the artifact's own compiled model is left as it is."""
        model = self.core.read_model(str(self.path))
        points = []
        for op in model.get_ordered_ops():
            kind = op.get_type_name()
            if kind == "FakeQuantize" and op.input_value(0).get_node().get_type_name() != "Constant":
                source = op.input_value(0)
                points.append((op.output(0), source, source.get_node().get_type_name()))
        if not points:
            skip = ("Parameter", "Constant", "Result", "Convert", "ShapeOf")
            points = [(op.output(0), op.output(0), op.get_type_name()) for op in model.get_ordered_ops()
                      if op.get_type_name() not in skip and op.get_output_size() == 1
                      and op.output(0).get_element_type().is_real() and op.output(0).get_partial_shape().rank.is_static
                      and op.output(0).get_partial_shape().rank.get_length() >= 2]
        model.add_outputs([p[0] for p in points])  # a port that already is an output is not added twice
        fed = [result.input_value(0) for result in model.get_results()]  # model outputs, in order
        keys = [(o.get_node().get_friendly_name(), o.get_index()) for o in fed]
        where = [keys.index((port.get_node().get_friendly_name(), port.get_index())) for port, _, _ in points]
        compiled = self.core.compile_model(model, "CPU", self.config())
        request = compiled.create_infer_request()
        names = [sorted(source.get_names()) or [source.get_node().get_friendly_name()] for _, source, _ in points]

        def run(x: np.ndarray) -> list[dict]:
            x = np.asarray(x, dtype=np.float32)
            if self.raw_preprocess is not None:
                x = self.to_uint8_images(x)
            request.infer({0: np.ascontiguousarray(x)})
            return [{"name": n[0], "names": n, "op": op,
                     "value": np.array(request.get_output_tensor(i).data, np.float32)}
                    for i, (_, _, op), n in zip(where, points, names)]
        return run


def _openvino_rt_info(model, key: str) -> str | None:
    """A value edgeres stored in the IR's rt_info (``edgeres/<key>``), or None (IRs made elsewhere)."""
    path = [OPENVINO_RT_INFO_KEY, key]
    return model.get_rt_info(path).astype(str) if model.has_rt_info(path) else None


# --- targets/runners/litert_runner.py ---
"""LiteRT: run a ``.tflite`` on NCHW float32 batches (numpy + ai-edge-litert or tflite-runtime only; copied
verbatim into the standalone runners, so no edgeres imports and no module-level name shared with the
other runners).

Batches are transposed to NHWC and quantised when the model's input is integer; integer outputs are
dequantised. A model made by edgeres that normalises its pixel input itself says so in its metadata
(``edgeres.input``), and gets the batches back as pixel values. XNNPACK is LiteRT's default CPU delegate.
"""


import json
import os

import numpy as np

LITERT_PIXELS_ENTRY = "edgeres.input"  # model metadata entry: the normalisation the model does on its pixel input
LITERT_NO_SCHEMA = ("takes pixels, and reading how it normalises them needs the model schema of ai-edge-litert; "
                    "pip install ai-edge-litert")


def litert_interpreter_module():
    """``ai_edge_litert.interpreter``, else ``tflite_runtime.interpreter`` (ImportError if neither)."""
    try:
        from ai_edge_litert import interpreter
    except ImportError:
        from tflite_runtime import interpreter
    return interpreter


def litert_version() -> str:
    try:
        import ai_edge_litert as rt
    except ImportError:
        import tflite_runtime as rt
    return getattr(rt, "__version__", "unknown")


class LiteRtRunner:
    """One LiteRT ``Interpreter``; a fixed-batch model runs in chunks of its batch, the last one padded."""

    runtime = "litert"
    suffix, companions = ".tflite", ()
    missing = "no TFLite runtime for this python; pip install ai-edge-litert"
    tensor_layout = "NHWC"  # of its intermediate tensors

    def __init__(self, path, threads: int | None = None):
        module = litert_interpreter_module()
        self.path = path
        self.version = litert_version()
        self.interp = module.Interpreter(model_path=str(path), num_threads=threads)
        self.interp.allocate_tensors()
        self.input = self.interp.get_input_details()[0]
        self.output = self.interp.get_output_details()[0]
        self.dynamic_batch = int(self.input.get("shape_signature", self.input["shape"])[0]) == -1
        self.batch = int(self.input["shape"][0])
        self._normalization = None

    @property
    def normalization(self) -> dict | None:
        """How the model normalises its pixel input (None: it takes normalised input), read once."""
        if self._normalization is None:
            self._normalization = litert_embedded_normalization(self.path) or {}
        return self._normalization or None

    @property
    def takes_pixels(self) -> bool:
        return self.normalization is not None

    def input_spec(self) -> dict:
        dims = [int(d) if int(d) > 0 else None for d in self.input.get("shape_signature", self.input["shape"])]
        dtype = np.dtype(self.input["dtype"]).name
        return {"name": self.input["name"], "dims": dims, "dtype": dtype, "type": dtype}

    def io_names(self) -> tuple[str, str]:
        return self.input["name"], self.output["name"]

    def reshape(self, shape) -> None:
        if [int(v) for v in self.interp.get_input_details()[0]["shape"]] != list(shape):
            self.interp.resize_tensor_input(self.input["index"], list(shape))
            self.interp.allocate_tensors()
            self.batch = int(shape[0])

    def fixed_input_call(self, x: np.ndarray):
        self.interp.set_tensor(self.input["index"], x)
        return self.interp.invoke

    def run_native(self, x: np.ndarray) -> np.ndarray:
        """The first output (dequantised, float32) for the model's own input layout (NHWC); float values
        are quantised onto an integer input's grid, values already of its dtype are fed as they are."""
        dtype = np.dtype(self.input["dtype"])
        self.interp.set_tensor(self.input["index"], x if x.dtype == dtype else litert_quantize(x, self.input))
        self.interp.invoke()
        return litert_dequantize(self.interp.get_tensor(self.output["index"]), self.output)

    def _nhwc(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 4:
            raise ValueError(f"expected an N×C×H×W batch, got shape {x.shape}")
        nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        return nhwc if self.normalization is None else litert_to_pixels(nhwc, self.normalization)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Logits (float32) of an N×C×H×W float32 batch."""
        nhwc = self._nhwc(x)
        if self.dynamic_batch:
            if len(nhwc) != self.batch:
                self.reshape([len(nhwc), *(int(v) for v in self.input["shape"][1:])])
            return self._run_float(nhwc)
        b, outs = self.batch, []
        for start in range(0, len(nhwc), b):
            chunk = nhwc[start:start + b]
            pad = b - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.float32)])
            outs.append(self._run_float(chunk)[: b - pad])
        return np.concatenate(outs)

    def _run_float(self, nhwc: np.ndarray) -> np.ndarray:
        self.interp.set_tensor(self.input["index"], litert_quantize(nhwc, self.input))
        self.interp.invoke()
        return litert_dequantize(self.interp.get_tensor(self.output["index"]), self.output)

    def intermediate_tensors(self):
        """``run(x)`` giving every activation tensor (op outputs) for a batch ``x`` (NCHW float32),
        dequantised with each tensor's own scale and zero point, in NHWC as LiteRT holds them. Entries:
        name, op, value. A second interpreter keeps every tensor (``experimental_preserve_all_tensors``)
        and runs LiteRT's builtin kernels: the XNNPACK delegate would hide the tensors inside what it fuses."""
        import warnings

        module = litert_interpreter_module()
        with warnings.catch_warnings():  # that keeping every tensor is meant for debugging: it is
            warnings.simplefilter("ignore", UserWarning)
            keep = module.Interpreter(model_path=str(self.path), experimental_preserve_all_tensors=True,
                                      experimental_op_resolver_type=module.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        inp = keep.get_input_details()[0]
        dynamic = int(inp.get("shape_signature", inp["shape"])[0]) == -1
        state = {"batch": None}

        def run(x: np.ndarray) -> list[dict]:
            nhwc = self._nhwc(x)
            if len(nhwc) != state["batch"]:
                if not dynamic and len(nhwc) != int(inp["shape"][0]):
                    raise ValueError(f"intermediate tensors of a fixed-batch model need batches of {inp['shape'][0]}")
                keep.resize_tensor_input(inp["index"], [len(nhwc), *(int(v) for v in inp["shape"][1:])])
                keep.allocate_tensors()
                state["batch"] = len(nhwc)
            keep.set_tensor(inp["index"], litert_quantize(nhwc, inp))
            keep.invoke()
            details = {t["index"]: t for t in keep.get_tensor_details()}
            out = []
            for op in keep._get_ops_details():  # noqa: SLF001 - the only API listing ops with their tensors
                if op["op_name"] in ("QUANTIZE", "DEQUANTIZE"):
                    continue
                for index in op["outputs"]:
                    detail = details.get(int(index))
                    if detail is not None and np.dtype(detail["dtype"]).kind in "fiu":
                        out.append({"name": detail["name"], "op": op["op_name"],
                                    "value": litert_dequantize(keep.get_tensor(int(index)), detail)})
            return out
        return run


def litert_quantize(x: np.ndarray, detail: dict) -> np.ndarray:
    """Float → the tensor's dtype with its (scale, zero_point); float tensors pass through."""
    dtype = np.dtype(detail["dtype"])
    if dtype.kind == "f":
        return x.astype(dtype, copy=False)
    scale, zero_point = detail["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale) + zero_point, info.min, info.max).astype(dtype)


def litert_dequantize(y: np.ndarray, detail: dict) -> np.ndarray:
    """The tensor's values as float32 (integer tensors with their scale and zero point)."""
    if np.dtype(detail["dtype"]).kind == "f":
        return y.astype(np.float32, copy=True)
    scale, zero_point = detail["quantization"]
    return ((y.astype(np.float32) - zero_point) * np.float32(scale)).astype(np.float32)


def litert_to_pixels(x_nhwc: np.ndarray, norm: dict) -> np.ndarray:
    """Normalised NHWC input back to the 0..255 pixel values it came from (float32)."""
    return ((x_nhwc * np.asarray(norm["std"], np.float32) + np.asarray(norm["mean"], np.float32))
            / np.float32(norm["scale"])).astype(np.float32)


def litert_metadata_entry(data: bytes, name: str) -> bytes | None:
    """The model metadata buffer called ``name``, read with the LiteRT package's own flatbuffer schema."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(data, 0)
    for i in range(model.MetadataLength()):
        m = model.Metadata(i)
        if m.Name().decode() == name:
            return model.Buffers(m.Buffer()).DataAsNumpy().tobytes()
    return None


def litert_embedded_normalization(path) -> dict | None:
    """The normalisation a ``.tflite`` made by edgeres does on its pixel input (None: it takes the
    normalised input). ImportError naming the fix when it takes pixels and no schema is installed."""
    with open(os.fspath(path), "rb") as f:
        data = f.read()
    if LITERT_PIXELS_ENTRY.encode() not in data:
        return None
    try:
        entry = litert_metadata_entry(data, LITERT_PIXELS_ENTRY)
    except ImportError:
        raise ImportError(LITERT_NO_SCHEMA) from None
    return json.loads(entry)["normalization"] if entry else None


# --- targets/runners/executorch_runner.py ---
"""ExecuTorch: run a ``.pte`` (XNNPACK delegate) on NCHW float32 batches (numpy + executorch only; copied
verbatim into the standalone runners, so no edgeres imports and no module-level name shared with the other
runners). ExecuTorch's Python runtime takes torch tensors, so torch comes with it (the pip package needs it)."""


import json
import os

import numpy as np

EXECUTORCH_SIDECAR = ".json"  # beside model.<precision>.pte: labels, preprocessing, the op audit (app metadata)
EXECUTORCH_DTYPES = {6: "float32", 5: "float16", 0: "uint8", 1: "int8", 3: "int32", 4: "int64"}  # c10 ScalarType


class ExecuTorchRunner:
    """One ``.pte`` loaded by ExecuTorch's runtime. The program's input is batch 1 (what a phone runs); a
    batch runs image by image. Threads: XNNPACK's process-wide threadpool, the one knob ExecuTorch's Python
    runtime has (``_unsafe_reset_threadpool``)."""

    runtime = "executorch"
    suffix, companions = ".pte", (EXECUTORCH_SIDECAR,)
    missing = "executorch is not installed for this python; pip install executorch (its runtime needs torch)"
    input_layout = tensor_layout = "NCHW"
    takes_pixels = False

    def __init__(self, path, threads: int | None = None):
        import warnings

        with warnings.catch_warnings():  # "This API is experimental": said once per import, not ours to show
            warnings.simplefilter("ignore")
            import torch
            from executorch.extension.pybindings import portable_lib
        from importlib import metadata

        self._torch = torch
        self.path = path
        self.version = metadata.version("executorch")
        if threads:
            portable_lib._unsafe_reset_threadpool(int(threads))
        self.threads = int(portable_lib._threadpool_get_thread_count())
        self.module = portable_lib._load_for_executorch(str(path))
        meta = self.module.method_meta("forward")
        info = meta.input_tensor_meta(0)
        self._dims, self._dtype = list(info.sizes()), EXECUTORCH_DTYPES.get(int(info.dtype()))
        self.metadata = executorch_sidecar(path)

    def input_spec(self) -> dict:
        """The first input: name, dims, numpy dtype name and the runtime's type."""
        return {"name": self.io_names()[0], "dims": list(self._dims), "dtype": self._dtype,
                "type": f"Tensor[{self._dtype}]"}

    def io_names(self) -> tuple[str, str]:
        return tuple(self.metadata.get("io_names") or ("x", "output"))

    def reshape(self, shape) -> None:
        """The program's input shape is fixed at export (batch 1): another is refused."""
        if list(shape) != list(self._dims):
            raise ValueError(f"{self.path}: the ExecuTorch program takes {self._dims}, not {list(shape)}")

    def fixed_input_call(self, x: np.ndarray):
        """A call running the model on ``x`` (the model's own input) as a user's loop would, for timing."""
        inputs = (self._torch.from_numpy(np.ascontiguousarray(x)),)
        forward = self.module.forward
        return lambda: forward(inputs)

    def run_native(self, x: np.ndarray) -> np.ndarray:
        """The first output for the model's own input (batch 1)."""
        out = self.module.forward((self._torch.from_numpy(np.ascontiguousarray(x)),))
        return out[0].numpy().astype(np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Logits (float32) of an N×C×H×W float32 batch, one image at a time."""
        x = np.asarray(x, np.float32)
        return np.concatenate([self.run_native(x[i:i + 1]) for i in range(len(x))]) if len(x) else \
            np.zeros((0, 0), np.float32)


def executorch_sidecar(path) -> dict:
    """What the ``.json`` beside a ``.pte`` says (labels, preprocessing, input, the op audit); empty if none."""
    side = str(path)[: -len(ExecuTorchRunner.suffix)] + EXECUTORCH_SIDECAR if str(path).endswith(".pte") else ""
    if not side or not os.path.isfile(side):
        return {}
    with open(side, encoding="utf-8") as f:
        return json.load(f)


RUNNER_CLASSES = (OnnxRuntimeRunner, OpenVinoIrRunner, LiteRtRunner, ExecuTorchRunner,)
# <<< runners

RUNNERS = {cls.runtime: cls for cls in RUNNER_CLASSES}


def load_runner(path: Path, threads):
    """run(x) -> logits for the model's own input (1×…, as model_input makes it)."""
    runner = RUNNERS[CONFIG["runtime"]](path, threads)
    dims = runner.input_spec()["dims"]
    if all(d is not None for d in dims[1:]):
        runner.reshape([1, *dims[1:]])
    return runner.run_native


# -- classify -------------------------------------------------------------------------------------

def top_k(logits: np.ndarray, labels: list[str], k: int) -> list[dict]:
    if CONFIG["output"].get("probabilities"):  # the head ends in a softmax: the outputs are the scores
        probs = logits.astype(np.float64)
    else:
        z = logits.astype(np.float64) - logits.max()
        probs = np.exp(z) / np.exp(z).sum()
    return [{"index": int(i), "label": labels[i], "score": round(float(probs[i]), 6)}
            for i in np.argsort(-probs, kind="stable")[:k]]


def image_files(items: list[str]) -> list[str]:
    files = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            files += sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        elif p.is_file():
            files.append(str(p))
        elif p.exists():  # a FIFO or a device would block or never end: refused without opening it
            usage_error(f"{p}: is not a regular file; give image files or folders")
        else:
            usage_error(f"{p}: no such image file or folder")
    return files


def usage_error(message: str) -> None:
    """One line on stderr and exit 2, before any image is read."""
    print(f"classify: error: {printable(message)}", file=sys.stderr)
    sys.exit(2)


BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def printable(text: str) -> str:
    """``text`` with control characters escaped, so a file name or label cannot drive the terminal (the
    rule of edgeres.tables.printable; --json keeps the exact text)."""
    if text.isprintable():
        return text
    return "".join(ascii(c)[1:-1] if unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp") or c in BIDI_CONTROLS
                   else c for c in text)


def camera(run, labels: list[str], index: int, k: int) -> None:
    """Classify frames from camera ``index`` until Ctrl-C (OpenCV captures; the rest is as for files)."""
    try:
        import cv2
    except ImportError:
        sys.exit("classify: error: --camera needs OpenCV: pip install opencv-python")
    cap = cv2.VideoCapture(index)
    if not cap.isOpened():
        sys.exit(f"classify: error: camera {index} cannot be opened")
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            h, w = rgb.shape[:2]
            side = min(h, w)  # a centre square, so a model that takes images as they are gets its size
            square = rgb[(h - side) // 2 : (h + side) // 2, (w - side) // 2 : (w + side) // 2]
            pre = CONFIG["preprocess"]
            as_is = pre.get("resize") is None and pre.get("resize_mode") != "direct"
            # a model that takes images as they are gets the square scaled to its size first
            pixels = geometry(_resize(np.ascontiguousarray(square), pre["size"], pre["size"]) if as_is else square)
            best = top_k(run(model_input(pixels))[0], labels, k)
            print(", ".join(f"{printable(t['label'])} {t['score']:.3f}" for t in best), flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        cap.release()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Classify images with the model beside this script.")
    parser.add_argument("inputs", nargs="*", help="image files and/or folders of images")
    parser.add_argument("--top", type=int, default=5, help="classes to show per image")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--threads", type=int, default=None, help="runtime threads")
    parser.add_argument("--camera", type=int, default=None, metavar="INDEX", help="classify a camera's frames")
    args = parser.parse_args(argv)
    if args.top < 1:
        parser.error("--top must be at least 1")
    if not args.inputs and args.camera is None:
        parser.error("give image files or folders, or --camera INDEX")
    labels = (HERE / CONFIG["labels"]).read_text(encoding="utf-8").splitlines()
    try:
        run = load_runner(HERE / CONFIG["model"], args.threads)
    except ImportError as e:
        sys.exit(f"classify: error: the runtime is not installed ({e}); pip install -r requirements.txt")
    if args.camera is not None:
        camera(run, labels, args.camera, args.top)
        return 0
    predictions, skipped = [], 0
    for f in image_files(args.inputs):
        try:
            x = model_input(geometry(decode_image(f)))
        except (OSError, ValueError) as e:  # ImageRefused is a ValueError
            print(f"classify: warning: {printable(f)}: {printable(str(e))}; skipped", file=sys.stderr)
            skipped += 1
            continue
        predictions.append({"file": f, "top": top_k(run(x)[0], labels, min(args.top, len(labels)))})
        if not args.json:
            print(f"{printable(f)}: " + ", ".join(f"{printable(t['label'])} {t['score']:.3f}"
                                                  for t in predictions[-1]["top"]), flush=True)
    if args.json:
        print(json.dumps({"predictions": predictions}, indent=2))
    if skipped:
        print(f"classify: warning: skipped {skipped} file(s) that could not be read as images", file=sys.stderr)
    return 0 if predictions else 2


if __name__ == "__main__":
    sys.exit(main())
