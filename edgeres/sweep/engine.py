"""Ray: an embedded local instance sized to this machine, or a running cluster joined by address; the
sweep's steps as Ray tasks; Ctrl-C cancels what is still running.

Conversions take one CPU each. Benchmarks also need one unit of the custom resource ``bench``: an
embedded Ray offers one, so benchmarks run one at a time, and only after every conversion has
finished, so no trial times another's compile. On a cluster, the node that offers ``bench`` (a
Raspberry Pi started with ``ray start --address HEAD --resources '{"bench": 1}'``) runs them."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from edgeres.errors import InputError
from edgeres.progress import log, progress
from edgeres.targets.base import cpu_threads  # the cores this process may run on (a container's CPU set)

BENCH = "bench"
OBJECT_STORE_MAX = 256 << 20  # the sweep passes paths and small dicts, never models, through the store
OBJECT_STORE_MIN = 80 << 20  # Ray refuses less than 75 MiB


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


LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray keeps 127.0.0.1 as this node's address
CONNECT_TIMEOUT_S = 5.0
CANCEL_GRACE_S = 5.0


class Terminated(KeyboardInterrupt):
    """SIGTERM: the sweep stops as on Ctrl-C (tasks cancelled, Ray stopped, lock released), then exits 143."""


_sigterm = {"received": False}


def _raise_terminated(signum, frame):
    _sigterm["received"] = True
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough: the sweep is already stopping
    raise Terminated()


@contextlib.contextmanager
def stop_on_sigterm():
    """SIGTERM raises ``Terminated`` in the main thread for the body (Ray's init takes the signal over, so
    ``ray_session`` takes it back), instead of ending the process where it stands."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _sigterm["received"] = False
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    except KeyboardInterrupt as e:  # raised inside Ray's wait, it comes out as a plain KeyboardInterrupt
        if _sigterm["received"] and not isinstance(e, Terminated):
            raise Terminated() from None
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def ray_session(address: str | None):
    """Start (or join) Ray for the sweep; yields the engine record for ``sweep.json``.

    An embedded Ray listens on 127.0.0.1 only and keeps its session files in a folder of its own, removed
    afterwards (unless RAY_TMPDIR names where Ray should keep them). A cluster is joined at exactly the
    address given: a loopback one is not swapped for this machine's LAN address, and an address where
    nothing answers fails within seconds."""
    common = dict(log_to_driver=False, logging_level=logging.WARNING, runtime_env=_worker_env())
    temp, ray_processes = None, []
    check_address(address)
    try:
        with _loopback_only(address is None or _is_loopback(address)):
            import ray

            if address is None:
                temp = None if os.environ.get("RAY_TMPDIR") else tempfile.mkdtemp(prefix="edgeres-ray-", dir=_short_tmp())
                ctx = _init(ray, address, dict(address="local", num_cpus=cpu_threads(), resources={BENCH: 1},
                                               include_dashboard=False, object_store_memory=object_store_bytes(),
                                               _temp_dir=temp, **common))
            else:
                ctx = _init(ray, address, dict(address=address, **common))
            try:
                yield _engine_record(ray, ctx, address)
            finally:
                with _sigterm_ignored():
                    try:  # taken before the raylet goes: its workers are found as its children too
                        ray_processes = _ray_processes(temp) if temp is not None else []
                    finally:
                        ray.shutdown()
    finally:
        if temp is not None:
            with _sigterm_ignored():
                remove_ray_folder(temp, ray_processes)


REAP_S = 10.0  # how long the embedded Ray's processes get to exit (then SIGKILL) before its folder goes


def _ray_processes(temp: str) -> list:
    """Every process of the embedded Ray whose folder is ``temp``: each names that folder on its command line
    (raylet, GCS, agents, workers), and the workers are the raylet's children, not ours."""
    import psutil

    found, mark = {}, os.path.join(temp, "")
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if p.pid != os.getpid() and any(mark in arg + os.sep for arg in p.info["cmdline"] or ()):
                found[p.pid] = p
                found.update((c.pid, c) for c in p.children(recursive=True))
    return list(found.values())


def remove_ray_folder(temp: str, known: list) -> None:
    """Remove the embedded Ray's folder once none of its processes runs any more. ``ray.shutdown`` stops
    the processes it started, but the raylet's workers outlive it for a moment (longer under load) and a
    late one recreated the session folder after a plain rmtree; so wait for them (``known``, taken before
    the shutdown, and any still naming ``temp``), SIGKILL those left after half of ``REAP_S``, give up at
    ``REAP_S``, then remove. Says so on stderr if the folder stays."""
    import psutil

    start = time.monotonic()
    procs = {p.pid: p for p in known}
    while True:
        procs.update((p.pid, p) for p in _ray_processes(temp))
        alive = [p for p in procs.values() if _running(p)]
        waited = time.monotonic() - start
        if not alive or waited >= REAP_S:
            break
        if waited >= REAP_S / 2:
            for p in alive:
                with contextlib.suppress(psutil.Error):
                    p.kill()
        psutil.wait_procs(alive, timeout=0.2)
    error = None
    for _ in range(2):  # a second pass for a file written while the first one walked
        try:
            shutil.rmtree(temp)
        except FileNotFoundError:
            pass
        except OSError as e:
            error = e
    if os.path.exists(temp):
        still = [f"pid {p.pid}" for p in alive if _running(p)]
        reason = f"Ray processes still running: {', '.join(still)}" if still else str(error or "recreated")
        log(f"warning: cannot remove Ray's session folder {temp} ({reason}); remove it by hand")


