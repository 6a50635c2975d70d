"""The preprocessing check: the fp32 model's top-1 under the standard preprocessing conventions beside the one
the bundle records. A wrong convention (a straight resize where the model was scored on a centre crop, BGR for
RGB, another mean/std) costs more accuracy than any quantisation choice and nothing else shows it.

One change from the recorded convention at a time (geometry, channel order, normalisation), so each row says
what that one choice is worth. Batch by batch (bounded memory), each photo is decoded once and resized once per
geometry, and every normalisation of that geometry runs on the same pixels. A convention that is clearly far
below the recorded one on the first images (``STOP_BELOW_PP``, ``STOP_AFTER``) stops there; its row says so.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from edgeres.calibration import ImageDataset, Preprocess
from edgeres.calibration.preprocess import IMAGENET_MEAN, IMAGENET_STD
from edgeres.measure.paired import CI_METHOD, drop_interval_pp, paired_counts
from edgeres.progress import progress

# how far below the best convention the recorded one may be before convert --eval says so
WARN_GAP_PP = 1.0
CHECK_FILE = "preprocess_check.json"  # convert --eval keeps its check here
# convert --eval checks on at most this many of its images (each convention is a pass of the fp32 model)
CONVERT_CHECK_IMAGES = 400
# A convention whose paired 95 % interval vs the recorded one lies wholly below -STOP_BELOW_PP stops there: it cannot
# be the best (the warning needs a convention above the recorded one), and the rest of its pass would only refine how
# bad it is. Looked at after STOP_AFTER images and at each doubling (64, 128, 256, ...), few looks so that the 95 %
# holds. On the ImageNet ResNet-50 (400 dev photos) the direct resizes and RGB stop at 128 and the other mean/std sets
# (~1 % against 88.5 %) at 64: 976 passes of the model where a 10 pp margin looked at every batch made 1616 (74 s
# instead of 117 s of one core), the same verdict.
STOP_BELOW_PP = 5.0
STOP_AFTER = 64
# per-channel statistics in RGB order: (name, scale, mean, std)
NORMALISATIONS = (
    ("torchvision: x/255, ImageNet mean/std", 1 / 255, IMAGENET_MEAN, IMAGENET_STD),
    ("caffe: 0..255 minus the ImageNet mean", 1.0, (123.68, 116.779, 103.939), (1.0, 1.0, 1.0)),
    ("tf/inception: x/127.5 − 1", 1 / 127.5, (1.0, 1.0, 1.0), (1.0, 1.0, 1.0)),
    ("x/255 only", 1 / 255, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
)


@dataclass(frozen=True)
class Convention:
    """One way to bring a photo to the model's input; ``axis`` is what differs from the recorded one."""

    name: str
    axis: str  # "recorded", "geometry", "channel order" or "normalisation"
    preprocess: Preprocess


def _numbers_key(pre: Preprocess) -> tuple:
    """The arithmetic in RGB terms (so BGR with reversed statistics is the same arithmetic on each colour)."""
    flip = (lambda v: tuple(v)[::-1]) if pre.channel_order == "BGR" else tuple
    return (pre.channel_order, round(pre.scale, 9), tuple(round(v, 6) for v in flip(pre.mean)),
            tuple(round(v, 6) for v in flip(pre.std)))


def _geometry_name(pre: Preprocess) -> str:
    return pre.describe().split(";")[0]


def conventions(recorded: Preprocess) -> list[Convention]:
    """The recorded convention first, then each standard alternative differing from it in one respect."""
    out = [Convention(recorded.describe(), "recorded", recorded)]
    seen_geometry, seen_numbers = {recorded.geometry_key()}, {_numbers_key(recorded)}
    if recorded.resize_mode == "direct" or recorded.resize is not None:  # images of any size: geometry matters
        crop = round(recorded.size * 256 / 224)
        for geometry in (dict(resize_mode="shorter_side_crop", resize=crop, filter="bilinear", antialias=True),
                         dict(resize_mode="shorter_side_crop", resize=crop, filter="bicubic", antialias=True),
                         dict(resize_mode="direct", resize=None, filter="bilinear", antialias=True),
                         dict(resize_mode="direct", resize=None, filter="nearest", antialias=True)):
            pre = replace(recorded, **geometry)
            if pre.geometry_key() not in seen_geometry:
                seen_geometry.add(pre.geometry_key())
                out.append(Convention(_geometry_name(pre), "geometry", pre))
    if recorded.channel_order == "L":  # greyscale: no channel order, and the standards are colour statistics
        return out
    other = "RGB" if recorded.channel_order == "BGR" else "BGR"
    flipped = replace(recorded, channel_order=other, mean=tuple(recorded.mean)[::-1], std=tuple(recorded.std)[::-1])
    out.append(Convention(f"{other} channel order", "channel order", flipped))
    seen_numbers.add(_numbers_key(flipped))
    for name, scale, mean_rgb, std_rgb in NORMALISATIONS:
        order = (lambda v: tuple(v)[::-1]) if recorded.channel_order == "BGR" else tuple
        pre = replace(recorded, scale=scale, mean=order(mean_rgb), std=order(std_rgb))
        if _numbers_key(pre) not in seen_numbers:
            seen_numbers.add(_numbers_key(pre))
            out.append(Convention(name, "normalisation", pre))
    return out


