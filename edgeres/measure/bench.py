"""``bench DIR``: latency, throughput and memory of every artifact of a bundle, here or on a device.

Each (artifact, thread count) runs ``bench_runner.py`` in a fresh Python process, so peak RSS is
that artifact's alone and no runtime's thread pool or cache leaks into the next measurement.
With a remote host the runner and the artifact files are copied over system OpenSSH (key auth,
batch mode: it never prompts) into a temporary folder there, run with the host's Python, and the
folder is removed afterwards. Results are stored as ``bench.json`` in the bundle for ``report``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import shlex
import signal
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from edgeres import targets
from edgeres.bundle import BENCH_FILE, bundle_path, model_path, ok_artifacts, read_manifest
from edgeres.errors import InputError, TargetError
from edgeres.flags import check_remote
from edgeres.measure.bench_runner import PARENT_PID_ENV
from edgeres.measure.records import keep_bench
from edgeres.progress import log, progress
from edgeres.tables import fmt

SCHEMA = "edgeres-bench/1"
RUNNER = Path(__file__).with_name("bench_runner.py")
RUNNER_SCHEMA = "edgeres-bench-run/1"
CONTROL_PERSIST_S = 60  # a shared SSH connection left without its run (killed) closes itself after this
# what a runner row carries into bench.json besides target/precision/file (its "system" goes top-level once)
ROW_DROP = ("schema", "system")


class RemoteError(TargetError):
    """The remote host could not be reached or did not behave; nothing was written to the bundle."""


@dataclass(frozen=True)
class BenchConfig:
    """The measurement protocol, recorded in ``bench.json``."""

    threads: tuple[int, ...] = (1,)
    warmup: int = 10
    runs: int | None = 100
    seconds: float | None = None
    batch: int = 1
    run_timeout_s: float = 900.0

    def validate(self) -> None:
        if not self.threads or any(t < 1 for t in self.threads):
            raise InputError(f"--threads {','.join(map(str, self.threads))}: give thread counts ≥ 1, e.g. 1,2,4")
        if self.runs is not None and self.seconds is not None:
            raise InputError("--runs and --seconds: give one of them, not both")
        if self.runs is not None and self.runs < 1:
            raise InputError(f"--runs {self.runs}: must be at least 1")
        if self.seconds is not None and self.seconds <= 0:
            raise InputError(f"--seconds {self.seconds}: must be positive")
        if self.warmup < 0:
            raise InputError(f"--warmup {self.warmup}: must be at least 0")
        if self.batch < 1:
            raise InputError(f"--batch {self.batch}: must be at least 1")

    def runner_args(self, artifact: str, threads: int, runtime: str) -> list[str]:
        args = ["--artifact", artifact, "--runtime", runtime, "--threads", str(threads), "--warmup", str(self.warmup),
                "--batch", str(self.batch), "--json"]
        args += ["--seconds", str(self.seconds)] if self.seconds is not None else ["--runs", str(self.runs or 100)]
        return args


@dataclass(frozen=True)
class RemoteHost:
    """Where to run: ``destination`` is what ``ssh`` takes (``user@host`` or a ~/.ssh/config alias)."""

    destination: str
    python: str = "python3"
    ssh_options: tuple[str, ...] = ()
    connect_timeout_s: int = 10
    call_timeout_s: float = 120.0

    def validate(self) -> None:
        check_remote("--remote", self.destination)
        for o in self.ssh_options:
            if "=" not in o or o.startswith("-"):
                raise InputError(f"--ssh-option {o!r}: expected KEY=VALUE, e.g. Port=2222")

    def base_options(self) -> list[str]:
        # ssh keeps the first value it sees for an option, so the user's -o go first and win
        opts = [arg for o in self.ssh_options for arg in ("-o", o)]
        return opts + ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={self.connect_timeout_s}",
                       "-o", "StrictHostKeyChecking=accept-new", "-o", "ServerAliveInterval=5",
                       "-o", "ServerAliveCountMax=3", "-o", "LogLevel=ERROR"]


@dataclass(frozen=True)
class BenchItem:
    """One artifact to measure: ``file`` is loaded, ``files`` are what must be copied to a device;
    both are among ``records``, the hashed files of a verified manifest they are resolved against."""

    target: str
    precision: str
    file: str
    files: tuple[str, ...]
    records: tuple[dict, ...] = ()

    def path(self, bundle: Path) -> Path:
        """The file to load, checked with the files its runtime reads beside it."""
        return model_path(bundle, self.file, list(self.records), f"{self.target} {self.precision} file")

    @property
    def runtime(self) -> str:
        """The runner's loader for it, from the target's record (the reference: by its file)."""
        info = targets.info_for_file(self.file) if self.target == "reference" else targets.get_info(self.target)
        return info.runtime

    @property
    def sha256(self) -> str | None:
        return next((r.get("sha256") for r in self.records if r.get("file") == self.file), None)

    @property
    def size_mb(self) -> float:
        """MB (10^6 bytes) of every file the manifest records for it (model, weights, sidecars: what a device
        gets), the size that ``convert``, ``report`` and ``sweep`` show; the runner counts only what it loads."""
        return round(sum(r["size_bytes"] for r in self.records) / 1e6, 4)

    def copy_paths(self, bundle: Path) -> dict[str, Path]:
        return {f: bundle_path(bundle, f, list(self.records), f"{self.target} {self.precision} file")
                for f in self.files}


def plan_items(manifest: dict) -> list[BenchItem]:
    """Every ok artifact, plus the fp32 reference when no artifact is a byte-identical copy of it."""
    items = []
    for a in ok_artifacts(manifest):
        records = tuple(a["file_records"])
        items.append(BenchItem(a["target"], a["precision"], a["file"], tuple(r["file"] for r in records), records))
    ref = manifest["reference"]
    if not any(r.get("sha256") == ref["sha256"] for a in ok_artifacts(manifest) for r in a.get("file_records", [])):
        items.insert(0, BenchItem("reference", ref.get("precision", "fp32"), ref["file"], (ref["file"],), (ref,)))
    return items


def parse_runner_output(stdout: str, schema: str = RUNNER_SCHEMA) -> dict | None:
    """The runner's JSON line (the last line that is one), or None when there is none."""
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and doc.get("schema") == schema and doc.get("status") in ("ok", "failed"):
            return doc
    return None


