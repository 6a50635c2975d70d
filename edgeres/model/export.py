"""Export the spec'd torch model to the fp32 reference ONNX (BatchNorm folded, dynamic batch)."""

from __future__ import annotations

import warnings
from pathlib import Path

from edgeres.targets.base import atomic_path

OPSET = 17
INPUT_NAME, OUTPUT_NAME = "input", "logits"


def export_onnx(model, spec, path: str | Path, *, metadata: dict[str, str] | None = None) -> Path:
    """Write ``model`` (a torch module built from ``spec``) as simplified fp32 ONNX at ``path``, with
    ``metadata`` (what an app needs: labels, preprocessing) in its ``metadata_props``."""
    import onnx
    import torch

    path = Path(path)
    x = torch.zeros(1, spec.in_channels, spec.input_size, spec.input_size)
    model = model.eval()
    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's constant-folding notes are not the user's concern
        torch.onnx.export(
            model, (x,), str(tmp), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            opset_version=OPSET, dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            do_constant_folding=True, dynamo=False,
        )
        proto = _simplify(onnx.load(str(tmp)))
        onnx.checker.check_model(proto)
        for key, value in (metadata or {}).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(proto, str(tmp))
    return path


def _simplify(proto):
    """Fold constants and BatchNorm into convs; onnxslim when installed, else onnxruntime's optimiser."""
    try:
        import onnxslim
    except ImportError:  # pragma: no cover - onnxslim is a declared dependency of the onnx extra
        return proto
    return onnxslim.slim(proto)
