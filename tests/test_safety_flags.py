"""Flags, table-driven: every bad flag of every command is refused in one line (exit 2) before any work
starts (no model loaded, no data read, nothing measured), and a conversion that fails once its staging
folder exists leaves nothing behind."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import stat
from pathlib import Path

import pytest

from edgeres import cli
from edgeres.calibration import DataError
from edgeres.targets.base import TargetError
from tests.conftest import run_cli_process
from tests.test_safety import Case, _assert_one_line, _invoke, _no_partial, env, runner  # noqa: F401


@pytest.fixture
def no_work(monkeypatch):
    """Loading, reading data, benchmarking, reporting or training fail the test: flags come first."""
    from edgeres import calibration
    import edgeres.measure.bench
    import edgeres.demo
    import edgeres.sources.loading
    import edgeres.convert.run
    import edgeres.measure.report

    def started(*args, **kwargs):
        raise AssertionError("work started before the flags were checked")

    for module, name in [(edgeres.sources.loading, "load_model"), (calibration, "open_dataset"),
                         (edgeres.convert.run, "open_dataset"), (edgeres.measure.bench, "bench_bundle"),
                         (edgeres.measure.report, "write_report"), (edgeres.demo, "run_demo")]:
        monkeypatch.setattr(module, name, started)
    if importlib.util.find_spec("ray") is not None:  # sweep imports these by name: its copies are what it calls
        import edgeres.measure.bundle_eval
        import edgeres.measure.remote_eval
        import edgeres.sweep.run

        for module, name in [(edgeres.sweep.run, "load_model"), (edgeres.sweep.run, "open_dataset"),
                             (edgeres.sweep.run, "ray_session"), (edgeres.measure.bundle_eval, "evaluate_path"),
                             (edgeres.measure.remote_eval, "evaluate_bundle_remote")]:
            monkeypatch.setattr(module, name, started)


def _convert(t: Path, e: dict, *extra) -> list:
    return ["convert", e["checkpoint"], "--targets", "onnx", "--precision", "int8", "--calib", e["npz"],
            "--out", t / "bundle", *extra]


def _option(value: str):
    return lambda t, e: _convert(t, e, "--option", value)


# a bad --option used to surface only after export and calibration (exit 3), leaving a .partial-* folder
OPTION_CASES = [
    Case("onnx-unknown-key", _option("onnx.no_such_key=1"), "unknown option onnx.no_such_key"),
    Case("onnx-per-channel-int", _option("onnx.per_channel=1"), "onnx.per_channel=1: choose true or false"),
    Case("onnx-reduce-range-word", _option("onnx.reduce_range=maybe"), "onnx.reduce_range=maybe: choose true or false"),
    Case("onnx-activation-type", _option("onnx.activation_type=int4"), "onnx.activation_type=int4: choose one of uint8, int8"),
    Case("onnx-float-nodes-number", _option("onnx.float_nodes=5"), "onnx.float_nodes=5: give names separated by commas"),
    Case("onnx-threads-word", _option("onnx.threads=many"), "unknown option onnx.threads"),
    Case("int8-unknown-key", _option("int8.no_such_key=1"), "unknown option int8.no_such_key"),
    Case("int8-reduce-range-word", _option("int8.reduce_range=maybe"), "int8.reduce_range=maybe: choose true or false"),
    Case("openvino-unknown-key", _option("openvino.colour=1"), "unknown option openvino.colour"),
    Case("openvino-engine", _option("openvino.engine=tensorrt"), "openvino.engine=tensorrt: choose one of qdq, nncf"),
    Case("openvino-embed-word", _option("openvino.embed_preprocess=maybe"), "embed_preprocess=maybe: choose true or false"),
    Case("openvino-hint", _option("openvino.hint=fast"), "openvino.hint=fast: choose one of"),
    Case("openvino-threads-zero", _option("openvino.threads=0"), "unknown option openvino.threads"),
    Case("tflite-unknown-key", _option("tflite.iio=uint8"), "unknown option tflite.iio"),
    Case("tflite-io", _option("tflite.io=int4"), "tflite.io=int4: choose one of"),
    Case("tflite-ranges", _option("tflite.ranges=guess"), "tflite.ranges=guess: choose one of"),
    Case("tflite-threads-float", _option("tflite.threads=1.5"), "unknown option tflite.threads"),
]


@pytest.mark.parametrize("case", OPTION_CASES, ids=lambda c: c.id)
def test_bad_target_option_is_refused_before_any_work(env, tmp_path, no_work, case):
    code, _, stderr = _invoke(case.make(tmp_path, env))
    _assert_one_line(code, stderr, case)
    assert "exporting" not in stderr and "calibrating" not in stderr, stderr
    assert not (tmp_path / "bundle").exists()
    _no_partial(tmp_path)


def test_bad_option_leaves_no_bundle_and_no_partial_folder(env, tmp_path):
    """The issue's run: it used to export and calibrate, exit 3 and leave a 1.1 MB .partial-* each time."""
    code, _, stderr = _invoke(_convert(tmp_path, env, "--no-bench", "--option", "onnx.no_such_key=1"))
    _assert_one_line(code, stderr, Case("no-such-key", None, "unknown option onnx.no_such_key"))
    assert not (tmp_path / "bundle").exists()
    _no_partial(tmp_path)


