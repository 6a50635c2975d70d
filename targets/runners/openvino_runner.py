"""OpenVINO: run an IR (``.xml`` + ``.bin``) on NCHW float32 batches (numpy + openvino only; copied verbatim
into the standalone runners, so no edgeres imports and no module-level name shared with the other runners).

The runtime settings travel in the IR's rt_info (``edgeres/hint``, ``edgeres/inference_precision``): f32
unless the IR says otherwise, because OpenVINO's CPU default is bf16 on CPUs with avx512_bf16/AMX, which
would silently run an "fp32" IR in bf16. An IR with embedded preprocessing (``edgeres/input_preprocess``)
takes uint8 NHWC images; its runner turns the NCHW float batches back into them (exact for inputs made
from uint8 images).

OpenVINO is imported through ``openvino_by_consent``: its usage telemetry goes out only where the user said yes.
"""

from __future__ import annotations

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