def remote_word(path: str) -> str:
    """Quote a path for the remote shell, keeping a leading ``~/`` meaningful (quoted, it would not expand)."""
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def _tail(text: str) -> str:
    lines = [l for l in text.strip().splitlines() if l.strip()]
    return lines[-1][:300] if lines else "no output"


class LocalExecutor:
    """Runs the runner with this Python, reading artifacts in place."""

    host = "local"

    def __init__(self, bundle: Path, cfg: BenchConfig):
        self.bundle, self.cfg = bundle, cfg

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def run(self, item: BenchItem, threads: int) -> dict:
        cmd = [sys.executable, str(RUNNER), *self.cfg.runner_args(str(item.path(self.bundle)), threads, item.runtime)]
        env = {**os.environ, PARENT_PID_ENV: str(os.getpid())}
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            stdout, stderr = proc.communicate(timeout=self.cfg.run_timeout_s)
        except subprocess.TimeoutExpired:
            return {"status": "failed", "error": f"timed out after {self.cfg.run_timeout_s:.0f} s"}
        finally:  # interrupted or timed out: the runner must not outlive this measurement
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        doc = parse_runner_output(stdout)
        if doc is None:
            return {"status": "failed", "error": f"runner exited {proc.returncode} without a result: {_tail(stderr)}"}
        return doc


