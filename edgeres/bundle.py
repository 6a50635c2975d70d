"""The artifact bundle: one directory per conversion, described by ``manifest.json``.

A bundle is written into a hidden staging directory beside its destination and renamed into
place only when complete, so an interrupted conversion never leaves a directory that looks like
a bundle. The manifest records sha256 of every file and readers verify it; every path it names is
resolved by ``bundle_path``, which accepts only hashed regular files inside the bundle. A run that
writes a bundle holds ``OutputLock`` on it, so two runs never write the same bundle or staging.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import stat
import sys
from dataclasses import fields
from pathlib import Path, PurePosixPath

from edgeres.calibration import DataError, Preprocess
from edgeres.calibration.preprocess import RESIZE_MODES
from edgeres.targets import companion_files
from edgeres.targets.base import atomic_path, sha256_file, sha256_stream
from edgeres.errors import InputError
from edgeres.model.zoo import ResNetSpec

try:
    import fcntl
except ImportError:  # Windows: no flock; outputs are then not locked
    fcntl = None

MANIFEST = "manifest.json"
EVAL_FILE = "eval.json"
BENCH_FILE = "bench.json"
FORMAT = "edgeres-bundle"
FORMAT_VERSION = 1
REFERENCE_FILE = "model.fp32.onnx"  # where convert writes the reference; readers use the manifest's
MAX_IMAGE_SIDE = 8192  # a preprocess size beyond this is damage, not a model (and would allocate GBs)
DAMAGED = "the bundle is damaged or was tampered with; re-run `edgeres convert`"


# --- writing -------------------------------------------------------------------------------------

def check_output_dir(out: Path, force: bool, *, marker: str = MANIFEST, made_by: str = "an edgeres bundle",
                     holding: str = "a bundle") -> None:
    """Refuse an output path that is a file, a folder we did not make (no ``marker`` file), or one we
    made without --force; and a parent that cannot be written. ``made_by``/``holding`` name what
    ``marker`` marks (bundles by default; ``export-app`` folders too)."""
    _check_destination(out, force, marker=marker, made_by=made_by, holding=holding)
    parent = out.resolve().parent
    if not parent.exists():
        raise InputError(f"{out}: parent folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise InputError(f"{out}: cannot write into {parent} (permission denied); choose a writable --out")
    probe = parent / f".{out.name}.probe-{os.getpid()}"
    try:  # os.access says yes to root even on a read-only file system
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        raise InputError(f"{out}: cannot write into {parent} ({e.strerror}); choose a writable --out") from None


def _check_destination(out: Path, force: bool, *, marker: str = MANIFEST, made_by: str = "an edgeres bundle",
                       holding: str = "a bundle") -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is a file; choose another --out directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / marker).exists():
            raise InputError(f"{out}: exists and is not {made_by}; choose an empty or new --out directory")
        if not force:
            raise InputError(f"{out}: already holds {holding}; pass --force to replace it or choose another --out")


def _destination_state(out: Path) -> tuple | None:
    """Identity of what is at ``out`` (None: nothing), to tell whether someone replaced it meanwhile."""
    try:
        st = os.stat(out)
    except FileNotFoundError:
        return None
    try:
        m = os.stat(out / MANIFEST)
        manifest = (m.st_ino, m.st_size, m.st_mtime_ns)
    except OSError:
        manifest = None
    return st.st_dev, st.st_ino, stat.S_IFMT(st.st_mode), manifest


_held: dict[Path, "OutputLock"] = {}  # lock file -> the outermost lock this process holds on it


class OutputLock:
    """This process's exclusive claim on an output folder and its staging siblings for one run.

    A ``flock`` on ``.NAME.lock`` beside the output: the kernel drops it when the process ends, even
    on a crash or ``kill -9``, so a stale lock never blocks the next run. A second run fails at once
    naming the holder's pid. ``publish`` refuses to replace a destination that changed since the lock
    was taken (something outside edgeres wrote there). Re-entrant within a process.
    """

    SUFFIX = ".lock"
    WAITS = False  # a second run fails at once (it would wait for a whole conversion)

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.key = self.out.resolve()
        self.path = self.key.parent / f".{self.key.name}{self.SUFFIX}"
        self.fd: int | None = None
        self.expected: tuple | None = None
        self.outer: OutputLock | None = None

    def __enter__(self) -> "OutputLock":
        self.outer = _held.get(self.path)
        if self.outer is not None:  # this process already holds it: the outermost run releases it
            return self.outer
        self._acquire()
        self.expected = _destination_state(self.out)
        _held[self.path] = self
        return self

    def __exit__(self, *exc) -> bool:
        if self.outer is None:
            del _held[self.path]
            self._release()
        return False

    def _acquire(self) -> None:
        if fcntl is None:
            return
        while True:
            fd = self._open()
            if fd is None:
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                if not self.WAITS:
                    os.close(fd)
                    raise InputError(f"{self.out}: another edgeres run is writing it (pid {holder}); wait for it "
                                     "or choose another --out") from None
                print(f"edgeres: waiting for pid {holder}, which is publishing {self.out}, to finish", file=sys.stderr)
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:  # a file system without locks: nothing to hold
                os.close(fd)
                return
            if self._still_named(fd):
                break
            os.close(fd)  # the previous holder removed this file as we locked it: lock the new one
        self.fd = fd
        try:  # the pid is for the message of whoever waits; a full disk must not keep us from holding the lock
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:
            pass

    def _open(self) -> int | None:
        """The lock file, never through a symlink (one planted there could make this truncate any file)."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | os.O_NONBLOCK, 0o644)
        except OSError as e:
            if os.path.islink(self.path):
                raise InputError(f"{self.path}: is a symlink, not an edgeres lock file; remove it") from None
            if e.errno in (errno.EACCES, errno.EROFS, errno.ENOENT, errno.EPERM, errno.ENOSPC):
                return None  # nothing can be written beside it either; check_output_dir says why
            raise InputError(f"{self.path}: cannot be opened ({e.strerror}); remove it") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise InputError(f"{self.path}: is not an edgeres lock file; remove it")
        return fd

    def _still_named(self, fd: int) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def _release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still locked, so no one can be holding a lock on a removed file
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


