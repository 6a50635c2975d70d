"""`edgeres bench` and the standalone runner: one fresh process per artifact and thread count."""

import ast
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.handmade_bundle import copy_bundle, shared_bundle


@pytest.fixture
def cli():
    """edgeres in this process: these tests read only its output, exit code and files."""
    from tests.conftest import run_cli_here

    return run_cli_here


RUNNER = ROOT / "edgeres" / "measure" / "bench_runner.py"
ROW_KEYS = {"target", "precision", "file", "threads", "status", "runtime", "size_mb", "load_ms", "first_ms",
            "p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "fps", "peak_rss_mb", "throttled", "warnings", "input"}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_model):
    return shared_bundle(tmp_path_factory, tiny_model)


@pytest.fixture(scope="module")
def benched(bundle, tmp_path_factory):
    """`bench --json --threads 1,2 --runs 20` on a copy of the ONNX + OpenVINO + TFLite bundle."""
    from tests.conftest import run_cli_here as run_cli

    work = copy_bundle(bundle, tmp_path_factory.mktemp("benched") / "b")
    r = run_cli("bench", work, "--threads", "1,2", "--runs", "20", "--warmup", "2", "--json")
    return work, r


def test_bench_json_has_a_row_per_artifact_and_thread_count(benched):
    _, r = benched
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    pairs = [(row["target"], row["precision"], row["threads"]) for row in result["results"]]
    assert pairs == [("onnx", "fp32", 1), ("onnx", "fp32", 2), ("openvino", "fp32", 1), ("openvino", "fp32", 2),
                     ("tflite", "int8", 1), ("tflite", "int8", 2)]
    for row in result["results"]:
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        assert row["status"] == "ok" and row["runs"] == 20
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert row["peak_rss_mb"] >= row["rss_before_load_mb"] > 0  # a tiny model may add less than 0.1 MB


def test_bench_stores_the_same_document_in_the_bundle(benched):
    work, r = benched
    assert json.loads((work / "bench.json").read_text()) == json.loads(r.stdout)


def test_bench_reports_sizes_of_all_artifact_files(benched):
    work, r = benched
    rows = {row["target"]: row for row in json.loads(r.stdout)["results"]}
    ir_bytes = (work / "openvino/model.fp32.xml").stat().st_size + (work / "openvino/model.fp32.bin").stat().st_size
    assert rows["openvino"]["size_mb"] == pytest.approx(ir_bytes / 1e6, abs=1e-3)


def test_bench_and_report_show_the_manifests_size_sidecars_included(bundle, tmp_path, cli):
    """One size per artifact, in MB of 10^6 bytes: every file the manifest records for it (a TFLite model's
    .json sidecars too), in bench.json, the bench table, the report and convert's summary (was: bench counted
    only the file the runtime loads, so ResNet-50's int8 .tflite read 26.32 MB in bench, 26.35 in report)."""
    from edgeres.bundle import MANIFEST, write_json_atomic
    from edgeres.measure.bench import bench_table
    from edgeres.tables import format_table
    from tests.handmade_bundle import _artifact

    work = copy_bundle(bundle, tmp_path / "b")
    (work / "onnx" / "model.fp32.json").write_text(json.dumps({"labels": ["x" * 10] * 500}))  # ~7 kB: +0.007 MB
    manifest = json.loads((work / MANIFEST).read_text())
    onnx = _artifact(work, "onnx", "fp32", ["onnx/model.fp32.onnx", "onnx/model.fp32.json"])
    write_json_atomic(work / MANIFEST, {**manifest, "artifacts": [onnx]})  # one runner: the reference is its copy
    r = cli("bench", work, "--runs", "2", "--warmup", "0", "--json")
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)["results"]
    mb = onnx["size_bytes"] / 1e6
    assert row["size_mb"] == round(mb, 4) and row["size_mb"] != round((work / onnx["file"]).stat().st_size / 1e6, 4)
    (reported,) = json.loads(cli("report", work, "--json").stdout)["artifacts"]
    assert reported["size_mb"] == row["size_mb"]
    shown = f"| {mb:.2f} "
    assert shown in format_table(*bench_table(json.loads(r.stdout))) and shown in cli("report", work).stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS the kernel keeps in /proc")
