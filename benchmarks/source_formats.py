"""The docs' table of the model files edgeres reads, from the results of ``tests/test_source_formats.py``.

Runs that test file (one row per source format: the file made by its own framework, inspect, convert int8 +
fp32 for every target, each fp32 artifact compared with the framework's output on the same pixels) with
``EDGERES_SOURCE_TABLE`` set, and keeps each row's result in the JSON file given; then
``python benchmarks/readme_tables.py --blocks sources --write`` puts the table in docs/convert.md.

Run: ``python benchmarks/source_formats.py --json benchmarks/results/source_formats.json`` (≈5 min on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST = "tests/test_source_formats.py"
SELECT = "fp32_artifacts_reproduce"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True, help="Where to write the rows.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows_file = Path(tmp) / "rows.jsonl"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGERES_SOURCE_TABLE": str(rows_file)}
        command = [sys.executable, "-m", "pytest", TEST, "-q", "-k", SELECT, "-p", "no:cacheprovider"]
        r = subprocess.run(command, cwd=ROOT, env=env)
        if r.returncode != 0:
            raise SystemExit(f"{TEST} failed (exit {r.returncode}): the table is not written")
        rows = [json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()]
    doc = {"command": f"python -m pytest {TEST} -k {SELECT} (EDGERES_SOURCE_TABLE set)", "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{len(rows)} rows → {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
