"""CPU time per test and per test file, user and system apart: a pytest plugin plus its summary.

    PYTHONPATH=scripts TEST_CPU_DIR=/tmp/cpu .venv/bin/python -m pytest -p test_cpu -n logical ...   # record
    python scripts/test_cpu.py /tmp/cpu                                                          # summarise

Each test's CPU is its worker's own (``RUSAGE_SELF``) plus that of the child processes it waited for
(``RUSAGE_CHILDREN``: CLI subprocesses, compile workers, fresh processes); processes nobody in the test waited
for (Ray's servers and workers, the emulated arm64 host behind sshd) are not in it, so compare the sum with the
machine's busy time (``/proc/stat``). On a 2-core machine running both workers flat out, the suite's wall time
is about its CPU time over two, so CPU, not wall time, is what a change to a test should be measured by. A test
whose time is mostly system time is spending it in the kernel: forks of a big process, fresh pages.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path

_records: list[dict] = []


def _usage() -> tuple[float, float, float, float]:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime, own.ru_stime, children.ru_utime, children.ru_stime


try:
    import pytest
except ImportError:  # the summary needs no pytest
    pytest = None
else:
    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        before, t0 = _usage(), time.time()
        yield
        after, t1 = _usage(), time.time()
        user, system, child_user, child_system = (b - a for a, b in zip(before, after))
        _records.append({"id": item.nodeid, "user": user + child_user, "system": system + child_system,
                         "children": child_user + child_system, "wall": t1 - t0})

    def pytest_sessionfinish(session):
        folder = Path(os.environ.get("TEST_CPU_DIR", "test-cpu"))
        folder.mkdir(parents=True, exist_ok=True)
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        (folder / f"{worker}.json").write_text(json.dumps(_records))


def summary(folder: Path, top: int = 25) -> str:
    tests = [r for f in sorted(folder.glob("*.json")) for r in json.loads(f.read_text())]
    files: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    for r in tests:
        row = files[r["id"].split("::")[0]]
        row[0] += r["user"]
        row[1] += r["system"]
        row[2] += r["wall"]
    lines = [f"{len(tests)} tests: user {sum(r['user'] for r in tests):.0f} + system "
             f"{sum(r['system'] for r in tests):.0f} CPU-s", "CPU-s (system)  wall s  file"]
    for name, (user, system, wall) in sorted(files.items(), key=lambda kv: -(kv[1][0] + kv[1][1]))[:top]:
        lines.append(f"{user + system:7.1f} ({system:5.1f}) {wall:7.1f}  {name}")
    lines.append("CPU-s (system)  wall s  test")
    for r in sorted(tests, key=lambda r: -(r["user"] + r["system"]))[:top]:
        lines.append(f"{r['user'] + r['system']:7.1f} ({r['system']:5.1f}) {r['wall']:7.1f}  {r['id']}")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        sys.exit("usage: python scripts/test_cpu.py FOLDER  (the TEST_CPU_DIR of a run with -p test_cpu)")
    print(summary(Path(sys.argv[1])))
