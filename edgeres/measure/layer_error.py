"""Per-layer error of every int8 artifact: SQNR of each quantised activation against the fp32 reference.

Each runtime's runner (``targets/runners``) gives the tensors its int8 model computes, as float: onnxruntime
the outputs of the QDQ graph's QuantizeLinear nodes (extra graph outputs), OpenVINO the outputs of the IR's
FakeQuantize ops (``model.add_outputs``), LiteRT every op output (``experimental_preserve_all_tensors``),
each dequantised with its own scale and zero point, so the error includes clipping, rounding and everything
accumulated upstream. The reference is the bundle's fp32 model run by its own runner, every float node
output. A runtime tensor is matched to its network point in the reference by name where the runtime kept
the source graph's names (ONNX, OpenVINO), otherwise by value (LiteRT, whose model is rebuilt from Keras):
the reference tensor of the same shape (NHWC read as NCHW) it is closest to, each point taken once, best
pairs first (the same value matching ``calibration.matching`` does for float twins, with the quantisation
error allowed for). What matches nothing (reshapes, the pixel normalisation) is counted, not reported.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from edgeres import targets
from edgeres.calibration import ImageDataset, Preprocess
from edgeres.bundle import artifact_path, data_file_path, ok_artifacts, read_manifest, reference_path, warn
from edgeres.errors import InputError
from edgeres.int8 import qdq_record, quantize_qdq
from edgeres.progress import log
from edgeres.targets import TargetError, get_target, info_for_file

# what quantize_qdq's record holds of the recipe it was made with
QDQ_RECIPE_KEYS = ("activation_type", "weight_type", "per_channel", "reduce_range", "reason", "cpu_features")

EXACT_SQNR_DB = 999.0  # reported when the int8 tensor equals fp32 exactly
# a value match must beat this: an unrelated tensor of the same shape scores about 0 dB or below, a matched
# int8 activation 10-45 dB; a layer broken below it shows as unmatched and in the artifact's accuracy
MIN_VALUE_MATCH_DB = 3.0
# activations held per batch (reference + runtime, float32), as in calibration: ~800 values per input pixel
MAX_VALUES_PER_BATCH = 64_000_000


def layer_sqnr_for_bundle(bundle_dir: str | Path, dataset: ImageDataset, images: int = 32) -> list[dict]:
    """[{"name", "op", "sqnr_db", ...}] for each quantised activation of the bundle's shared int8 QDQ
    model (the one the budget can keep in float), worst (lowest SQNR) first."""
    shared = targets.shipping_target(targets.QDQ_ONNX)  # its int8 artifact is the int8 stage's QDQ ONNX itself
    report = layer_report(bundle_dir, dataset, images, only=shared)
    return [{k: v for k, v in row.items() if k not in ("target", "precision")} for row in report["layers"]]


def layer_report(bundle_dir: str | Path, dataset: ImageDataset, images: int = 32, *, only: str | None = None) -> dict:
    """{"layers": rows, "layer_targets": per-artifact coverage} for every int8 artifact of the bundle (or
    target ``only``'s) on ``images`` images of ``dataset`` spread over the set; rows worst first, each
    with target, precision, name (the reference's tensor), op (the reference's), runtime_tensor,
    runtime_op, matched_by (name or value) and sqnr_db; the coverage says how many tensors matched and the
    SQNR of the artifact's own logits (OpenVINO and LiteRT run a little differently with every tensor kept:
    OpenVINO fuses less, LiteRT uses its builtin kernels instead of XNNPACK)."""
    bundle = Path(bundle_dir)
    manifest = read_manifest(bundle)
    int8 = [a for a in ok_artifacts(manifest) if a["precision"] == "int8" and only in (None, a["target"])]
    if not int8:
        which = f"{only} int8" if only else "int8"
        raise InputError(f"{bundle}: has no {which} artifact; --layers needs one "
                         f"(convert with --precision int8{f' --targets {only}' if only else ''})")
    pre = Preprocess.from_dict(manifest["preprocess"])
    x = next(dataset.batches(pre, batch_size=images, limit=images))[0]
    ref_path = reference_path(bundle, manifest)
    ref_runner = get_target(info_for_file(ref_path.name).name).load_runner(ref_path)
    ref_fn, ref_logits = ref_runner.intermediate_tensors(), ref_runner(x)
    rows, coverage = [], []
    for a in int8:
        path = artifact_path(bundle, a)
        try:
            runner = get_target(a["target"]).load_runner(path)
            if not hasattr(runner, "intermediate_tensors"):
                raise TargetError(f"its runner gives no intermediate tensors ({type(runner).__name__})")
            log(f"per-layer SQNR: {a['target']} {a['precision']} vs fp32")
            found, summary = artifact_layer_sqnr(ref_fn, runner.intermediate_tensors(), runner.tensor_layout, x)
            # the artifact as it ships: a runtime may run a little differently with its tensors kept
            summary["logits_sqnr_db"] = round(_sqnr_db(ref_logits, runner(x)), 2)
        except TargetError as e:
            warn(f"--layers: {a['target']} {a['precision']} skipped: {e}")
            coverage.append({"target": a["target"], "precision": a["precision"], "status": "failed", "error": str(e)})
            continue
        coverage.append({"target": a["target"], "precision": a["precision"], "status": "ok", **summary})
        rows += [{"target": a["target"], "precision": a["precision"], **row} for row in found]
    if not rows:
        raise TargetError(f"{bundle}: no int8 artifact gave per-layer tensors matching the fp32 reference")
    shared = targets.shipping_target(targets.QDQ_ONNX)
    calibration = manifest.get("calibration") or {}
    qdq = [a for a in int8 if a["target"] == shared]
    if qdq and calibration.get("quant") == "accurate" and calibration.get("ranges_file"):
        ranges = data_file_path(bundle, manifest, calibration["ranges_file"])
        if ranges is None:
            warn(f"{bundle}: the manifest does not hash {calibration['ranges_file']}, so the "
                 "gain over plain int8 is not shown (re-run `edgeres convert --force` to record it)")
        else:
            add_gain_over_fast([r for r in rows if r["target"] == shared], ref_path, artifact_path(bundle, qdq[0]),
                               ranges, x)
    return {"layers": sorted(rows, key=lambda r: r["sqnr_db"]), "layer_targets": coverage}


def add_gain_over_fast(rows: list[dict], fp32_path: Path, qdq_path: Path, ranges_path: Path, x: np.ndarray) -> None:
    """Add ``fast_sqnr_db`` and ``gain_db`` to ``rows`` of a ``--quant accurate`` model: the same
    reference quantised plainly (same ranges, same recipe) is what the accurate weights improve on."""
    import json
    import tempfile

    recipe = qdq_record(qdq_path)
    options = {"float_nodes": list(recipe["float_nodes"])} if recipe.get("float_nodes") else {}
    ranges = {k: tuple(v) for k, v in json.loads(ranges_path.read_text()).items()}
    with tempfile.TemporaryDirectory(prefix="edgeres-fast-qdq-") as tmp:
        fast_path = Path(tmp) / "fast.qdq.onnx"
        quantize_qdq(fp32_path, ranges, fast_path, recipe={k: recipe[k] for k in QDQ_RECIPE_KEYS}, options=options)
        fast = {r["name"]: r["sqnr_db"] for r in layer_sqnr(fp32_path, fast_path, x)}
    for row in rows:
        if row["name"] in fast:
            row["fast_sqnr_db"] = fast[row["name"]]
            row["gain_db"] = round(row["sqnr_db"] - fast[row["name"]], 2)


def layer_sqnr(fp32_path: Path, int8_path: Path, x: np.ndarray) -> list[dict]:
    """SQNR (dB) of each quantised activation of the artifact ``int8_path`` vs the same point of
    ``fp32_path``, each run by its target's runner, worst first."""
    ref = get_target(info_for_file(Path(fp32_path).name).name).load_runner(fp32_path)
    runner = get_target(info_for_file(Path(int8_path).name).name).load_runner(int8_path)
    rows, _ = artifact_layer_sqnr(ref.intermediate_tensors(), runner.intermediate_tensors(), runner.tensor_layout, x)
    return sorted(rows, key=lambda r: r["sqnr_db"])


