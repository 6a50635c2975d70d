"""edgeres sweep: trials on Ray (embedded and a `ray start` cluster), shared steps once, Pareto front,
best under a budget, failed trials as rows, re-runs that skip finished trials."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, run_cli

GRID = ["--prune", "0,0.3", "--precision", "int8,fp32", "--targets", "onnx,tflite"]
pytest.importorskip("ray", reason="edgeres sweep needs Ray: pip install 'edgeres[sweep]'")


def _sweep(model, calib, evald, out, *extra, **kw):
    return run_cli("sweep", model, "--calib", calib, "--eval", evald, *GRID, "--out", out, *extra, **kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """A real Ray cluster from `ray start --head` on 127.0.0.1 with one `bench` slot; stopped afterwards."""
    ray_cli = str(Path(sys.executable).with_name("ray"))
    temp = tempfile.mkdtemp(prefix="edr", dir="/tmp")  # Ray's socket paths must stay short
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
    start = subprocess.run([ray_cli, "start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1",
                            "--num-cpus", "2", "--resources", '{"bench": 1}', "--temp-dir", temp,
                            "--object-store-memory", str(100 << 20),
                            "--include-dashboard", "false", "--disable-usage-stats"],
                           capture_output=True, text=True, timeout=120, env=env)
    try:
        assert start.returncode == 0, start.stderr
        yield f"127.0.0.1:{port}", env
    finally:
        subprocess.run([ray_cli, "stop", "--force"], capture_output=True, timeout=120, env=env)
        shutil.rmtree(temp, ignore_errors=True)


def _doc(out: Path) -> dict:
    return json.loads((out / "sweep.json").read_text())


@pytest.mark.realdata
@pytest.mark.slow
def test_resnet20_sweep_on_embedded_ray_gives_8_trials_a_front_and_a_best(cifar, tmp_path):
    dev = np.load(cifar / "cifar10_dev.npz")
    idx = np.arange(0, 5000, 10)  # 500 images, 50 per class
    evald = tmp_path / "dev500.npz"
    np.savez(evald, x=dev["x"][idx], y=dev["y"][idx])
    out = tmp_path / "sw"
    r = _sweep(cifar / "resnet20.th", cifar / "cifar10_calib.npz", evald, out, "--calib-images", "100",
               "--bench-runs", "20", "--accuracy-budget", "1.0", "--html")
    assert r.returncode == 0, r.stderr[-3000:]
    doc = _doc(out)
    assert doc["engine"]["mode"] == "embedded" and doc["engine"]["ray_version"] == "2.60.0"
    trials = doc["trials"]
    assert len(trials) == 8 and all(t["status"] == "ok" for t in trials), trials
    assert 90.0 < doc["baseline"]["top1"] < 94.0 and doc["baseline"]["images"] == 500
    for t in trials:  # every trial is a real bundle, measured
        assert (out / t["bundle"] / "manifest.json").exists() and t["p50_ms"] > 0 and t["size_mb"] > 0
    pruned = [t for t in trials if t["prune"] == 0.3]
    assert all(t["macs"] < 41e6 * 0.8 for t in pruned)  # ResNet-20 has 41 M MACs
    # shared steps ran once per distinct key: 1 pruned ratio, 2 reference exports, 2 shared calibrations
    assert doc["shared"] == {"prune": 1, "export": 2, "calibrate": 2}
    names = {t["name"]: t for t in trials}
    assert doc["pareto"] and all(n in names for n in doc["pareto"])
    best = doc["best"]
    assert best is not None and best["top1_drop_pp"] <= 1.0 and best["name"] in doc["pareto"]
    fits = [t for t in trials if t["top1_drop_pp"] <= 1.0]
    assert best["p50_ms"] == min(t["p50_ms"] for t in fits)
    html = (out / "sweep.html").read_text()
    assert "data:image/png;base64," in html and best["name"] in html
    report = run_cli("report", out)
    assert report.returncode == 0 and best["name"] + " ★" in report.stdout


@pytest.mark.slow
def test_sweep_on_a_ray_start_cluster_reports_a_failed_trial_then_resumes(cluster, tiny_checkpoint, tiny_npz,
                                                                          tmp_path):
    out = tmp_path / "sw"
    (out / ".shared").mkdir(parents=True)
    (out / "prune0.3-onnx-fp32").write_text("in the way")  # this trial cannot publish its bundle
    address, env = cluster  # joining a cluster by address: its token authentication must be asked for
    r = _sweep(tiny_checkpoint, tiny_npz, tiny_npz, out, "--address", address, "--accuracy-budget", "100",
               "--bench-runs", "10", env={"RAY_AUTH_MODE": env["RAY_AUTH_MODE"]})
    assert r.returncode == 3, r.stderr[-3000:]
    doc = _doc(out)
    assert doc["engine"]["mode"] == "cluster" and doc["engine"]["address"].endswith(address.split(":")[1])
    failed = [t for t in doc["trials"] if t["status"] != "ok"]
    assert [t["name"] for t in failed] == ["prune0.3-onnx-fp32-t1"] and failed[0]["error"]
    assert sum(t["status"] == "ok" for t in doc["trials"]) == 7 and doc["best"] is not None
    (out / "prune0.3-onnx-fp32").unlink()
    again = _sweep(tiny_checkpoint, tiny_npz, tiny_npz, out, "--address", address, "--accuracy-budget", "100",
                   "--bench-runs", "10", env={"RAY_AUTH_MODE": env["RAY_AUTH_MODE"]})
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("(finished in an earlier run, skipped)") == 7 + 2  # 7 trials and both bases
    doc = _doc(out)
    assert all(t["status"] == "ok" for t in doc["trials"]) and len(doc["trials"]) == 8
    assert doc["shared"] == {"prune": 1, "export": 2, "calibrate": 2}  # nothing shared was made again


def test_without_ray_the_command_says_what_to_install(tiny_checkpoint, tiny_npz, tmp_path):
    boot = "import sys; sys.modules['ray'] = None; import cli; sys.argv[0] = 'edgeres'; cli.app()"
    r = subprocess.run([sys.executable, "-c", boot, "sweep", str(tiny_checkpoint), "--calib", str(tiny_npz),
                        "--eval", str(tiny_npz), "--out", str(tmp_path / "sw")], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "pip install 'edgeres[sweep]'" in r.stderr
    assert not (tmp_path / "sw").exists()


@pytest.mark.parametrize("change, expect", [({"prune": (0.0, 0.99)}, "--prune"), ({"threads": (0,)}, "--threads"),
                                            ({"objective": "speed"}, "--objective"),
                                            ({"address": "nowhere"}, "--address"),
                                            ({"estimators": ("mse", "mse")}, "names a value twice"),
                                            ({"precisions": ("bf16",)}, "bf16")])
def test_bad_flags_are_refused_with_the_flag_named(change, expect):
    from edgeres.errors import InputError
    from edgeres.sweep.grid import SweepConfig, validate_sweep

    cfg = SweepConfig(model="m.pt", out="o", calib="c.npz", eval_data="e.npz", targets=("onnx", "tflite"))
    with pytest.raises(InputError, match=expect):
        validate_sweep(replace(cfg, **change))


def test_a_bad_flag_fails_before_any_work(tiny_checkpoint, tiny_npz, tmp_path):
    out = tmp_path / "sw"
    r = run_cli("sweep", tiny_checkpoint, "--calib", tiny_npz, "--eval", tiny_npz, "--out", out, "--threads", "1,x")
    assert r.returncode == 2 and r.stderr.startswith("edgeres: error: --threads"), r.stderr
    assert not out.exists()


@pytest.mark.slow
def test_ctrl_c_cancels_the_running_tasks_and_exits_130(tiny_checkpoint, tiny_npz, tmp_path):
    import os
    import signal
    import time

    out = tmp_path / "sw"
    cmd = [sys.executable, "-m", "cli", "sweep", str(tiny_checkpoint), "--calib", str(tiny_npz), "--eval",
           str(tiny_npz), "--precision", "fp32", "--targets", "onnx", "--bench-runs", "10000000", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while not (out / "logs" / "prune0-onnx-fp32.log").exists() or \
                "== bench" not in (out / "logs" / "prune0-onnx-fp32.log").read_text():
            assert proc.poll() is None and time.time() < deadline, "the sweep never reached its benchmark"
            time.sleep(0.5)
        time.sleep(2)  # the benchmark runs (it would take hours)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted; finished trials are kept" in err and not (out / "sweep.json").exists()
    assert (out / "prune0-onnx-fp32" / "manifest.json").exists()  # the finished bundle stays for the re-run