class ResultsLock(OutputLock):
    """Held while a result is kept in a bundle (``eval.json``, ``evals/…``) and while a grown bundle is
    published over it, so a result is either carried into the grown bundle or written into it — never
    into the old folder being replaced. Held for moments only, so the other side waits (one line)."""

    SUFFIX = ".results.lock"
    WAITS = True


def publish(staging: Path, out: Path, *, keep_results: bool = False) -> None:
    """Move a complete staging dir to ``out`` (replacing an old bundle there).

    Needs the ``OutputLock`` on ``out``: the destination must still be what it was when the lock was
    taken (or when this run last published), else nothing is replaced. ``keep_results`` (a grown bundle):
    every file of the old bundle that the new manifest does not list — kept evaluations and benchmarks,
    the report, anything the user put there — is carried over as it is at this moment, under
    ``ResultsLock``, so results kept while the bundle was growing are not lost."""
    lock = _held.get(OutputLock(out).path)
    if lock is None:
        raise RuntimeError(f"publish({out}) without holding OutputLock({out})")
    if _destination_state(out) != lock.expected:
        raise InputError(f"{out}: changed while this run was writing it (another program wrote there); "
                         "nothing was replaced — check what is there, then re-run (with --force to replace it)")
    _check_destination(out, force=True)  # whatever is there, a folder that is not a bundle is never replaced
    if out.exists():
        with ResultsLock(out):
            if keep_results:
                carry_results(out, staging)
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)
    lock.expected = _destination_state(out)