def check_preprocessing(run: Callable[[np.ndarray], np.ndarray], dataset: ImageDataset, recorded: Preprocess, *,
                        limit: int | None = None, batch_size: int = 32, recorded_correct: np.ndarray | None = None) -> dict:
    """top-1 of ``run`` (the fp32 model) under every convention of ``conventions(recorded)`` on ``dataset``.
    ``recorded_correct``: the recorded convention's hits on these images when already measured (eval's reference
    run on the same images), so that pass of the model is not made twice."""
    indices = dataset.spread(limit)
    order = _interleaved(len(indices))  # any first k images spread over the whole set (a stop decides on them)
    indices = indices[order]
    labels = dataset.labels[indices]
    found = conventions(recorded)
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(found):
        groups.setdefault(c.preprocess.geometry_key(), []).append(i)
    correct = np.zeros((len(found), len(indices)), bool)
    run_from = 0
    if recorded_correct is not None:
        correct[0] = np.asarray(recorded_correct, bool).reshape(len(indices))[order]
        run_from = 1
    n = len(indices)
    seen = [n] * len(found)  # images each convention ran on (fewer when it stopped early)
    looks = [STOP_AFTER << k for k in range(max(n, 1).bit_length()) if STOP_AFTER << k < n]
    with progress("preprocessing check", n * (len(found) - run_from)) as advance:
        for start in range(0, n, batch_size):
            live = [[i for i in members if i >= run_from and seen[i] == n] for members in groups.values()]
            live = [members for members in live if members]
            if not live:
                break
            idx = indices[start:start + batch_size]
            end = start + len(idx)
            look = end < n and any(start < k <= end for k in looks)
            # each photo decoded once, resized once per geometry for every convention of that geometry
            for members, pixels in zip(live, dataset.read_each(idx, [found[m[0]].preprocess for m in live])):
                for i in members:
                    x = replace(found[i].preprocess, resize=None, resize_mode="shorter_side_crop")(pixels, dataset.source)
                    logits = np.asarray(run(x), np.float32).reshape(len(x), -1)
                    correct[i, start:end] = logits.argmax(1) == labels[start:end]
                    advance(len(idx))
                    if i > 0 and look and \
                            drop_interval_pp(paired_counts(correct[i, :end], correct[0, :end]))[1] < -STOP_BELOW_PP:
                        seen[i] = end
                        advance(n - end)
    return {"data": str(dataset.source), "images": int(n), **compare(found, correct, seen)}


def _interleaved(n: int) -> np.ndarray:
    """0..n-1 in golden-ratio order: every prefix is spread evenly over the range (class folders are read in
    order, so the first 64 images in file order would be a few classes only)."""
    return np.argsort((np.arange(n) * 0.6180339887498949) % 1.0, kind="stable")


def compare(found: list[Convention], correct: np.ndarray, seen: list[int] | None = None) -> dict:
    """top-1 per convention (``correct``: conventions × images, the recorded one first), the best one, and how
    sure its gain over the recorded one is: the paired 95 % interval of the difference on the same images (as
    eval's drop interval), so a few photos at a small ``--limit`` are not read as a better convention.
    ``seen``: how many of the images (in the check's interleaved order) each convention ran on; one stopped early
    is compared on those only and is never the best."""
    seen = seen or [correct.shape[1]] * len(found)
    rows = []
    for i, c in enumerate(found):
        k = seen[i]
        vs = None if i == 0 else list(drop_interval_pp(paired_counts(correct[i, :k], correct[0, :k])))
        rows.append({"convention": c.name, "axis": c.axis, "preprocess": c.preprocess.to_dict(),
                     "top1": round(float(correct[i, :k].mean() * 100), 4), "vs_recorded_ci95_pp": vs, "images": k,
                     "stopped_early": k < correct.shape[1]})
        if rows[-1]["stopped_early"]:  # what the recorded convention scored on the same images
            rows[-1]["recorded_top1_same_images"] = round(float(correct[0, :k].mean() * 100), 4)
    best = max((r for r in rows if not r["stopped_early"]), key=lambda r: r["top1"])
    ci = best["vs_recorded_ci95_pp"] or [0.0, 0.0]
    return {"recorded_top1": rows[0]["top1"], "best": best["convention"], "best_top1": best["top1"],
            "gap_pp": round(best["top1"] - rows[0]["top1"], 4), "gap_ci95_pp": ci, "ci_method": CI_METHOD,
            "significant": ci[0] > 0, "conventions": rows}


