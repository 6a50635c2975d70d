"""edgeres sweep: trials on Ray (embedded and a `ray start` cluster), shared steps once, Pareto front,
best under a budget, failed trials as rows, re-runs that skip finished trials."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from types import SimpleNamespace
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, run_cli, run_cli_process, sigint_at_default

GRID = ["--prune", "0,0.3", "--precision", "int8,fp32", "--targets", "onnx,tflite"]
pytest.importorskip("ray", reason="edgeres sweep needs Ray: pip install 'edgeres[sweep]'")


def _sweep(model, calib, evald, out, *extra, **kw):
    return run_cli_process("sweep", model, "--calib", calib, "--eval", evald, *GRID, "--out", out, *extra, **kw)


SECOND_ADDRESS = "192.0.2.77"  # TEST-NET-1: never routed anywhere
NAMESPACE_SETUP = (f"ip link set lo up && ip link add v0 type veth peer name v1 && ip addr add {SECOND_ADDRESS}/24 "
                   "dev v0 && ip link set v0 up && ip link set v1 up && ip route add default dev v0")


class Namespace:
    """A private network and PID namespace: loopback plus a second address with a default route, so Ray's
    "this node's address" is not 127.0.0.1 (the machine of issue 33). Every process started in it is
    killed by the kernel when its first process ends, so no Ray is left behind, and `ray stop` is never
    needed (it would stop every Ray on this machine, other runs' too)."""

    def __init__(self):
        self.holder = subprocess.Popen(["unshare", "--net", "--pid", "--fork", "--mount-proc", "sh", "-c",
                                        f"{NAMESPACE_SETUP} && exec sleep 3600"], stderr=subprocess.PIPE, text=True)
        self.pid = None
        deadline = time.time() + 30
        while time.time() < deadline and self.holder.poll() is None:
            import psutil

            children = psutil.Process(self.holder.pid).children()
            if children and children[0].name() == "sleep":
                self.pid = children[0].pid
                return
            time.sleep(0.1)
        self.close()
        raise OSError(f"cannot make a network namespace ({(self.holder.stderr.read() or '').strip()[:200]})")

    def run(self, *cmd, env: dict, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run(["nsenter", "--target", str(self.pid), "--net", "--pid", "--mount", "--", *map(str, cmd)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)

    def close(self):
        if self.holder.poll() is None:
            if self.pid is not None:
                os.kill(self.pid, signal.SIGKILL)  # the namespace's first process: the kernel kills the rest
            self.holder.wait(timeout=30)


@pytest.fixture(scope="module")
def cluster():
    """`ray start --head --node-ip-address 127.0.0.1 --port 6391` (issue 33) with one `bench` slot, in a
    namespace whose machine also has 192.0.2.77. Started as a one-machine Ray, as the embedded one is, its
    servers listen on 127.0.0.1 only: a driver that swaps the address given for 192.0.2.77 cannot join."""
    if os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("nsenter") and shutil.which("ip")):
        pytest.skip("the cluster test runs in a network namespace with a second address: needs root, unshare, "
                    "nsenter and ip")
    try:
        ns = Namespace()
    except OSError as e:
        pytest.skip(f"the cluster test needs a network namespace with a second address: {e}")
    ray_cli = str(Path(sys.executable).with_name("ray"))
    temp = tempfile.mkdtemp(prefix="edr", dir="/tmp")  # Ray's socket paths must stay short
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32)}  # token authentication, its token given to both sides
    try:
        start = ns.run(ray_cli, "start", "--head", "--port", "6391", "--node-ip-address", "127.0.0.1", "--num-cpus",
                       "2", "--resources", '{"bench": 1}', "--temp-dir", temp, "--object-store-memory",
                       str(100 << 20), "--include-dashboard", "false", "--disable-usage-stats",
                       env={**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}, timeout=180)
        assert start.returncode == 0, start.stderr[-3000:]
        assert ns.run("ip", "-brief", "addr", env=env).stdout.count(SECOND_ADDRESS) == 1
        yield ns, "127.0.0.1:6391", env
    finally:
        ns.close()
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
    for t in trials:  # every trial is a real bundle, measured, compiled in its Ray worker (a CIFAR ResNet is small)
        assert (out / t["bundle"] / "manifest.json").exists() and t["p50_ms"] > 0 and t["size_mb"] > 0
        assert json.loads((out / t["bundle"] / "manifest.json").read_text())["config"]["jobs"] == 0
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


def _sweep_in(ns: Namespace, env: dict, model, calib, evald, out, *extra):
    return ns.run(sys.executable, "-m", "edgeres.cli", "sweep", model, "--calib", calib, "--eval", evald, *GRID, "--out", out,
                  *extra, env=env)


