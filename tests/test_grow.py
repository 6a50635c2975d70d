"""A bundle grows (edgeres/convert/grow.py): more targets or precisions on the same source, data and
options add artifacts and keep the finished ones — same files, same records, kept results."""

import json

from tests.conftest import run_cli


def _manifest(out):
    return json.loads((out / "manifest.json").read_text())


def _rows(out):
    return {(a["target"], a["precision"]): a for a in _manifest(out)["artifacts"]}


def test_a_bundle_grows_keeps_its_artifacts_and_results_and_refuses_other_data(tmp_path, tiny_checkpoint, tiny_npz):
    out = tmp_path / "b"
    base = ("convert", tiny_checkpoint, "--calib", tiny_npz, "--calib-images", "32", "--no-bench", "--out", out)
    r = run_cli(*base, "--targets", "onnx", "--precision", "int8")
    assert r.returncode == 0, r.stderr
    onnx = out / "onnx" / "model.int8.onnx"
    before = (onnx.read_bytes(), onnx.stat().st_mtime_ns, _rows(out)[("onnx", "int8")])
    ranges = (out / "calibration_ranges.json").read_bytes()
    r = run_cli("eval", out, "--data", tiny_npz, "--limit", "32")
    assert r.returncode == 0, r.stderr
    evals = sorted(p.name for p in (out / "evals").iterdir()) if (out / "evals").exists() else []

    # more targets: tflite is added, onnx is kept as it was (not rebuilt: same bytes, same time, same record)
    r = run_cli(*base, "--targets", "onnx,tflite", "--precision", "int8")
    assert r.returncode == 0, r.stderr
    said = " ".join(r.stderr.split())  # rich wraps long lines
    assert "growing" in said and "adding tflite int8 (onnx int8 kept)" in said
    assert "calibrating" not in said and "exporting" not in said  # the shared steps are not redone
    rows = _rows(out)
    assert set(rows) == {("onnx", "int8"), ("tflite", "int8")} and rows[("tflite", "int8")]["status"] == "ok"
    assert (onnx.read_bytes(), onnx.stat().st_mtime_ns, rows[("onnx", "int8")]) == before
    assert (out / "calibration_ranges.json").read_bytes() == ranges
    if evals:
        assert sorted(p.name for p in (out / "evals").iterdir()) == evals  # kept results survive
    report = run_cli("report", out, "--json")
    assert report.returncode == 0, report.stderr

    # more precisions (the README's second command): fp32 for both targets
    r = run_cli(*base, "--targets", "onnx,tflite", "--precision", "int8,fp32")
    assert r.returncode == 0, r.stderr
    assert set(_rows(out)) == {(t, p) for t in ("onnx", "tflite") for p in ("int8", "fp32")}
    assert onnx.read_bytes() == before[0]

    # asking again for all, or for the first plan alone: up to date, nothing built
    for args in (("--targets", "onnx,tflite", "--precision", "int8,fp32"), ("--targets", "onnx", "--precision", "int8")):
        r = run_cli(*base, *args)
        assert r.returncode == 0 and "up to date" in " ".join(r.stderr.split()), r.stderr

    # other calibration settings: refused, naming the flag, bundle untouched
    manifest = (out / "manifest.json").read_text()
    r = run_cli("convert", tiny_checkpoint, "--calib", tiny_npz, "--calib-images", "16", "--no-bench", "--out", out,
                "--targets", "onnx,openvino", "--precision", "int8")
    said = " ".join(r.stderr.split())
    assert r.returncode == 2 and "--calib-images" in said and "--force" in said, r.stderr
    assert (out / "manifest.json").read_text() == manifest
    assert not list(tmp_path.glob(".b.partial-*"))
