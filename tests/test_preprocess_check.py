"""The preprocessing check: fp32 top-1 under each standard convention beside the recorded one, and
``convert --eval`` warning in one line when the recorded one is more than 1 pp below the best, beyond the paired
noise."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from edgeres.calibration import Preprocess, open_dataset
from tests.conftest import make_images
from tests.conftest import run_cli_here as run_cli  # in process: output and exit code
from tests.test_safety import env  # noqa: F401

KERAS = Preprocess(size=32, resize=37, mean=(103.939, 116.779, 123.68), std=(1.0, 1.0, 1.0), scale=1.0,
                   channel_order="BGR", layout="NHWC")


def photos(tmp_path, n=12):
    """Class folders 0..3 of photos of other sizes than the model's input (so geometry matters)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = tmp_path / "photos" / str(i % 4)
        folder.mkdir(parents=True, exist_ok=True)
        h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return open_dataset(tmp_path / "photos")


def model_trained_on(true: Preprocess, dataset):
    """A stand-in fp32 model that is right exactly on inputs made by ``true`` (and wrong on anything else)."""
    dataset.number_classes(list(range(len(dataset.class_names))))
    table = np.concatenate([true(dataset.read([i]), "t") for i in range(len(dataset))]).reshape(len(dataset), -1)

    def run(x):
        flat = x.reshape(len(x), -1)
        out = np.zeros((len(x), 5), np.float32)  # class 4: no image's label, the answer to an unknown input
        for row, v in enumerate(flat):
            d = np.abs(table - v).max(1)
            j = int(d.argmin())
            out[row, dataset.labels[j] if d[j] < 1e-4 else 4] = 1
        return out
    return run


def test_conventions_change_one_thing_at_a_time_and_start_with_the_recorded_one():
    from edgeres.measure.preprocess_check import conventions

    found = conventions(KERAS)
    assert found[0].axis == "recorded" and found[0].preprocess == KERAS
    axes = [c.axis for c in found]
    assert axes.count("geometry") == 3  # crop bicubic, direct bilinear, direct nearest (crop bilinear is recorded)
    assert axes.count("channel order") == 1 and axes.count("normalisation") == 3  # caffe is the recorded one
    for c in found[1:]:
        differs = {k for k, v in c.preprocess.to_dict().items() if v != KERAS.to_dict()[k]}
        assert differs <= {"geometry": {"resize_mode", "resize", "filter"}, "channel order": {"channel_order", "mean"},
                           "normalisation": {"scale", "mean", "std"}}[c.axis], (c.name, differs)


def test_models_that_take_their_images_as_they_are_get_no_geometry_rows():
    from edgeres.measure.preprocess_check import conventions

    assert "geometry" not in {c.axis for c in conventions(Preprocess(size=32))}


@pytest.mark.parametrize("true", [replace(KERAS, filter="bicubic"), replace(KERAS, resize_mode="direct", resize=None),
                                  replace(KERAS, channel_order="RGB", mean=KERAS.mean[::-1]),
                                  replace(KERAS, scale=1 / 127.5, mean=(1.0, 1.0, 1.0))],
                         ids=["bicubic", "direct", "rgb", "inception"])
def test_the_check_finds_the_convention_the_model_was_trained_with(tmp_path, true):
    from edgeres.measure.preprocess_check import check_preprocessing, warning

    dataset = photos(tmp_path)
    result = check_preprocessing(model_trained_on(true, dataset), dataset, KERAS, batch_size=5)
    assert result["recorded_top1"] == 0.0 and result["best_top1"] == 100.0
    best = next(r for r in result["conventions"] if r["convention"] == result["best"])
    assert Preprocess.from_dict(best["preprocess"]) == true
    line = warning(result)
    assert "\n" not in line and "scores 0.00 % top-1" in line and "+100.00 pp" in line
    assert Preprocess.from_dict(best["preprocess"]) == _apply(KERAS, line.rsplit("--preprocess ", 1)[1])


def _apply(pre, text):
    from edgeres.convert.config import apply_preprocess_override, parse_preprocess_override

    return apply_preprocess_override(pre, parse_preprocess_override(text))


def test_no_warning_when_the_recorded_convention_is_the_best(tmp_path):
    from edgeres.measure.preprocess_check import check_preprocessing, warning

    dataset = photos(tmp_path)
    result = check_preprocessing(model_trained_on(KERAS, dataset), dataset, KERAS)
    assert result["recorded_top1"] == 100.0 and result["gap_pp"] == 0 and warning(result) is None


@pytest.mark.parametrize("extra, advised", [(3, False), (10, True)], ids=["3-photos-noise", "10-photos"])
def test_advice_needs_a_gain_beyond_the_paired_noise(extra, advised, capsys):
    """100 photos: an alternative right on the recorded one's 80 plus ``extra`` more. +3 pp is inside the paired
    95 % interval (it includes 0): no advice, and the check says so; +10 pp is not: the advice, with its interval."""
    from edgeres.measure.preprocess_check import WARN_GAP_PP, compare, conventions, print_check, warning

    found = conventions(KERAS)
    correct = np.zeros((len(found), 100), bool)
    correct[:, :80] = True
    correct[2, 80:80 + extra] = True
    result = {"data": "photos", "images": 100, **compare(found, correct)}
    assert result["best"] == found[2].name and result["gap_pp"] == extra > WARN_GAP_PP
    lo, hi = result["gap_ci95_pp"]
    assert lo < extra < hi and (lo > 0) == advised == result["significant"]
    assert (warning(result) is not None) == advised
    print_check(result)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    if advised:
        assert last.startswith("preprocessing: the recorded convention") and f"[{lo:+.2f}, {hi:+.2f}]" in last
    else:
        assert last.startswith("no significant difference at 100 photos:") and "--preprocess" not in last