def _eval(*extra, model=False):
    return lambda t, e: ["eval", e["checkpoint"] if model else e["bundle"], "--data", e["npz"], *extra]


def _bench(*extra):
    return lambda t, e: ["bench", e["bundle"], *extra]


def _prune(*extra):
    return lambda t, e: ["prune", e["checkpoint"], "--ratio", "0.3", "--out", t / "pruned.pt", *extra]


TOO_MANY_THREADS = "must be at most 256 \\(more threads than an edge CPU has cores"

NUMBER_CASES = [
    # eval
    Case("eval-threads-zero", _eval("--threads", "0"), "--threads 0: must be at least 1"),
    Case("eval-threads-negative", _eval("--threads", "-1"), "--threads -1: must be at least 1"),
    Case("eval-threads-huge", _eval("--threads", "100000"), "--threads 100000: " + TOO_MANY_THREADS),
    Case("eval-model-threads-huge", _eval("--threads", "100000", model=True), "--threads 100000: " + TOO_MANY_THREADS),
    Case("eval-limit-zero", _eval("--limit", "0"), "--limit 0: must be at least 1"),
    Case("eval-limit-negative", _eval("--limit", "-3"), "--limit -3: must be at least 1"),
    Case("eval-layers-of-a-model", _eval("--layers", model=True), "--layers: .*not a bundle directory"),
    # convert
    Case("convert-eval-images-zero", lambda t, e: _convert(t, e, "--eval", e["npz"], "--eval-images", "0"),
         "--eval-images 0: must be at least 1"),
    Case("convert-threads-huge", lambda t, e: _convert(t, e, "--threads", "100000"), "--threads 100000: " + TOO_MANY_THREADS),
    Case("convert-calib-images-negative", lambda t, e: _convert(t, e, "--calib-images", "-5"), "--calib-images -5: must be at least 1"),
    Case("convert-bench-threads-huge", lambda t, e: _convert(t, e, "--bench-threads", "1,100000"),
         "--bench-threads 100000: " + TOO_MANY_THREADS),
    Case("convert-bench-runs-zero", lambda t, e: _convert(t, e, "--bench-runs", "0"), "--bench-runs 0: must be at least 1"),
    Case("convert-epochs-negative", lambda t, e: _convert(t, e, "--prune", "0.3", "--epochs", "-1"), "--epochs -1: must be at least 0"),
    Case("convert-epochs-without-data", lambda t, e: _convert(t, e, "--prune", "0.3", "--epochs", "2"),
         "--epochs 2: fine-tuning needs training images"),
    # bench
    Case("bench-seconds-nan", _bench("--seconds", "nan"), "--seconds nan: must be a finite number"),
    Case("bench-seconds-inf", _bench("--seconds", "inf"), "--seconds inf: must be a finite number"),
    Case("bench-seconds-huge", _bench("--seconds", "1e9"), "--seconds 1e\\+09: must be at most 600 \\(each run is stopped"),
    Case("bench-threads-huge", _bench("--threads", "1,100000"), "--threads 100000: " + TOO_MANY_THREADS),
    Case("bench-batch-huge", _bench("--batch", "100000"), "--batch 100000: must be at most 1024"),
    # report
    Case("report-threads-zero", lambda t, e: ["report", e["bundle"], "--threads", "0"], "--threads 0: must be at least 1"),
    Case("report-threads-huge", lambda t, e: ["report", e["bundle"], "--threads", "100000"], "--threads 100000: " + TOO_MANY_THREADS),
    # prune
    Case("prune-seed-negative", _prune("--seed", "-1"), "--seed -1: must be at least 0"),
    Case("prune-batch-size-zero", _prune("--batch-size", "0"), "--batch-size 0: must be at least 1"),
    Case("prune-eval-images-zero", _prune("--eval", "x.npz", "--eval-images", "0"), "--eval-images 0: must be at least 1"),
    # demo
    Case("demo-train-seconds-nan", lambda t, e: ["demo", "--out", t / "demo", "--train-seconds", "nan"],
         "--train-seconds nan: must be a finite number"),
    Case("demo-train-seconds-zero", lambda t, e: ["demo", "--out", t / "demo", "--train-seconds", "0"],
         "--train-seconds 0: must be positive"),
]


