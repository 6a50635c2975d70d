"""``python -m edgeres.convert.eval_process TASK.json``: ``convert --eval`` in a fresh process.

By the time a conversion evaluates, its main process holds torch, TensorFlow (a Keras model's import)
and the model; eval then loads onnxruntime, OpenVINO and LiteRT beside them, and a runtime's library
stays mapped once loaded: a ResNet-50's conversion peaked there (3.7 GB). Here eval starts from
nothing and loads only the runtimes it runs. Reads a JSON task (the bundle, the data, the image limit,
threads); writes ``{"ok": true}`` or the error's type and text to the task's result file; dies with
its parent."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ERRORS = ("DataError", "InputError", "TargetError", "TargetUnavailable", "OptionError")


def main(argv: list[str]) -> int:
    from edgeres.convert.worker import _die_with_parent
    from edgeres.targets.base import rarer_collections

    _die_with_parent()
    rarer_collections()
    from edgeres.bundle import write_json_atomic
    from edgeres.calibration import DataError, open_dataset
    from edgeres.errors import InputError
    from edgeres.targets import TargetError

    task = json.loads(Path(argv[0]).read_text())
    try:
        from edgeres.convert.run import evaluate_and_check

        evaluate_and_check(Path(task["out"]), open_dataset(task["data"]), task["limit"], task["threads"])
        result = {"ok": True}
    except (DataError, InputError, TargetError) as e:
        result = {"ok": False, "type": type(e).__name__, "error": str(e)}
    write_json_atomic(Path(task["result_file"]), result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