def artifact_layer_sqnr(reference_fn, runtime_fn, layout: str, x: np.ndarray) -> tuple[list[dict], dict]:
    """(rows, coverage) for one artifact: its intermediate tensors (``runtime_fn``, in ``layout``) matched
    on the first batch to the reference's (``reference_fn``), their error summed over every batch of ``x``."""
    pairs, sums = None, None
    for start in range(0, len(x), _batch_size(x)):
        chunk = np.ascontiguousarray(x[start:start + _batch_size(x)], dtype=np.float32)
        try:
            reference, runtime = reference_fn(chunk), runtime_fn(chunk)
        except Exception as e:  # noqa: BLE001 - every runtime raises its own exception types
            raise TargetError(f"cannot fetch intermediate tensors ({_first_line(e)})") from None
        runtime = [{**t, "value": _as_nchw(t["value"], layout)} for t in runtime]
        if pairs is None:
            pairs = match_points(reference, runtime)
            sums = np.zeros((len(pairs), 2))
        for i, (ri, ti, _) in enumerate(pairs):
            ref, got = reference[ri]["value"].astype(np.float64), runtime[ti]["value"].astype(np.float64)
            sums[i] += (np.sum(ref ** 2), np.sum((ref - got) ** 2))
    rows = []
    for (ri, ti, how), (signal, noise) in zip(pairs, sums):
        if signal == 0.0 and noise == 0.0:
            continue
        sqnr = EXACT_SQNR_DB if noise == 0.0 else 10.0 * math.log10(max(signal, 1e-30) / noise)
        rows.append({"name": reference[ri]["name"], "op": reference[ri]["op"], "runtime_tensor": runtime[ti]["name"],
                     "runtime_op": runtime[ti]["op"], "matched_by": how, "sqnr_db": round(sqnr, 2)})
    coverage = {"tensors": len(runtime), "matched_by_name": sum(p[2] == "name" for p in pairs),
                "matched_by_value": sum(p[2] == "value" for p in pairs), "unmatched": len(runtime) - len(pairs)}
    return sorted(rows, key=lambda r: r["sqnr_db"]), coverage