@pytest.mark.slow
def test_sweep_on_a_ray_start_cluster_reports_a_failed_trial_then_resumes(cluster, tiny_checkpoint, tiny_npz,
                                                                          tmp_path):
    out = tmp_path / "sw"
    (out / ".shared").mkdir(parents=True)
    (out / "prune0.3-onnx-fp32").write_text("in the way")  # this trial cannot publish its bundle
    ns, address, env = cluster
    r = _sweep_in(ns, env, tiny_checkpoint, tiny_npz, tiny_npz, out, "--address", address, "--accuracy-budget", "100",
                  "--bench-runs", "10")
    assert r.returncode == 3, r.stderr[-3000:]
    doc = _doc(out)
    # the cluster was joined at the address given, not at this machine's other address (issue 33)
    assert doc["engine"]["mode"] == "cluster" and doc["engine"]["address"] == address, doc["engine"]
    failed = [t for t in doc["trials"] if t["status"] != "ok"]
    assert [t["name"] for t in failed] == ["prune0.3-onnx-fp32-t1"] and failed[0]["error"]
    assert sum(t["status"] == "ok" for t in doc["trials"]) == 7 and doc["best"] is not None
    (out / "prune0.3-onnx-fp32").unlink()
    again = _sweep_in(ns, env, tiny_checkpoint, tiny_npz, tiny_npz, out, "--address", address, "--accuracy-budget",
                      "100", "--bench-runs", "10")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("(finished in an earlier run, skipped)") == 7 + 2  # 7 trials and both bases
    doc = _doc(out)
    assert all(t["status"] == "ok" for t in doc["trials"]) and len(doc["trials"]) == 8
    assert doc["shared"] == {"prune": 1, "export": 2, "calibrate": 2}  # nothing shared was made again


