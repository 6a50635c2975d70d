"""LiteRT: run a ``.tflite`` on NCHW float32 batches (numpy + ai-edge-litert or tflite-runtime only; copied
verbatim into the standalone runners, so no edgeres imports and no module-level name shared with the
other runners).

Batches are transposed to NHWC and quantised when the model's input is integer; integer outputs are
dequantised. A model made by edgeres that normalises its pixel input itself says so in its metadata
(``edgeres.input``), and gets the batches back as pixel values. XNNPACK is LiteRT's default CPU delegate.
"""

from __future__ import annotations

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