def _sweep(t: Path, e: dict, *extra) -> list:
    pytest.importorskip("ray", reason="edgeres sweep needs Ray")
    return ["sweep", e["checkpoint"], "--calib", e["npz"], "--eval", e["npz"], "--targets", "onnx", "--out",
            t / "sw", *extra]


REMOTE_EXPECT = "expected USER@HOST \\(or an ssh config alias\\)"

# issue 33: an empty --remote ran here without a word, a half address reached ssh, --epochs did nothing
FLAG_CASES = [
    Case("bench-remote-empty", _bench("--remote", ""), "--remote '': empty; " + REMOTE_EXPECT),
    Case("bench-remote-no-host", _bench("--remote", "pi@"), "--remote 'pi@': the host is missing; " + REMOTE_EXPECT),
    Case("bench-remote-no-user", _bench("--remote", "@pi5"), "--remote '@pi5': the user is missing"),
    Case("bench-remote-option", _bench("--remote", "-oProxyCommand=x"), "--remote '-oProxyCommand=x': " + REMOTE_EXPECT),
    Case("bench-remote-control-char", _bench("--remote", "pi@host\x1b"), "--remote 'pi@host\\\\x1b': " + REMOTE_EXPECT),
    Case("eval-remote-empty", _eval("--remote", ""), "--remote '': empty"),
    Case("eval-remote-no-host", _eval("--remote", "pi@"), "--remote 'pi@': the host is missing"),
    Case("sweep-remote-empty", lambda t, e: _sweep(t, e, "--remote", ""), "--remote '': empty"),
    Case("sweep-remote-no-host", lambda t, e: _sweep(t, e, "--remote", "pi@"), "--remote 'pi@': the host is missing"),
    Case("sweep-epochs-without-data", lambda t, e: _sweep(t, e, "--epochs", "3"),
         "--epochs 3: fine-tuning needs training images; give --finetune-data"),
    Case("sweep-epochs-negative", lambda t, e: _sweep(t, e, "--epochs", "-1"), "--epochs -1: must be at least 0"),
]


@pytest.mark.parametrize("case", NUMBER_CASES + FLAG_CASES, ids=lambda c: c.id)
def test_bad_number_is_refused_before_any_work(env, tmp_path, onnx_bundle, no_work, case):
    bundle = tmp_path / "b"
    shutil.copytree(onnx_bundle, bundle)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, _, stderr = _invoke(case.make(tmp_path, {**env, "bundle": bundle}))
    _assert_one_line(code, stderr, case)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written, not even eval.json


# -- usage errors: one line naming the command, for CliRunner and the console script alike ----------------

USAGE_CASES = [
    Case("unknown-option", lambda t, e: ["convert", e["checkpoint"], "--out", t / "o", "--bogus"],
         "^edgeres: error: No such option: --bogus.*; see edgeres convert --help$"),
    Case("missing-argument", lambda t, e: ["convert"], "^edgeres: error: Missing argument 'MODEL'; see edgeres convert --help$"),
    Case("missing-option", lambda t, e: ["eval", e["checkpoint"]], "Missing option '--data'; see edgeres eval --help$"),
    Case("missing-value", lambda t, e: ["bench", e["checkpoint"], "--seconds"],
         "Option '--seconds' requires an argument; see edgeres bench --help$"),
    Case("bad-int", lambda t, e: ["eval", e["checkpoint"], "--data", e["npz"], "--limit", "ten"],
         "Invalid value for '--limit'.*; see edgeres eval --help$"),
    Case("bad-float", lambda t, e: ["bench", e["checkpoint"], "--seconds", "soon"],
         "Invalid value for '--seconds'.*; see edgeres bench --help$"),
    Case("extra-argument", lambda t, e: ["zoo", "resnet20"], "unexpected extra argument.*; see edgeres zoo --help$"),
    Case("unknown-command", lambda t, e: ["convrt"], "No such command 'convrt'.*; see edgeres --help$"),
    Case("unknown-global-option", lambda t, e: ["--verbose", "zoo"], "No such option: --verbose.*see edgeres --help$"),
]