def test_peak_rss_is_in_megabytes_of_a_million_bytes_as_sizes_are():
    """The "RSS MB" column was KiB / 1024 (MiB): 4.9 % below the MB that sizes use."""
    from edgeres.measure.bench_runner import peak_rss_mb

    hwm_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    assert peak_rss_mb() == pytest.approx(hwm_kib * 1024 / 1e6, rel=0.01)  # MiB would be 4.9 % below


def test_inputs_follow_each_artifacts_layout_and_dtype(benched):
    _, r = benched
    inputs = {row["target"]: row["input"] for row in json.loads(r.stdout)["results"]}
    assert inputs["onnx"]["shape"] == [1, 3, 16, 16] and inputs["onnx"]["dtype"] == "float32"
    assert inputs["openvino"]["shape"] == [1, 3, 16, 16]
    assert inputs["tflite"]["shape"] == [1, 16, 16, 3] and inputs["tflite"]["dtype"] == "int8"


def test_bench_system_info_names_the_cpu(benched):
    _, r = benched
    system = json.loads(r.stdout)["system"]
    assert system["cpu_model"] and system["cpu_count"] >= 1 and "governor" in system
    assert json.loads(r.stdout)["host"] == "local"


def test_bench_prints_a_table_with_latency_columns(cli, bundle, tmp_path):
    work = copy_bundle(bundle, tmp_path / "b")
    r = cli("bench", work, "--runs", "5", "--warmup", "0")
    assert r.returncode == 0, r.stderr
    header = r.stdout.splitlines()[1]
    for col in ("target", "precision", "threads", "size MB", "load ms", "first ms", "p50 ms", "p90 ms", "p99 ms",
                "FPS", "RSS MB"):
        assert col in header
    assert sum(line.startswith("| onnx") or line.startswith("| openvino") or line.startswith("| tflite")
               for line in r.stdout.splitlines()) == 3


def test_a_broken_artifact_is_a_failed_row_and_the_others_still_run(cli, bundle, tmp_path):
    from edgeres.bundle import file_record, write_json_atomic

    work = copy_bundle(bundle, tmp_path / "b")
    (work / "openvino/model.fp32.xml").write_text("<net>not really</net>")
    manifest = json.loads((work / "manifest.json").read_text())
    ov = next(a for a in manifest["artifacts"] if a["target"] == "openvino")
    ov["file_records"][0] = file_record(work, "openvino/model.fp32.xml")  # sha matches: only the runtime can tell
    write_json_atomic(work / "manifest.json", manifest)
    r = cli("bench", work, "--runs", "5", "--warmup", "0", "--json")
    assert r.returncode == 3
    rows = {row["target"]: row for row in json.loads(r.stdout)["results"]}
    assert rows["openvino"]["status"] == "failed" and "openvino" in rows["openvino"]["error"]
    assert rows["onnx"]["status"] == "ok" and rows["tflite"]["status"] == "ok"


def test_reference_is_benched_when_no_artifact_is_a_copy_of_it(cli, bundle, tmp_path):
    from edgeres.bundle import write_json_atomic

    work = copy_bundle(bundle, tmp_path / "b")
    manifest = json.loads((work / "manifest.json").read_text())
    manifest["artifacts"] = [a for a in manifest["artifacts"] if a["target"] == "tflite"]
    write_json_atomic(work / "manifest.json", manifest)
    r = cli("bench", work, "--runs", "5", "--warmup", "0", "--json")
    assert r.returncode == 0, r.stderr
    assert [row["target"] for row in json.loads(r.stdout)["results"]] == ["reference", "tflite"]


@pytest.mark.parametrize("args", [["--threads", "0"], ["--threads", "two"], ["--runs", "0"],
                                  ["--runs", "5", "--seconds", "1"], ["--remote", "-oProxyCommand=x"]])
def test_bad_bench_options_exit_2_before_running_anything(cli, bundle, args):
    r = cli("bench", bundle, *args)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "error" in r.stderr


