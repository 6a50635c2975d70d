"""Ray: an embedded local instance sized to this machine, or a running cluster joined by address; the
sweep's steps as Ray tasks; Ctrl-C cancels what is still running.

Conversions take one CPU each. Benchmarks also need one unit of the custom resource ``bench``: an
embedded Ray offers one, so benchmarks run one at a time, and only after every conversion has
finished, so no trial times another's compile. On a cluster, the node that offers ``bench`` (a
Raspberry Pi started with ``ray start --address HEAD --resources '{"bench": 1}'``) runs them."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Callable

from edgeres.errors import InputError
from edgeres.progress import log, progress

BENCH = "bench"
OBJECT_STORE_MAX = 256 << 20  # the sweep passes paths and small dicts, never models, through the store
OBJECT_STORE_MIN = 80 << 20  # Ray refuses less than 75 MiB


def machine_cpus() -> int:
    """Cores this process may run on (a container's CPU set, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def object_store_bytes() -> int:
    """Small: a tenth of the memory available now, within [80 MiB, 256 MiB]."""
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        available = 4 << 30
    return int(max(OBJECT_STORE_MIN, min(OBJECT_STORE_MAX, available // 10)))


def _worker_env() -> dict:
    """Workers import this very edgeres (the driver's), wherever Ray starts them from."""
    root = str(Path(__file__).resolve().parents[2])
    paths = [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    # wide lines in the steps' log files, so no message is wrapped mid-way
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(paths), "COLUMNS": "160"}}


@contextlib.contextmanager
def ray_session(address: str | None):
    """Start (or join) Ray for the sweep; yields the engine record for ``sweep.json``."""
    import ray

    common = dict(log_to_driver=False, logging_level=logging.WARNING, runtime_env=_worker_env())
    if address is None:
        store = object_store_bytes()
        ctx = ray.init(address="local", num_cpus=machine_cpus(), resources={BENCH: 1}, include_dashboard=False,
                       object_store_memory=store, **common)
    else:
        try:
            ctx = ray.init(address=address, **common)
        except (ConnectionError, RuntimeError, ValueError) as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            auth = "" if os.environ.get("RAY_AUTH_MODE") == "token" else \
                " (a cluster with token authentication also needs RAY_AUTH_MODE=token here)"
            raise InputError(f"--address {address}: cannot join a Ray cluster there ({reason}){auth}; start one "
                             "with `ray start --head` and give the address it prints, or leave --address out") from None
    try:
        yield _engine_record(ray, ctx, address)
    finally:
        ray.shutdown()


def _engine_record(ray, ctx, address: str | None) -> dict:
    resources = ray.cluster_resources()
    if resources.get(BENCH, 0) < 1:
        raise InputError(f"--address {address}: no node of that cluster offers the `{BENCH}` resource the "
                         f"benchmarks run on; start one with `ray start ... --resources '{{\"{BENCH}\": 1}}'`")
    info = ctx.address_info
    return {"name": "ray", "ray_version": ray.__version__, "mode": "embedded" if address is None else "cluster",
            "address": info.get("gcs_address") or info.get("address"),
            "nodes": sum(1 for n in ray.nodes() if n.get("Alive")), "cpus": resources.get("CPU"),
            "bench_slots": resources.get(BENCH),
            "object_store_mb": round(resources.get("object_store_memory", 0) / 2**20)}


class TaskRunner:
    """Submits steps as Ray tasks and gathers them; remembers every task so Ctrl-C can cancel them all."""

    def __init__(self):
        import ray

        self.ray = ray
        self.submitted: list = []
        self._remote: dict = {}

    def submit(self, fn: Callable, *args, bench: bool = False):
        key = (fn, bench)
        if key not in self._remote:
            options = {"num_cpus": 1, "max_retries": 0}
            if bench:  # no CPU: a device that offers only `bench` (--num-cpus 0) gets benchmarks, never compiles
                options.update(num_cpus=0, resources={BENCH: 1})
            self._remote[key] = self.ray.remote(**options)(fn)
        ref = self._remote[key].remote(*args)
        self.submitted.append(ref)
        return ref

    def gather(self, refs: dict, what: str, on_done: Callable[[str, dict], None]) -> dict[str, dict]:
        """Wait for every ref (name → ref); a failed task becomes ``{"error": reason}``."""
        pending = {ref: name for name, ref in refs.items()}
        results: dict[str, dict] = {}
        try:
            with progress(what, len(pending)) as advance:
                while pending:
                    # a short timeout: inside Ray's wait Python cannot see Ctrl-C
                    done, _ = self.ray.wait(list(pending), num_returns=1, timeout=0.5)
                    for ref in done:
                        name = pending.pop(ref)
                        try:
                            results[name] = self.ray.get(ref)
                        except self.ray.exceptions.RayError as e:
                            results[name] = {"error": task_error(e)}
                        on_done(name, results[name])
                        advance()
        except KeyboardInterrupt:
            self.cancel()
            raise
        return results

    def cancel(self) -> None:
        log("interrupted: cancelling the sweep's running and queued tasks…")
        for ref in self.submitted:
            with contextlib.suppress(Exception):
                self.ray.cancel(ref, force=True)


def task_error(e: Exception) -> str:
    """The reason a task failed, in one line: the step's own error message where there is one."""
    cause = getattr(e, "cause", None)
    if cause is not None and not isinstance(cause, type(e)):
        from calibration import DataError
        from edgeres.errors import EdgeResError, TargetError

        if isinstance(cause, (EdgeResError, DataError, TargetError)):
            return str(cause)
        return f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0][:300]}"
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"
