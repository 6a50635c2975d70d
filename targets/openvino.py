"""OpenVINO target: IR (``.xml`` + ``.bin``) in fp32, fp16 and int8, run by ``ov.Core`` on the CPU.

int8 has two engines, chosen with ``--option openvino.engine=qdq|nncf``:

- ``qdq``: convert the pipeline's QDQ int8 ONNX (built once from OUR calibration ranges); OpenVINO
  reads its QuantizeLinear/DequantizeLinear pairs as FakeQuantize, so the IR uses the very ranges the
  ONNX artifact uses.
- ``nncf``: ``nncf.quantize`` on the fp32 IR, fed OUR calibration batches (same images, same count);
  NNCF computes its own ranges with its preset, recorded in the artifact options.

``--option openvino.embed_preprocess=true`` bakes scale/mean/std, channel order and NCHW layout into
the IR with OpenVINO's PrePostProcessor: the IR then takes raw uint8 NHWC RGB images (resize/crop stay
the app's job). The bundle keeps ONE IR per precision, so ``eval`` measures exactly what ships; the
runner turns eval's NCHW float32 back into uint8 (exact for inputs that came from uint8 images) using
the preprocessing stored in the IR's rt_info, so it needs no manifest and no edgeres.

Imports nothing heavy at module level: the runner works with only numpy + openvino installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgeres.targets.base import (ANY_PRECISION, METADATA_PREFIX, QDQ_ONNX, REFERENCE_ONNX, Artifact, CompileJob, Runner, TargetError, TargetInfo, TargetOption, TargetUnavailable, first_line, x86_u8s8_recipe)
from edgeres.targets.runners.openvino_runner import OPENVINO_RT_INFO_KEY, OpenVinoIrRunner, openvino_by_consent

PRECISIONS = ("fp32", "fp16", "int8")
ENGINES = ("qdq", "nncf")
# qdq by measurement through `edgeres convert` on CIFAR ResNet-20/32 (dev 5000, 300 calibration images,
# mse estimator): top-1 drop -0.02/-0.06 pp and top-1 agreement with fp32 99.28/99.48 %, vs 0.00/0.02 pp and
# 98.46/98.42 % for nncf; it agrees with the ONNX int8 artifact on 99.46/99.48 % and compiles in ~1.5 s vs ~19 s.
DEFAULT_ENGINE = "qdq"
NNCF_PRESETS = ("performance", "mixed")
HINTS = ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT")
INFERENCE_PRECISIONS = ("f32", "bf16", "f16")
DEFAULT_HINT, DEFAULT_INFERENCE_PRECISION = "LATENCY", "f32"
INFO = TargetInfo(
    name="openvino", title="OpenVINO IR", suffixes=(".xml",), companions=(".bin",), dist="openvino",
    runtime="openvino",
    precisions=PRECISIONS, sources={"int8": QDQ_ONNX, ANY_PRECISION: REFERENCE_ONNX}, tools=("nncf",), int8_recipe=x86_u8s8_recipe,
    budget_tunes=("estimator", "float_nodes"),
    options=(
        TargetOption("engine", str, DEFAULT_ENGINE, "int8 from the shared QDQ model (qdq) or nncf.quantize", ENGINES),
        TargetOption("embed_preprocess", bool, False, "take uint8 NHWC pixels; mean/std inside the IR"),
        TargetOption("nncf_preset", str, "performance", "NNCF preset for engine=nncf", NNCF_PRESETS),
        TargetOption("hint", str, DEFAULT_HINT, "performance hint recorded for the runner", HINTS),
        TargetOption("inference_precision", str, DEFAULT_INFERENCE_PRECISION,
                     "INFERENCE_PRECISION_HINT (f32 keeps BF16/AMX CPUs from running f32 IRs in bf16)",
                     INFERENCE_PRECISIONS),
    ),
)
OPTIONS = tuple(o.name for o in INFO.options)
RT_INFO_KEY = OPENVINO_RT_INFO_KEY  # IR rt_info section holding what the runner needs to know


def available() -> str:
    try:
        openvino = openvino_by_consent()  # every path here starts with this: before NNCF or the converter runs
    except ImportError:
        raise TargetUnavailable("openvino is not installed; pip install 'edgeres[openvino]'") from None
    return openvino.__version__.split("-")[0]


def compile(job: CompileJob) -> Artifact:  # noqa: A001 - the target interface's verb
    """Write ``openvino/model.<precision>.xml`` + ``.bin`` into ``job.out_dir``."""
    available()
    import openvino as ov

    options = INFO.check_options(job.options)
    rel_xml = Path("openvino") / f"model.{job.precision}.xml"
    rel_bin = rel_xml.with_suffix(".bin")
    (job.out_dir / rel_xml).parent.mkdir(parents=True, exist_ok=True)
    versions = {"openvino": available()}
    notes: list[str] = []

    if job.precision in ("fp32", "fp16"):
        model = _convert(job.onnx_fp32)
        engine = "ov.convert_model"
        recorded = {"compress_to_fp16": job.precision == "fp16"}
    elif job.precision == "int8":
        engine = options.get("engine", DEFAULT_ENGINE)
        if engine == "qdq":
            model, recorded = _int8_from_qdq(job)
        else:
            model, recorded = _int8_with_nncf(job, options)
            import nncf

            versions["nncf"] = nncf.__version__
        recorded["fake_quantize_ops"] = _count_ops(model, "FakeQuantize")
        if recorded["fake_quantize_ops"] == 0:
            raise TargetError(f"openvino int8 ({engine}): the IR has no FakeQuantize op, so it would run in float; "
                              "check the QDQ ONNX / calibration")
        recorded["engine"] = engine
    else:
        raise TargetError(f"openvino: precision {job.precision!r} is not one of {', '.join(PRECISIONS)}")

    layout, dtype = "NCHW", "float32"
    if options.get("embed_preprocess"):
        if not job.preprocess:
            raise TargetError("openvino: embed_preprocess needs the model's preprocessing (job.preprocess is empty)")
        model = _embed_preprocess(model, job.preprocess)
        layout, dtype = "NHWC", "uint8"
        notes.append("IR input is raw uint8 NHWC RGB at the model's size; resize/crop are not embedded")
        recorded["embedded_preprocess"] = {k: job.preprocess[k] for k in ("scale", "mean", "std", "channel_order")}
    model.set_rt_info(job.precision, [RT_INFO_KEY, "precision"])
    # what an app needs (labels, preprocessing of this IR's input), readable with ov.Core().read_model alone
    for key, value in job.model_metadata(layout=layout, dtype=dtype).items():
        model.set_rt_info(value, [RT_INFO_KEY, key.removeprefix(METADATA_PREFIX)])
    # the runtime settings travel in the IR so a device runner uses them without the manifest
    recorded["runtime"] = {"hint": str(options.get("hint", DEFAULT_HINT)).upper(),
                           "inference_precision": options.get("inference_precision", DEFAULT_INFERENCE_PRECISION)}
    for key, value in recorded["runtime"].items():
        model.set_rt_info(value, [RT_INFO_KEY, key])
    try:
        # save_model compresses weights to fp16 by default; fp16 must be asked for, never implied
        ov.save_model(model, str(job.out_dir / rel_xml), compress_to_fp16=job.precision == "fp16")
    except Exception as e:  # noqa: BLE001 - openvino raises RuntimeError subclasses of its own
        raise TargetError(f"openvino: cannot save {rel_xml} ({first_line(e)})") from None
    return Artifact("openvino", job.precision, (str(rel_xml), str(rel_bin)), engine=engine, input_layout=layout,
                    input_dtype=dtype, options=recorded, tool_versions=versions, notes=tuple(notes))


def _convert(onnx_path: Path):
    import openvino as ov

    try:
        return ov.convert_model(str(onnx_path))
    except Exception as e:  # noqa: BLE001
        raise TargetError(f"{onnx_path}: OpenVINO cannot convert it ({first_line(e)})") from None


def _int8_from_qdq(job: CompileJob):
    if QDQ_ONNX not in job.sources or not Path(job.sources[QDQ_ONNX]).exists():
        raise TargetError("openvino int8 engine 'qdq' needs the int8 stage's QDQ ONNX (the qdq_onnx source), which was "
                          "not made; use --option openvino.engine=nncf or give --calib images")
    return _convert(Path(job.source(QDQ_ONNX))), {"source": "QDQ ONNX from the shared calibration ranges"}


def _int8_with_nncf(job: CompileJob, options: dict):
    """``nncf.quantize`` fed our calibration images one per item, so its subset is exactly our set."""
    import nncf

    if job.calibration is None:
        raise TargetError("openvino int8 engine 'nncf' needs calibration images; give --calib")
    items = [batch[i : i + 1] for batch in job.calibration(layout="NCHW") for i in range(len(batch))]
    if not items:
        raise TargetError("openvino int8 engine 'nncf': the calibration set yielded no images")
    preset_name = str(options.get("nncf_preset", "performance")).lower()
    preset = {"performance": nncf.QuantizationPreset.PERFORMANCE, "mixed": nncf.QuantizationPreset.MIXED}[preset_name]
    settings = {"preset": preset_name, "subset_size": len(items), "fast_bias_correction": True,
                "calibration_images": len(items)}
    try:
        model = nncf.quantize(_convert(job.onnx_fp32), nncf.Dataset(items), preset=preset,
                              subset_size=len(items), fast_bias_correction=True)
    except Exception as e:  # noqa: BLE001
        raise TargetError(f"openvino int8: nncf.quantize failed ({first_line(e)})") from None
    return model, {"source": "nncf.quantize on the fp32 IR with our calibration images", "nncf": settings}


def _embed_preprocess(model, preprocess: dict):
    """IR input becomes uint8 NHWC RGB; conversion, channel order, mean/std and layout run inside."""
    import openvino as ov
    from openvino.preprocess import PrePostProcessor

    scale = float(preprocess["scale"])
    ppp = PrePostProcessor(model)
    ppp.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
    ppp.input().model().set_layout(ov.Layout("NCHW"))
    steps = ppp.input().preprocess().convert_element_type(ov.Type.f32)
    if preprocess["channel_order"] == "BGR":
        steps.reverse_channels()
    # (u·scale − mean)/std  ==  (u − mean/scale) / (std/scale)
    steps.mean([m / scale for m in preprocess["mean"]]).scale([s / scale for s in preprocess["std"]])
    model = ppp.build()
    model.set_rt_info(json.dumps({k: preprocess[k] for k in ("scale", "mean", "std", "channel_order")}),
                      [RT_INFO_KEY, "input_preprocess"])
    return model


def _count_ops(model, type_name: str) -> int:
    return sum(op.get_type_name() == type_name for op in model.get_ops())


class OpenVinoRunner(OpenVinoIrRunner, Runner):
    """``targets.runners.openvino_runner`` with this target's errors, compiled on load.

    ``hint`` / ``inference_precision`` default to what the IR was compiled with (``--option
    openvino.hint=…``), else LATENCY / f32. f32 is pinned because OpenVINO's CPU default is bf16 on CPUs
    with avx512_bf16/AMX (this machine included), which would silently run an "fp32" IR in bf16.
    """

    def __init__(self, path: str | Path, threads: int | None = None, hint: str | None = None,
                 inference_precision: str | None = None):
        available()
        try:
            super().__init__(str(path), threads, hint=hint, inference_precision=inference_precision)
        except Exception as e:  # noqa: BLE001
            raise TargetError(f"{path}: OpenVINO cannot read it ({first_line(e)})") from None
        self.path = Path(path)  # named when its outputs are unusable (edgeres.measure.evaluate)
        if self.hint not in HINTS:
            raise TargetError(f"openvino performance hint {self.hint!r}: choose one of {', '.join(HINTS)}")
        if self.inference_precision not in INFERENCE_PRECISIONS:
            raise TargetError(f"openvino inference precision {self.inference_precision!r}: "
                              f"choose one of {', '.join(INFERENCE_PRECISIONS)}")
        try:
            self.compile()
        except Exception as e:  # noqa: BLE001
            raise TargetError(f"{path}: OpenVINO cannot load it ({first_line(e)})") from None


def load_runner(path: str | Path, threads: int | None = None, hint: str | None = None,
                inference_precision: str | None = None) -> OpenVinoRunner:
    return OpenVinoRunner(path, threads, hint, inference_precision)