def test_bench_of_a_missing_bundle_exits_2(cli, tmp_path):
    r = cli("bench", tmp_path / "nope")
    assert r.returncode == 2 and "not a folder" in r.stderr


# --- the standalone runner -----------------------------------------------------------------------

ALLOWED_IMPORTS = {"argparse", "ctypes", "math", "glob", "json", "os", "platform", "resource", "signal", "subprocess", "sys",
                   "time", "warnings", "__future__", "numpy", "onnxruntime", "openvino", "ai_edge_litert", "tflite_runtime",
                   "onnx",  # onnx: only for intermediate tensors (per-layer error), which run on the host
                   "importlib", "executorch", "torch",  # ExecuTorch's Python runtime needs torch (its runtime_needs)
                   "openvino_telemetry"}  # openvino's own dependency: its usage reports sent only by consent


def test_runner_imports_only_stdlib_numpy_and_the_runtimes():
    tree = ast.parse(RUNNER.read_text())
    names = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert names <= ALLOWED_IMPORTS, names - ALLOWED_IMPORTS


def test_runner_works_copied_alone_to_another_folder(bundle, tmp_path):
    shutil.copy(RUNNER, tmp_path / "bench_runner.py")
    home = tmp_path / "home"
    home.mkdir()
    env = {**{k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "XDG_CACHE_HOME")},
           "HOME": str(home)}
    # -I: no PYTHONPATH, no cwd on sys.path — as on a device that has only numpy and the runtime
    out = subprocess.run([sys.executable, "-I", str(tmp_path / "bench_runner.py"), "--artifact",
                          str(bundle / "onnx/model.fp32.onnx"), "--seconds", "0.2", "--warmup", "0", "--json"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["status"] == "ok" and doc["runs"] >= 2 and doc["runtime"] == "onnxruntime"
    # onnxruntime, left alone, keeps a device ID and its usage reports there (and sends them)
    assert not (home / ".cache" / "Microsoft").exists(), sorted(map(str, home.rglob("*")))


def test_runner_reports_a_failure_as_json_with_exit_3(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not an onnx file")
    out = subprocess.run([sys.executable, str(RUNNER), "--artifact", str(bad), "--json"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 3
    doc = json.loads(out.stdout)
    assert doc["status"] == "failed" and "onnxruntime cannot load broken.onnx" in doc["error"]


def test_pi_throttling_flags_mark_the_run_throttled(bundle, tmp_path):
    fake = tmp_path / "bin" / "vcgencmd"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho throttled=0x50005\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run([sys.executable, str(RUNNER), "--artifact", str(bundle / "tflite/model.int8.tflite"),
                          "--runs", "3", "--warmup", "0", "--json"], capture_output=True, text=True, env=env, timeout=120)
    doc = json.loads(out.stdout)
    assert doc["throttled"] is True
    assert doc["system"]["throttled"] == {"raw": "0x50005", "now": ["under_voltage", "throttled"],
                                          "since_boot": ["under_voltage", "throttled"]}
    assert any("under_voltage" in w for w in doc["warnings"])


def test_decode_throttled_separates_now_from_since_boot():
    from edgeres.measure.bench_runner import decode_throttled

    assert decode_throttled(0) == {"raw": "0x0", "now": [], "since_boot": []}
    assert decode_throttled(0x80008) == {"raw": "0x80008", "now": ["soft_temp_limit"], "since_boot": ["soft_temp_limit"]}
    assert decode_throttled(0x20000)["since_boot"] == ["freq_capped"] and decode_throttled(0x20000)["now"] == []
    assert decode_throttled(0x2)["now"] == ["freq_capped"]


def test_a_remote_python_under_home_is_expanded_by_the_remote_shell():
    from edgeres.measure.bench import remote_word

    assert remote_word("~/venv/bin/python") == '"$HOME"/venv/bin/python'
    assert remote_word("/usr/bin/python3") == "/usr/bin/python3"
    assert remote_word("py; rm -rf /") == "'py; rm -rf /'"
