"""`edgeres report`: one table from stored manifest + eval.json + bench.json, Markdown and self-contained HTML."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from edgeres.bundle import write_json_atomic
from edgeres.measure.report import load_report, pareto_front, report_table, waterfall_bars, write_report


@pytest.fixture
def cli():
    """edgeres in this process: these tests read only its output, exit code and files."""
    from tests.conftest import run_cli_here

    return run_cli_here

LAYERS = [{"name": f"layer{i}.conv", "op": "Conv", "sqnr_db": 30.0 - i} for i in range(6)]


def _artifact(bundle, target, precision, file, size):
    return {"target": target, "precision": precision, "file": file, "size_bytes": size, "status": "ok",
            "file_records": [_file(bundle, file, size)]}


def _file(bundle: Path, rel: str, size: int) -> dict:
    from edgeres.bundle import file_record

    (bundle / rel).parent.mkdir(parents=True, exist_ok=True)
    (bundle / rel).write_bytes(bytes(size))  # never loaded: the report reads stored results only
    return file_record(bundle, rel)


def make_results_bundle(root: Path, *, evaluated=True, benched=True, pruning=True) -> Path:
    """A bundle with stored results only: the report must never need the model files."""
    from edgeres.model.zoo import get_spec

    spec = get_spec("resnet20")
    bundle = root / "bundle"
    bundle.mkdir()
    manifest = {
        "format": "edgeres-bundle", "format_version": 1, "arch": spec.to_dict(), "cost": spec.cost(),
        "preprocess": spec.preprocess.to_dict(), "source": {"path": "resnet20.th"},
        "pruning": {"ratio": 0.3, "top1_before": 91.5, "top1_after_prune": 85.0, "top1_after": 91.0} if pruning else None,
        "calibration": {"images": 300, "source": "calib.npz", "estimator": "percentile"},
        "reference": {**_file(bundle, "model.fp32.onnx", 1_000_000), "precision": "fp32"},
        "artifacts": [_artifact(bundle, "onnx", "int8", "onnx/model.int8.onnx", 300_000),
                      _artifact(bundle, "openvino", "int8", "openvino/model.int8.xml", 320_000),
                      {"target": "tflite", "precision": "int8", "status": "failed",
                       "error": "converter <crashed> & stopped", "files": [], "file_records": []}],
    }
    write_json_atomic(bundle / "manifest.json", manifest)
    if evaluated:
        write_json_atomic(bundle / "eval.json", {
            "reference": {"top1": 91.0, "top5": 99.7}, "images": 500, "data": "dev.npz", "layers": LAYERS,
            "artifacts": [{"target": "onnx", "precision": "int8", "file": "onnx/model.int8.onnx", "top1": 90.6,
                           "top1_drop_pp": 0.4},
                          {"target": "openvino", "precision": "int8", "file": "openvino/model.int8.xml",
                           "top1": 90.9, "top1_drop_pp": 0.1}]})
    if benched:
        rows = []
        for target, file, ms in (("onnx", "onnx/model.int8.onnx", 2.0), ("openvino", "openvino/model.int8.xml", 3.0)):
            for threads in (1, 2):
                rows.append({"target": target, "precision": "int8", "file": file, "threads": threads, "status": "ok",
                             "p50_ms": ms / threads, "p90_ms": 1.2 * ms / threads, "fps": 1000 * threads / ms,
                             "size_mb": 0.3, "throttled": False})
        write_json_atomic(bundle / "bench.json", {
            "schema": "edgeres-bench/1", "host": "local", "settings": {"batch": 1, "runs": 20, "warmup": 2, "threads": [1, 2]},
            "system": {"cpu_model": "Test CPU", "governor": "performance"}, "results": rows})
    return bundle


@pytest.fixture
def bundle(tmp_path):
    return make_results_bundle(tmp_path)


def test_report_table_has_the_reference_every_artifact_and_the_failed_one(bundle):
    headers, rows = report_table(bundle)
    assert headers == ["Target", "Precision", "Size MB", "Top-1", "Drop pp", "Drop 95% CI", "Agree %", "p50 ms",
                       "p90 ms", "FPS", "Threads", "Status"]
    assert [r[:2] for r in rows] == [["reference", "fp32"], ["onnx", "int8"], ["openvino", "int8"], ["tflite", "int8"]]
    assert rows[1] == ["onnx", "int8", "0.30", "90.60", "0.40", "", "", "1.00", "1.20", "1000.0", "2", "ok"]
    assert rows[3][-1] == "failed: converter <crashed> & stopped"


def test_report_shows_the_largest_benchmarked_thread_count_unless_told(bundle):
    assert report_table(bundle)[1][2][7] == "1.50"  # openvino p50 at 2 threads
    assert report_table(bundle, threads=1)[1][2][7] == "3.00"


def test_report_refuses_a_thread_count_that_was_not_benchmarked(cli, bundle):
    r = cli("report", bundle, "--threads", "8")
    assert r.returncode == 2 and "have results for 1, 2 threads" in r.stderr


def test_report_without_stored_results_lists_artifacts_and_says_what_to_run(tmp_path):
    bundle = make_results_bundle(tmp_path, evaluated=False, benched=False)
    _, rows = report_table(bundle)
    assert rows[1] == ["onnx", "int8", "0.30", "", "", "", "", "", "", "", "", "ok"]
    text = write_report(bundle)["markdown_text"]
    assert "edgeres eval DIR" in text and "edgeres bench DIR" in text


def test_a_failed_benchmark_shows_in_the_status(bundle):
    bench = json.loads((bundle / "bench.json").read_text())
    for r in bench["results"]:
        if r["target"] == "openvino":
            r.update(status="failed", error="openvino cannot load model.int8.xml")
            del r["p50_ms"]
    write_json_atomic(bundle / "bench.json", bench)
    row = report_table(bundle)[1][2]
    assert row[7] == "" and row[-1] == "bench failed: openvino cannot load model.int8.xml"


def test_report_refuses_a_bundle_whose_files_changed(cli, bundle):
    (bundle / "onnx/model.int8.onnx").write_bytes(b"changed")
    r = cli("report", bundle)
    assert r.returncode == 2 and "size or sha256 differs" in r.stderr


def test_report_prints_markdown_and_writes_report_md(cli, bundle):
    r = cli("report", bundle)
    assert r.returncode == 0, r.stderr
    assert re.search(r"\| onnx +\| int8 +\| 0.30 +\| 90.60 \| 0.40 +\| +\| +\| 1.00 +\| 1.20 +\| 1000.0 \| 2 +\| ok",
                     r.stdout), r.stdout
    assert (bundle / "report.md").read_text().strip() == r.stdout.strip()
    assert not (bundle / "report.html").exists()


def test_pareto_front_keeps_points_no_other_beats_on_both_axes():
    points = [(1.0, 90.0), (2.0, 91.0), (1.5, 89.0), (3.0, 91.0), (0.5, 80.0)]
    assert pareto_front(points) == [(0.5, 80.0), (1.0, 90.0), (2.0, 91.0)]


def test_waterfall_chains_pruning_then_branches_each_target_from_the_reference(bundle):
    bars = waterfall_bars(load_report(bundle))
    assert bars == [("original fp32", 0.0, 91.5, True), ("pruning", 91.5, 85.0, False),
                    ("fine-tune", 85.0, 91.0, False), ("fp32 reference", 0.0, 91.0, True),
                    ("onnx int8", 91.0, 90.6, False), ("openvino int8", 91.0, 90.9, False)]


def test_html_is_self_contained_with_three_embedded_plots(bundle):
    out = write_report(bundle, html_out=True)
    page = out["html"].read_text()
    assert len(re.findall(r'<img alt="[^"]+" src="data:image/png;base64,', page)) == 2
    assert page.count("<svg") == 1  # the accuracy-vs-latency chart, inline
    assert not re.search(r'(src|href)="(https?:|//|file:)', page)
    assert "converter &lt;crashed&gt; &amp; stopped" in page
    assert {p.name for p in (bundle / "plots").iterdir()} == {"accuracy_vs_latency.png", "accuracy_vs_latency.svg",
                                                             "accuracy_waterfall.png", "layer_sqnr.png"}


def test_html_omits_plots_it_has_no_data_for(tmp_path):
    bundle = make_results_bundle(tmp_path, benched=False, pruning=False)
    out = write_report(bundle, html_out=True)
    assert sorted(out["plots"]) == ["Accuracy lost per step", "Per-layer SQNR (int8)"]


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_html_report_renders_in_headless_chromium(bundle, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    page = write_report(bundle, html_out=True)["html"]
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           "--virtual-time-budget=10000", "--dump-dom", page.resolve().as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    # the page's own script counts images that decoded (naturalWidth > 0) once everything loaded
    assert 'data-images-decoded="2/2"' in dom, dom[:500]
    rows = re.findall(r'<tr class="(ok|failed)" data-target="(\w+)" data-precision="(\w+)">', dom)
    assert rows == [("ok", "reference", "fp32"), ("ok", "onnx", "int8"), ("ok", "openvino", "int8"),
                    ("failed", "tflite", "int8")]


# -- damaged results are skipped or refused in one line, never shown as numbers (issue 33) -------------

def _nan_top1(bundle: Path) -> str:
    doc = json.loads((bundle / "eval.json").read_text())
    doc["artifacts"][0]["top1"] = float("nan")  # json.dumps writes NaN, which json.loads reads back
    (bundle / "eval.json").write_text(json.dumps(doc))
    return "artifacts[0].top1"


def _infinite_reference(bundle: Path) -> str:
    doc = json.loads((bundle / "eval.json").read_text())
    doc["reference"]["top5"] = float("inf")
    (bundle / "eval.json").write_text(json.dumps(doc))
    return "reference.top5"


def _nan_latency(bundle: Path) -> str:
    doc = json.loads((bundle / "bench.json").read_text())
    doc["results"][2]["p50_ms"] = float("nan")
    (bundle / "bench.json").write_text(json.dumps(doc))
    return "results[2].p50_ms"


@pytest.mark.parametrize("damage, name", [(_nan_top1, "eval.json"), (_infinite_reference, "eval.json"),
                                          (_nan_latency, "bench.json")], ids=["nan-top1", "inf-top5", "nan-p50"])
def test_a_kept_result_with_a_non_finite_number_is_skipped_as_damaged(tmp_path, damage, name):
    from typer.testing import CliRunner

    from edgeres import cli

    bundle = make_results_bundle(tmp_path)
    where = damage(bundle)
    r = CliRunner().invoke(cli.app, ["report", str(bundle)])
    assert r.exit_code == 0, r.stderr
    assert f"ignored damaged {bundle / name} ({where} is not a finite number)" in r.stderr
    assert "nan" not in r.stdout.lower() and "inf " not in r.stdout.lower(), r.stdout


def _sweep_doc() -> dict:
    row = {"name": "prune0-onnx-int8-mse-t1", "status": "ok", "prune": 0.0, "precision": "int8", "target": "onnx",
           "estimator": "mse", "threads": 1, "bundle": "prune0-onnx-int8-mse", "top1": 90.5, "top1_drop_pp": 0.5,
           "conversion_drop_pp": 0.5, "agreement_pct": 98.0, "p50_ms": 1.5, "p90_ms": 1.7, "fps": 600.0,
           "size_mb": 0.3, "macs": 41_000_000, "error": None}
    failed = {**row, "name": "prune0-tflite-int8-mse-t1", "target": "tflite", "status": "failed", "top1": None,
              "top1_drop_pp": None, "agreement_pct": None, "p50_ms": None, "size_mb": None, "error": "converter died"}
    return {"schema": "edgeres-sweep/1", "objective": "latency", "accuracy_budget_pp": 1.0, "wall_s": 12.0,
            "engine": {"name": "ray", "ray_version": "2.60.0", "mode": "embedded", "address": "127.0.0.1:6379",
                       "nodes": 1, "cpus": 2.0, "bench_slots": 1.0, "object_store_mb": 80},
            "baseline": {"top1": 91.0, "images": 500, "what": "the unpruned fp32 model"}, "shared": {},
            "trials": [row, failed], "pareto": [row["name"]], "best": dict(row)}


def _without(*path):
    def damage(doc):
        for key in path[:-1]:
            doc = doc[key]
        del doc[path[-1]]
    return damage


def _set(value, *path):
    def damage(doc):
        for key in path[:-1]:
            doc = doc[key]
        doc[path[-1]] = value
    return damage


SWEEP_FAULTS = [
    ("no-trials", _without("trials"), "trials is missing"),
    ("no-engine", _without("engine"), "engine is missing"),
    ("engine-without-cpus", _without("engine", "cpus"), "engine.cpus is missing"),
    ("baseline-without-top1", _without("baseline", "top1"), "baseline.top1 is missing"),
    ("trial-without-name", _without("trials", 0, "name"), "trials\\[0\\].name is missing"),
    ("trial-without-status", _without("trials", 1, "status"), "trials\\[1\\].status is missing"),
    ("trial-prune-text", _set("0.3", "trials", 0, "prune"), 'trials\\[0\\].prune is "0.3", not a finite number'),
    ("trial-top1-nan", _set(float("nan"), "trials", 0, "top1"), "trials\\[0\\].top1 is NaN, not a finite number"),
    ("trial-not-object", _set(3, "trials", 1), "trials\\[1\\] is not an object"),
    ("best-without-p50", _without("best", "p50_ms"), "best.p50_ms is missing"),
    ("pareto-numbers", _set([1], "pareto"), "pareto is not a list of trial names"),
    ("not-an-object", lambda doc: doc.clear() or doc.update(x=1), "objective is missing|engine is missing"),
]


def test_a_whole_sweep_document_reports(tmp_path):
    from typer.testing import CliRunner

    from edgeres import cli

    (tmp_path / "sweep.json").write_text(json.dumps(_sweep_doc()))
    r = CliRunner().invoke(cli.app, ["report", str(tmp_path)])
    assert r.exit_code == 0, r.stderr
    assert "prune0-onnx-int8-mse-t1 ★" in r.stdout and "failed: converter died" in r.stdout


@pytest.mark.parametrize("name, damage, expect", SWEEP_FAULTS, ids=[f[0] for f in SWEEP_FAULTS])
def test_a_damaged_sweep_document_is_refused_in_one_line(tmp_path, name, damage, expect):
    from typer.testing import CliRunner

    from edgeres import cli

    doc = _sweep_doc()
    damage(doc)
    (tmp_path / "sweep.json").write_text(json.dumps(doc))
    r = CliRunner().invoke(cli.app, ["report", str(tmp_path)])
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1, r.stderr
    assert re.search(f"sweep.json: damaged \\(({expect})\\); re-run the same `edgeres sweep`", lines[0]), lines[0]
    assert not (tmp_path / "sweep.md").exists()  # nothing written from a damaged document
