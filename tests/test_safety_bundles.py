"""Bundles that cannot point outside, outputs nothing silently replaces, damage that never crashes.

Table-driven like tests/test_safety.py (whose helpers and fixtures it reuses): every hostile bundle is
refused by every reader with ONE line naming the path, before any model is handed to a runtime."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli, sigint_at_default
from tests.test_safety import Case, _assert_one_line, _invoke, _no_partial, env  # noqa: F401 (fixtures)

DEADLINE_S = 60  # a reader that blocks on a FIFO or reads /dev/zero fails the test instead of hanging it


class Hung(BaseException):
    """Raised by the alarm; a BaseException so neither the CLI's handler nor CliRunner swallows it."""


@contextlib.contextmanager
def deadline(seconds: float):
    def fire(signum, frame):
        raise Hung(f"still running after {seconds} s (blocked on a FIFO or reading a device?)")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def loads(monkeypatch):
    """Every model file handed to a runtime: in this process, or to a benchmark runner process."""
    import edgeres.targets.onnx
    import edgeres.targets.openvino
    import edgeres.targets.tflite

    seen: list[Path] = []
    for module in (edgeres.targets.onnx, edgeres.targets.openvino, edgeres.targets.tflite):
        def spy(path, *args, _real=module.load_runner, **kwargs):
            seen.append(Path(path))
            return _real(path, *args, **kwargs)

        monkeypatch.setattr(module, "load_runner", spy)

    class SpyPopen(subprocess.Popen):
        def __init__(self, args, *rest, **kwargs):
            if isinstance(args, (list, tuple)) and "--artifact" in args:
                seen.append(Path(args[list(args).index("--artifact") + 1]))
            super().__init__(args, *rest, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", SpyPopen)
    return seen


# -- building hostile bundles ---------------------------------------------------------------------

def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _save(bundle: Path, manifest: dict) -> None:
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def _record(rel: str, content: bytes) -> dict:
    """What an attacker writes into the manifest so the sha256 check passes for ``content``."""
    return {"file": rel, "size_bytes": len(content), "sha256": hashlib.sha256(content).hexdigest()}


def _outside_model(tmp: Path, like: Path) -> Path:
    """A valid model outside the bundle, different in its bytes from every file in it."""
    import onnx

    outside = tmp / "outside"
    outside.mkdir(exist_ok=True)
    model = onnx.load(str(like))
    model.doc_string = "planted outside the bundle"
    onnx.save(model, str(outside / "evil.onnx"))
    return outside / "evil.onnx"


def _artifact_file(value):
    def make(b: Path, evil: Path) -> str:
        m = _manifest(b)
        m["artifacts"][0]["file"] = value(b, evil)
        _save(b, m)
        return "evil.onnx" if "evil" in m["artifacts"][0]["file"] else m["artifacts"][0]["file"]
    return make


def _record_for_outside_absolute(b: Path, evil: Path) -> str:
    m = _manifest(b)
    m["artifacts"][0]["file_records"].append(_record(str(evil), evil.read_bytes()))
    m["artifacts"][0]["file"] = str(evil)
    _save(b, m)
    return "evil.onnx"


def _unlisted_copy(b: Path, evil: Path) -> str:
    shutil.copy(evil, b / "onnx" / "evil.onnx")
    return _artifact_file(lambda b, e: "onnx/evil.onnx")(b, evil)


def _artifact_symlink_out(b: Path, evil: Path) -> str:
    m = _manifest(b)
    rel = m["artifacts"][0]["file"]
    (b / rel).unlink()
    (b / rel).symlink_to(evil)
    m["artifacts"][0]["file_records"][0] = _record(rel, evil.read_bytes())
    _save(b, m)
    return rel


def _folder_symlink_out(b: Path, evil: Path) -> str:
    moved = evil.parent / "onnx-folder"
    shutil.move(str(b / "onnx"), moved)
    (b / "onnx").symlink_to(moved, target_is_directory=True)  # same files, same hashes: only the place is wrong
    return _manifest(b)["artifacts"][0]["file"]


def _listed_special(rel: str, make_it):
    def make(b: Path, evil: Path) -> str:
        make_it(b / rel)
        m = _manifest(b)
        m["artifacts"][0]["file_records"].append(_record(rel, b""))  # stat says 0 bytes for all of these
        _save(b, m)
        return rel
    return make


def _char_device(path: Path) -> None:
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 5))  # what /dev/zero is
    except OSError as e:
        pytest.skip(f"cannot create a device node here: {e}")