def test_without_ray_the_command_says_what_to_install(tiny_checkpoint, tiny_npz, tmp_path):
    boot = "import sys; sys.modules['ray'] = None; from edgeres import cli; sys.argv[0] = 'edgeres'; cli.app()"
    r = subprocess.run([sys.executable, "-c", boot, "sweep", str(tiny_checkpoint), "--calib", str(tiny_npz),
                        "--eval", str(tiny_npz), "--out", str(tmp_path / "sw")], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "pip install 'edgeres[sweep]'" in r.stderr
    assert not (tmp_path / "sw").exists()


def test_only_a_small_model_compiles_in_the_ray_worker():
    """Under COMPILE_IN_TASK_BELOW_BYTES of weights: jobs=0 (no second process importing its runtime); at or over it,
    or with jobs given: unchanged (a worker process per compile takes an ImageNet-size runtime heap with it)."""
    from edgeres.convert.config import ConvertConfig
    from edgeres.sweep.tasks import COMPILE_IN_TASK_BELOW_BYTES, compile_where

    cfg = ConvertConfig(model="m.pt", out="o")
    small = SimpleNamespace(state_dict={"w": np.zeros(COMPILE_IN_TASK_BELOW_BYTES // 4 - 1, np.float32)})
    big = SimpleNamespace(state_dict={"a": np.zeros(COMPILE_IN_TASK_BELOW_BYTES // 8, np.float32),
                                      "b": np.zeros(COMPILE_IN_TASK_BELOW_BYTES // 8, np.float32)})
    assert compile_where(cfg, small).jobs == 0
    assert compile_where(cfg, big).jobs is None
    assert compile_where(replace(cfg, jobs=2), small).jobs == 2


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


@pytest.mark.parametrize("address", ["127.0.0.1:1", "localhost:1"])
def test_a_closed_address_fails_in_seconds_before_any_work(tiny_checkpoint, tiny_npz, tmp_path, address):
    """Issue 33: Ray redialled this machine's other address for minutes; nothing is dialled but the one given."""
    out = tmp_path / "sw"
    t0 = time.perf_counter()
    r = run_cli_process("sweep", tiny_checkpoint, "--calib", tiny_npz, "--eval", tiny_npz, "--out", out, "--targets", "onnx",
                "--address", address, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and lines == [f"edgeres: error: --address {address}: nothing listens there; start a "
                                           "cluster with `ray start --head --port PORT` and give the address it "
                                           "prints, or leave --address out for a Ray of this sweep's own"], r.stderr
    assert time.perf_counter() - t0 < 60 and not out.exists()


@pytest.mark.parametrize("address, loopback", [("127.0.0.1:6379", True), ("localhost:6379", True),
                                               ("[::1]:6379", True), ("127.0.0.2:6379", True),
                                               ("192.0.2.2:6379", False), ("head.local:6379", False),
                                               ("auto", False)])
def test_only_a_loopback_address_keeps_ray_on_loopback(address, loopback):
    from edgeres.sweep.engine import _is_loopback, check_address

    assert _is_loopback(address) is loopback
    if address == "auto":
        check_address(address)  # Ray finds the cluster itself: nothing to dial here


def _listening(pid: int) -> set[str]:
    """The addresses the process tree of ``pid`` (a sweep: its Ray and Ray's workers) listens on."""
    import psutil

    found = set()
    for p in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        try:
            found |= {c.laddr.ip for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
        except psutil.Error:
            pass
    return found


def _ray_session_dir(pid: int) -> Path | None:
    import psutil

    for p in psutil.Process(pid).children(recursive=True):
        try:
            for arg in p.cmdline():
                if arg.startswith("--raylet_socket_name="):
                    return Path(arg.split("=", 1)[1]).parents[1]
        except psutil.Error:
            pass
    return None


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, line", [
    (signal.SIGINT, 130, "edgeres: error: interrupted; finished trials are kept in {out}: re-run the same command "
                         "to go on"),
    (signal.SIGTERM, 143, "edgeres: error: terminated (SIGTERM); finished trials are kept in {out}: re-run the same "
                          "command to go on")], ids=["ctrl-c", "sigterm"])
def test_a_signal_cancels_the_running_tasks_and_leaves_nothing_behind(tiny_checkpoint, tiny_npz, tmp_path, sig,
                                                                      code, line):
    """Ctrl-C exits 130, SIGTERM 143 (was: a stack dump and exit 134): one line, the finished bundle kept, no
    lock file, no Ray session folder; while it ran, its embedded Ray listened on 127.0.0.1 only."""
    out = tmp_path / "sw"
    cmd = [sys.executable, "-m", "edgeres.cli", "sweep", str(tiny_checkpoint), "--calib", str(tiny_npz), "--eval",
           str(tiny_npz), "--precision", "fp32", "--targets", "onnx", "--bench-runs", "10000000", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_at_default)
    try:
        deadline = time.time() + 300
        while not (out / "logs" / "prune0-onnx-fp32.log").exists() or \
                "== bench" not in (out / "logs" / "prune0-onnx-fp32.log").read_text():
            assert proc.poll() is None and time.time() < deadline, "the sweep never reached its benchmark"
            time.sleep(0.5)
        time.sleep(2)  # the benchmark runs (it would take hours)
        listening, session = _listening(proc.pid), _ray_session_dir(proc.pid)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err[-2000:]
    assert [l for l in err.splitlines() if l.startswith("edgeres: error:")] == [line.format(out=out)], err[-2000:]
    assert "SIGTERM received" not in err and "Traceback" not in err, err[-2000:]
    assert not (out / "sweep.json").exists()
    assert (out / "prune0-onnx-fp32" / "manifest.json").exists()  # the finished bundle stays for the re-run
    assert not [p.name for p in out.rglob("*.lock")] and not list(tmp_path.glob(".*.lock"))
    assert listening and listening <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, listening
    assert session is not None and not session.exists() and not str(session).startswith("/tmp/ray/"), \
        (session, sorted(map(str, session.rglob("*")))[:20] if session else None, err[-1000:])


def _ray_like(temp: Path, code: str) -> subprocess.Popen:
    """A process naming ``temp`` on its command line, as every process of an embedded Ray does."""
    return subprocess.Popen([sys.executable, "-c", code, f"--temp-dir={temp}"])


def test_the_ray_folder_is_removed_after_a_late_ray_process_has_written_into_it(tmp_path):
    """Under load a Ray worker outlives ``ray.shutdown`` and recreated the session folder after a plain rmtree
    (full-suite run, [ctrl-c]: the folder was born after the sweep's cleanup, mode 0755, empty)."""
    from edgeres.sweep.engine import remove_ray_folder

    temp = tmp_path / "edgeres-ray-x"
    (temp / "session_1" / "logs").mkdir(parents=True)
    late = _ray_like(temp, "import os, sys, time; time.sleep(1); "
                           "os.makedirs(sys.argv[1].split('=', 1)[1] + '/session_1', exist_ok=True)")
    try:
        remove_ray_folder(str(temp), [])
        late.wait(timeout=30)  # (it may have been reaped already: then its code reads 0)
        assert not temp.exists(), sorted(map(str, temp.rglob("*")))
    finally:
        late.kill()
        late.wait()


def test_a_ray_process_that_will_not_end_is_killed_before_its_folder_goes(tmp_path, monkeypatch):
    from edgeres.sweep import engine

    monkeypatch.setattr(engine, "REAP_S", 1.0)
    temp = tmp_path / "edgeres-ray-x"
    (temp / "session_1").mkdir(parents=True)
    stuck = _ray_like(temp, "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)")
    try:
        t0 = time.monotonic()
        engine.remove_ray_folder(str(temp), [])
        import psutil

        assert not psutil.pid_exists(stuck.pid) and not temp.exists()  # killed and reaped, then removed
        assert time.monotonic() - t0 < 5
    finally:
        stuck.kill()
        stuck.wait()
