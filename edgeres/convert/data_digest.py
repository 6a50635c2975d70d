"""What the data a conversion reads (``--calib``, ``--finetune-data``) is, by content: the sha256 of an
.npz, or of a folder's file names and contents. The conversion key uses this, not the path and mtime,
so ``touch``, ``cp -a`` or the same file given from another working folder keep a bundle current, and
only different bytes make it differ. Hashing is cached per file by path, size and mtime (in this
process and in ``$XDG_CACHE_HOME/edgeres``), so a large image folder is read once, not every run."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from edgeres.errors import InputError

CACHE_NAME = "data-sha256.json"
CACHE_LIMIT = 200_000  # entries; beyond this the cache starts afresh rather than growing without bound
_memo: dict[str, list] = {}  # resolved path -> [size, mtime_ns, sha256]
_loaded = False


def _cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "edgeres" / CACHE_NAME


def _load_cache() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    try:
        stored = json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return  # no cache, or a damaged one: hashing again is all it costs
    if isinstance(stored, dict):
        for path, entry in stored.items():
            if isinstance(entry, list) and len(entry) == 3 and path not in _memo:
                _memo[path] = entry


def _save_cache() -> None:
    """Best effort: a cache that cannot be written (read-only home) only costs hashing again."""
    path = _cache_file()
    entries = _memo if len(_memo) <= CACHE_LIMIT else {}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries))
        os.replace(tmp, path)
    except OSError:
        pass


def _file_sha256(path: Path) -> tuple[str, bool]:
    """(sha256 of the file, whether it had to be read)."""
    real = str(path.resolve())
    st = path.stat()
    cached = _memo.get(real)
    if cached is not None and cached[0] == st.st_size and cached[1] == st.st_mtime_ns:
        return cached[2], False
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    _memo[real] = [st.st_size, st.st_mtime_ns, h.hexdigest()]
    return h.hexdigest(), True


def data_sha256(source: str | os.PathLike | None) -> str | None:
    """sha256 of a data file, or of a folder's relative file names and contents; None for no data.
    Raises ``InputError`` naming the path when it cannot be read."""
    if source is None:
        return None
    _load_cache()
    p = Path(source)
    try:
        if p.is_dir():
            h, read = hashlib.sha256(), False
            for f in sorted((q for q in p.rglob("*") if q.is_file()), key=lambda q: q.relative_to(p).as_posix()):
                sha, fresh = _file_sha256(f)
                read |= fresh
                h.update(f"{f.relative_to(p).as_posix()}\0{sha}\n".encode())
            digest = h.hexdigest()
        else:
            digest, read = _file_sha256(p)
    except OSError as e:
        raise InputError(f"{source}: cannot be read ({e.strerror or e}); check the path") from None
    if read:
        _save_cache()
    return digest
