"""Kept results: every ``eval`` and ``bench`` run is a record in the bundle, never an overwrite.

``evals/<run>.json`` and ``benches/<run>.json`` hold one run each (data fingerprint, image count,
partial or not, threads, host, time); ``eval.json`` / ``bench.json`` stay beside them as the latest
run, which is all a bundle written before this kept (those are read as one more run). Like those two
files, the records are measurements, not inputs: they sit outside the manifest's hashed set, and a
damaged one is skipped with a warning, never followed outside the bundle. ``report`` picks the most
complete evaluation and the latest benchmark per host and thread count (``choose_eval`` /
``choose_bench``) and says which it used; ``--eval-run`` / ``--bench-run`` pick another.

``keep_eval`` / ``keep_bench`` are what any producer of a result calls (local or remote eval/bench).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from edgeres.bundle import BENCH_FILE, EVAL_FILE, ResultsLock, read_result, store_result, warn
from edgeres.errors import InputError
from edgeres.targets.base import sha256_file

EVALS_DIR = "evals"
BENCHES_DIR = "benches"
RUN_ID = re.compile(r"\d{8}-\d{6}(-\d{1,4})?")


@dataclass(frozen=True)
class Run:
    """One kept result: its id (what ``--eval-run`` / ``--bench-run`` take), where it is, its document."""

    id: str
    path: Path
    doc: dict

    @property
    def created(self) -> str:
        return str(self.doc.get("created") or "")


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def data_fingerprint(source: str | os.PathLike) -> str | None:
    """sha256 (16 hex) of an .npz file, or of an image folder's file list with sizes; None if unreadable."""
    p = Path(source)
    try:
        if p.is_file():
            return sha256_file(p)[:16]
        h = hashlib.sha256()
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            h.update(f"{f.relative_to(p).as_posix()}\0{f.stat().st_size}\n".encode())
        return h.hexdigest()[:16]
    except OSError:
        return None


def keep_eval(bundle: str | Path, doc: dict) -> str | None:
    """Store an evaluation as ``eval.json`` (the latest) and as a new ``evals/`` record; returns its run id."""
    return _keep(Path(bundle), EVAL_FILE, EVALS_DIR, doc)


def keep_bench(bundle: str | Path, doc: dict) -> str | None:
    """Store a benchmark as ``bench.json`` (the latest) and as a new ``benches/`` record; returns its run id."""
    return _keep(Path(bundle), BENCH_FILE, BENCHES_DIR, doc)


def _keep(bundle: Path, latest: str, folder: str, doc: dict) -> str | None:
    # a grow publishing over this bundle now carries this run into the grown bundle, or waits until it is kept
    with ResultsLock(bundle):
        return _keep_locked(bundle, latest, folder, doc)


def _keep_locked(bundle: Path, latest: str, folder: str, doc: dict) -> str | None:
    doc.setdefault("created", now())
    run = _new_run_id(bundle / folder, doc["created"])
    doc["run"] = run
    # the latest first: a read-only bundle then warns once, naming the file users know
    if not store_result(bundle, latest, doc):
        return None
    directory = bundle / folder
    if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
        warn(f"{directory}: is not a plain folder of the bundle; this run is only in {bundle / latest}")
        return None
    try:
        directory.mkdir(exist_ok=True)
    except OSError as e:
        warn(f"{directory}: cannot be created ({e.strerror}); this run is only in {bundle / latest}")
        return None
    return run if store_result(bundle, f"{folder}/{run}.json", doc) else None


def _new_run_id(directory: Path, created: str) -> str:
    stamp = re.sub(r"\D", "", created)[:14]
    base = f"{stamp[:8]}-{stamp[8:14]}"
    run, n = base, 1
    while (directory / f"{run}.json").exists():
        run, n = f"{base}-{n}", n + 1
    return run


def runs(bundle: str | Path, folder: str, latest: str) -> list[Run]:
    """Every kept run, oldest first, plus the latest file when no record holds the same document (a bundle
    from before records, or one whose latest file was edited since, e.g. by the accuracy budget)."""
    bundle = Path(bundle)
    directory = bundle / folder
    found = []
    if directory.is_dir() and not directory.is_symlink():
        for path in sorted(directory.glob("*.json")):
            if not RUN_ID.fullmatch(path.stem) or path.is_symlink():
                continue
            doc = _finite_result(bundle, f"{folder}/{path.name}", latest)
            if doc is not None:
                found.append(Run(path.stem, path, doc))
    doc = _finite_result(bundle, latest, latest)
    if doc is not None and not any(r.doc == doc for r in found):
        # named by its file: it is either from before runs were kept or was changed after its run was kept
        found.append(Run(latest, bundle / latest, doc))
    return sorted(found, key=lambda r: (r.created, r.path.parent == bundle, run_sequence(r.id)))


def _finite_result(bundle: Path, name: str, kind: str) -> dict | None:
    """``read_result``, and a record holding NaN or an infinity is damaged too: edgeres writes strict JSON
    (a non-finite value becomes null), so one came from elsewhere, and a report would show "nan … ok"."""
    doc = read_result(bundle, name, kind=kind)
    where = _non_finite(doc) if doc is not None else None
    if where is None:
        return doc
    command = "bench DIR" if kind == BENCH_FILE else "eval DIR --data DATA"
    warn(f"ignored damaged {bundle / name} ({where} is not a finite number); re-run `edgeres {command}`")
    return None