class RemoteExecutor:
    """Copies the runner and the artifacts to ``host`` over ssh/scp and runs them there."""

    def __init__(self, bundle: Path, cfg: BenchConfig, remote: RemoteHost, items: list[BenchItem],
                 extra_files: tuple[Path, ...] = ()):
        self.bundle, self.cfg, self.remote, self.items = bundle, cfg, remote, items
        self.extra_files = extra_files  # sent to the temp folder beside the runner (eval's inputs)
        self.host = remote.destination
        self.workdir: str | None = None
        self._control: str | None = None  # the shared connection's socket (see _options)

    def _options(self) -> list[str]:
        """ssh/scp options: the host's, plus one shared connection for every call of this run (OpenSSH
        multiplexing: the first call opens it, the others reuse it, so a bench of 6 runs does one key exchange
        and authentication instead of a dozen; ControlPersist ends it on its own should ``__exit__`` never run).
        A user's own ``--ssh-option ControlMaster=…``/``ControlPath=…`` comes first and wins."""
        if self._control is None:
            return self.remote.base_options()
        return self.remote.base_options() + ["-o", "ControlMaster=auto", "-o", f"ControlPath={self._control}",
                                             "-o", f"ControlPersist={CONTROL_PERSIST_S}"]

    # every call has a timeout and BatchMode, so a dead or password-only host fails fast instead of hanging
    def _ssh(self, command: str, timeout: float, what: str) -> subprocess.CompletedProcess:
        cmd = ["ssh", *self._options(), self.remote.destination, command]
        return self._call(cmd, timeout, what)

    def _call(self, cmd: list[str], timeout: float, what: str) -> subprocess.CompletedProcess:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise RemoteError(f"--remote: `{cmd[0]}` is not installed here; install the OpenSSH client") from None
        except subprocess.TimeoutExpired:
            raise RemoteError(f"{self.host}: {what} timed out after {timeout:.0f} s; check the host is up "
                              f"and reachable (ssh {shlex.quote(self.host)} true)") from None
        if out.returncode == 255:  # ssh's own failure: connection refused/dropped, auth, host key
            raise RemoteError(f"{self.host}: ssh failed during {what} ({_tail(out.stderr)}); check "
                              f"`ssh -o BatchMode=yes {shlex.quote(self.host)} true` works with key auth")
        return out

    def __enter__(self):
        self._open_control()
        try:
            return self._enter()
        except BaseException:
            self._close_control()
            raise

    def _open_control(self) -> None:
        """A private folder for the shared connection's socket (a Unix socket path must stay under ~100 bytes:
        where the temp folder is deeper than that, every call connects on its own, as before)."""
        folder = tempfile.mkdtemp(prefix="edgeres-ssh-")
        control = os.path.join(folder, "c")
        if len(control.encode()) > 90:
            os.rmdir(folder)
            return
        self._control = control

    def _close_control(self) -> None:
        if self._control is None:
            return
        control, self._control = self._control, None
        if os.path.exists(control):  # the master is running: ask it to end now
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(["ssh", "-o", f"ControlPath={control}", "-O", "exit", self.remote.destination],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               timeout=self.remote.connect_timeout_s)
        shutil.rmtree(os.path.dirname(control), ignore_errors=True)

    def _enter(self):
        subdirs = sorted({str(Path(f).parent) for item in self.items for f in item.files} - {"."})
        mkdirs = "".join(f" && mkdir -p {shlex.quote(d)}" for d in subdirs)
        out = self._ssh(f'd=$(mktemp -d "${{TMPDIR:-/tmp}}/edgeres-bench.XXXXXX") && cd "$d"{mkdirs} && pwd',
                        self.remote.call_timeout_s, "creating a temp folder")
        lines = out.stdout.strip().splitlines()
        if out.returncode != 0 or not lines or not lines[-1].startswith("/") or " " in lines[-1]:
            raise RemoteError(f"{self.host}: could not create a temp folder with mktemp -d "
                              f"(exit {out.returncode}: {_tail(out.stderr or out.stdout)})")
        self.workdir = lines[-1].strip()
        try:
            self._check_python()
            self._copy()
        except BaseException:
            self._cleanup()
            raise
        return self

    def __exit__(self, *exc):
        try:
            self._cleanup()
        finally:
            self._close_control()
        return False

    def _cleanup(self) -> None:
        if not self.workdir:
            return
        workdir, self.workdir = self.workdir, None
        try:
            self._ssh(f"rm -rf {shlex.quote(workdir)}", self.remote.call_timeout_s, "removing the temp folder")
        except RemoteError as e:
            log(f"[yellow]warning:[/] could not remove {workdir} on {self.host}: {e}")

    def _check_python(self) -> None:
        py = remote_word(self.remote.python)
        out = self._ssh(f"{py} -c 'import numpy, sys; print(sys.version.split()[0])'", self.remote.call_timeout_s,
                        "checking the remote python")
        if out.returncode != 0:
            raise RemoteError(f"{self.host}: `{self.remote.python}` cannot run or import numpy "
                              f"({_tail(out.stderr or out.stdout)}); install python3 and numpy there or pass "
                              f"--remote-python")

    def _copy(self) -> None:
        by_dir: dict[str, list[str]] = {}
        # only hashed regular files of the bundle, each checked again right before it is sent
        sources = {f: p for item in self.items for f, p in item.copy_paths(self.bundle).items()}
        for f in sorted(sources):
            by_dir.setdefault(str(Path(f).parent), []).append(str(sources[f]))
        by_dir.setdefault(".", [])[:0] = [str(RUNNER), *map(str, self.extra_files)]
        size_mb = sum(Path(p).stat().st_size for paths in by_dir.values() for p in paths) / 1e6
        # generous for a Pi on Wi-Fi (~1 MB/s), still bounded
        timeout = self.remote.call_timeout_s + size_mb
        for sub, paths in by_dir.items():
            dest = self.workdir if sub == "." else f"{self.workdir}/{sub}"
            cmd = ["scp", "-q", "-B", *self._options(), *paths, f"{self.remote.destination}:{dest}/"]
            out = self._call(cmd, timeout, "copying the artifacts")
            if out.returncode != 0:
                raise RemoteError(f"{self.host}: scp of {len(paths)} file(s) to {dest} failed "
                                  f"({_tail(out.stderr)}); check free space there")

    def run(self, item: BenchItem, threads: int) -> dict:
        return self.run_runner(item, self.cfg.runner_args(item.file, threads, item.runtime), "benchmarking")

    def run_runner(self, item: BenchItem, args: list[str], doing: str, schema: str = RUNNER_SCHEMA) -> dict:
        """Run bench_runner.py with ``args`` in the temp folder; its JSON result, or a failed row."""
        command = f"cd {shlex.quote(self.workdir)} && {remote_word(self.remote.python)} bench_runner.py " + \
            " ".join(map(shlex.quote, args))
        out = self._ssh(command, self.cfg.run_timeout_s + self.remote.call_timeout_s, f"{doing} {item.file}")
        doc = parse_runner_output(out.stdout, schema)
        if doc is None:
            if out.returncode == 0:
                raise RemoteError(f"{self.host}: the runner printed no result for {item.file} (got "
                                  f"{_tail(out.stdout)!r}); check `{self.remote.python}` there runs bench_runner.py")
            return {"status": "failed", "error": f"runner exited {out.returncode} on {self.host} without a result: "
                                                 f"{_tail(out.stderr)}"}
        return doc

    def fetch(self, name: str, dest: Path) -> None:
        """Copy ``name`` from the temp folder back to ``dest``."""
        cmd = ["scp", "-q", "-B", *self._options(), f"{self.remote.destination}:{self.workdir}/{name}",
               str(dest)]
        out = self._call(cmd, self.remote.call_timeout_s, f"fetching {name}")
        if out.returncode != 0:
            raise RemoteError(f"{self.host}: could not copy back {name} ({_tail(out.stderr)})")


