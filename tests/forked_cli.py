"""``edgeres ARGS`` in a process of its own, forked from a warm helper instead of a fresh interpreter.

A test that needs the CLI in a separate process for what the process does (an address-space limit that a memory
bomb must not reach, a FIFO that must not hang it) paid ~2.5 s of imports per case. ``run_forked(args, limit,
timeout)`` asks a helper process (started once per test process, which has imported the CLI and torch, onnx and
onnxruntime, and runs no thread) to fork; the child sets the limit, points fds 1 and 2 at files, runs the CLI's
own entry point and leaves with its exit code (``os._exit``: nothing of the helper runs after it). The helper
kills a child that outlives ``timeout``. Returns ``(exit code, stdout, stderr)`` as a fresh process would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

from tests.conftest import ROOT

HELPER = r"""
import json, os, resource, signal, sys, tempfile, time
import onnx, onnxruntime, torch  # what the CLI's readers import: paid once here, not per child
from edgeres import cli

for line in sys.stdin:
    ask = json.loads(line)
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    pid = os.fork()
    if pid == 0:  # the child: the CLI as `python -m edgeres.cli ARGS` runs it
        try:
            if ask["limit"]:
                resource.setrlimit(resource.RLIMIT_AS, (ask["limit"], ask["limit"]))
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            sys.argv = ["edgeres", *ask["args"]]
            code = 0
            try:
                cli.app()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    deadline, status = time.monotonic() + ask["timeout"], None
    while status is None:
        done, raw = os.waitpid(pid, os.WNOHANG)
        if done:
            status = raw
        elif time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            status = os.waitpid(pid, 0)[1]
        else:
            time.sleep(0.02)
    out.seek(0)
    err.seek(0)
    reply = {"code": os.waitstatus_to_exitcode(status), "stdout": out.read().decode("utf-8", "replace"),
             "stderr": err.read().decode("utf-8", "replace")}
    print(json.dumps(reply), flush=True)
"""

_helper: dict = {}
_lock = threading.Lock()


def run_forked(args, *, limit: int | None = None, timeout: float = 240) -> tuple[int, str, str]:
    """``edgeres ARGS`` in a forked child under ``RLIMIT_AS = limit`` (bytes); (exit code, stdout, stderr)."""
    with _lock:
        proc = _helper.get("proc")
        if proc is None or proc.poll() is not None:
            proc = subprocess.Popen([sys.executable, "-c", HELPER], cwd=ROOT, stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True,
                                    env={**os.environ, "PYTHONPATH": str(ROOT)})
            _helper["proc"] = proc
        proc.stdin.write(json.dumps({"args": [str(a) for a in args], "limit": limit, "timeout": timeout}) + "\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"the forking helper ended (exit code {proc.poll()})")
    reply = json.loads(line)
    return reply["code"], reply["stdout"], reply["stderr"]