def _running(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _init(ray, address: str | None, kwargs: dict):
    """``ray.init``, with SIGTERM given back to ``stop_on_sigterm`` (Ray installs a stack dumper for it)."""
    handler = signal.getsignal(signal.SIGTERM)
    try:
        ctx = ray.init(**kwargs)
    except SystemExit as e:  # Ray's own SIGTERM handler during init
        if e.code == signal.SIGTERM:
            raise Terminated() from None
        raise
    except (ConnectionError, RuntimeError, ValueError) as e:
        if address is None:
            raise
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        auth = "" if os.environ.get("RAY_AUTH_MODE") == "token" else \
            " (a cluster with token authentication also needs RAY_AUTH_MODE=token here)"
        raise InputError(f"--address {address}: cannot join a Ray cluster there ({reason}){auth}; start one "
                         "with `ray start --head` and give the address it prints, or leave --address out") from None
    finally:
        if threading.current_thread() is threading.main_thread() and callable(handler):
            signal.signal(signal.SIGTERM, handler)
    return ctx


@contextlib.contextmanager
def _sigterm_ignored():
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _is_loopback(address: str) -> bool:
    """Is HOST of HOST:PORT this machine's loopback (``auto`` is not an address: Ray finds the cluster)?"""
    if address == "auto":
        return False
    host = _split(address)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_address(address: str | None) -> None:
    """Something must accept a connection at exactly HOST:PORT, or Ray would retry for minutes."""
    if address is None or address == "auto":
        return
    host, port = _split(address)
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except socket.gaierror as e:
        reason = f"unknown host ({e.strerror})"
    except TimeoutError:
        reason = f"no answer within {CONNECT_TIMEOUT_S:g} s"
    except OSError as e:
        reason = "nothing listens there" if isinstance(e, ConnectionRefusedError) else (e.strerror or str(e))
    else:
        return
    raise InputError(f"--address {address}: {reason}; start a cluster with `ray start --head --port PORT` and give "
                     "the address it prints, or leave --address out for a Ray of this sweep's own")


@contextlib.contextmanager
def _loopback_only(on: bool):
    """Ray swaps 127.0.0.1 for this machine's LAN address, whether given as the node's address or the
    cluster's, unless told this is a one-machine Ray (then its servers also listen on 127.0.0.1 only)."""
    if not on:
        yield
        return
    saved = os.environ.get(LOOPBACK_ENV)
    os.environ[LOOPBACK_ENV] = "0"  # read when Ray is imported, and inherited by the processes it starts
    constants = sys.modules.get("ray._private.ray_constants")
    enabled = getattr(constants, "ENABLE_RAY_CLUSTER", None)
    if constants is not None:  # Ray imported already: the constant was read before
        constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(LOOPBACK_ENV, None)
        else:
            os.environ[LOOPBACK_ENV] = saved
        constants = sys.modules.get("ray._private.ray_constants")
        if constants is not None:
            constants.ENABLE_RAY_CLUSTER = enabled if enabled is not None else saved != "0"


def _short_tmp() -> str:
    """Ray's socket paths must stay under 108 bytes: /tmp, as Ray itself uses on Linux."""
    return "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()


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
        """Interrupt every task (its ``with`` blocks then release locks and drop staging folders); kill
        the ones still running after a grace period."""
        log("interrupted: cancelling the sweep's running and queued tasks…")
        for ref in self.submitted:
            with contextlib.suppress(Exception):
                self.ray.cancel(ref, force=False)
        with contextlib.suppress(Exception):
            _, running = self.ray.wait(self.submitted, num_returns=len(self.submitted), timeout=CANCEL_GRACE_S)
            for ref in running:
                with contextlib.suppress(Exception):
                    self.ray.cancel(ref, force=True)


def task_error(e: Exception) -> str:
    """The reason a task failed, in one line: the step's own error message where there is one."""
    cause = getattr(e, "cause", None)
    if cause is not None and not isinstance(cause, type(e)):
        from edgeres.calibration import DataError
        from edgeres.errors import EdgeResError, TargetError

        if isinstance(cause, (EdgeResError, DataError, TargetError)):
            return str(cause)
        return f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0][:300]}"
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"