def carry_results(old: Path, new: Path) -> list[str]:
    """Put every file of bundle ``old`` that ``new``'s manifest does not list into ``new`` (replacing its
    copy: ``old``'s is the latest). Hard links where possible (``old`` is about to go), else copies.
    Returns the paths carried, relative to the bundles."""
    manifest = json.loads((new / MANIFEST).read_text())
    listed = {MANIFEST, *(r["file"] for r in listed_files(manifest))}
    carried = []
    for root, dirs, files in os.walk(old):  # symlinked folders are not followed, only carried as links
        here = Path(root)
        for name in [*files, *(d for d in dirs if (here / d).is_symlink())]:
            src = here / name
            rel = src.relative_to(old).as_posix()
            if rel in listed or not (src.is_symlink() or src.is_file()):
                continue
            dst = new / rel
            if dst.is_dir() and not dst.is_symlink():
                continue  # the new bundle has a folder there: it wins
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f".{dst.name}.carry-{os.getpid()}")
            discard(tmp)
            if src.is_symlink():
                os.symlink(os.readlink(src), tmp)
            else:
                try:
                    os.link(src, tmp)
                except OSError:
                    shutil.copy2(src, tmp)
            os.replace(tmp, dst)
            carried.append(rel)
    return carried


def file_record(bundle: Path, rel: str) -> dict:
    path = bundle / rel
    return {"file": rel, "size_bytes": path.stat().st_size, "sha256": sha256_file(path)}


def label_names(spec_or_manifest) -> list[str]:
    """The model's class names (a spec or a manifest); their indices when it has none."""
    if isinstance(spec_or_manifest, dict):
        labels, count = spec_or_manifest.get("labels"), spec_or_manifest["arch"]["num_classes"]
    else:
        labels, count = spec_or_manifest.labels, spec_or_manifest.num_classes
    return [str(v) for v in labels] if labels else [str(i) for i in range(count)]


def outputs_probabilities(spec_or_manifest) -> bool:
    """Does the model already output probabilities (its head ends in a softmax, as Keras classifiers do)?
    Scores are then its outputs as they are; a second softmax would flatten them towards 1/classes."""
    if isinstance(spec_or_manifest, dict):
        return bool((spec_or_manifest["arch"].get("head_layers") or {}).get("softmax"))
    return bool(spec_or_manifest.head_layers.softmax)


SCORES = {True: "the model's own probabilities (its head ends in a softmax)", False: "softmax of the model's logits"}


def json_text(data, indent: int | None = 2) -> str:
    """Strict JSON: a NaN or infinite number (never valid JSON, refused by most parsers) becomes null."""
    return json.dumps(_finite_or_none(data), indent=indent, allow_nan=False)


def _finite_or_none(v):
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _finite_or_none(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite_or_none(x) for x in v]
    return v


def write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json_text(data) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write beside ``path`` and rename over it, so a reader never sees half a file."""
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    except OSError as e:
        raise InputError(f"{path}: cannot write ({e.strerror}); check the folder is writable and has space") from None


def discard(path: Path) -> None:
    """Remove a temporary file if it is there; a read-only file system refuses even this, and then
    there is nothing to remove."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def store_result(bundle: Path, name: str, data: dict) -> bool:
    """Store a measured result (``eval.json``, ``bench.json``) for ``report``; on failure warn in one
    line and return False, so what was measured still reaches the user."""
    try:
        write_json_atomic(Path(bundle) / name, data)
        return True
    except InputError as e:
        warn(f"{e} — the results were printed but not stored in the bundle")
        return False


def warn(message: str) -> None:
    """One plain stderr line (rich would wrap a long one at 80 columns when stderr is not a terminal)."""
    from edgeres.tables import printable  # a file name or label in the message cannot drive the terminal

    print(f"edgeres: warning: {printable(message)}", file=sys.stderr)


# --- reading -------------------------------------------------------------------------------------

