"""Target compiles in worker processes: each (target, precision) that loads a heavy runtime (OpenVINO,
TensorFlow for LiteRT) compiles in a child process that exits when done, so the conversion's peak
memory is its largest step, not torch + TensorFlow + onnxruntime + OpenVINO in one process; with
``--jobs N`` up to N of them at once.

A worker gets files only (never a pickle: code from files must never run): a JSON task naming the
fp32 ONNX, the files of the model source the target reads (``model_sources``: the QDQ ONNX, the Keras
network's spec and weights, a plugin's own), the options and metadata, plus, as needed, the calibration
images as a float32 ``.npy`` (NCHW, exactly the batches the in-process compile would read). A target a
plugin registered compiles there too: the task names the plugin's module, which the worker imports. It writes its artifact record as JSON; the parent turns a failed
or vanished worker into the same "failed" record an in-process compile gives. Workers die with the
parent (``PR_SET_PDEATHSIG``) and are stopped on Ctrl-C, so nothing runs on after the conversion.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from edgeres.bundle import file_record, write_json_atomic
from edgeres.progress import log
from edgeres.targets.base import cpu_threads

PARENT_ENV = "EDGERES_WORKER_PARENT"  # the worker exits at once if its parent is already gone
CALIB_FILE = "calibration.nchw.npy"
JOB_MEMORY_GB = 2.5  # what one worker may take at the largest (TFLite of a ResNet-50: ~2 GB measured)


@dataclass
class WorkerTask:
    """One compile for a worker: the target, the ``CompileJob`` as plain data, the files it reads."""

    target: str
    precision: str
    job: dict  # CompileJob fields that are data (paths as str)
    sources: dict  # source name -> its files (model_sources.make_files), opened in the worker
    calibration_file: str | None = None  # NCHW float32 .npy of the calibration images
    plugin: str | None = None  # the module of a target registered from outside targets/, imported by the worker
    plugin_root: str | None = None  # the folder that module is imported from


def compile_record(target: str, job) -> dict:
    """Compile one (target, precision) here; its artifact record, or a "failed" one with the reason."""
    from edgeres.calibration import DataError
    from edgeres.errors import InputError
    from edgeres.progress import step
    from edgeres.targets import TargetError, get_target

    t0 = time.perf_counter()
    try:
        with step(f"compiling {target} {job.precision}"):
            artifact = get_target(target).compile(job)
        record = artifact.to_dict()
        record["file_records"] = [file_record(job.out_dir, f) for f in artifact.files]
        record["size_bytes"] = sum(r["size_bytes"] for r in record["file_records"])
        record["sha256"] = record["file_records"][0]["sha256"]
        record["status"] = "ok"
    except (TargetError, DataError, InputError) as e:
        record = {"target": target, "precision": job.precision, "status": "failed", "error": str(e),
                  "files": [], "file_records": []}
        log(f"[red]{target} {job.precision} failed:[/] {e}")
    record["compile_s"] = round(time.perf_counter() - t0, 3)
    return record


def default_jobs(worker_compiles: int) -> int:
    """As many workers as cores and free memory allow, no more than there are compiles."""
    cores = cpu_threads()
    try:
        import psutil

        by_memory = int(psutil.virtual_memory().available / 1e9 // JOB_MEMORY_GB)
    except ImportError:
        by_memory = 1
    return max(1, min(cores, by_memory, worker_compiles))


def write_calibration(path: Path, batches) -> None:
    """The calibration images once, NCHW float32, for every worker that calibrates."""
    import numpy as np

    if path.exists():
        return
    data = np.concatenate([np.asarray(b, np.float32) for b in batches("NCHW", 32)])
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, data)
    os.replace(tmp, path)


class Compiles:
    """Worker compiles started now, running while the caller does other work; ``results()`` waits
    for them, ``stop()`` ends them (and is what an error or Ctrl-C in ``results()`` does)."""

    def __init__(self, tasks: list[WorkerTask], work: Path, jobs: int, *, labelled: bool | None = None):
        work.mkdir(parents=True, exist_ok=True)
        self.work, self.tasks = work, list(tasks)
        self.labelled = jobs > 1 if labelled is None else labelled  # several at once: say whose line it is
        self.procs: dict[int, subprocess.Popen] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.pool = ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="edgeres-worker")
        self.futures = [self.pool.submit(self._one, i, t) for i, t in enumerate(self.tasks)]

    def results(self) -> list[dict]:
        try:
            return [f.result() for f in self.futures]
        except BaseException:
            self.stop()
            raise
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def stop(self) -> None:
        self.stopping.set()
        for f in self.futures:
            f.cancel()
        with self.lock:
            for proc in self.procs.values():
                if proc.poll() is None:
                    proc.terminate()
        for proc in list(self.procs.values()):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _one(self, i: int, task: WorkerTask) -> dict:
        work = self.work
        task_file = work / f"task-{task.target}-{task.precision}.json"
        result_file = work / f"result-{task.target}-{task.precision}.json"
        result_file.unlink(missing_ok=True)
        write_json_atomic(task_file, {**task.__dict__, "result_file": str(result_file)})
        t0 = time.perf_counter()
        env = {**os.environ, PARENT_ENV: str(os.getpid())}
        if task.plugin_root:  # the plugin's module is found where this process found it
            env["PYTHONPATH"] = os.pathsep.join(p for p in (task.plugin_root, env.get("PYTHONPATH")) if p)
        with self.lock:
            if self.stopping.is_set():
                raise KeyboardInterrupt
            proc = subprocess.Popen([sys.executable, "-m", "edgeres.convert.worker", str(task_file)], env=env,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, errors="replace", cwd=os.getcwd())
            self.procs[i] = proc
        for line in proc.stdout:  # the worker's progress lines, shown as ours
            line = line.rstrip("\n")
            if line:
                log(f"[dim]{task.target} {task.precision}:[/] {line}" if self.labelled else line)
        code = proc.wait()
        record = _read_result(result_file)
        if record is None:
            reason = "killed" if code < 0 else f"exit code {code}"
            record = {"target": task.target, "precision": task.precision, "status": "failed",
                      "error": f"the {task.target} worker process ended without a result ({reason}); "
                               "re-run with --debug to see its output", "files": [], "file_records": []}
            log(f"[red]{task.target} {task.precision} failed:[/] {record['error']}")
        record["compile_s"] = round(time.perf_counter() - t0, 3)
        task_file.unlink(missing_ok=True)
        result_file.unlink(missing_ok=True)
        return record


def _read_result(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("status") in ("ok", "failed") else None