def test_the_recorded_row_taken_from_eval_is_not_run_again_and_changes_nothing(tmp_path):
    """convert --eval hands the check its reference run's hits on the same images: one model pass fewer."""
    from edgeres.measure.preprocess_check import check_preprocessing

    dataset = photos(tmp_path)
    model, calls = model_trained_on(replace(KERAS, filter="bicubic"), dataset), []

    def counted(x):
        calls.append(len(x))
        return model(x)

    full = check_preprocessing(counted, dataset, KERAS, batch_size=5)
    passes = sum(calls)
    calls.clear()
    assert full["recorded_top1"] == 0.0  # trained on bicubic: the recorded convention gets every photo wrong
    recorded = np.zeros(len(dataset), bool)
    given = check_preprocessing(counted, dataset, KERAS, batch_size=5, recorded_correct=recorded)
    assert given == full and sum(calls) == passes - len(dataset)


def test_a_convention_far_below_the_recorded_one_stops_early_and_is_never_the_best(tmp_path, capsys):
    """Right on every photo recorded, wrong on every photo otherwise: the others stop after STOP_AFTER photos."""
    from edgeres.measure.preprocess_check import STOP_AFTER, check_preprocessing, print_check

    dataset = photos(tmp_path, n=STOP_AFTER + 36)
    model, calls = model_trained_on(KERAS, dataset), []

    def counted(x):
        calls.append(len(x))
        return model(x)

    result = check_preprocessing(counted, dataset, KERAS, batch_size=16)
    rows = result["conventions"]
    assert rows[0]["images"] == result["images"] == len(dataset) and not rows[0]["stopped_early"]
    assert all(r["stopped_early"] and r["images"] == STOP_AFTER and r["top1"] == 0.0 for r in rows[1:]), rows
    assert result["best"] == rows[0]["convention"] and result["gap_pp"] == 0
    assert sum(calls) == len(dataset) + STOP_AFTER * (len(rows) - 1)
    print_check(result)
    assert capsys.readouterr().out.count(f"on the first {STOP_AFTER} images") == len(rows) - 1


def test_a_stop_is_decided_only_after_64_photos_and_at_each_doubling(tmp_path, monkeypatch):
    """Few looks, so the 95 % of the interval holds: on 200 photos in batches of 16 the check looks at 64 and 128
    photos (the batches that reach them), never at 80, 96, ... (a stop made impossible here to see every look)."""
    import edgeres.measure.preprocess_check as pc

    dataset = photos(tmp_path, n=200)
    model = model_trained_on(KERAS, dataset)
    looked = []

    def spy(counts):
        looked.append(counts.both_right + counts.reference_only + counts.artifact_only + counts.both_wrong)
        return real(counts)

    real = pc.drop_interval_pp
    monkeypatch.setattr(pc, "drop_interval_pp", spy)
    monkeypatch.setattr(pc, "STOP_BELOW_PP", 101.0)
    result = pc.check_preprocessing(model, dataset, KERAS, batch_size=16)
    others = len(result["conventions"]) - 1
    assert not any(r["stopped_early"] for r in result["conventions"])
    assert sorted(looked) == sorted([64] * others + [128] * others + [200] * others), looked  # 200: the rows


def test_check_preprocess_command_prints_each_convention_beside_the_recorded_one(app_bundle, tmp_path):
    x, y = make_images(20, 16, seed=1)
    np.savez(tmp_path / "eval.npz", x=x, y=y)
    r = run_cli("check-preprocess", app_bundle, "--data", tmp_path / "eval.npz")
    assert r.returncode == 0, r.stderr
    assert "16×16 as is (no resize); RGB" in r.stdout and "recorded" in r.stdout and "BGR channel order" in r.stdout
    doc = json.loads(run_cli("check-preprocess", app_bundle, "--data", tmp_path / "eval.npz", "--json").stdout)
    assert doc["images"] == 20 and doc["conventions"][0]["axis"] == "recorded" and len(doc["conventions"]) == 5


def test_convert_eval_keeps_the_check_and_warns_in_one_line_when_another_convention_is_better(env, tmp_path):
    """On random weights every convention is near chance; the warning depends only on the stored numbers."""
    from edgeres import cli
    from edgeres.measure.preprocess_check import CHECK_FILE, WARN_GAP_PP
    from tests.test_safety import _invoke

    out = tmp_path / "bundle"
    code, _, stderr = _invoke(["convert", env["checkpoint"], "--targets", "onnx", "--precision", "fp32",
                               "--eval", env["npz"], "--no-bench", "--out", out])
    assert code == 0, stderr
    check = json.loads((out / CHECK_FILE).read_text())
    assert check["images"] == 64 and check["conventions"][0]["axis"] == "recorded"
    evaluated = json.loads((out / "eval.json").read_text())
    assert check["recorded_top1"] == evaluated["reference"]["top1"]  # the recorded row is eval's reference run
    (onnx_fp32,) = evaluated["artifacts"]  # the reference file itself: its row is the reference run's
    assert onnx_fp32["same_file_as_reference"] and onnx_fp32["agreement_pct"] == 100.0 \
        and onnx_fp32["max_abs_logit_err"] == 0.0 and onnx_fp32["top1"] == evaluated["reference"]["top1"]
    assert "onnx fp32 is the fp32 reference file itself (same sha256)" in stderr
    warned = [line for line in stderr.splitlines() if "preprocessing: the recorded convention" in line]
    assert len(warned) == (1 if check["gap_pp"] > WARN_GAP_PP and check["significant"] else 0), stderr
