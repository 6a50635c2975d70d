"""The device side on a real arm64 userland: `bench --remote` and `eval --remote` against an emulated
Raspberry Pi 5 (Debian 12 arm64 under qemu-user, sshd on 127.0.0.1; see tests/arm64_host.py).

The image is built once into ~/.cache/edgeres (a few minutes from nothing, seconds when cached).
Skipped, with the reason, only where the emulated host cannot run (not root, no binfmt_misc, no qemu).
"""

import json
import socket
import time

import pytest

from tests.arm64_host import processes_in, running_host, unavailable_reason
from tests.handmade_bundle import copy_bundle

pytestmark = pytest.mark.arm64

DEV = "cifar10_dev.npz"


@pytest.fixture(scope="module")
def arm64_host():
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"emulated arm64 host unavailable: {reason}")
    with running_host("cortex-a76") as host:
        yield host
    assert not processes_in(host.root), "the emulated host left processes running"


@pytest.fixture(scope="module")
def r20_bundle(tmp_path_factory, cifar, cli):
    """ResNet-20 int8 for ONNX and TFLite with the Raspberry Pi 5 profile's recipe (S8S8 for onnxruntime)."""
    out = tmp_path_factory.mktemp("arm64") / "r20"
    r = cli("convert", cifar / "resnet20.th", "--arch", "resnet20", "--calib", cifar / "cifar10_calib.npz",
            "--calib-images", "100", "--device", "rpi5", "--targets", "onnx,tflite", "--precision", "int8",
            "--no-bench", "--out", out, timeout=600)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    onnx = next(a for a in manifest["artifacts"] if a["target"] == "onnx")
    assert "S8S8" in json.dumps(onnx) or '"activation_type": "int8"' in json.dumps(onnx), onnx
    return out


@pytest.fixture(scope="module")
def cli():
    from tests.conftest import run_cli

    return run_cli


def _one_error_line(stderr: str) -> bool:
    return sum(line.startswith("edgeres: error:") for line in stderr.splitlines()) == 1 and "Traceback" not in stderr


@pytest.mark.realdata
def test_remote_bench_runs_on_aarch64_sees_the_pi5_features_and_says_emulated(cli, arm64_host, r20_bundle):
    r = cli("bench", r20_bundle, *arm64_host.cli_args(), "--runs", "3", "--warmup", "0", timeout=600)
    assert r.returncode == 0, r.stderr
    assert "EMULATED" in r.stdout and "aarch64; fp asimd" in r.stdout  # the user is told, not only the JSON
    doc = json.loads((r20_bundle / "bench.json").read_text())
    system = doc["system"]
    assert system["machine"] == "aarch64" and system["python"].startswith("3.11")
    assert {"asimd", "asimddp"} <= set(system["cpu_features"]["features"])  # a Cortex-A76: dot-product…
    assert "i8mm" not in system["cpu_features"]["features"]  # …and no int8 matrix multiply
    assert system["emulation"]["emulated"] and "qemu" in system["emulation"]["evidence"][0]
    rows = {r["target"]: r for r in doc["results"]}
    assert set(rows) >= {"onnx", "tflite"}
    assert all(r["status"] == "ok" and r["emulated"] and r["p50_ms"] > 0 for r in rows.values())
    assert any("EMULATED" in w for w in rows["onnx"]["warnings"])
    assert "ok (EMULATED" in r.stdout and "EMULATED" in r.stderr
    assert not list((arm64_host.root / "tmp").glob("edgeres-bench.*")), "the remote temp folder was left behind"


@pytest.mark.realdata
def test_remote_eval_measures_accuracy_on_the_arm_kernels_and_compares_with_here(cli, arm64_host, r20_bundle, cifar):
    # 200 images keep the emulated fp32 reference (the slow part) near 4 minutes on 2 loaded cores;
    # benchmarks and the README use 500
    r = cli("eval", r20_bundle, "--data", cifar / DEV, "--limit", "200", *arm64_host.cli_args(), "--json", timeout=900)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["images"] == 200 and doc["emulated"] and doc["device"]["machine"] == "aarch64"
    ref = doc["reference"]
    assert 85 < ref["top1"] < 97 and ref["device_host_agreement_pct"] >= 99  # fp32: the same on both CPUs
    rows = {a["target"]: a for a in doc["artifacts"]}
    assert set(rows) == {"onnx", "tflite"}
    for row in rows.values():
        assert row["status"] == "ok" and row["runtime_version"]
        assert abs(row["top1_drop_pp"] - (ref["top1"] - row["top1"])) < 1e-6  # measured against the device's fp32
        assert row["top1_drop_pp"] < 3 and row["agreement_pct"] > 90
        assert 90 < row["device_host_agreement_pct"] <= 100 and "top1" in row["host"]
    stored = json.loads((r20_bundle / "device_eval.json").read_text())
    assert stored["artifacts"] == doc["artifacts"] and stored["host"] == arm64_host.destination
    report = cli("report", r20_bundle)
    assert report.returncode == 0 and "device top-1" in report.stdout


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory, tiny_model):
    from tests.handmade_bundle import shared_bundle

    return shared_bundle(tmp_path_factory, tiny_model)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_eval_on_an_unreachable_device_is_one_error_line_exit_3_and_nothing_stored(cli, tiny_bundle, tiny_npz, tmp_path):
    work = copy_bundle(tiny_bundle, tmp_path / "b")
    t0 = time.time()
    r = cli("eval", work, "--data", tiny_npz, "--remote", "pi@127.0.0.1", "--ssh-option", f"Port={_free_port()}",
            "--ssh-option", f"UserKnownHostsFile={tmp_path / 'kh'}", "--json", timeout=300)
    assert r.returncode == 3 and time.time() - t0 < 120
    assert _one_error_line(r.stderr) and "Connection refused" in r.stderr
    assert r.stdout == "" and not (work / "device_eval.json").exists()


def test_eval_on_a_device_without_that_python_names_the_flag(cli, arm64_host, tiny_bundle, tiny_npz, tmp_path):
    work = copy_bundle(tiny_bundle, tmp_path / "b")
    r = cli("eval", work, "--data", tiny_npz, *arm64_host.cli_args(), "--remote-python", "/usr/bin/python2",
            timeout=300)
    assert r.returncode == 3 and _one_error_line(r.stderr) and "--remote-python" in r.stderr
    assert not (work / "device_eval.json").exists()
