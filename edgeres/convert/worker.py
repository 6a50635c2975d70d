"""``python -m edgeres.convert.worker TASK.json``: one target compile in its own process (see
``edgeres.convert.workers``). Reads only data files; writes its artifact record to the task's
``result_file``; dies with its parent."""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

from edgeres.bundle import write_json_atomic
from edgeres.convert.workers import PARENT_ENV, compile_record
from edgeres.targets.base import die_with_parent, rarer_collections


def _die_with_parent() -> None:
    """SIGKILL when the parent goes (kill -9 included); exit now if it has gone already."""
    die_with_parent()
    parent = os.environ.get(PARENT_ENV)
    if parent and os.getppid() != int(parent):
        os._exit(1)


def calibration_batches(path: str):
    """The parent's calibration images, in the layout and batch size a target asks for — the same
    float32 values, in the same order, as the in-process batches."""
    import numpy as np

    images = np.load(path, mmap_mode="r")

    def batches(layout: str = "NCHW", batch_size: int = 32):
        for i in range(0, len(images), batch_size):
            x = np.asarray(images[i:i + batch_size], np.float32)
            yield x if layout == "NCHW" else np.ascontiguousarray(x.transpose(0, 2, 3, 1))

    return batches


def job_from_task(task: dict):
    """The ``CompileJob`` of a task: its data, its sources' files opened here, its calibration file."""
    from edgeres.convert.model_sources import open_files
    from edgeres.targets import CompileJob

    if task.get("plugin"):  # a target (and its sources) registered from outside targets/
        from edgeres import targets

        targets.register(importlib.import_module(task["plugin"]))
    fields = dict(task["job"])
    for key in ("onnx_fp32", "out_dir"):
        fields[key] = Path(fields[key])
    if fields.get("labels") is not None:
        fields["labels"] = tuple(fields["labels"])
    fields["sources"] = {name: open_files(name, files) for name, files in task["sources"].items()}
    if task.get("calibration_file"):
        fields["calibration"] = calibration_batches(task["calibration_file"])
    return CompileJob(**fields)


TEST_ABORT_ENV = "EDGERES_TEST_WORKER_ABORT"  # tests: the worker dies at once, as a crashed runtime would


def main(argv: list[str]) -> int:
    _die_with_parent()
    rarer_collections()
    if os.environ.get(TEST_ABORT_ENV):
        os.abort()
    task = json.loads(Path(argv[0]).read_text())
    try:
        record = compile_record(task["target"], job_from_task(task))
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - anything else: a failed artifact with the reason, as one line
        from edgeres.progress import DEBUG_ENV

        if os.environ.get(DEBUG_ENV):
            raise
        record = {"target": task["target"], "precision": task["precision"], "status": "failed",
                  "error": f"internal error in the {task['target']} worker: {type(e).__name__}: {e} "
                           "(re-run with --debug for the traceback)", "files": [], "file_records": []}
    write_json_atomic(Path(task["result_file"]), record)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
