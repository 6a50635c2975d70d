"""The test suite's inventory: collected test ids and checks per test file, saved or compared with a saved baseline.

    python scripts/test_inventory.py save benchmarks/results/test_inventory_before.json
    python scripts/test_inventory.py diff benchmarks/results/test_inventory_before.json
    python scripts/test_inventory.py files LOG     # seconds per test file from a `pytest --durations=0` log

A check is an ``assert`` statement or a ``pytest.raises``/``pytest.warns`` call, counted in the file's AST
(helpers included; a check moved into conftest.py shows as a move, not a loss). ``diff`` prints the ids that
were lost or added and every file whose check count changed, and exits 1 when an id was lost or the total
number of checks fell.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"


def checks_in(path: Path) -> int:
    """Number of ``assert`` statements plus ``pytest.raises``/``pytest.warns`` calls in one Python file."""
    count = 0
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Assert):
            count += 1
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("raises", "warns") and isinstance(node.func.value, ast.Name)
              and node.func.value.id == "pytest"):
            count += 1
    return count


def collected_ids() -> list[str]:
    """Test ids as ``pytest --collect-only -q`` lists them (run without xdist so the list is plain)."""
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:xdist", "-o", "addopts="],
                       cwd=ROOT, capture_output=True, text=True)
    ids = [line for line in r.stdout.splitlines() if "::" in line]
    if r.returncode != 0 or not ids:
        sys.exit(f"pytest --collect-only failed (exit {r.returncode}):\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return sorted(ids)


def inventory() -> dict:
    checks = {p.relative_to(ROOT).as_posix(): checks_in(p) for p in sorted(TESTS.rglob("*.py"))}
    return {"ids": collected_ids(), "checks": checks, "total_checks": sum(checks.values())}


def diff(before: dict, after: dict) -> int:
    lost = sorted(set(before["ids"]) - set(after["ids"]))
    added = sorted(set(after["ids"]) - set(before["ids"]))
    print(f"test ids: {len(before['ids'])} before, {len(after['ids'])} after; {len(lost)} lost, {len(added)} added")
    for i in lost:
        print(f"  LOST  {i}")
    for i in added:
        print(f"  added {i}")
    files = sorted(set(before["checks"]) | set(after["checks"]))
    print(f"checks (assert + pytest.raises/warns): {before['total_checks']} before, {after['total_checks']} after")
    for f in files:
        b, a = before["checks"].get(f, 0), after["checks"].get(f, 0)
        if a != b:
            print(f"  {f}: {b} -> {a} ({a - b:+d})")
    return 1 if lost or after["total_checks"] < before["total_checks"] else 0


def seconds_per_file(log: str) -> dict[str, float]:
    """Setup + call + teardown seconds per test file, from the ``--durations`` lines of a pytest log."""
    import re

    per_file: dict[str, float] = {}
    for m in re.finditer(r"^([0-9.]+)s (?:setup|call|teardown) +(tests/[^:]+)::", log, re.MULTILINE):
        per_file[m.group(2)] = per_file.get(m.group(2), 0.0) + float(m.group(1))
    return dict(sorted(per_file.items(), key=lambda kv: -kv[1]))


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "files":
        per_file = seconds_per_file(Path(argv[1]).read_text(errors="replace"))
        for name, seconds in per_file.items():
            print(f"{seconds:8.1f} s  {name}")
        print(f"{sum(per_file.values()):8.1f} s  in all ({len(per_file)} files)")
        return 0
    if len(argv) != 2 or argv[0] not in ("save", "diff"):
        print(__doc__, file=sys.stderr)
        return 2
    verb, path = argv[0], Path(argv[1])
    if verb == "save":
        path.write_text(json.dumps(inventory(), indent=1) + "\n")
        print(f"saved {path}")
        return 0
    if not path.is_file():
        print(f"{path}: no saved inventory there; make one with `save {path}` on the baseline checkout", file=sys.stderr)
        return 2
    return diff(json.loads(path.read_text()), inventory())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