def read_manifest(bundle: str | Path, verify: bool = True) -> dict:
    """Load and check ``manifest.json``; with ``verify`` every path it names must be a hashed regular
    file inside the bundle whose size and sha256 match."""
    bundle = Path(bundle)
    path = bundle / MANIFEST
    if not bundle.is_dir():
        raise InputError(f"{bundle}: not a folder; give a bundle directory made by `edgeres convert`")
    if not path.exists():
        if (bundle / "config.json").is_file() or (bundle / "saved_model.pb").is_file():
            kind = "Hugging Face" if (bundle / "config.json").is_file() else "Keras SavedModel"
            raise InputError(f"{bundle}: is a {kind} model folder, not an edgeres bundle; convert it first "
                             f"(edgeres convert {bundle} --out DIR) and give DIR")
        raise InputError(f"{bundle}: has no {MANIFEST}; it is not a complete edgeres bundle (re-run `edgeres convert`)")
    try:
        manifest = json.loads(_read_regular(path).decode())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot be parsed ({e}); the bundle is damaged, re-run `edgeres convert`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputError(f"{path}: is not an edgeres manifest (format {manifest.get('format') if isinstance(manifest, dict) else None!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise InputError(f"{path}: format_version {version!r} is not an integer; the bundle is damaged, re-run `edgeres convert`")
    if version > FORMAT_VERSION:
        raise InputError(f"{path}: format version {version} is newer than this edgeres; upgrade edgeres")
    problem = _schema_problem(manifest)
    if problem:
        raise InputError(f"{path}: {problem}; the bundle is damaged, re-run `edgeres convert`")
    if verify:
        for record in listed_files(manifest):
            verify_file(bundle, record)
        reference_path(bundle, manifest)
        for a in manifest["artifacts"]:
            if a.get("file") is not None:
                bundle_path(bundle, a["file"], a.get("file_records", []), f"{_label(a)} file")
            for rel in a.get("files", []):
                bundle_path(bundle, rel, a.get("file_records", []), f"{_label(a)} file")
    return manifest


def _read_regular(path: Path, limit: int = 64 << 20) -> bytes:
    """A small metadata file's bytes, refusing a FIFO or device (which would block or never end)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        if st.st_size > limit:
            raise ValueError(f"{st.st_size} bytes, more than a metadata file holds")
        return f.read()


def _label(a: dict) -> str:
    return f"{a['target']} {a['precision']}"


def bundle_path(bundle: Path, rel, records: list[dict], what: str = "file") -> Path:
    """The one way to turn a path the manifest names into a file to open.

    Refused unless ``rel`` is one of ``records`` (files whose sha256 the manifest holds), stays inside
    the bundle once every symlink is resolved, and is a regular file (not a FIFO or device, which
    would block or never end). Returns the path inside the bundle, so a runtime that finds companion
    files by name (an OpenVINO ``.bin`` beside its ``.xml``) finds the checked ones."""
    shown = f"{bundle}: the manifest's {what} {rel!r}"
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise InputError(f"{shown} is not a path; {DAMAGED}")
    pure = PurePosixPath(rel)
    if pure.is_absolute() or Path(rel).is_absolute() or ".." in pure.parts:
        raise InputError(f"{shown} points outside the bundle; {DAMAGED}")
    if rel not in {r.get("file") for r in records if isinstance(r, dict)}:
        raise InputError(f"{shown} is not one of the files it hashes for it; {DAMAGED}")
    root = bundle.resolve()
    real = Path(os.path.realpath(root / rel))
    if root not in real.parents:
        raise InputError(f"{shown} resolves to {real}, outside the bundle (a symlink); {DAMAGED}")
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise InputError(f"{bundle / rel}: listed in the manifest but missing; the bundle is incomplete, "
                         "re-run `edgeres convert`") from None
    except OSError as e:
        raise InputError(f"{shown} cannot be read ({e.strerror}); {DAMAGED}") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{shown} is not a regular file ({_file_kind(st.st_mode)}); {DAMAGED}")
    return bundle / rel


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a file"


def reference_path(bundle: Path, manifest: dict) -> Path:
    """The fp32 reference the manifest names (checked like every other file)."""
    ref = manifest["reference"]
    return bundle_path(Path(bundle), ref["file"], [ref], "reference")


def artifact_path(bundle: Path, artifact: dict) -> Path:
    """The file to load for an artifact, checked with everything its runtime reads beside it."""
    return model_path(Path(bundle), artifact.get("file"), artifact.get("file_records", []),
                      f"{_label(artifact)} file")


def model_path(bundle: Path, rel, records: list[dict], what: str) -> Path:
    """``bundle_path`` for a file a runtime loads: the files the runtime then opens by name beside it
    (an OpenVINO ``.bin``) must be among ``records`` too."""
    path = bundle_path(bundle, rel, records, what)
    for companion in companion_files(rel):
        bundle_path(bundle, companion, records, f"{what}'s companion")
    return path


def data_file_path(bundle: Path, manifest: dict, rel: str) -> Path | None:
    """A non-model file the manifest names (calibration ranges); None when the manifest does not hash
    it (bundles written before it did), so the caller can do without it."""
    records = manifest.get("data_files") or []
    if rel not in {r["file"] for r in records}:
        return None
    return bundle_path(Path(bundle), rel, records, "data file")


def verify_file(bundle: Path, record: dict) -> None:
    path = bundle_path(bundle, record["file"], [record])
    try:  # the checks above looked at a name; what is hashed is the file actually opened
        fd = os.open(os.path.realpath(path), os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror}); {DAMAGED}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{path}: is not a regular file ({_file_kind(st.st_mode)}); {DAMAGED}")
        if st.st_size != record["size_bytes"] or sha256_stream(f) != record["sha256"]:
            raise InputError(f"{path}: size or sha256 differs from the manifest; the file was changed or truncated, "
                             "re-run `edgeres convert`")


def _is_file_record(r) -> bool:
    return (isinstance(r, dict) and isinstance(r.get("file"), str) and isinstance(r.get("sha256"), str)
            and _is_int(r.get("size_bytes")) and r["size_bytes"] >= 0)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_finite(v) -> bool:
    return _is_number(v) and math.isfinite(v)


def _numbers_problem(d: dict, keys: tuple[str, ...], where: str) -> str | None:
    for k in keys:
        if d.get(k) is not None and not _is_number(d[k]):
            return f"{where} {k} {d[k]!r} is not a number"
    return None


def _schema_problem(manifest: dict) -> str | None:
    """What is wrong with the manifest's structure and values (None when it is sound)."""
    for key, kind in (("arch", dict), ("preprocess", dict), ("reference", dict), ("artifacts", list)):
        if not isinstance(manifest.get(key), kind):
            return f"{key!r} is missing or not a {kind.__name__}"
    for key in ("source", "cost", "pruning", "calibration", "accuracy_budget"):
        if manifest.get(key) is not None and not isinstance(manifest[key], dict):
            return f"{key!r} is not an object"
    if not _is_file_record(manifest["reference"]):
        return "the reference file record is malformed"
    if not manifest["reference"]["file"].endswith(".onnx"):
        return f"the reference {manifest['reference']['file']!r} is not an .onnx file (onnxruntime runs it)"
    data_files = manifest.get("data_files", [])
    if not isinstance(data_files, list) or not all(_is_file_record(r) for r in data_files):
        return "the data file records are malformed"
    return (_artifacts_problem(manifest["artifacts"]) or _preprocess_problem(manifest["preprocess"], "preprocess")
            or _arch_problem(manifest["arch"]) or _sections_problem(manifest))


def _artifacts_problem(artifacts: list) -> str | None:
    for a in artifacts:
        if not isinstance(a, dict) or not isinstance(a.get("target"), str) or not isinstance(a.get("precision"), str):
            return "an artifact record is malformed"
        records = a.get("file_records", [])
        if not isinstance(records, list) or not all(_is_file_record(r) for r in records):
            return f"the file records of {_label(a)} are malformed"
        if a.get("file") is not None and not isinstance(a["file"], str):
            return f"the file of {_label(a)} is not a path"
        files = a.get("files", [])
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            return f"the files of {_label(a)} are malformed"
        if a.get("status") == "ok" and (not records or a.get("file") is None):
            return f"{_label(a)} lists no files"
    return None


PREPROCESS_KEYS = frozenset(f.name for f in fields(Preprocess))


def _preprocess_problem(pre, where: str) -> str | None:
    if not isinstance(pre, dict):
        return f"{where} is not an object"
    unknown = sorted(set(pre) - PREPROCESS_KEYS)
    if unknown:
        return f"{where} has unknown keys {unknown}"
    size, resize = pre.get("size"), pre.get("resize")
    if not _is_int(size) or not 1 <= size <= MAX_IMAGE_SIDE:
        return f"{where} size {size!r} is not an image side of 1 to {MAX_IMAGE_SIDE} pixels"
    if resize is not None and (not _is_int(resize) or not size <= resize <= MAX_IMAGE_SIDE):
        return f"{where} resize {resize!r} is not a side of {size} to {MAX_IMAGE_SIDE} pixels"
    for key in ("mean", "std"):
        v = pre.get(key, [1.0, 1.0, 1.0])
        if not isinstance(v, list) or len(v) not in (1, 3) or not all(_is_finite(x) for x in v):
            return f"{where} {key} {v!r} is not three finite numbers (one for a greyscale model)"
    if any(x <= 0 for x in pre.get("std", [1.0])):
        return f"{where} std {pre['std']!r} must be positive"
    scale = pre.get("scale", 1.0)
    if not _is_finite(scale) or scale <= 0:
        return f"{where} scale {scale!r} is not a positive number"
    mode = pre.get("resize_mode", "shorter_side_crop")  # absent in manifests written before it existed
    if mode not in RESIZE_MODES:
        return f"{where} resize_mode {mode!r} is not one of {', '.join(RESIZE_MODES)}"
    try:
        Preprocess.from_dict(pre)
    except (DataError, TypeError, ValueError) as e:
        return f"{where}: {e}"
    return None


ARCH_KEYS = frozenset(f.name for f in fields(ResNetSpec))


def _arch_problem(arch: dict) -> str | None:
    unknown = sorted(set(arch) - ARCH_KEYS)
    if unknown:
        return f"arch has unknown keys {unknown}"
    ints = [arch.get("num_classes"), arch.get("stem_width")]
    for key in ("layers", "stage_widths"):
        if not isinstance(arch.get(key), list):
            return f"arch {key} {arch.get(key)!r} is not a list"
        ints += arch[key]
    inner = arch.get("inner_widths")
    if not isinstance(inner, list) or not all(isinstance(st, list) and all(isinstance(b, list) for b in st)
                                              for st in inner):
        return f"arch inner_widths {inner!r} is not a list of lists of widths"
    ints += [w for st in inner for b in st for w in b]
    if not all(_is_int(v) and v > 0 for v in ints):
        return "arch counts and widths (num_classes, stem_width, layers, stage_widths, inner_widths) must be " \
               "positive integers"
    problem = _preprocess_problem(arch.get("preprocess"), "arch preprocess")
    if problem:
        return problem
    try:
        ResNetSpec.from_dict(arch)
    except (InputError, DataError) as e:
        return f"arch: {e}"
    return None


def _sections_problem(manifest: dict) -> str | None:
    """The optional sections ``report`` formats as numbers."""
    for key, numbers in (("cost", ("params", "macs")), ("pruning", ("top1_before", "top1_after", "top1_after_prune"))):
        problem = _numbers_problem(manifest.get(key) or {}, numbers, key)
        if problem:
            return problem
    labels = manifest.get("labels")
    if labels is not None and (not isinstance(labels, list) or not all(isinstance(v, str) for v in labels)):
        return "labels is not a list of names"
    budget = manifest.get("accuracy_budget")
    if budget is not None:
        actions = budget.get("actions", [])
        if not isinstance(actions, list) or not all(isinstance(a, dict) for a in actions):
            return "accuracy_budget actions are malformed"
        for a in actions:
            problem = _numbers_problem(a, ("top1_drop_pp",), "accuracy_budget action")
            if problem:
                return problem
    return None


def listed_files(manifest: dict) -> list[dict]:
    records = [manifest["reference"], *manifest.get("data_files", [])]
    for a in manifest["artifacts"]:
        records.extend(a.get("file_records", []))
    return records


def ok_artifacts(manifest: dict) -> list[dict]:
    return [a for a in manifest["artifacts"] if a.get("status") == "ok"]


# --- stored results --------------------------------------------------------------------------------

def _eval_problem(doc: dict) -> str | None:
    ref = doc.get("reference")
    if not isinstance(ref, dict) or _numbers_problem(ref, ("top1", "top5"), "reference"):
        return "its reference accuracy is malformed"
    if doc.get("images") is not None and not _is_int(doc["images"]):
        return "its image count is not an integer"
    entries = doc.get("artifacts", [])
    if not isinstance(entries, list):
        return "its artifacts are not a list"
    for e in entries:
        problem = _entry_problem(e, ("top1", "top5", "top1_drop_pp", "agreement_pct", "max_abs_logit_err"))
        if problem:
            return problem
        ci = e.get("top1_drop_ci95_pp")
        if ci is not None and not (isinstance(ci, list) and len(ci) == 2 and all(_is_finite(v) for v in ci)):
            return f"the drop interval of {e['target']} {e['precision']} is not two numbers"
        paired = e.get("paired")
        if paired is not None and not (isinstance(paired, dict) and all(_is_int(v) and v >= 0 for v in paired.values())):
            return f"the paired counts of {e['target']} {e['precision']} are malformed"
    layers = doc.get("layers", [])
    if not isinstance(layers, list) or not all(isinstance(v, dict) and isinstance(v.get("name"), str)
                                               and not _numbers_problem(v, ("sqnr_db",), "") for v in layers):
        return "its layers are malformed"
    return None


def _bench_problem(doc: dict) -> str | None:
    if not isinstance(doc.get("settings"), dict):
        return "its settings are missing"
    if doc.get("system") is not None and not isinstance(doc["system"], dict):
        return "its system record is not an object"
    rows = doc.get("results")
    if not isinstance(rows, list):
        return "its results are not a list"
    for r in rows:
        problem = _entry_problem(r, ("size_mb", "load_ms", "first_ms", "p50_ms", "p90_ms", "p99_ms", "mean_ms",
                                     "fps", "peak_rss_mb", "temperature_c"))
        if problem:
            return problem
        if not _is_int(r.get("threads")) or not isinstance(r.get("status"), str):
            return "a result row has no thread count or status"
    return None


def _entry_problem(e, numbers: tuple[str, ...]) -> str | None:
    if not isinstance(e, dict) or not isinstance(e.get("target"), str) or not isinstance(e.get("precision"), str):
        return "an entry has no target and precision"
    if e.get("file") is not None and not isinstance(e["file"], str):
        return "an entry's file is not a path"
    if e.get("status") is not None and not isinstance(e["status"], str):
        return "an entry's status is not text"
    return _numbers_problem(e, numbers, f"{e['target']} {e['precision']}")


RESULT_CHECKS = {EVAL_FILE: _eval_problem, BENCH_FILE: _bench_problem}
RESULT_COMMANDS = {EVAL_FILE: "eval DIR --data DATA", BENCH_FILE: "bench DIR"}


def read_result(bundle: Path, name: str, kind: str | None = None) -> dict | None:
    """A stored result (``eval.json``, ``bench.json``, or a kept run of ``kind`` one of those), or None when
    absent or damaged (with a warning: results are measurements to redo, not inputs to refuse a bundle for)."""
    path = Path(bundle) / name
    if not path.exists():
        return None
    try:
        doc = json.loads(_read_regular(path).decode())
        problem = None if isinstance(doc, dict) else "not a JSON object"
    except (OSError, ValueError) as e:
        doc, problem = None, f"cannot be parsed: {e}"
    check = RESULT_CHECKS.get(kind or name)
    if problem is None and check is not None:
        problem = check(doc)
    if problem:
        warn(f"ignored damaged {path} ({problem}); re-run `edgeres {RESULT_COMMANDS.get(kind or name, 'eval')}`")
        return None
    return doc
