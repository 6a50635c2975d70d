"""The shape of the code: stages import only downwards, no loops, and a runtime is one module."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import ROOT

# Top to bottom: a module may import only from layers below its own (and within its own package).
LAYERS = (
    ("edgeres.cli",),
    ("edgeres.demo",),
    ("edgeres.app",),
    ("edgeres.sweep",),
    ("edgeres.convert",),
    ("edgeres.compress",),
    ("edgeres.measure",),
    ("edgeres.int8",),
    ("edgeres.sources", "edgeres.bundle"),
    ("edgeres.model",),
    ("edgeres.device",),
    ("edgeres.flags", "edgeres.progress", "edgeres.tables"),
    ("edgeres", "edgeres.errors"),
    ("edgeres.targets",),
    ("edgeres.calibration",),
)
RUNTIME_NAMES = ("onnx", "openvino", "tflite")
# Where such a string is not a runtime's identity: (file, value) and why.
NOT_A_RUNTIME = {
    ("edgeres/device/doctor.py", "onnx"): "the onnx Python package, a tool edgeres exports with",
    ("edgeres/sources/loading.py", "onnx"): "the format of a model file the user brings",
    ("edgeres/int8/options.py", "onnx"): "the old spelling of the int8 options (--option onnx.*), still accepted",
    ("edgeres/measure/bench_runner.py", "openvino"): "the device-side loaders of the standalone runner (no imports)",
    ("edgeres/app/classify_template.py", "openvino"): "the exported app's own loaders (a standalone script)",
}


# the repository keeps targets/, calibration/ and cli.py beside edgeres/; installed (and through the
# symlinks edgeres/targets, edgeres/calibration, edgeres/cli.py) they are edgeres.targets, edgeres.calibration
# and edgeres.cli: one top-level package
BESIDE = {"targets": "edgeres.targets", "calibration": "edgeres.calibration"}


def _modules() -> dict[str, Path]:
    found = {"edgeres.cli": ROOT / "cli.py"}
    for pkg in ("edgeres", *BESIDE):
        for path in (ROOT / pkg).rglob("*.py"):
            rel = path.relative_to(ROOT)
            if rel.parts[0] == "edgeres" and (ROOT / "edgeres" / rel.parts[1]).is_symlink():
                continue  # edgeres/targets -> ../targets: walked as targets/ below
            parts = list(rel.with_suffix("").parts)
            parts[0] = BESIDE.get(parts[0], parts[0])
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _imports(name: str) -> set[str]:
    """Project modules ``name`` imports anywhere (top level or inside functions)."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _layer(name: str) -> int:
    best = None
    for i, group in enumerate(LAYERS):
        for prefix in group:
            if name == prefix or name.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (i, len(prefix))
    assert best is not None, f"{name} is in no layer; add it to LAYERS"
    return best[0]


def _stage(name: str) -> str:
    """The package a module belongs to for the layer rule: edgeres' stage packages, else the top package."""
    parts = name.split(".")
    if parts[0] == "edgeres" and len(parts) > 1 and (ROOT / "edgeres" / parts[1]).is_dir():
        return ".".join(parts[:2])
    return parts[0]


def test_every_import_points_down_the_layers():
    upward = []
    for name in MODULES:
        for dep in _imports(name):
            same_stage = _stage(dep) == _stage(name) and _stage(name) not in ("edgeres", "cli")
            if not same_stage and _layer(dep) <= _layer(name) and not (dep == "edgeres" or name == "edgeres"):
                upward.append(f"{name} -> {dep}")
    assert not upward, "imports that run up or sideways:\n" + "\n".join(sorted(upward))


def test_there_are_no_import_loops():
    graph = {name: _imports(name) for name in MODULES}
    state: dict[str, int] = {}
    loops = []

    def visit(node, path):
        state[node] = 1
        for dep in graph[node]:
            if dep == "edgeres":
                continue  # the package face: re-exports errors only
            if state.get(dep) == 1:
                loops.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not loops, "\n".join(loops)


def _runtime_name_uses(path: Path) -> list[str]:
    """String constants that are a runtime's name, outside docstrings."""
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    rel = str(path.relative_to(ROOT))
    return [f"{rel}:{n.lineno} {n.value!r}" for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and n.value in RUNTIME_NAMES and id(n) not in docstrings
            and (rel, n.value) not in NOT_A_RUNTIME]


def test_no_module_outside_targets_names_a_runtime():
    uses = [u for name, path in MODULES.items() if not name.startswith("edgeres.targets") for u in _runtime_name_uses(path)]
    assert not uses, "runtime names outside targets/ (read targets.infos() instead):\n" + "\n".join(uses)