def match_points(reference: list[dict], runtime: list[dict]) -> list[tuple[int, int, str]]:
    """[(reference index, runtime index, "name" | "value")]: by name where a runtime tensor carries a
    reference tensor's name and shape, then by value: the remaining same-shape pairs, highest SQNR first,
    each side used once, none below ``MIN_VALUE_MATCH_DB``."""
    by_name = {t["name"]: i for i, t in enumerate(reference)}
    pairs, used_ref, used_rt = [], set(), set()
    for ti, t in enumerate(runtime):
        for name in t.get("names") or [t["name"]]:
            ri = by_name.get(name)
            if ri is not None and ri not in used_ref and reference[ri]["value"].shape == t["value"].shape:
                pairs.append((ri, ti, "name"))
                used_ref.add(ri)
                used_rt.add(ti)
                break
    scored = []
    for ti, t in enumerate(runtime):
        if ti in used_rt or not np.isfinite(t["value"]).all():
            continue
        for ri, r in enumerate(reference):
            if ri not in used_ref and r["value"].shape == t["value"].shape and float(np.ptp(r["value"])) > 0:
                db = _sqnr_db(r["value"], t["value"])
                if db >= MIN_VALUE_MATCH_DB:
                    scored.append((db, ri, ti))
    for _, ri, ti in sorted(scored, reverse=True):
        if ri not in used_ref and ti not in used_rt:
            pairs.append((ri, ti, "value"))
            used_ref.add(ri)
            used_rt.add(ti)
    return sorted(pairs)


def _sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    noise = float(np.sum((ref - got) ** 2))
    return EXACT_SQNR_DB if noise == 0.0 else 10.0 * math.log10(max(float(np.sum(ref ** 2)), 1e-30) / noise)


def _as_nchw(value: np.ndarray, layout: str) -> np.ndarray:
    return value.transpose(0, 3, 1, 2) if layout == "NHWC" and value.ndim == 4 else value


def _batch_size(x: np.ndarray) -> int:
    pixels = int(np.prod(x.shape[2:])) or 1
    return int(np.clip(MAX_VALUES_PER_BATCH // (pixels * 800), 1, max(len(x), 1)))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]