def _reference_symlink_out(b: Path, evil: Path) -> str:
    (b / "model.fp32.onnx").unlink()
    (b / "model.fp32.onnx").symlink_to(evil)
    m = _manifest(b)
    m["reference"].update(_record("model.fp32.onnx", evil.read_bytes()))
    _save(b, m)
    return "model.fp32.onnx"


def _reference_absolute(b: Path, evil: Path) -> str:
    m = _manifest(b)
    m["reference"].update(_record(str(evil), evil.read_bytes()))
    _save(b, m)
    return "evil.onnx"


def _reference_fifo(b: Path, evil: Path) -> str:
    (b / "model.fp32.onnx").unlink()
    os.mkfifo(b / "model.fp32.onnx")
    m = _manifest(b)
    m["reference"].update(_record("model.fp32.onnx", b""))
    _save(b, m)
    return "model.fp32.onnx"


def _ir_with_unlisted_bin(b: Path, evil: Path) -> str:
    """An OpenVINO IR whose .xml is hashed but whose .bin (which the runtime reads by name) is not."""
    (b / "openvino").mkdir()
    (b / "openvino" / "model.xml").write_text("<net/>")
    (b / "openvino" / "model.bin").symlink_to(evil)
    m = _manifest(b)
    m["artifacts"].append({"target": "openvino", "precision": "fp32", "status": "ok", "file": "openvino/model.xml",
                           "files": ["openvino/model.xml"],
                           "file_records": [_record("openvino/model.xml", b"<net/>")]})
    _save(b, m)
    return "openvino/model.bin"


def _manifest_fifo(b: Path, evil: Path) -> str:
    (b / "manifest.json").unlink()
    os.mkfifo(b / "manifest.json")
    return "manifest.json"


