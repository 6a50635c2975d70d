"""The install is the tested one: make install pins every package from constraints.txt, one TensorFlow."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _locked() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not name==version"
            pins[_norm(name)] = version
    return pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_names(reqs: list[str]) -> set[str]:
    return {_norm(re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0]) for r in reqs if not r.startswith("edgeres")}


def test_every_declared_dependency_is_locked():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = _requirement_names(project["dependencies"])
    for reqs in project["optional-dependencies"].values():
        declared |= _requirement_names(reqs)
    missing = declared - set(_locked())
    assert not missing, f"not in constraints.txt (run scripts/lock.sh): {sorted(missing)}"


def _site_distributions():
    """The distributions installed in this environment's site-packages: not the copies other packages vendor
    and put on sys.path once imported in this process (setuptools appends its ``_vendor`` folder, with
    packaging, platformdirs and wheel of its own versions)."""
    import sysconfig

    return metadata.distributions(path=sorted({sysconfig.get_paths()[k] for k in ("purelib", "platlib")}))


def test_installed_versions_are_the_locked_ones():
    locked = _locked()
    installed = {_norm(d.metadata["Name"]): d.version for d in _site_distributions()}
    wrong = {n: (installed[n], v) for n, v in locked.items() if n in installed and installed[n] != v}
    if "edgeres" not in installed:
        pytest.skip("edgeres is not pip-installed here (make install pins the set)")
    assert not wrong, f"installed (got, locked) differ from constraints.txt: {wrong}"


def test_one_tensorflow_and_the_cpu_torch():
    names = {_norm(d.metadata["Name"]) for d in _site_distributions()}
    tensorflows = sorted(n for n in names if n in {"tensorflow", "tensorflow-cpu", "tensorflow-intel"})
    assert len(tensorflows) <= 1, f"two TensorFlow distributions share one package directory: {tensorflows}"
    assert _locked()["torch"].endswith("+cpu")


@pytest.mark.slow
def test_the_wheel_holds_one_top_level_package(tmp_path):
    """Installed, edgeres puts only ``edgeres`` into site-packages (no ``cli``, ``targets`` or ``calibration``
    to collide with other packages), and its console script is ``edgeres.cli:app``."""
    import subprocess
    import sys
    import zipfile

    import shutil

    source = tmp_path / "src"  # setuptools builds in the source tree: a copy keeps build/ out of the repository
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", "tests", "benchmarks", "docs", "demo-out"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                        str(tmp_path), str(source)], capture_output=True, text=True, timeout=600)
    if r.returncode != 0 and "No module named" in r.stderr:
        pytest.skip(f"cannot build a wheel here: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("edgeres-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"edgeres"}
    for module in ("edgeres/cli.py", "edgeres/targets/base.py", "edgeres/calibration/estimators.py",
                   "edgeres/targets/runners/onnxruntime_runner.py", "edgeres/measure/bench_runner.py"):
        assert module in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "edgeres = edgeres.cli:app" in zipfile.ZipFile(wheel).read(entry_points).decode()
