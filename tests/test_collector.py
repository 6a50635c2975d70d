"""Every edgeres process makes the collector's automatic runs rarer before it imports a runtime
(``targets.base.rarer_collections``): the CLI, a compile worker, the eval child and the Keras-mapping child."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest

from edgeres.targets.base import GC_THRESHOLDS
from tests.conftest import ROOT, run_cli_here

DEFAULT = (700, 10, 10)


def test_the_cli_sets_the_thresholds_before_its_command_runs():
    before = gc.get_threshold()
    gc.set_threshold(*DEFAULT)
    try:
        r = run_cli_here("zoo", "--json")
        assert r.returncode == 0, r.stderr
        assert gc.get_threshold() == GC_THRESHOLDS
    finally:
        gc.set_threshold(*before)


@pytest.mark.parametrize("module", ["edgeres.convert.worker", "edgeres.convert.eval_process",
                                    "edgeres.sources.keras_process"])
def test_each_child_process_sets_them_first(module, tmp_path):
    """Each child's main on a task that does not exist: it fails, after setting the thresholds."""
    probe = (f"import gc, sys\nfrom {module} import main\nassert gc.get_threshold() == (700, 10, 10)\n"
             f"try:\n    main([{str(tmp_path / 'missing')!r}, '', {str(tmp_path)!r}])\nexcept Exception:\n    pass\n"
             "print(gc.get_threshold())")
    r = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == str(GC_THRESHOLDS)


def _full_collections(fn) -> int:
    seen = []

    def note(phase, info):
        if phase == "start" and info["generation"] == 2:
            seen.append(1)

    gc.callbacks.append(note)
    try:
        fn()
    finally:
        gc.callbacks.remove(note)
    return len(seen)


def test_release_memory_collects_only_when_the_process_still_holds_much_more_than_after_its_last_collection():
    """A 300 MB array in a reference cycle (what a Keras graph is) is given back by the next release_memory;
    after a small step (a small cycle) no full collection runs: with the runtimes loaded each costs ~0.3 s."""
    import numpy as np

    from edgeres.targets import base

    base.release_memory()  # the baseline: a collection here
    assert base.resident_bytes() is not None

    def cycle(nbytes):
        box = {"data": np.ones(nbytes, np.uint8)}
        box["self"] = box  # only the collector can free it

    cycle(1 << 20)
    assert _full_collections(base.release_memory) == 0
    held = base.resident_bytes()
    cycle(300 << 20)
    grown = base.resident_bytes()
    assert grown - held >= base.COLLECT_WHEN_GROWN_BY
    assert _full_collections(base.release_memory) == 1
    assert base.resident_bytes() < grown - (200 << 20)  # the array went back to the system
