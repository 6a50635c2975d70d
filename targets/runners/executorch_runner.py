"""ExecuTorch: run a ``.pte`` (XNNPACK delegate) on NCHW float32 batches (numpy + executorch only; copied
verbatim into the standalone runners, so no edgeres imports and no module-level name shared with the other
runners). ExecuTorch's Python runtime takes torch tensors, so torch comes with it (the pip package needs it)."""

from __future__ import annotations

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