def _assert_usage_line(code: int, stderr: str, case: Case):
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1, stderr  # the whole of stderr: no box around it
    assert re.search(case.expect, lines[0], re.IGNORECASE), lines[0]


@pytest.mark.parametrize("case", USAGE_CASES, ids=lambda c: c.id)
def test_usage_error_is_one_line(env, tmp_path, case):
    code, stdout, stderr = _invoke(case.make(tmp_path, env))
    _assert_usage_line(code, stderr, case)
    assert stdout == ""


@pytest.mark.parametrize("case", [USAGE_CASES[0], USAGE_CASES[4]], ids=lambda c: c.id)
def test_usage_error_is_one_line_from_the_console_script(env, tmp_path, case):
    r = run_cli_process(*case.make(tmp_path, env), timeout=120)
    _assert_usage_line(r.returncode, r.stderr, case)


def test_no_arguments_still_prints_the_help(env):
    code, stdout, stderr = _invoke([])
    assert "Usage" in stdout + stderr and "edgeres: error" not in stderr


# -- eval --layers: checked before eval.json is written, and no eval.json when it fails ----------------------

def test_eval_layers_without_int8_writes_no_eval_json(env, tmp_path, onnx_bundle):
    bundle = tmp_path / "b"
    shutil.copytree(onnx_bundle, bundle)  # fp32 only: per-layer SQNR has no int8 model to measure
    assert not (bundle / "eval.json").exists()
    code, _, stderr = _invoke(["eval", bundle, "--data", env["npz"], "--layers"])
    _assert_one_line(code, stderr, Case("layers", None, "has no int8 artifact; --layers needs one"))
    assert not (bundle / "eval.json").exists()
    _no_partial(tmp_path)


# -- a conversion failing after its staging folder exists leaves nothing behind -----------------------------

def _fail_in_quantizer(error: BaseException):
    def quantize_qdq(*args, **kwargs):
        raise error

    return quantize_qdq


@pytest.mark.parametrize("error, code", [
    pytest.param(TargetError("the quantizer crashed"), 3, id="target-error"),
    pytest.param(RuntimeError("a bug"), 1, id="bug"),
    pytest.param(DataError("a bad batch"), 2, id="data-error"),
])
def test_failure_after_staging_began_leaves_no_partial_folder(env, tmp_path, monkeypatch, error, code):
    from edgeres.convert import build

    monkeypatch.setattr(build, "quantize_qdq", _fail_in_quantizer(error))
    out = tmp_path / "bundle"
    exit_code, _, stderr = _invoke(_convert(tmp_path, env, "--no-bench"))
    assert exit_code == code, stderr
    assert "calibrating" in stderr, stderr  # it did fail after staging began
    assert not out.exists()
    _no_partial(tmp_path)


def test_interrupted_conversion_keeps_its_steps_for_resuming(env, tmp_path, monkeypatch):
    from edgeres.convert import build

    real = build.quantize_qdq
    monkeypatch.setattr(build, "quantize_qdq", _fail_in_quantizer(KeyboardInterrupt()))
    code, _, stderr = _invoke(_convert(tmp_path, env, "--no-bench"))
    assert code == 130, stderr
    assert len(list(tmp_path.glob(".bundle.partial-*"))) == 1
    monkeypatch.setattr(build, "quantize_qdq", real)
    code, _, stderr = _invoke(_convert(tmp_path, env, "--no-bench"))
    assert code == 0 and "reusing the finished steps" in stderr, stderr
    _no_partial(tmp_path)


# -- the suggested ssh command is shell-quoted ----------------------------------------------------------------

def test_ssh_hint_quotes_the_host(env, tmp_path, onnx_bundle):
    fake = tmp_path / "bin"
    fake.mkdir()
    ssh = fake / "ssh"
    ssh.write_text("#!/bin/sh\necho 'ssh: connect to host ::1 port 22: Connection refused' >&2\nexit 255\n")
    ssh.chmod(ssh.stat().st_mode | stat.S_IXUSR)
    host = "ssh://pi@[::1]:22"  # a valid ssh destination that a shell would glob
    result = runner.invoke(cli.app, ["bench", str(onnx_bundle), "--remote", host],
                           env={"PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"})
    _assert_one_line(result.exit_code, result.stderr, Case("ssh", None, "ssh failed", code=3))
    assert "`ssh -o BatchMode=yes 'ssh://pi@[::1]:22' true`" in result.stderr, result.stderr