def bench_bundle(bundle: str | Path, cfg: BenchConfig, remote: RemoteHost | None = None) -> dict:
    """Benchmark every ok artifact at every thread count; stores and returns the ``bench.json`` document.

    A failing artifact becomes a row with its error and the others continue; an unreachable or
    misbehaving remote host raises ``RemoteError`` and leaves the bundle untouched.
    """
    cfg.validate()
    if remote is not None:
        remote.validate()
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    items = plan_items(manifest)
    if not items:
        raise InputError(f"{bundle}: has no ok artifact to benchmark; re-run `edgeres convert`")
    for item in items:  # here or on a device, nothing runs unless every file it reads is a checked one
        item.path(bundle)
    executor = RemoteExecutor(bundle, cfg, remote, items) if remote is not None else LocalExecutor(bundle, cfg)
    rows, system = [], None
    with _terminate_as_interrupt(), executor, progress("benchmarking", len(items) * len(cfg.threads)) as advance:
        for item in items:
            for threads in cfg.threads:
                log(f"bench {item.target} {item.precision} ({item.file}), {threads} thread(s) on {executor.host}…")
                doc = executor.run(item, threads)
                row = {"target": item.target, "precision": item.precision, "file": item.file, "threads": threads,
                       "sha256": item.sha256, **{k: v for k, v in doc.items() if k not in ROW_DROP},
                       "size_mb": item.size_mb}
                if doc.get("status") == "ok":
                    system = system or doc.get("system")
                    temps = (doc.get("system") or {}).get("temperatures_c") or {}
                    row["temperature_c"] = max(temps.values(), default=None)
                    for w in doc.get("warnings", []):
                        log(f"[yellow]warning:[/] {item.target} {item.precision}: {w}")
                else:
                    row["status"] = "failed"
                    row.setdefault("error", "unknown failure")
                    log(f"[red]{item.target} {item.precision} failed:[/] {row['error']}")
                rows.append(row)
                advance()
    result = {
        "schema": SCHEMA,
        "bundle": str(bundle),
        "host": executor.host,
        "hostname": platform.node() if executor.host == "local" else executor.host,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": {**asdict(cfg), "threads": list(cfg.threads)},
        "system": system,
        "results": rows,
    }
    run = keep_bench(bundle, result)
    if run is not None:
        result["run"] = run
    return result


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM unwinds like Ctrl-C while benchmarking, so ``finally`` blocks stop the runner (by
    default SIGTERM ends Python at once and leaves the runner running)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def bench_table(result: dict) -> tuple[list[str], list[list]]:
    headers = ["target", "precision", "threads", "size MB", "load ms", "first ms", "p50 ms", "p90 ms", "p99 ms",
               "FPS", "RSS MB", "status"]
    rows = []
    for r in result["results"]:
        status = "ok" if r["status"] == "ok" else f"failed: {r.get('error', '')}"
        if r["status"] == "ok" and r.get("throttled"):
            status = "ok (THROTTLED)"
        if r["status"] == "ok" and r.get("emulated"):
            status = "ok (EMULATED: not a device latency)"
        rows.append([r["target"], r["precision"], r["threads"], fmt(r.get("size_mb"), ".2f"), fmt(r.get("load_ms"), ".1f"),
                     fmt(r.get("first_ms"), ".1f"), fmt(r.get("p50_ms"), ".2f"), fmt(r.get("p90_ms"), ".2f"),
                     fmt(r.get("p99_ms"), ".2f"), fmt(r.get("fps"), ".1f"), fmt(r.get("peak_rss_mb"), ".0f"), status])
    return headers, rows


def any_failed(result: dict) -> bool:
    return any(r["status"] != "ok" for r in result["results"])
