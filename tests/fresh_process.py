"""Run one function of a test module in a fresh interpreter.

For steps that would leave gigabytes in the test process: TensorFlow/Keras keep the heap of an ImageNet-size model
(8.9 GB after a Keras ResNet-50 ran over 400 photos), and under pytest-xdist every later test of that worker would
run beside it. Arguments and the result are JSON (paths as strings; arrays travel as ``.npy`` files)."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

_CALL = """import json, sys
from importlib import import_module
from edgeres.targets.base import rarer_collections
rarer_collections()  # as every edgeres process does
func = getattr(import_module(sys.argv[1]), sys.argv[2])
result = func(*json.loads(sys.argv[3]))
sys.stdout.write("\\n" + json.dumps(result) + "\\n")
"""


def call_in_fresh_process(func, *args, timeout: int = 900):
    """``func(*args)`` in a new interpreter (``func`` a module-level function of an importable module)."""
    module = ".".join(Path(inspect.getfile(func)).resolve().relative_to(ROOT).with_suffix("").parts)
    payload = json.dumps([str(a) if isinstance(a, os.PathLike) else a for a in args])
    r = subprocess.run([sys.executable, "-c", _CALL, module, func.__name__, payload], cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{func.__name__} in a fresh process failed ({r.returncode}):\n{r.stderr[-3000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])
