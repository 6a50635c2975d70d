"""The artifact bundle: one directory per conversion, described by ``manifest.json``.

A bundle is written into a hidden staging directory beside its destination and renamed into
place only when complete, so an interrupted conversion never leaves a directory that looks like
a bundle. The manifest records sha256 of every file and readers verify it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from edgeres.errors import InputError
from edgeres.loading import sha256_file

MANIFEST = "manifest.json"
FORMAT = "edgeres-bundle"
FORMAT_VERSION = 1
REFERENCE_FILE = "model.fp32.onnx"


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse an output path that is a file, a non-bundle folder, or an existing bundle without --force."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is a file; choose another --out directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MANIFEST).exists():
            raise InputError(f"{out}: exists and is not an edgeres bundle; choose an empty or new --out directory")
        if not force:
            raise InputError(f"{out}: already holds a bundle; pass --force to replace it or choose another --out")
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


def make_staging(out: Path) -> Path:
    parent = out.resolve().parent
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))
        staging.chmod(0o755)  # mkdtemp makes it private; a bundle is an ordinary folder
        return staging
    except OSError as e:
        raise InputError(f"{out}: cannot create a folder in {parent} ({e.strerror}); choose a writable --out") from None


def publish(staging: Path, out: Path) -> None:
    """Move a complete staging dir to ``out`` (replacing an old bundle there)."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)


def file_record(bundle: Path, rel: str) -> dict:
    path = bundle / rel
    return {"file": rel, "size_bytes": path.stat().st_size, "sha256": sha256_file(path)}


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise InputError(f"{path}: cannot write ({e.strerror}); check the folder is writable and has space") from None


def read_manifest(bundle: str | Path, verify: bool = True) -> dict:
    """Load and check ``manifest.json``; with ``verify`` every listed file's size and sha256 must match."""
    bundle = Path(bundle)
    path = bundle / MANIFEST
    if not bundle.is_dir():
        raise InputError(f"{bundle}: not a folder; give a bundle directory made by `edgeres convert`")
    if not path.exists():
        raise InputError(f"{bundle}: has no {MANIFEST}; it is not a complete edgeres bundle (re-run `edgeres convert`)")
    try:
        manifest = json.loads(path.read_text())
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
    return manifest


def _is_file_record(r) -> bool:
    return (isinstance(r, dict) and isinstance(r.get("file"), str) and isinstance(r.get("sha256"), str)
            and isinstance(r.get("size_bytes"), int) and not Path(r["file"]).is_absolute() and ".." not in Path(r["file"]).parts)


def _schema_problem(manifest: dict) -> str | None:
    """What is wrong with the manifest's structure (None when it is sound)."""
    for key, kind in (("arch", dict), ("preprocess", dict), ("reference", dict), ("artifacts", list)):
        if not isinstance(manifest.get(key), kind):
            return f"{key!r} is missing or not a {kind.__name__}"
    if not _is_file_record(manifest["reference"]):
        return "the reference file record is malformed"
    for a in manifest["artifacts"]:
        if not isinstance(a, dict) or not isinstance(a.get("target"), str) or not isinstance(a.get("precision"), str):
            return "an artifact record is malformed"
        records = a.get("file_records", [])
        if not isinstance(records, list) or not all(_is_file_record(r) for r in records):
            return f"the file records of {a['target']} {a['precision']} are malformed"
        if a.get("status") == "ok" and (not records or not isinstance(a.get("file"), str)):
            return f"{a['target']} {a['precision']} lists no files"
    return None


def listed_files(manifest: dict) -> list[dict]:
    records = [manifest["reference"]]
    for a in manifest["artifacts"]:
        records.extend(a.get("file_records", []))
    return records


def verify_file(bundle: Path, record: dict) -> None:
    path = bundle / record["file"]
    if not path.exists():
        raise InputError(f"{path}: listed in the manifest but missing; the bundle is incomplete, re-run `edgeres convert`")
    if path.stat().st_size != record["size_bytes"] or sha256_file(path) != record["sha256"]:
        raise InputError(f"{path}: size or sha256 differs from the manifest; the file was changed or truncated, re-run `edgeres convert`")


def ok_artifacts(manifest: dict) -> list[dict]:
    return [a for a in manifest["artifacts"] if a.get("status") == "ok"]


def read_result(bundle: Path, name: str) -> dict | None:
    """A stored result (``eval.json``, ``bench.json``) or None."""
    path = Path(bundle) / name
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None
