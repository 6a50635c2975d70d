"""Issue 23: results a user can trust and script — kept runs, JSON, confidence intervals, one sign, CLI hygiene."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgeres import cli
from edgeres.measure.paired import (PairedCounts, drop_interval_pp, pack_bits, paired_counts, unpack_bits)
from edgeres.measure.report import (draw_accuracy_vs_latency, load_report, pareto_front, results_document,
                                    waterfall_bars, write_report)
from tests.conftest import ROOT, in_process_argv, make_images, run_cli, run_cli_process
from tests.test_report import make_results_bundle

runner = CliRunner()


def invoke(*args):
    r = runner.invoke(cli.app, in_process_argv(args))
    return r.exit_code, r.stdout, r.stderr


# --- the drop's 95 % interval ---------------------------------------------------------------------

def test_the_drop_interval_covers_the_true_drop_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    cells = np.array([0.88, 0.02, 0.01, 0.09])  # both right, ref only, artifact only, both wrong: true drop 1 pp
    hits = 0
    for _ in range(1000):
        c = PairedCounts(*(int(v) for v in rng.multinomial(500, cells)))
        lo, hi = drop_interval_pp(c)
        hits += lo <= 1.0 <= hi
    assert 0.93 <= hits / 1000 <= 0.985, hits


def test_identical_predictions_still_get_an_interval_not_zero_width():
    lo, hi = drop_interval_pp(PairedCounts(4500, 0, 0, 500))
    assert lo < 0 < hi and hi - lo < 0.2  # 5000 images, no disagreement: within ±0.1 pp


def test_the_interval_holds_the_estimate_and_counts_come_back_from_the_bits():
    rng = np.random.default_rng(1)
    ref, art = rng.random(5000) < 0.9, rng.random(5000) < 0.9
    c = paired_counts(unpack_bits(pack_bits(ref), 5000), unpack_bits(pack_bits(art), 5000))
    assert c == paired_counts(ref, art) and c.images == 5000
    lo, hi = drop_interval_pp(c)
    assert lo < c.drop_pp < hi
    assert c.drop_pp == pytest.approx(100 * (ref.mean() - art.mean()))


# --- kept runs ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kept(tmp_path_factory, tiny_checkpoint, tiny_npz):
    """A tiny onnx fp32+int8 bundle, evaluated on all images, then on part of them, and benchmarked twice."""
    from edgeres.calibration import open_dataset
    from edgeres.measure.bench import BenchConfig, bench_bundle
    from edgeres.measure.bundle_eval import evaluate_path

    out = tmp_path_factory.mktemp("kept") / "b"
    code, _, stderr = invoke("convert", tiny_checkpoint, "--targets", "onnx", "--precision", "fp32,int8", "--calib",
                             tiny_npz, "--eval", tiny_npz, "--no-bench", "--out", out)
    assert code == 0, stderr
    data = open_dataset(tiny_npz)
    layered = evaluate_path(out, data, layers=True)
    partial = evaluate_path(out, data, limit=20)
    bench_bundle(out, BenchConfig(threads=(1, 2), runs=3, warmup=0))
    bench_bundle(out, BenchConfig(threads=(1,), runs=3, warmup=0))
    return {"bundle": out, "layered": layered, "partial": partial}


def test_every_eval_run_is_kept_and_a_partial_one_is_marked(kept):
    runs = sorted(p.stem for p in (kept["bundle"] / "evals").glob("*.json"))
    assert len(runs) == 3  # convert's, --layers, --limit 20
    assert kept["partial"]["partial"] is True and kept["partial"]["images"] == 20
    assert kept["layered"]["partial"] is False and kept["layered"]["dataset_images"] == 64
    assert kept["layered"]["data_fingerprint"] and kept["layered"]["threads"] is None
    latest = json.loads((kept["bundle"] / "eval.json").read_text())
    assert latest["run"] == kept["partial"]["run"]  # eval.json is the latest run, as before


def test_the_eval_record_names_its_tie_rule_and_counts_tied_top_scores(kept):
    stored = json.loads((kept["bundle"] / "evals" / f"{kept['layered']['run']}.json").read_text())
    assert stored["tie_rule"] == "lowest-class-index"
    for row in [stored["reference"], *stored["artifacts"]]:
        assert isinstance(row["top1_tied_images"], int) and 0 <= row["top1_tied_images"] <= stored["images"]


def test_report_uses_the_complete_evaluation_not_the_latest_and_names_it(kept):
    data = load_report(kept["bundle"])
    assert data.eval_run.id == kept["layered"]["run"] and data.eval["images"] == 64
    text = write_report(kept["bundle"])["markdown_text"]
    assert f"eval run {kept['layered']['run']}" in text and "64 of 64 images" in text
    assert "2 other run(s) kept" in text


def test_eval_run_picks_another_run_and_says_it_is_partial(kept):
    code, stdout, stderr = invoke("report", kept["bundle"], "--eval-run", kept["partial"]["run"])
    assert code == 0, stderr
    assert "20 of 64 images" in stdout and "**partial**" in stdout
    code, _, stderr = invoke("report", kept["bundle"], "--eval-run", "20000101-000000")
    assert code == 2 and "--eval-run 20000101-000000" in stderr and kept["partial"]["run"] in stderr


def test_per_layer_sqnr_of_an_earlier_run_survives_a_later_eval(kept):
    data = load_report(kept["bundle"])
    assert data.layers_run.id == kept["layered"]["run"] and data.layers_run.doc["layers"]
    assert "layers" not in kept["partial"]


def test_each_bench_run_is_kept_and_report_takes_the_latest_per_thread_count(kept):
    from edgeres.measure.records import run_sequence

    runs = sorted((kept["bundle"] / "benches").glob("*.json"), key=lambda p: (p.stem[:15], run_sequence(p.stem)))
    assert len(runs) == 2
    first, second = (json.loads(p.read_text())["run"] for p in runs)
    assert load_report(kept["bundle"]).threads == 2 and load_report(kept["bundle"]).bench_run.id == first
    assert load_report(kept["bundle"], threads=1).bench_run.id == second
    assert load_report(kept["bundle"], bench_run=first, threads=1).bench_run.id == first
    code, _, stderr = invoke("report", kept["bundle"], "--bench-run", second, "--threads", "2")
    assert code == 2 and f"bench run {second} has results for 1 threads" in stderr


def test_kept_runs_are_outside_the_hashed_set_and_the_bundle_still_verifies(kept):
    from edgeres.bundle import listed_files, read_manifest

    manifest = read_manifest(kept["bundle"])  # verifies every hashed file
    assert not any(r["file"].startswith(("evals/", "benches/")) for r in listed_files(manifest))


def test_a_damaged_kept_run_is_skipped_with_a_warning(kept, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(kept["bundle"], bundle)
    bad = sorted((bundle / "evals").glob("*.json"))[1]
    bad.write_text('{"reference": {"top1": "high"}}')
    code, stdout, stderr = invoke("report", bundle)
    assert code == 0 and f"ignored damaged {bad}" in stderr
    assert "| reference" in stdout


def test_a_kept_runs_folder_that_is_a_symlink_is_not_followed(kept, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(kept["bundle"], bundle)
    outside = tmp_path / "outside"
    shutil.move(bundle / "evals", outside)
    (bundle / "evals").symlink_to(outside)
    data = load_report(bundle)
    assert [r.id for r in data.eval_runs] == ["eval.json"]  # only the latest file, inside the bundle


def test_an_old_bundle_with_only_eval_json_and_bench_json_still_reports(kept, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(kept["bundle"], bundle)
    shutil.rmtree(bundle / "evals")
    shutil.rmtree(bundle / "benches")
    for name in ("eval.json", "bench.json"):  # as written before runs were kept
        doc = json.loads((bundle / name).read_text())
        for key in ("run", "created", "dataset_images", "partial"):
            doc.pop(key, None)
        (bundle / name).write_text(json.dumps(doc))
    data = load_report(bundle)
    assert data.eval["images"] == 20 and data.threads == 1
    assert data.rows[1].top1 is not None and data.rows[1].p50_ms is not None


def test_report_json_is_the_table_as_a_document(kept):
    code, stdout, stderr = invoke("report", kept["bundle"], "--json")
    assert code == 0, stderr
    doc = json.loads(stdout)
    assert doc["schema"] == "edgeres-results/1" and doc["eval"]["images"] == 64 and not doc["eval"]["partial"]
    assert doc["bench"]["threads"] == 2 and doc["bench"]["host"] == "local"
    for a in doc["artifacts"]:
        lo, hi = a["top1_drop_ci95_pp"]
        assert lo <= a["top1_drop_pp"] <= hi
        assert a["agreement_pct"] is not None and a["threads"] == 2 and a["host"] == "local"
        assert {(lat["host"], lat["threads"]) for lat in a["latency"]} == {("local", 1), ("local", 2)}
        assert a["size_mb"] > 0 and a["p50_ms"] > 0 and a["p90_ms"] >= a["p50_ms"]
    assert doc["reference"]["top1"] == kept["layered"]["reference"]["top1"]


def test_convert_json_ends_with_the_same_results_document(kept, tiny_checkpoint, tiny_npz):
    code, stdout, stderr = invoke("convert", tiny_checkpoint, "--targets", "onnx", "--precision", "fp32,int8", "--calib",
                                  tiny_npz, "--eval", tiny_npz, "--no-bench", "--out", kept["bundle"], "--json")
    assert code == 0, stderr
    doc = json.loads(stdout)
    assert doc["manifest"]["format"] == "edgeres-bundle"
    assert doc["results"] == results_document(load_report(kept["bundle"]))


# --- one sign, intervals on the chart ---------------------------------------------------------------

def test_every_drop_is_written_with_one_sign_positive_is_lost(tmp_path):
    bundle = make_results_bundle(tmp_path)
    bars = {b[0]: b for b in waterfall_bars(load_report(bundle))}
    assert bars["onnx int8"][1] - bars["onnx int8"][2] == pytest.approx(0.4)  # drop 0.40 pp in the table
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    captured = []
    real = Figure.savefig

    def keep_texts(fig, *a, **k):
        captured.extend(t.get_text() for ax in fig.axes for t in ax.texts)
        return real(fig, *a, **k)

    Figure.savefig = keep_texts
    try:
        write_report(bundle, html_out=True)
    finally:
        Figure.savefig = real
    assert "drop 0.40 pp" in captured and "drop 0.10 pp" in captured and not any("+" in t for t in captured)


def test_points_whose_intervals_overlap_are_not_called_better():
    fast_noisy = (1.0, 91.50, (91.30, 91.70))
    slow_same = (2.0, 91.56, (91.40, 91.72))  # more accurate by noise only: the fast one beats it
    slow_better = (3.0, 93.00, (92.80, 93.20))  # surely better: stays on the front
    assert pareto_front([fast_noisy, slow_same, slow_better]) == [fast_noisy, slow_better]


def _crowded_bundle(tmp_path) -> Path:
    """Six artifacts within a few hundredths of a point and a millisecond: labels must find room."""
    bundle = make_results_bundle(tmp_path, pruning=False)
    ev = json.loads((bundle / "eval.json").read_text())
    for a, ci in zip(ev["artifacts"], ([-0.1, 0.9], [-0.3, 0.5])):
        a["top1_drop_ci95_pp"] = ci
        a["agreement_pct"] = 99.1
    (bundle / "eval.json").write_text(json.dumps(ev))
    return bundle


def test_the_chart_has_an_error_bar_per_artifact_and_no_point_under_a_label_or_the_legend(tmp_path):
    data = load_report(_crowded_bundle(tmp_path))
    plt, fig, layout = draw_accuracy_vs_latency(data)
    plt.close(fig)
    assert layout.points == 2 and layout.error_bars == 2 and layout.hidden == ()


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_the_html_report_in_headless_chromium_shows_error_bars_and_hides_no_point(tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run does)")
    page = write_report(_crowded_bundle(tmp_path), html_out=True)["html"]
    base = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]
    dom = subprocess.run([*base, "--dump-dom", page.resolve().as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    # the page's own script measured, as the browser laid the inline SVG out, what covers what
    assert 'data-points="2"' in dom and 'data-error-bars="2"' in dom, dom[-800:]
    assert 'data-hidden-points="none"' in dom, re.findall(r'data-hidden-points="[^"]*"', dom)
    shot = tmp_path / "report.png"
    subprocess.run([*base, f"--screenshot={shot}", "--window-size=1200,2400", page.resolve().as_uri()],
                   capture_output=True, timeout=120)
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.std() > 10  # drawn, not a blank page
    if os.environ.get("EDGERES_KEEP_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["EDGERES_KEEP_SCREENSHOT"])


# --- CLI hygiene ----------------------------------------------------------------------------------

def test_version():
    from edgeres import __version__

    code, stdout, _ = invoke("--version")
    assert code == 0 and stdout.strip() == f"edgeres {__version__}"


def test_shell_completion_is_offered():
    code, stdout, _ = invoke("--help")
    assert "--install-completion" in stdout and "--show-completion" in stdout
    # without a detectable parent shell (make, CI) Typer's auto-detection fails; name the shell instead
    env = {**os.environ, "PYTHONPATH": str(ROOT), "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    r = subprocess.run([sys.executable, "-c", "from edgeres import cli; cli.app(prog_name='edgeres')", "--show-completion", "bash"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "_EDGERES_COMPLETE=complete_bash" in r.stdout and "complete -o default" in r.stdout, \
        (r.returncode, r.stdout[-300:], r.stderr[-500:])


def test_help_keeps_bracketed_defaults_and_debug_is_a_plain_flag():
    code, stdout, _ = invoke("convert", "--help")
    text = " ".join(stdout.split())
    assert code == 0 and "[all, or the device's]" in text and "tflite: fp32,fp16,dynamic,int8;" in text and "fp32,int8) [int8]" in text
    assert "[default: 300]" in text
    code, stdout, _ = invoke("--help")
    assert re.search(r"--debug\s+Show", stdout), stdout
    code, stdout, _ = invoke("--debug", "zoo")
    assert code == 0 and "resnet20" in stdout


def _cli_flags() -> set[str]:
    import typer

    flags = set()

    def walk(command):
        for p in command.params:
            flags.update(p.opts, p.secondary_opts)
        for sub in getattr(command, "commands", {}).values():
            walk(sub)

    walk(typer.main.get_command(cli.app))
    runner_src = (ROOT / "edgeres/measure/bench_runner.py").read_text()  # the device-side runner's own flags
    return flags | set(re.findall(r'add_argument\("(--[a-z-]+)"', runner_src)) | {"--help"}


def test_every_flag_a_message_names_exists():
    # the exported app's classify.py has its own command line
    app_flags = set(re.findall(r'add_argument\("(--[a-z][a-z0-9-]*)"', (ROOT / "edgeres/app/classify_template.py").read_text()))
    ray_flags = {"--head", "--resources", "--port"}  # `ray start` flags the sweep's hints name
    flags, unknown = _cli_flags() | app_flags | ray_flags, []
    files = [ROOT / "cli.py", *sorted(ROOT.glob("edgeres/**/*.py")), *sorted(ROOT.glob("calibration/*.py")),
             *sorted(ROOT.glob("targets/*.py"))]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                unknown += [f"{path.relative_to(ROOT)}:{node.lineno} {f}"
                            for f in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", node.value) if f not in flags]
    assert not unknown, unknown


def test_inspect_prints_no_python_lists(kept):
    code, stdout, stderr = invoke("inspect", kept["bundle"])
    assert code == 0, stderr
    assert "[" not in stdout and "inner widths per block 8" in stdout, stdout


def test_a_closed_stdout_pipe_ends_quietly():
    proc = subprocess.Popen([sys.executable, "-m", "edgeres.cli", "zoo"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # like `| head -1` having exited: every write fails with EPIPE
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0 and b"BrokenPipe" not in stderr and b"internal error" not in stderr, stderr


@pytest.fixture(scope="module")
def tflite_bundle(tmp_path_factory, tiny_checkpoint):
    pytest.importorskip("tensorflow")
    out = tmp_path_factory.mktemp("tfl") / "b"
    code, _, stderr = invoke("convert", tiny_checkpoint, "--targets", "tflite", "--precision", "fp32", "--no-bench",
                             "--out", out)
    assert code == 0, stderr
    return out


def test_litert_chatter_is_held_back_unless_debug(tflite_bundle, tiny_npz):
    quiet = run_cli_process("eval", tflite_bundle, "--data", tiny_npz, "--limit", "8")
    assert quiet.returncode == 0, quiet.stderr
    assert "XNNPACK" not in quiet.stderr and "INFO:" not in quiet.stderr, quiet.stderr
    loud = run_cli_process("--debug", "eval", tflite_bundle, "--data", tiny_npz, "--limit", "8")
    assert loud.returncode == 0 and "XNNPACK" in loud.stderr, loud.stderr  # the chatter is real, and shown


def test_every_latency_comes_with_its_thread_count(kept):
    code, stdout, _ = invoke("report", kept["bundle"], "--threads", "1")
    header = next(line for line in stdout.splitlines() if line.startswith("| Target"))
    assert "Threads" in header
    rows = [line for line in stdout.splitlines() if line.startswith("| onnx")]
    assert rows and all(line.rstrip(" |").split("|")[-2].strip() == "1" for line in rows)


# --- real data: a partial eval does not replace the full one ----------------------------------------

@pytest.mark.realdata
def test_report_json_after_a_limit_500_eval_still_reports_the_5000_image_one(cifar, tmp_path):
    out = tmp_path / "r20"
    code, _, stderr = invoke("convert", cifar / "resnet20.th", "--calib", cifar / "cifar10_calib.npz", "--eval",
                             cifar / "cifar10_dev.npz", "--targets", "onnx", "--precision", "int8",
                             "--bench-runs", "20", "--out", out)
    assert code == 0, stderr
    code, _, stderr = invoke("eval", out, "--data", cifar / "cifar10_dev.npz", "--limit", "500")
    assert code == 0, stderr
    code, stdout, stderr = invoke("report", out, "--json")
    assert code == 0, stderr
    doc = json.loads(stdout)
    assert doc["eval"]["images"] == 5000 and not doc["eval"]["partial"] and len(doc["eval"]["kept_runs"]) == 2
    (onnx,) = doc["artifacts"]
    lo, hi = onnx["top1_drop_ci95_pp"]
    assert lo <= onnx["top1_drop_pp"] <= hi and hi - lo < 1.0  # 5000 paired images: well under a point wide
    assert onnx["agreement_pct"] > 98 and onnx["p50_ms"] > 0 and onnx["threads"] >= 1 and onnx["host"] == "local"


# --- progress on the long steps (stderr) ------------------------------------------------------------

class _Recorder:
    """Stands in for ``progress`` / ``step``: records what each long step announced and how far it got."""

    def __init__(self):
        self.bars, self.steps = [], []

    def progress(self, description, total):
        import contextlib

        bar = {"description": description, "total": total, "done": 0}
        self.bars.append(bar)

        @contextlib.contextmanager
        def cm():
            def advance(n=1):
                bar["done"] += n
            yield advance

        return cm()

    def step(self, description):
        import contextlib

        self.steps.append(description)
        return contextlib.nullcontext()


def test_bench_shows_progress_over_every_run(kept, monkeypatch, tmp_path):
    from edgeres.measure import bench

    rec = _Recorder()
    monkeypatch.setattr(bench, "progress", rec.progress)
    bundle = tmp_path / "b"
    shutil.copytree(kept["bundle"], bundle)
    result = bench.bench_bundle(bundle, bench.BenchConfig(threads=(1,), runs=2, warmup=0))
    assert rec.bars == [{"description": "benchmarking", "total": len(result["results"]),
                         "done": len(result["results"])}]


def test_calibration_and_each_compile_show_a_step(monkeypatch, tmp_path, tiny_checkpoint, tiny_npz):
    from edgeres import progress
    from edgeres.convert import build

    rec = _Recorder()
    monkeypatch.setattr(build, "step", rec.step)
    monkeypatch.setattr(progress, "step", rec.step)  # what compile_record (convert.workers) imports when it runs
    code, _, stderr = invoke("convert", tiny_checkpoint, "--targets", "onnx", "--precision", "int8,fp32", "--calib",
                             tiny_npz, "--no-bench", "--out", tmp_path / "b")
    assert code == 0, stderr
    assert rec.steps[0].startswith("calibrating on 64 images") and rec.steps[1:] == ["compiling onnx int8",
                                                                                     "compiling onnx fp32"]


def test_reconstruction_shows_progress_block_by_block(monkeypatch, tiny_model):
    import copy

    from edgeres.compress import reconstruct as rc

    rec = _Recorder()
    monkeypatch.setattr(rc, "progress", rec.progress)
    spec, model = tiny_model
    x, _ = make_images(32, spec.input_size)
    rc.reconstruct(copy.deepcopy(model), model, spec, [spec.preprocess(x, "test images")])
    assert rec.bars == [{"description": "reconstructing pruned layers", "total": sum(spec.layers) + 1,
                         "done": sum(spec.layers) + 1}]


def test_prune_prints_its_drop_with_the_one_sign(tmp_path, tiny_checkpoint, tiny_npz):
    code, stdout, stderr = invoke("prune", tiny_checkpoint, "--ratio", "0.5", "--eval", tiny_npz, "--out",
                                  tmp_path / "p.pt")
    assert code == 0, stderr
    before, after, drop = re.search(r"\| top-1 % +\| ([\d.]+) +\| ([\d.]+) +\| drop (-?[\d.]+) pp", stdout).groups()
    assert float(drop) == pytest.approx(float(before) - float(after), abs=0.011)


def test_json_output_is_strict_json_even_with_a_non_finite_number(tmp_path):
    """A NaN or Inf (a failed timing, say) is null in what edgeres writes, never a bare NaN token that
    strict parsers (JavaScript's JSON.parse, jq) refuse."""
    import json as _json

    from edgeres.bundle import json_text, write_json_atomic
    from edgeres.measure.bench_runner import _nan_to_none

    doc = {"p50_ms": float("nan"), "rows": [{"x": float("inf")}, 1.5], "ok": True}
    assert _json.loads(json_text(doc)) == {"p50_ms": None, "rows": [{"x": None}, 1.5], "ok": True}
    write_json_atomic(tmp_path / "r.json", doc)
    text = (tmp_path / "r.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert _json.loads(_json.dumps(_nan_to_none(doc), allow_nan=False)) == _json.loads(text)