def _non_finite(value, where: str = "") -> str | None:
    """Where the first NaN or infinite number in ``value`` is (``artifacts[1].top1``), or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return where or "a value"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _non_finite(item, f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}".lstrip("."))
        if found:
            return found
    return None


def run_sequence(run: str) -> int:
    """The n of a run id ``YYYYMMDD-HHMMSS-n`` (0 without one): runs kept within one second, in order."""
    parts = run.split("-")
    return int(parts[2]) if len(parts) == 3 and parts[2].isdigit() else 0


def pick(found: list[Run], run_id: str, flag: str, bundle: Path) -> Run:
    for r in found:
        if r.id == run_id:
            return r
    known = ", ".join(r.id for r in found) or "none"
    raise InputError(f"{flag} {run_id}: {bundle} keeps no such run (kept: {known}); pick one of those")


# --- which result a report uses ------------------------------------------------------------------

def artifact_sha(manifest: dict) -> dict[tuple, str | None]:
    """(target, precision, file) → sha256 of that file, for every ok artifact and the reference."""
    out = {}
    ref = manifest["reference"]
    out[("reference", ref.get("precision", "fp32"), ref["file"])] = ref.get("sha256")
    for a in manifest["artifacts"]:
        if a.get("status") == "ok":
            sha = next((r.get("sha256") for r in a.get("file_records", []) if r.get("file") == a.get("file")), None)
            out[(a["target"], a["precision"], a["file"])] = sha
    return out


def matches(entry: dict, shas: dict[tuple, str | None]) -> bool:
    """Whether a stored entry measured a file the manifest still holds (same name, and same bytes when known)."""
    key = (entry.get("target"), entry.get("precision"), entry.get("file"))
    if key not in shas:
        return False
    return entry.get("sha256") is None or shas[key] is None or entry["sha256"] == shas[key]


def is_partial(doc: dict) -> bool:
    total = doc.get("dataset_images")
    return bool(doc.get("partial")) or (isinstance(total, int) and isinstance(doc.get("images"), int)
                                        and doc["images"] < total)


def choose_eval(bundle: str | Path, manifest: dict, run_id: str | None = None) -> tuple[Run | None, list[Run]]:
    """The evaluation a report uses (and every kept one): the asked-for run, else the most complete —
    all images first, then the most of today's artifacts, then the latest."""
    found = runs(bundle, EVALS_DIR, EVAL_FILE)
    if run_id is not None:
        return pick(found, run_id, "--eval-run", Path(bundle)), found
    if not found:
        return None, found
    shas = artifact_sha(manifest)

    def completeness(r: Run):
        covered = sum(matches(e, shas) and e.get("status") != "failed" for e in r.doc.get("artifacts", []))
        return (not is_partial(r.doc), covered, r.doc.get("images") or 0, found.index(r))  # then the latest

    return max(found, key=completeness), found


def bench_threads(doc: dict) -> list[int]:
    return sorted({r["threads"] for r in doc.get("results", [])})


def choose_bench(bundle: str | Path, manifest: dict, run_id: str | None = None, threads: int | None = None
                 ) -> tuple[Run | None, int | None, list[Run]]:
    """The benchmark a report uses and its thread count: the asked-for run, else the latest on the host
    benchmarked last that measured ``threads`` (default: the most threads measured there)."""
    found = runs(bundle, BENCHES_DIR, BENCH_FILE)
    if run_id is not None:
        chosen = pick(found, run_id, "--bench-run", Path(bundle))
        measured = bench_threads(chosen.doc)
        if threads is not None and threads not in measured:
            raise InputError(f"--threads {threads}: bench run {chosen.id} has results for "
                             f"{', '.join(map(str, measured))} threads; pick one of those")
        return chosen, threads if threads is not None else (measured[-1] if measured else None), found
    if not found:
        return None, None, found
    host = found[-1].doc.get("host")
    on_host = [r for r in found if r.doc.get("host") == host and bench_threads(r.doc)]
    if not on_host:
        return found[-1], None, found
    measured = sorted({t for r in on_host for t in bench_threads(r.doc)})
    if threads is None:
        threads = measured[-1]
    elif threads not in measured:
        raise InputError(f"--threads {threads}: the benchmarks on {host} have results for "
                         f"{', '.join(map(str, measured))} threads; pick one of those or re-run "
                         f"`edgeres bench --threads {threads}`")
    shas = artifact_sha(manifest)
    with_threads = [r for r in on_host if threads in bench_threads(r.doc)]
    chosen = max(with_threads, key=lambda r: (sum(matches(e, shas) for e in r.doc["results"]
                                                  if e["threads"] == threads), found.index(r)))
    return chosen, threads, found


def latest_per_host_threads(found: list[Run]) -> dict[tuple[str, int], Run]:
    """The latest run per (host, thread count)."""
    out: dict[tuple[str, int], Run] = {}
    for r in found:  # oldest first, so later runs replace earlier ones
        for t in bench_threads(r.doc):
            out[(str(r.doc.get("host")), t)] = r
    return out
