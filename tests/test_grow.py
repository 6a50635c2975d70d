"""A bundle grows (edgeres/convert/grow.py): more targets or precisions on the same source, data and
options add artifacts and keep the finished ones — same files, same records, kept results."""

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from tests.conftest import make_images, run_cli, run_cli_process


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


# -- the safety table of growing (issue 33): each case failed before, passes now -----------------------


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_checkpoint, tiny_npz):
    """A project folder: its calibration data and a bundle made from inside it with relative paths
    (``--calib calib.npz --out b``), as a user types them."""
    proj = tmp_path_factory.mktemp("grow") / "proj"
    proj.mkdir()
    shutil.copy(tiny_npz, proj / "calib.npz")
    r = run_cli("convert", tiny_checkpoint, "--calib", "calib.npz", "--targets", "onnx", "--precision", "fp32",
                "--no-bench", "--jobs", "0", "--out", "b", cwd=proj)
    assert r.returncode == 0, r.stderr
    return proj


@dataclass(frozen=True)
class GrowCase:
    id: str
    prepare: Callable  # (project folder) -> None: what the user did to it before running the command
    cwd: str  # where the command runs, relative to the project folder
    calib: str  # --calib and --out as given from there
    out: str
    precisions: str
    code: int
    said: str  # a regular expression the (unwrapped) stderr matches
    rows: set  # (target, precision) in the bundle afterwards


def _touch(proj: Path) -> None:
    os.utime(proj / "calib.npz", ns=(1_900_000_000 * 10**9,) * 2)


def _other_images(proj: Path) -> None:
    x, y = make_images(64, 16, seed=7)
    np.savez(proj / "calib.npz", x=x, y=y)


GROW_CASES = [
    # item 2: a relative --calib recorded in the manifest, the bundle grown from the folder above
    GrowCase("grow-from-another-working-folder", lambda p: None, "..", "proj/calib.npz", "proj/b", "fp32,fp16",
             0, "adding onnx fp16 \\(onnx fp32 kept\\)", {("onnx", "fp32"), ("onnx", "fp16")}),
    # item 3: the same bytes keep the key: a touched file, and (every case runs in a `cp -a` of the project)
    GrowCase("touched-calib-identical-command", _touch, ".", "calib.npz", "b", "fp32", 0, "up to date",
             {("onnx", "fp32")}),
    GrowCase("copied-project-identical-command", lambda p: None, ".", "calib.npz", "b", "fp32", 0, "up to date",
             {("onnx", "fp32")}),
    GrowCase("touched-calib-grows", _touch, ".", "calib.npz", "b", "fp32,fp16", 0, "adding onnx fp16",
             {("onnx", "fp32"), ("onnx", "fp16")}),
    # item 3: other bytes at the same path are refused, naming the flag
    GrowCase("other-calib-content-is-named", _other_images, ".", "calib.npz", "b", "fp32,fp16", 2,
             "made with another --calib data \\(its content differs", {("onnx", "fp32")}),
]


@pytest.mark.parametrize("case", GROW_CASES, ids=lambda c: c.id)
def test_growing_a_bundle_keys_data_by_content_from_any_folder(tmp_path, project, tiny_checkpoint, case):
    proj = tmp_path / "proj"
    subprocess.run(["cp", "-a", str(project), str(proj)], check=True)  # the project, copied as users copy it
    case.prepare(proj)
    manifest = (proj / "b" / "manifest.json").read_text()
    r = run_cli("convert", tiny_checkpoint, "--calib", case.calib, "--targets", "onnx", "--precision",
                case.precisions, "--no-bench", "--jobs", "0", "--out", case.out, cwd=(proj / case.cwd).resolve())
    said = " ".join(r.stderr.split())
    assert r.returncode == case.code, r.stderr
    assert re.search(case.said, said), r.stderr
    assert "Traceback" not in r.stderr and "internal error" not in said
    if case.code:
        assert len([ln for ln in r.stderr.splitlines() if ln.startswith("edgeres: error:")]) == 1, r.stderr
        assert (proj / "b" / "manifest.json").read_text() == manifest  # refused: the bundle untouched
    assert set(_rows(proj / "b")) == case.rows
    assert all(a["status"] == "ok" for a in _rows(proj / "b").values())
    assert not [p.name for p in tmp_path.rglob(".*partial*")]


def test_a_grow_adds_only_the_pairs_asked_for_not_every_target_times_precision(tmp_path, app_bundle, tiny_checkpoint,
                                                                                tiny_npz):
    """Item 6: ``--targets onnx --precision fp16`` on an onnx+openvino+tflite bundle adds onnx fp16 only."""
    out = tmp_path / "b"
    shutil.copytree(app_bundle, out)
    before = _rows(out)
    args = ("convert", tiny_checkpoint, "--calib", tiny_npz, "--targets", "onnx", "--precision", "fp16",
            "--no-bench", "--jobs", "0", "--out", out)
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert "adding onnx fp16 (" in " ".join(r.stderr.split()), r.stderr
    rows = _rows(out)
    assert set(rows) == set(before) | {("onnx", "fp16")}, sorted(rows)
    assert all(rows[pair] == before[pair] for pair in before)
    # the grown bundle's plan is replayed exactly: asking again is up to date, not a "cannot be checked"
    r = run_cli(*args)
    assert r.returncode == 0 and "up to date" in " ".join(r.stderr.split()), r.stderr


def test_a_killed_worker_is_retried_by_the_next_identical_run(tmp_path, tiny_checkpoint, tiny_npz):
    """Item 5: a failed artifact (its worker killed) is never "up to date"; the same command builds it
    and keeps what was finished, byte for byte."""
    out = tmp_path / "b"
    args = ("convert", tiny_checkpoint, "--calib", tiny_npz, "--targets", "onnx,openvino", "--precision", "fp32",
            "--no-bench", "--jobs", "1", "--out", out)
    r = run_cli_process(*args, env={"EDGERES_TEST_WORKER_ABORT": "1"})  # every worker dies at start
    assert r.returncode == 3, r.stderr
    assert _rows(out)[("openvino", "fp32")]["status"] == "failed"
    onnx = out / "onnx" / "model.fp32.onnx"
    kept = (onnx.read_bytes(), onnx.stat().st_mtime_ns, _rows(out)[("onnx", "fp32")])
    r = run_cli(*args)
    said = " ".join(r.stderr.split())
    assert r.returncode == 0, r.stderr
    assert "up to date" not in said and "adding openvino fp32 (onnx fp32 kept)" in said
    rows = _rows(out)
    assert rows[("openvino", "fp32")]["status"] == "ok"
    assert (onnx.read_bytes(), onnx.stat().st_mtime_ns, rows[("onnx", "fp32")]) == kept
    r = run_cli(*args)
    assert r.returncode == 0 and "up to date" in " ".join(r.stderr.split()), r.stderr
