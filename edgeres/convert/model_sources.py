"""Model sources: what a target compiles from, materialised as files once per conversion.

Each source is made by a step of the conversion into files under the staging folder and opened, in the
process that compiles (this one, or a worker), into what ``CompileJob.sources`` holds. A target names
the source it reads per precision (``TargetInfo.sources``), so what crosses into a worker process is
only files and plain data, and any target — a plugin's too — can compile there.

Built-ins: ``reference_onnx`` (the export step's fp32 ONNX), ``qdq_onnx`` (the int8 stage's QDQ model),
``keras`` (the network's spec as JSON + its weights as ``.npz``, rebuilt in Keras when opened),
``torch_export`` (the same two files, rebuilt in torch and exported with ``torch.export`` when opened: no
pickled program crosses into a worker). A plugin adds its own with ``register_source``."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgeres.targets import KERAS, QDQ_ONNX, REFERENCE_ONNX, TORCH_EXPORT


@dataclass(frozen=True)
class SourceRequest:
    """What a source's maker may read: the network (spec and the weights this compile uses — int8's
    improved for its grid, else the model as given), the precision, the conversion's files."""

    spec: object  # edgeres.model.zoo.ResNetSpec
    weights: dict  # state dict
    weights_tag: str  # "fp32" (the model as given) or "int8" (improved for the source's weight grid)
    precision: str
    reference: Path  # the fp32 reference ONNX
    qdq: Path | None  # the int8 stage's QDQ ONNX, when one was made
    scratch: Path  # where a source writes its files (removed when the bundle is published)


@dataclass(frozen=True)
class ModelSource:
    """``make(request) -> {role: path}`` writes (or finds) its files; ``open(files)`` turns them into what
    a target's ``CompileJob.sources[name]`` holds, in the compiling process. ``after``: the conversion
    step whose output it needs — "export" (the fp32 reference), "int8" (the int8 stage's QDQ model) or
    "" (the network as loaded: its compiles may start at once, beside export and calibration)."""

    name: str
    make: Callable[[SourceRequest], dict[str, str]]
    open: Callable[[dict[str, str]], object]
    after: str = "export"


_SOURCES: dict[str, ModelSource] = {}


def register_source(source: ModelSource) -> ModelSource:
    """Add a model source (a plugin's, before it registers the targets that read it)."""
    _SOURCES[source.name] = source
    return source


def get_source(name: str) -> ModelSource:
    from edgeres.targets import TargetError

    if name not in _SOURCES:
        raise TargetError(f"no model source named {name!r} is registered (known: {', '.join(_SOURCES)})")
    return _SOURCES[name]


def make_files(name: str, request: SourceRequest) -> dict[str, str]:
    """Source ``name``'s files for ``request`` (empty when the conversion did not make it: the compile
    that needs it then fails with the reason)."""
    return get_source(name).make(request)


def open_files(name: str, files: dict[str, str]):
    return get_source(name).open(files)


# --- the built-in sources -----------------------------------------------------------------------------

def _path(files: dict[str, str]) -> Path:
    return Path(files["file"])


def _make_keras(req: SourceRequest) -> dict[str, str]:
    import numpy as np

    req.scratch.mkdir(parents=True, exist_ok=True)
    spec_file, weights_file = req.scratch / "keras.spec.json", req.scratch / f"keras.{req.weights_tag}.npz"
    if not spec_file.exists():
        spec_file.write_text(json.dumps(req.spec.to_dict()))
    if not weights_file.exists():
        arrays = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v))
                  for k, v in req.weights.items()}
        tmp = weights_file.with_name(weights_file.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, weights_file)
    return {"spec": str(spec_file), "weights": str(weights_file)}


def _open_keras(files: dict[str, str]):
    """A builder of the Keras network; the arrays go once Keras holds the weights."""

    def build():
        import numpy as np

        from edgeres.model.keras_model import build_keras
        from edgeres.model.zoo import ResNetSpec

        spec = ResNetSpec.from_dict(json.loads(Path(files["spec"]).read_text()))
        with np.load(files["weights"], allow_pickle=False) as z:
            state_dict = {k: z[k] for k in z.files}
        return build_keras(spec, state_dict)

    return build


register_source(ModelSource(REFERENCE_ONNX, lambda req: {"file": str(req.reference)}, _path, after="export"))
register_source(ModelSource(QDQ_ONNX, lambda req: {"file": str(req.qdq)} if req.qdq is not None else {}, _path,
                            after="int8"))
def _open_torch_export(files: dict[str, str]):
    """A builder of the network's ``torch.export`` program at batch 1 (the spec's input size), in eval mode."""

    def export():
        import numpy as np
        import torch

        from edgeres.model.torch_model import build_torch
        from edgeres.model.zoo import ResNetSpec

        spec = ResNetSpec.from_dict(json.loads(Path(files["spec"]).read_text()))
        model = build_torch(spec)
        with np.load(files["weights"], allow_pickle=False) as z:
            model.load_state_dict({k: torch.from_numpy(np.array(z[k])) for k in z.files})
        size = spec.preprocess.size
        return torch.export.export(model.eval(), (torch.zeros(1, spec.in_channels, size, size),))

    return export


register_source(ModelSource(KERAS, _make_keras, _open_keras, after=""))
# the same files as the Keras network's (made once when both are asked for)
register_source(ModelSource(TORCH_EXPORT, _make_keras, _open_torch_export, after=""))
