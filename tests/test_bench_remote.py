"""`edgeres bench --remote` for real: against an sshd this test starts on 127.0.0.1 with throwaway keys."""

import getpass
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.handmade_bundle import copy_bundle, shared_bundle


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sshd_binary() -> str | None:
    found = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)
    return found if found and shutil.which("ssh") and shutil.which("scp") and shutil.which("ssh-keygen") else None


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """A loopback sshd for the current user; yields the --remote/--ssh-option arguments that reach it."""
    binary = _sshd_binary()
    if binary is None:
        pytest.skip("OpenSSH server/client not installed (apt-get install openssh-server openssh-client)")
    if os.geteuid() == 0 and not os.path.isdir("/run/sshd"):
        try:  # sshd running as root insists on its privilege-separation folder (the package normally makes it)
            os.makedirs("/run/sshd", mode=0o755)
        except OSError as e:
            pytest.skip(f"sshd needs /run/sshd and it cannot be created ({e})")
    d = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    shutil.copy(d / "client_key.pub", d / "authorized_keys")
    port = _free_port()
    proc = subprocess.Popen([binary, "-D", "-e", "-f", "/dev/null", "-p", str(port),
                             "-o", "ListenAddress=127.0.0.1", "-o", f"HostKey={d / 'host_key'}",
                             "-o", f"AuthorizedKeysFile={d / 'authorized_keys'}", "-o", "UsePAM=no",
                             "-o", "StrictModes=no", "-o", "PasswordAuthentication=no",
                             "-o", "KbdInteractiveAuthentication=no", "-o", "PermitRootLogin=prohibit-password",
                             "-o", "PidFile=none", "-o", "Subsystem=sftp internal-sftp"],  # scp speaks SFTP
                            stdout=subprocess.DEVNULL, stderr=open(d / "sshd.log", "w"))
    deadline = time.time() + 10
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.skip(f"sshd could not start: {(d / 'sshd.log').read_text().strip()[-300:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.skip("sshd did not listen within 10 s")
    options = ["--ssh-option", f"Port={port}", "--ssh-option", f"IdentityFile={d / 'client_key'}",
               "--ssh-option", "IdentitiesOnly=yes", "--ssh-option", f"UserKnownHostsFile={d / 'known_hosts'}"]
    yield {"destination": f"{getpass.getuser()}@127.0.0.1", "options": options, "port": port, "log": d / "sshd.log"}
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_model):
    return shared_bundle(tmp_path_factory, tiny_model)


def _one_error_line(stderr: str) -> bool:
    """Progress lines may precede it; the failure itself is exactly one `edgeres: error:` line."""
    return sum(line.startswith("edgeres: error:") for line in stderr.splitlines()) == 1 and \
        "Traceback" not in stderr


def _remote_dirs() -> set[str]:
    return set(glob.glob(os.path.join(os.environ.get("TMPDIR", "/tmp"), "edgeres-bench.*")))


def _logins(sshd) -> int:
    return sshd["log"].read_text().count("Accepted publickey")


def test_remote_bench_gives_the_local_schema_with_the_host(cli, sshd, bundle, tmp_path, monkeypatch):
    import tempfile

    work = copy_bundle(bundle, tmp_path / "b")
    # this run's temp folder (short: it holds the shared connection's socket), so a remote bench of another
    # worker running meanwhile is not seen
    mine = tempfile.mkdtemp(prefix="t", dir="/tmp")
    monkeypatch.setattr(tempfile, "tempdir", mine)
    before, logins = _remote_dirs(), _logins(sshd)
    remote = cli("bench", work, "--remote", sshd["destination"], "--remote-python", sys.executable, *sshd["options"],
                 "--runs", "5", "--warmup", "0", "--json", timeout=300)
    monkeypatch.undo()
    assert remote.returncode == 0, remote.stderr
    # 3 runs, a temp folder, a python check, the copies and the clean-up: one login, the connection shared,
    # and closed at the end (its socket folder gone, no ssh left holding it)
    assert _logins(sshd) - logins == 1
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert not [line for line in ps.splitlines() if mine in line], ps
    assert os.listdir(mine) == [], os.listdir(mine)
    os.rmdir(mine)
    remote_doc = json.loads(remote.stdout)
    local_doc = json.loads(cli("bench", work, "--runs", "5", "--warmup", "0", "--json").stdout)
    assert remote_doc["host"] == sshd["destination"] and local_doc["host"] == "local"
    assert set(remote_doc) == set(local_doc)
    assert [set(r) for r in remote_doc["results"]] == [set(r) for r in local_doc["results"]]
    assert all(r["status"] == "ok" for r in remote_doc["results"])
    assert [r["target"] for r in remote_doc["results"]] == ["onnx", "openvino", "tflite"]
    assert _remote_dirs() == before, "the remote temp folder was left behind"


def test_a_refusing_host_is_one_error_line_exit_3_and_the_bundle_untouched(cli, bundle, tmp_path):
    work = copy_bundle(bundle, tmp_path / "b")
    t0 = time.time()
    r = cli("bench", work, "--remote", "nobody@127.0.0.1", "--ssh-option", f"Port={_free_port()}",
            "--ssh-option", f"UserKnownHostsFile={tmp_path / 'kh'}", "--json", timeout=120)
    assert r.returncode == 3 and time.time() - t0 < 60
    assert _one_error_line(r.stderr) and "Connection refused" in r.stderr
    assert r.stdout == "" and not (work / "bench.json").exists()


def test_a_host_that_accepts_but_never_answers_times_out(cli, bundle, tmp_path):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    held = []
    threading.Thread(target=lambda: held.append(server.accept()), daemon=True).start()
    work = copy_bundle(bundle, tmp_path / "b")
    t0 = time.time()
    r = cli("bench", work, "--remote", "nobody@127.0.0.1", "--ssh-option", f"Port={server.getsockname()[1]}",
            "--ssh-option", "ConnectTimeout=2", "--ssh-option", f"UserKnownHostsFile={tmp_path / 'kh'}",
            timeout=120)
    server.close()
    assert r.returncode == 3 and time.time() - t0 < 60
    assert _one_error_line(r.stderr) and "127.0.0.1" in r.stderr
    assert not (work / "bench.json").exists()


def test_garbage_from_the_remote_is_one_error_line_and_cleans_up(cli, sshd, bundle, tmp_path):
    work = copy_bundle(bundle, tmp_path / "b")
    before = _remote_dirs()
    # `echo` passes for a python that prints, then "runs" the benchmark by printing its arguments
    r = cli("bench", work, "--remote", sshd["destination"], "--remote-python", "echo", *sshd["options"],
            "--runs", "5", timeout=120)
    assert r.returncode == 3
    assert _one_error_line(r.stderr) and "printed no result" in r.stderr
    assert not (work / "bench.json").exists()
    assert _remote_dirs() == before


def test_a_remote_without_the_python_says_so(cli, sshd, bundle, tmp_path):
    work = copy_bundle(bundle, tmp_path / "b")
    r = cli("bench", work, "--remote", sshd["destination"], "--remote-python", "/nonexistent/python3",
            *sshd["options"], timeout=120)
    assert r.returncode == 3 and "--remote-python" in r.stderr and _one_error_line(r.stderr)
    assert not (work / "bench.json").exists()