def warning(result: dict) -> str | None:
    """One line when the recorded convention is more than ``WARN_GAP_PP`` below the best and the paired
    interval of that gap excludes 0, else None."""
    if result["gap_pp"] <= WARN_GAP_PP or not result["significant"]:
        return None
    best = next(r for r in result["conventions"] if r["convention"] == result["best"])
    lo, hi = result["gap_ci95_pp"]
    return (f"preprocessing: the recorded convention scores {result['recorded_top1']:.2f} % top-1 (fp32, "
            f"{result['images']} images) but {best['convention']} scores {best['top1']:.2f} % "
            f"(+{result['gap_pp']:.2f} pp, 95 % interval [{lo:+.2f}, {hi:+.2f}]); check how the model was trained "
            f"and convert again with --preprocess {override_text(best['preprocess'])}")


def verdict(result: dict) -> str:
    """The last line of the check: the advice, or why there is none."""
    line = warning(result)
    if line:
        return line
    if result["gap_pp"] > WARN_GAP_PP:
        lo, hi = result["gap_ci95_pp"]
        return (f"no significant difference at {result['images']} photos: {result['best']} scores "
                f"+{result['gap_pp']:.2f} pp, but its paired 95 % interval [{lo:+.2f}, {hi:+.2f}] pp includes 0; "
                f"keep the recorded convention, or check on more photos")
    return f"the recorded convention is within {WARN_GAP_PP:g} pp of the best ({result['best']})"


def override_text(pre: dict) -> str:
    """The --preprocess value that gives ``pre`` (a Preprocess.to_dict())."""
    parts = [f"mode={pre['resize_mode']}"]
    if pre.get("resize") is not None:
        parts.append(f"resize={pre['resize']}")
    parts += [f"filter={pre['filter']}", f"antialias={str(pre['antialias']).lower()}", f"order={pre['channel_order']}",
              f"scale={pre['scale']!r}", "mean=" + ",".join(f"{v:g}" for v in pre["mean"]),
              "std=" + ",".join(f"{v:g}" for v in pre["std"])]
    return ",".join(parts)


def check_bundle(bundle, dataset: ImageDataset, *, limit: int | None = None, threads: int | None = None,
                 recorded_correct: np.ndarray | None = None) -> dict:
    """``check_preprocessing`` of a bundle's fp32 reference (ONNX, run by onnxruntime)."""
    from pathlib import Path

    from edgeres.bundle import read_manifest, reference_path
    from edgeres.measure.bundle_eval import check_data_for
    from edgeres.targets import get_target, info_for_file

    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    recorded = check_data_for(manifest, dataset)
    ref_path = reference_path(bundle, manifest)
    run = get_target(info_for_file(ref_path.name).name).load_runner(ref_path, threads=threads)
    return {"bundle": str(bundle), **check_preprocessing(run, dataset, recorded, limit=limit,
                                                        recorded_correct=recorded_correct)}


def print_check(result: dict) -> None:
    """The table on stdout: top-1 per convention, the recorded one marked."""
    print(f"fp32 top-1 by preprocessing convention ({result['images']} images of {result['data']}):")
    width = max(len(r["convention"]) for r in result["conventions"])
    for r in result["conventions"]:
        mark = "recorded" if r["axis"] == "recorded" else f"{r['top1'] - result['recorded_top1']:+.2f} pp"
        if r.get("stopped_early"):
            mark = (f"{r['top1'] - r['recorded_top1_same_images']:+.2f} pp on the first {r['images']} images "
                    f"(more than {STOP_BELOW_PP:g} pp below: stopped there)")
        print(f"  {r['convention']:<{width}}  {r['top1']:6.2f} %  {mark}")
    print(verdict(result))
