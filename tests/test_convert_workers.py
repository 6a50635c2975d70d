"""Target compiles in worker processes (edgeres/convert/workers.py): the same bytes in this process,
serially in workers and in parallel; a worker's failure is the artifact's failure; kill -9 of the
parent leaves no worker and no bundle."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, run_cli, run_cli_process

ARGS = ("--targets", "onnx,openvino,tflite", "--precision", "fp32,int8", "--no-bench")  # app_bundle's, with --jobs


def _artifacts(out: Path) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    return {(a["target"], a["precision"]): {r["file"]: r["sha256"] for r in a["file_records"]}
            for a in manifest["artifacts"] if a["status"] == "ok"}


@pytest.fixture(scope="module")
def three_ways(tmp_path_factory, tiny_checkpoint, tiny_npz, app_bundle):
    """The same conversion in this process (``--jobs 0``: the session's ``app_bundle``), in one worker and in two."""
    root = tmp_path_factory.mktemp("workers")
    results = {"0": (app_bundle, None)}
    for jobs in ("1", "2"):
        out = root / f"jobs{jobs}"
        r = run_cli("convert", tiny_checkpoint, "--calib", tiny_npz, *ARGS, "--jobs", jobs, "--out", out)
        assert r.returncode == 0, r.stderr
        results[jobs] = (out, r)
    return results


def _without_generated_names(xml: Path) -> str:
    """An OpenVINO IR with the names OpenVINO numbers from a process-wide counter (Constant_7531)
    taken out: in a fresh worker they always start alike, in a process that built other models not."""
    return re.sub(r'name="([A-Za-z]+)_\d+"', r'name="\1_N"', xml.read_text())


def test_serial_and_parallel_workers_write_the_same_bytes_as_in_process(three_ways):
    here, serial, parallel = (_artifacts(three_ways[j][0]) for j in ("0", "1", "2"))
    assert len(here) == 6 and set(here) == set(serial) == set(parallel)
    assert serial == parallel  # sha256 of every file of every artifact
    for pair, files in here.items():
        for name, sha in files.items():
            if sha != serial[pair][name]:  # only OpenVINO's generated node names may differ from in-process
                assert name.endswith(".xml"), (pair, name)
                assert _without_generated_names(three_ways["0"][0] / name) == \
                    _without_generated_names(three_ways["1"][0] / name)


def test_workers_leave_nothing_behind_and_say_what_they_compile(three_ways):
    out, r = three_ways["2"]
    assert not list(out.parent.glob(".jobs2.partial-*")) and not (out / ".work").exists()
    assert "openvino int8:" in r.stderr and "tflite fp32:" in r.stderr  # the workers' own progress, labelled
    assert "Traceback" not in r.stderr


def test_worker_calibration_batches_equal_the_in_process_ones(tmp_path, tiny_npz):
    """What a worker reads from the .npy is, batch for batch, what the dataset gives in-process."""
    from edgeres.calibration import open_dataset
    from edgeres.convert.worker import calibration_batches
    from edgeres.convert.workers import write_calibration
    from tests.conftest import tiny_spec

    ds, pre = open_dataset(tiny_npz), tiny_spec().preprocess

    def batches(layout="NCHW", batch_size=32):
        return (x for x, _ in ds.batches(pre.with_layout(layout), batch_size, 40))

    write_calibration(tmp_path / "c.npy", batches)
    theirs = calibration_batches(str(tmp_path / "c.npy"))
    for layout, bs in (("NCHW", 32), ("NHWC", 8), ("NHWC", 32)):
        ours = list(batches(layout, bs))
        got = list(theirs(layout, bs))
        assert len(ours) == len(got) and all(a.tobytes() == b.tobytes() and a.shape == b.shape
                                             for a, b in zip(ours, got))


def test_a_worker_that_dies_is_a_failed_artifact_with_one_line(tmp_path, tiny_checkpoint, tiny_npz):
    out = tmp_path / "b"
    # the worker of every target but onnx is killed at start (the environment reaches only the workers' code)
    r = run_cli_process("convert", tiny_checkpoint, "--calib", tiny_npz, "--targets", "onnx,openvino", "--no-bench",
                "--calib-images", "16", "--jobs", "1", "--out", out, env={"EDGERES_TEST_WORKER_ABORT": "1"})
    assert r.returncode == 3, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    rows = {a["target"]: a for a in manifest["artifacts"]}
    assert rows["onnx"]["status"] == "ok" and rows["openvino"]["status"] == "failed"
    assert "worker process ended without a result" in rows["openvino"]["error"]
    assert "Traceback" not in r.stderr


def _children(pid: int) -> list[int]:
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def test_kill_9_of_the_parent_takes_its_workers_and_leaves_no_bundle(tmp_path, tiny_checkpoint, tiny_npz):
    import psutil

    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "edgeres.cli", "convert", str(tiny_checkpoint), "--calib", str(tiny_npz),
                             "--targets", "onnx,tflite", "--no-bench", "--calib-images", "16", "--jobs", "1",
                             "--out", str(out)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not workers:
        workers = [p for p in _children(proc.pid)
                   if "edgeres.convert.worker" in " ".join(psutil.Process(p).cmdline())]
        time.sleep(0.05)
    assert workers, "no worker process was seen before the conversion ended"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    gone_by = time.time() + 10
    while time.time() < gone_by and any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                                        for p in workers):
        time.sleep(0.1)
    assert not [p for p in workers if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert not out.exists()


def test_jobs_out_of_range_is_one_line_exit_2(tmp_path, tiny_checkpoint, tiny_npz):
    r = run_cli("convert", tiny_checkpoint, "--calib", tiny_npz, "--jobs", "-1", "--out", tmp_path / "x")
    assert r.returncode == 2 and "--jobs -1" in r.stderr and not (tmp_path / "x").exists()


def test_default_jobs_is_bounded_by_cores_and_compiles():
    from edgeres.convert.workers import default_jobs

    assert default_jobs(1) == 1
    assert 1 <= default_jobs(5) <= max(1, os.cpu_count() or 1)
    assert isinstance(np.int64(default_jobs(2)).item(), int)


def test_tflite_int8_takes_the_shared_ranges_in_process_and_in_workers(three_ways):
    """Ranges once: in process, in one worker and in a worker started beside the int8 stage (--jobs 2,
    which waits for the reference activations), TFLite's int8 ranges are the int8 stage's, matched."""
    for jobs in ("0", "1", "2"):
        manifest = json.loads((three_ways[jobs][0] / "manifest.json").read_text())
        tflite = next(a for a in manifest["artifacts"] if a["target"] == "tflite" and a["precision"] == "int8")
        o = tflite["options"]
        assert o["ranges_from"] == "shared" and o["ranges_own_pass"] == 0 and o["ranges_matched"] > 5, (jobs, o)
        assert manifest["calibration"]["reference_images"] == 2


def test_eval_runs_in_its_own_process_unless_jobs_0(tmp_path, tiny_checkpoint, tiny_npz, monkeypatch):
    """``convert --eval`` evaluates in a fresh process (its runtimes do not sit beside torch and the model);
    ``--jobs 0`` keeps everything in the one process the user started, eval too, with the same results."""
    from edgeres.convert import run as convert_run

    apart, real = [], convert_run._evaluate_apart

    def noted(cfg, out):
        apart.append(cfg.jobs)
        return real(cfg, out)

    monkeypatch.setattr(convert_run, "_evaluate_apart", noted)
    top1 = {}
    for jobs in ("0", "1"):
        out = tmp_path / f"jobs{jobs}"
        r = run_cli("convert", tiny_checkpoint, "--targets", "onnx", "--precision", "fp32", "--eval", tiny_npz,
                    "--no-bench", "--jobs", jobs, "--out", out)
        assert r.returncode == 0, r.stderr
        ev = json.loads((out / "eval.json").read_text())
        top1[jobs] = (ev["images"], ev["reference"]["top1"], [a["top1"] for a in ev["artifacts"]])
    assert apart == [1] and top1["0"] == top1["1"] and top1["0"][0] == 64
