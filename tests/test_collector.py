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