FAKE_TARGET = '''
"""A throwaway fourth runtime, int8 from a model source of its own: onnxruntime's dynamic int8
quantisation of a copy of the reference that its source step makes, under another suffix."""
import os
import shutil
from pathlib import Path

from edgeres.convert.model_sources import ModelSource, register_source
from edgeres.targets.base import ANY_PRECISION, Artifact, TargetInfo, TargetOption

SOURCE = "fake_onnx_copy"


def _make(request):
    copy = request.scratch / "fake.source.onnx"
    copy.parent.mkdir(parents=True, exist_ok=True)
    if not copy.exists():
        shutil.copyfile(request.reference, copy)
    return {"file": str(copy)}


register_source(ModelSource(SOURCE, _make, lambda files: Path(files["file"])))
INFO = TargetInfo(name="fakert", title="Fake runtime", suffixes=(".fake",), dist="onnxruntime", runtime="onnxruntime",
                  precisions=("fp32", "int8"), sources={ANY_PRECISION: SOURCE},
                  int8_recipe=lambda cpu: ("int8", False, "onnxruntime dynamic int8"),
                  options=(TargetOption("speed", str, "fast", "how fast it pretends to be", ("fast", "slow")),))


def available():
    return "0.1"


def compile(job):
    rel = Path("fake") / f"model.{job.precision}.fake"
    (job.out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
    source = job.source(SOURCE)
    if job.precision == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(source), str(job.out_dir / rel), weight_type=QuantType.QInt8)
    else:
        shutil.copyfile(source, job.out_dir / rel)
    where = "worker" if os.environ.get("EDGERES_WORKER_PARENT") else "here"
    return Artifact("fakert", job.precision, (str(rel),), engine=f"copy + quantize_dynamic ({where})",
                    options=INFO.check_options(job.options))


def load_runner(path, threads=None):
    from edgeres.targets.onnx import load_runner as onnx_runner
    return onnx_runner(path, threads)
'''


@pytest.fixture
def fake_cli(tmp_path):
    (tmp_path / "fake_target.py").write_text(textwrap.dedent(FAKE_TARGET))
    boot = ("import sys; sys.path.insert(0, sys.argv.pop(1)); import fake_target; "
            "from edgeres import targets; targets.register(fake_target); "
            "from edgeres import cli; sys.argv[0] = 'edgeres'; cli.app()")  # registered before cli builds its help

    def run(*args):
        return subprocess.run([sys.executable, "-c", boot, str(tmp_path), *map(str, args)], cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
    return run


def test_a_registered_fourth_target_shows_in_doctor_and_help(fake_cli):
    doctor = json.loads(fake_cli("doctor", "--json").stdout)
    assert doctor["targets"]["fakert"]["precisions"] == ["fp32", "int8"]
    help_text = " ".join(fake_cli("convert", "--help").stdout.split())
    assert "fakert" in help_text and "fakert.speed" in help_text


@pytest.mark.parametrize("option, expect", [("fakert.speed=warp", "choose one of fast, slow"),
                                            ("fakert.colour=red", "unknown option")])
def test_a_fourth_targets_options_are_validated_before_any_work(fake_cli, tiny_checkpoint, tmp_path, option, expect):
    out = tmp_path / "b"
    r = fake_cli("convert", tiny_checkpoint, "--targets", "fakert", "--precision", "fp32", "--option", option,
                 "--out", out, "--no-bench")
    assert r.returncode == 2, r.stderr
    assert expect in r.stderr and "exporting" not in r.stderr
    assert not out.exists()


def test_a_fourth_target_converts_int8_from_its_own_source_in_a_worker_and_is_evaluated_and_benchmarked(
        fake_cli, tiny_checkpoint, tiny_npz, tmp_path):
    out = tmp_path / "b"
    r = fake_cli("convert", tiny_checkpoint, "--targets", "fakert", "--precision", "int8,fp32", "--calib", tiny_npz,
                 "--option", "fakert.speed=slow", "--eval", tiny_npz, "--out", out, "--no-bench", "--jobs", "1")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    int8, fp32 = manifest["artifacts"]
    assert (int8["target"], int8["precision"], int8["status"]) == ("fakert", "int8", "ok")
    assert int8["engine"].endswith("(worker)") and int8["options"] == {"speed": "slow"}  # compiled in a worker
    assert fp32["status"] == "ok" and manifest["int8"]["recipes"]["fakert"]["reason"] == "onnxruntime dynamic int8"
    assert not (out / ".work").exists()  # the source's files stay out of the bundle
    evaluated = {a["precision"]: a for a in json.loads((out / "eval.json").read_text())["artifacts"]}
    assert evaluated["fp32"]["agreement_pct"] == 100.0
    assert evaluated["int8"]["agreement_pct"] >= 50.0 and not evaluated["int8"].get("error")
    r = fake_cli("bench", out, "--threads", "1", "--runs", "3", "--json")
    assert r.returncode == 0, r.stderr
    rows = {(row["target"], row["precision"]): row for row in json.loads(r.stdout)["results"]}
    assert rows["fakert", "int8"]["status"] == "ok" and rows["fakert", "int8"]["p50_ms"] > 0


# -- one runner per runtime: numpy-only modules, copied verbatim into the standalone files -------------------

RUNNER_MODULES = sorted(p for p in (ROOT / "targets" / "runners").glob("*_runner.py"))
STANDALONE_FILES = ("edgeres/measure/bench_runner.py", "edgeres/app/classify_template.py")


def test_there_is_a_runner_module_per_builtin_runtime():
    from edgeres import targets

    runtimes = {targets.get_info(name).runtime for name in targets.BUILTIN}
    assert {p.stem.removesuffix("_runner") for p in RUNNER_MODULES} == runtimes


@pytest.mark.parametrize("path", RUNNER_MODULES, ids=lambda p: p.name)
def test_a_runner_module_needs_only_the_standard_library_and_numpy(path):
    """Its runtime is imported inside functions; nothing from edgeres, targets or calibration anywhere."""
    tree = ast.parse(path.read_text())
    top, anywhere = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or "."]
            roots = {n.split(".")[0] for n in names} | ({"."} if getattr(node, "level", 0) else set())
            anywhere |= roots
            if node in tree.body:
                top |= roots
    assert top <= set(sys.stdlib_module_names) | {"__future__", "numpy"}, top
    assert not anywhere & {"edgeres", "targets", "calibration", "cli", "."}, anywhere


