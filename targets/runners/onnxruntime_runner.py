"""onnxruntime: run an ``.onnx`` on NCHW float32 batches (numpy + onnxruntime only; copied verbatim into
the standalone runners, so no edgeres imports and no module-level name shared with the other runners).

onnxruntime reports usage to Microsoft (and keeps a device ID under ``~/.cache/Microsoft``) unless
``ORT_DISABLE_TELEMETRY=1`` when it starts: set here, before onnxruntime is imported, unless the user has set it."""

from __future__ import annotations

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
