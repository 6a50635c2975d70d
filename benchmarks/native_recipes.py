"""The runtimes' own int8 recipes that the benchmarks compare edgeres with — defined once, so every
benchmark measures the same "native" baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np


def ort_quantize_static(src: Path, dst: Path, batches: Iterable[np.ndarray], *, reduce_range: bool = True,
                        activation_type: str = "uint8", input_name: str = "input") -> Path:
    """onnxruntime's ``quantize_static``: QDQ, int8 per-channel weights, MinMax calibration on ``batches``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(batches)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {input_name: batch}

    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type={"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[activation_type],
                    weight_type=QuantType.QInt8, per_channel=True, reduce_range=reduce_range)
    return Path(dst)