@pytest.mark.parametrize("rel", STANDALONE_FILES)
def test_the_standalone_files_carry_the_runner_modules_verbatim(rel):
    from edgeres.targets.runners import assemble

    text = (ROOT / rel).read_text()
    assert assemble.assemble(text, rel) == text, f"{rel} is stale: run python -m edgeres.targets.runners.assemble {rel}"
    for path in RUNNER_MODULES:
        body = path.read_text().replace(assemble.FUTURE, "", 1)
        assert f"# --- targets/runners/{path.name} ---\n{body}" in text  # byte for byte, less the __future__ line


def test_the_assembler_refuses_a_runner_whose_names_clash_with_the_file():
    from edgeres.targets.runners import assemble

    text = f"from __future__ import annotations\n\ndef litert_quantize():\n    pass\n\n{assemble.BEGIN}\n{assemble.END}\n"
    with pytest.raises(ValueError, match="defined twice.*litert_quantize"):
        assemble.assemble(text)
    with pytest.raises(ValueError, match="exactly one runners part"):
        assemble.assemble("x = 1\n")


def test_the_assembler_check_names_a_stale_file(tmp_path):
    stale = tmp_path / "standalone.py"
    stale.write_text((ROOT / STANDALONE_FILES[0]).read_text().replace("class LiteRtRunner:", "class LiteRtRunner:  # edited", 1))
    r = subprocess.run([sys.executable, "-m", "edgeres.targets.runners.assemble", "--check", str(stale)], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 1 and "differs from targets/runners" in r.stderr
    assert subprocess.run([sys.executable, "-m", "edgeres.targets.runners.assemble", str(stale)], cwd=ROOT).returncode == 0
    assert stale.read_text() == (ROOT / STANDALONE_FILES[0]).read_text()


def test_code_imports_the_beside_folders_only_as_edgeres_subpackages():
    """An installed edgeres has no top-level cli, targets or calibration module; an import of one would
    work here (the repository root is on sys.path) and break there."""
    found = []
    for path in [*ROOT.glob("*.py"), *(p for d in ("edgeres", "targets", "calibration", "tests", "benchmarks", "scripts")
                                        for p in (ROOT / d).rglob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and not node.level and node.module else []
            found += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names
                      if n.split(".")[0] in ("cli", *BESIDE)]
    assert not found, "import them as edgeres.cli / edgeres.targets / edgeres.calibration:\n" + "\n".join(found)