PATH_CASES = [
    Case("file-absolute", _artifact_file(lambda b, e: str(e)), "outside the bundle"),
    Case("file-dotdot", _artifact_file(lambda b, e: "../outside/evil.onnx"), "outside the bundle"),
    Case("record-absolute", _record_for_outside_absolute, "outside the bundle"),
    Case("file-not-among-its-records", _unlisted_copy, "not one of the files it hashes"),
    Case("file-is-another-entrys-record", _artifact_file(lambda b, e: "model.fp32.onnx"),
         "not one of the files it hashes"),
    Case("record-symlink-out", _artifact_symlink_out, "outside the bundle"),
    Case("folder-symlink-out", _folder_symlink_out, "outside the bundle"),
    Case("record-symlink-dev-zero", _listed_special("onnx/zero.bin", lambda p: p.symlink_to("/dev/zero")),
         "outside the bundle"),
    Case("record-char-device", _listed_special("onnx/zero.bin", _char_device), "not a regular file"),
    Case("record-fifo", _listed_special("onnx/pipe.bin", os.mkfifo), "not a regular file \\(a FIFO\\)"),
    Case("reference-symlink-out", _reference_symlink_out, "outside the bundle"),
    Case("reference-absolute", _reference_absolute, "outside the bundle"),
    Case("reference-fifo", _reference_fifo, "not a regular file \\(a FIFO\\)"),
    Case("ir-bin-not-hashed", _ir_with_unlisted_bin, "not one of the files it hashes"),
    Case("manifest-fifo", _manifest_fifo, "not a regular file"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(command: str, bundle: Path, tmp: Path, npz) -> list:
    return {
        "eval": ["eval", bundle, "--data", npz],
        "inspect": ["inspect", bundle],
        "bench": ["bench", bundle, "--runs", "2", "--warmup", "0"],
        # a refusing port: a bundle that is refused never gets as far as ssh
        "bench-remote": ["bench", bundle, "--remote", "nobody@127.0.0.1", "--ssh-option", f"Port={_free_port()}",
                         "--ssh-option", f"UserKnownHostsFile={tmp / 'known_hosts'}",
                         "--ssh-option", "ConnectTimeout=2", "--runs", "2"],
        "report": ["report", bundle],
    }[command]


@pytest.fixture
def bundle_copy(tmp_path, onnx_bundle):
    bundle = tmp_path / "b"
    shutil.copytree(onnx_bundle, bundle, symlinks=True)
    return bundle


COMMANDS = ["eval", "inspect", "bench", "bench-remote", "report"]
LOADING = {"eval", "bench", "bench-remote"}
# files a runtime opens by name beside the one it is given matter only to the commands that load models
LOADING_ONLY = {"ir-bin-not-hashed"}
PATH_MATRIX = [pytest.param(case, command, id=f"{case.id}-{command}") for case in PATH_CASES for command in COMMANDS
               if command in LOADING or case.id not in LOADING_ONLY]


@pytest.mark.parametrize("case,command", PATH_MATRIX)
def test_a_path_the_manifest_names_must_be_a_hashed_regular_file_inside_the_bundle(env, tmp_path, bundle_copy,
                                                                                   loads, case, command):
    evil = _outside_model(tmp_path, like=bundle_copy / "model.fp32.onnx")
    named = case.make(bundle_copy, evil)
    with deadline(DEADLINE_S):
        code, _, stderr = _invoke(_command(command, bundle_copy, tmp_path, env["npz"]))
    _assert_one_line(code, stderr, case, named=named)
    assert loads == [], f"handed to a runtime although the bundle was refused: {loads}"
    assert not (bundle_copy / "eval.json").exists() and not (bundle_copy / "bench.json").exists()
    _no_partial(tmp_path)


def test_eval_runs_the_reference_the_manifest_names_never_a_planted_one(env, tmp_path, bundle_copy, loads):
    """An attacker cannot make eval compare against an unhashed model: renaming the reference in the
    manifest (with a correct record) is followed, and the unlisted file at the usual name is never opened."""
    m = _manifest(bundle_copy)
    (bundle_copy / "ref").mkdir()
    shutil.move(bundle_copy / "model.fp32.onnx", bundle_copy / "ref" / "model.fp32.onnx")
    m["reference"]["file"] = "ref/model.fp32.onnx"
    _save(bundle_copy, m)
    planted = _outside_model(tmp_path, like=bundle_copy / "ref" / "model.fp32.onnx")
    shutil.copy(planted, bundle_copy / "model.fp32.onnx")  # at the usual name, listed nowhere
    code, stdout, stderr = _invoke(["eval", bundle_copy, "--data", env["npz"], "--json"])
    assert code == 0, stderr
    hashed = {bundle_copy / "ref/model.fp32.onnx", bundle_copy / m["artifacts"][0]["file"]}
    assert loads and set(loads) <= hashed, loads
    assert bundle_copy / "ref/model.fp32.onnx" in loads


# -- concurrent converts ----------------------------------------------------------------------------

# runs the real CLI, but stops right before publishing until the test says go, so a second run (or a
# program outside edgeres) can act while the first holds everything it holds during a conversion
HELD_CONVERT = """
import os, sys, time
from pathlib import Path
import edgeres.convert.build as build
real_publish = build.publish
def held_publish(staging, out, **kwargs):
    Path(os.environ["EDGERES_TEST_READY"]).touch()
    go, until = Path(os.environ["EDGERES_TEST_GO"]), time.time() + 300
    while not go.exists() and time.time() < until:
        time.sleep(0.05)
    return real_publish(staging, out, **kwargs)
build.publish = held_publish
from edgeres.cli import app
sys.argv = ["edgeres", *sys.argv[1:]]
app()
"""


def _start_held_convert(tmp: Path, args: list) -> tuple[subprocess.Popen, Path]:
    ready, go = tmp / "held-ready", tmp / "held-go"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGERES_TEST_READY": str(ready), "EDGERES_TEST_GO": str(go)}
    proc = subprocess.Popen([sys.executable, "-c", HELD_CONVERT, *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    until = time.time() + 300
    while not ready.exists():
        if proc.poll() is not None:
            pytest.fail(f"the first convert ended before publishing: {proc.communicate()[1]}")
        assert time.time() < until, "the first convert never reached publish"
        time.sleep(0.05)
    return proc, go


def _fp32(env, out) -> list:
    return ["convert", env["checkpoint"], "--targets", "onnx", "--precision", "fp32", "--out", out, "--no-bench"]


def _int8(env, out) -> list:
    return ["convert", env["checkpoint"], "--targets", "onnx", "--precision", "int8", "--calib", env["npz"],
            "--out", out, "--no-bench"]


@pytest.mark.parametrize("second", [_int8, _fp32], ids=["int8-into-the-same-out", "the-same-command"])
def test_a_second_convert_on_the_same_out_fails_fast_and_the_first_bundle_stays(env, tmp_path, second):
    from edgeres.bundle import read_manifest

    out = tmp_path / "o"
    first, go = _start_held_convert(tmp_path, _fp32(env, out))
    try:
        t0 = time.time()
        r = run_cli(*second(env, out), timeout=300)
        waited = time.time() - t0
    finally:
        go.touch()
        _, first_err = first.communicate(timeout=300)
    _assert_one_line(r.returncode, r.stderr, Case("locked", None, "another edgeres run is writing it"), named=str(out))
    assert f"(pid {first.pid})" in r.stderr and waited < 60
    assert first.returncode == 0, first_err
    assert [a["precision"] for a in read_manifest(out)["artifacts"]] == ["fp32"]
    _no_partial(tmp_path)
    assert not (tmp_path / ".o.lock").exists()


def test_a_bundle_that_appears_while_converting_is_not_replaced(env, tmp_path, onnx_bundle):
    out = tmp_path / "o"
    first, go = _start_held_convert(tmp_path, _int8(env, out))
    try:
        shutil.copytree(onnx_bundle, out)  # written by something that is not edgeres, so it took no lock
        before = (out / "manifest.json").read_text()
    finally:
        go.touch()
        _, stderr = first.communicate(timeout=300)
    _assert_one_line(first.returncode, stderr, Case("appeared", None, "changed while this run was writing it"),
                     named=str(out))
    assert (out / "manifest.json").read_text() == before
    _no_partial(tmp_path)


def test_a_killed_convert_releases_its_lock(env, tmp_path):
    from edgeres.bundle import read_manifest

    out = tmp_path / "o"
    first, _ = _start_held_convert(tmp_path, _fp32(env, out))
    first.kill()
    first.communicate()
    r = run_cli(*_fp32(env, out), timeout=300)
    assert r.returncode == 0, r.stderr
    read_manifest(out)
    _no_partial(tmp_path)
    assert not (tmp_path / ".o.lock").exists()


def test_a_symlink_planted_as_the_lock_file_is_refused_and_its_target_untouched(env, tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    out = tmp_path / "o"
    (tmp_path / ".o.lock").symlink_to(victim)
    code, _, stderr = _invoke(_fp32(env, out))
    _assert_one_line(code, stderr, Case("lock-symlink", None, "is a symlink"), named=".o.lock")
    assert victim.read_text() == "keep me" and not out.exists()


# -- damage and crashes -----------------------------------------------------------------------------

def _edit(change):
    def make(b: Path, _evil=None) -> str:
        m = _manifest(b)
        change(m)
        _save(b, m)
        return "manifest.json"
    return make


VALUE_CASES = [
    Case("preprocess-negative-size", _edit(lambda m: m["preprocess"].update(size=-16)), "preprocess size -16"),
    Case("preprocess-size-text", _edit(lambda m: m["preprocess"].update(size="16")), "preprocess size '16'"),
    Case("preprocess-huge-size", _edit(lambda m: m["preprocess"].update(size=10**6)), "preprocess size"),
    Case("preprocess-nan-mean", _edit(lambda m: m["preprocess"].update(mean=[float("nan"), 0.4, 0.4])), "mean"),
    Case("preprocess-zero-std", _edit(lambda m: m["preprocess"].update(std=[0, 0, 0])), "std"),
    Case("preprocess-unknown-key", _edit(lambda m: m["preprocess"].update(gamma=2.2)), "unknown keys \\['gamma'\\]"),
    Case("arch-classes-text", _edit(lambda m: m["arch"].update(num_classes="10")), "positive integers"),
    Case("arch-negative-width", _edit(lambda m: m["arch"].update(stem_width=-8)), "positive integers"),
    Case("arch-unknown-key", _edit(lambda m: m["arch"].update(dropout=0.5)), "arch has unknown keys \\[.dropout.\\]"),
    Case("arch-preprocess-nan-std", _edit(lambda m: m["arch"]["preprocess"].update(std=[float("nan")] * 3)),
         "arch preprocess std"),
    Case("cost-text", _edit(lambda m: m.update(cost={"macs": "many"})), "cost macs"),
    Case("source-not-object", _edit(lambda m: m.update(source="resnet.pt")), "'source' is not an object"),
]


@pytest.mark.parametrize("command", ["eval", "inspect", "bench", "report"])
@pytest.mark.parametrize("case", VALUE_CASES, ids=lambda c: c.id)
def test_corrupt_manifest_values_are_one_line(env, tmp_path, bundle_copy, case, command):
    named = case.make(bundle_copy)
    code, _, stderr = _invoke(_command(command, bundle_copy, tmp_path, env["npz"]))
    _assert_one_line(code, stderr, case, named=named)
    assert "damaged" in stderr


RESULT_CASES = [
    ("eval.json", "[]"),
    ("eval.json", '{"reference": null, "artifacts": []}'),
    ("eval.json", '{"reference": {"top1": "high"}, "artifacts": []}'),
    ("eval.json", '{"reference": {"top1": 10.0}, "artifacts": [{"target": 3}]}'),
    ("eval.json", '{"reference": {"top1": 10.0}, "artifacts": 7}'),
    ("eval.json", "fifo"),
    ("bench.json", '{"settings": {}, "results": 5}'),
    ("bench.json", '{"settings": {}, "results": [{"target": "onnx", "precision": "fp32"}]}'),
    ("bench.json", '{"settings": 3, "results": []}'),
    ("bench.json", "[1, 2]"),
]


@pytest.mark.parametrize("name,content", RESULT_CASES, ids=[f"{n}:{c[:30]}" for n, c in RESULT_CASES])
def test_report_ignores_a_damaged_stored_result_and_says_so(tmp_path, bundle_copy, name, content):
    if content == "fifo":
        os.mkfifo(bundle_copy / name)
    else:
        (bundle_copy / name).write_text(content)
    with deadline(DEADLINE_S):
        code, stdout, stderr = _invoke(["report", bundle_copy])
    assert code == 0, stderr
    assert "| reference" in stdout
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"edgeres: warning: ignored damaged {bundle_copy / name}"), stderr


def test_convert_re_evaluates_over_a_damaged_eval_json(env, tmp_path, onnx_bundle):
    out = tmp_path / "o"
    shutil.copytree(onnx_bundle, out)
    (out / "eval.json").write_text('["damaged"]')
    code, _, stderr = _invoke([*_fp32(env, out), "--eval", env["npz"]])
    assert code == 0, stderr
    assert "ignored damaged" in stderr and "Traceback" not in stderr
    assert json.loads((out / "eval.json").read_text())["reference"]["top1"] >= 0


STEPS_CASES = [
    "\x00\x01 not json",
    "[1, 2, 3]",
    '{"export": {"seconds": 1.0}, "compile onnx fp32": 7}',
    '{"export": {"seconds": 1.0}, "compile onnx fp32": {"status": "ok", "files": 7}}',
]


@pytest.mark.parametrize("content", STEPS_CASES, ids=range(len(STEPS_CASES)))
def test_a_damaged_staging_step_record_is_redone_not_a_crash(env, tmp_path, monkeypatch, content):
    from edgeres.convert import build
    from edgeres.bundle import read_manifest

    out = tmp_path / "o"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # an interruption after the export step leaves its record behind
        m.setattr(build, "compile_record", interrupted)
        code, _, _ = _invoke(_fp32(env, out))
    assert code == 130
    steps = next(tmp_path.glob(".o.partial-*")) / ".steps.json"
    assert steps.exists()
    steps.write_text(content)
    code, _, stderr = _invoke(_fp32(env, out))
    assert code == 0, stderr
    assert "ignored damaged" in stderr and "Traceback" not in stderr
    read_manifest(out)
    _no_partial(tmp_path)


@pytest.fixture
def readonly_bundle(tmp_path, onnx_bundle):
    """A copy of the bundle on a file system mounted read-only (root ignores permission bits)."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to make read-only (needs root/CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        shutil.copytree(onnx_bundle, mnt / "b")
        r = subprocess.run(["mount", "-o", "remount,ro", str(mnt)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot remount the tmpfs read-only: {r.stderr.strip()}")
        yield mnt / "b"
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


@pytest.mark.parametrize("command,stored", [("eval", "eval.json"), ("bench", "bench.json"), ("report", "report.md")])
def test_a_read_only_bundle_still_gives_its_results_and_says_they_were_not_stored(env, readonly_bundle, command,
                                                                                  stored):
    args = {"eval": ["eval", readonly_bundle, "--data", env["npz"], "--json"],
            "bench": ["bench", readonly_bundle, "--runs", "2", "--warmup", "0", "--json"],
            "report": ["report", readonly_bundle]}[command]
    code, stdout, stderr = _invoke(args)
    assert code == 0, stderr
    if command == "report":
        assert "| reference" in stdout
    else:
        doc = json.loads(stdout)
        assert doc["reference"]["top1"] >= 0 if command == "eval" else doc["results"][0]["status"] == "ok"
    lines = [line for line in stderr.splitlines() if line.startswith("edgeres:")]
    assert len(lines) == 1 and lines[0].startswith("edgeres: warning:") and "Traceback" not in stderr, stderr
    assert str(readonly_bundle / stored) in lines[0] and "Read-only file system" in lines[0]
    assert "not stored" in lines[0]


def _runner_processes(parent) -> list:
    return [p for p in parent.children(recursive=True) if "bench_runner.py" in " ".join(p.cmdline())]


def _alive(proc) -> bool:
    import psutil

    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=lambda s: s.name)
def test_a_killed_bench_takes_its_runner_with_it(tmp_path, onnx_bundle, signum):
    import psutil

    bundle = tmp_path / "b"
    shutil.copytree(onnx_bundle, bundle)
    cli_proc = subprocess.Popen([sys.executable, "-m", "edgeres.cli", "bench", str(bundle), "--seconds", "120",
                                 "--warmup", "0"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=sigint_at_default)  # as at a terminal, also when pytest runs in background
    parent = psutil.Process(cli_proc.pid)
    runners = []
    try:
        until = time.time() + 120
        while not runners and time.time() < until and cli_proc.poll() is None:
            time.sleep(0.1)
            runners = _runner_processes(parent)
        assert runners, f"no benchmark runner started: {cli_proc.stderr.read() if cli_proc.poll() is not None else ''}"
        time.sleep(0.5)  # let it get into its loop
        cli_proc.send_signal(signum)
        _, stderr = cli_proc.communicate(timeout=60)
        until = time.time() + 10
        while any(_alive(p) for p in runners) and time.time() < until:
            time.sleep(0.1)
        survivors = [p.pid for p in runners if _alive(p)]
        assert not survivors, f"the runner outlived `edgeres bench` killed by {signum.name}"
        if signum != signal.SIGKILL:
            assert cli_proc.returncode == 130 and "edgeres: error: interrupted" in stderr and "Traceback" not in stderr
        assert not (bundle / "bench.json").exists()
    finally:
        for p in runners:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        if cli_proc.poll() is None:
            cli_proc.kill()



# -- growing a bundle (issue 33): what a grow keeps, with other processes and a full disk -----------------

# `edgeres eval`, held right after it took the results lock, before it keeps its run
HELD_EVAL = """
import os, sys, time
from pathlib import Path
import edgeres.measure.records as records
real_keep = records._keep_locked
def held_keep(*args, **kwargs):
    Path(os.environ["EDGERES_TEST_READY"]).touch()
    go, until = Path(os.environ["EDGERES_TEST_GO"]), time.time() + 300
    while not go.exists() and time.time() < until:
        time.sleep(0.05)
    return real_keep(*args, **kwargs)
records._keep_locked = held_keep
from edgeres.cli import app
sys.argv = ["edgeres", *sys.argv[1:]]
app()
"""


def _grow(env, out) -> list:
    """The onnx fp32 bundle grows an fp16 artifact (no calibration: quick)."""
    return ["convert", env["checkpoint"], "--targets", "onnx", "--precision", "fp32,fp16", "--out", out,
            "--no-bench", "--jobs", "0"]


def _kept_runs(out: Path, folder: str) -> list[str]:
    return sorted(p.stem for p in (out / folder).glob("*.json")) if (out / folder).is_dir() else []


def _assert_grown_with_results(out: Path, eval_run: dict, bench_run: dict | None = None) -> None:
    from edgeres.bundle import read_manifest

    assert {a["precision"] for a in read_manifest(out)["artifacts"]} == {"fp32", "fp16"}
    assert _kept_runs(out, "evals") == [eval_run["run"]]
    assert json.loads((out / "eval.json").read_text()) == eval_run
    if bench_run is not None:
        assert _kept_runs(out, "benches") == [bench_run["run"]]
        assert json.loads((out / "bench.json").read_text()) == bench_run
    assert not list(out.parent.glob(f".{out.name}.old-*")) and not list(out.parent.glob(f".{out.name}.*lock"))


def test_eval_and_bench_kept_while_a_bundle_grows_are_in_the_grown_bundle(env, tmp_path, onnx_bundle):
    """Item 1, two real processes: the grow is held just before publishing while `eval` and `bench` keep
    their runs in the bundle; the grown bundle carries both (evals/, benches/, the latest files)."""
    out = tmp_path / "o"
    shutil.copytree(onnx_bundle, out)
    grow, go = _start_held_convert(tmp_path, _grow(env, out))
    try:
        ev = run_cli("eval", out, "--data", env["npz"], "--json", timeout=300)
        bench = run_cli("bench", out, "--runs", "2", "--warmup", "0", "--json", timeout=300)
    finally:
        go.touch()
        _, grow_err = grow.communicate(timeout=300)
    assert ev.returncode == 0, ev.stderr
    assert bench.returncode == 0, bench.stderr
    assert grow.returncode == 0, grow_err
    _assert_grown_with_results(out, json.loads((out / "evals" / f"{_kept_runs(out, 'evals')[0]}.json").read_text()),
                               json.loads((out / "benches" / f"{_kept_runs(out, 'benches')[0]}.json").read_text()))
    assert json.loads(ev.stdout)["reference"] == json.loads((out / "eval.json").read_text())["reference"]
    _no_partial(tmp_path)


def test_a_grow_publishing_while_eval_keeps_its_run_waits_for_it(env, tmp_path, onnx_bundle):
    """Item 1, the narrow window: `eval` is writing its run when the grow publishes; the grow waits (one
    line) instead of moving the bundle away under it, and the run is in the grown bundle."""
    out = tmp_path / "o"
    shutil.copytree(onnx_bundle, out)
    ready, go = tmp_path / "held-ready", tmp_path / "held-go"
    child_env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGERES_TEST_READY": str(ready), "EDGERES_TEST_GO": str(go)}
    ev = subprocess.Popen([sys.executable, "-c", HELD_EVAL, "eval", str(out), "--data", str(env["npz"])], cwd=ROOT,
                          env=child_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    grow_log = tmp_path / "grow.stderr"
    grow = None
    try:
        until = time.time() + 300
        while not ready.exists():
            assert ev.poll() is None, f"eval ended before keeping its run: {ev.communicate()[1]}"
            assert time.time() < until, "eval never reached keeping its run"
            time.sleep(0.05)
        with open(grow_log, "w") as log:
            grow = subprocess.Popen([sys.executable, "-m", "edgeres.cli", *map(str, _grow(env, out))], cwd=ROOT,
                                    env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL, stderr=log)
        until = time.time() + 300
        while "waiting for pid" not in grow_log.read_text():
            assert grow.poll() is None, f"the grow published without waiting for eval: {grow_log.read_text()}"
            assert time.time() < until, "the grow never reached publishing"
            time.sleep(0.1)
        said = " ".join(grow_log.read_text().split())
        assert f"waiting for pid {ev.pid}, which is publishing" in said and str(out) in said
    finally:
        go.touch()
        _, ev_err = ev.communicate(timeout=300)
        if grow is not None:
            grow.wait(timeout=300)
    assert ev.returncode == 0, ev_err
    assert grow.returncode == 0, grow_log.read_text()
    _assert_grown_with_results(out, json.loads((out / "eval.json").read_text()))
    _no_partial(tmp_path)


def test_eval_after_an_interrupted_grow_is_in_the_resumed_grown_bundle(env, tmp_path, onnx_bundle, monkeypatch):
    """Item 1: grow interrupted (its staging kept), `eval`, the same grow again: the run is kept."""
    from edgeres.convert import build

    out = tmp_path / "o"
    shutil.copytree(onnx_bundle, out)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(build, "compile_record", interrupted)
        code, _, _ = _invoke(_grow(env, out))
    assert code == 130 and list(tmp_path.glob(".o.partial-*"))
    ev = run_cli("eval", out, "--data", env["npz"], timeout=300)
    assert ev.returncode == 0, ev.stderr
    kept = json.loads((out / "eval.json").read_text())
    code, _, stderr = _invoke(_grow(env, out))
    assert code == 0, stderr
    _assert_grown_with_results(out, kept)
    _no_partial(tmp_path)


@pytest.fixture
def tmpfs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill up (needs root/CAP_SYS_ADMIN): {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.parametrize("room", ["half-a-copy", "a-copy-but-not-the-new-artifact"])
def test_a_grow_on_a_full_disk_is_one_line_and_leaves_the_bundle_as_it_was(env, tmp_path, onnx_bundle, tmpfs, room):
    """Item 4: whether the disk fills while the bundle's artifacts are copied for the grow or while the new
    artifact is written: one line, exit 2, nothing left beside the bundle, the bundle as it was — on
    every try."""
    from edgeres.bundle import read_manifest

    out = _bundle_on_a_nearly_full_disk(tmpfs, onnx_bundle, half=room == "half-a-copy")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for _ in range(2):  # a second try meets the same full disk, not leftovers of the first
        code, _, stderr = _invoke(_grow(env, out))
        _assert_one_line(code, stderr, Case("full", None, "No space left on device", code=2), named=str(out))
        assert "free disk space" in stderr
        assert sorted(p.name for p in tmpfs.iterdir()) == ["o"], list(tmpfs.iterdir())
        assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
        read_manifest(out)


def _bundle_on_a_nearly_full_disk(tmpfs: Path, bundle: Path, half: bool) -> Path:
    """A copy of ``bundle`` on ``tmpfs``, shrunk to leave room for half a copy of its artifacts, or for a
    copy and 16 kB more (less than any new artifact)."""
    out = tmpfs / "o"
    shutil.copytree(bundle, out)
    listed = sum(r["size_bytes"] for r in _manifest_records(out))
    st = os.statvfs(tmpfs)
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    extra = listed // 2 if half else listed + 16 * 1024
    r = subprocess.run(["mount", "-o", f"remount,size={used + extra}", str(tmpfs)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


def test_a_worker_out_of_disk_in_a_grow_is_a_failed_row_and_leaves_no_half_artifact(env, tmp_path, onnx_bundle,
                                                                                   tmpfs):
    """Item 4 with the new artifact written by a worker process: its artifact is a failed row (exit 3), the
    kept ones stay byte for byte, nothing it half wrote is published, nothing is left beside the bundle."""
    out = _bundle_on_a_nearly_full_disk(tmpfs, onnx_bundle, half=False)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, _, stderr = _invoke(["convert", env["checkpoint"], "--targets", "onnx,openvino", "--precision", "fp32",
                               "--out", out, "--no-bench", "--jobs", "1"])
    assert code == 3, stderr
    rows = {a["target"]: a for a in _manifest(out)["artifacts"]}
    assert rows["onnx"]["status"] == "ok" and rows["openvino"]["status"] == "failed"
    kept = {rel for rel in before if rel.parts[0] == "onnx" or rel.name == "model.fp32.onnx"}
    assert all((out / rel).read_bytes() == before[rel] for rel in kept)
    assert not (out / "openvino").exists()
    assert sorted(p.name for p in tmpfs.iterdir()) == ["o"], list(tmpfs.iterdir())


def _manifest_records(out: Path) -> list[dict]:
    from edgeres.bundle import listed_files

    return listed_files(_manifest(out))
