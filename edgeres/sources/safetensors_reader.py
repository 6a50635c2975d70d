"""Read a ``.safetensors`` file (a torch state_dict saved by ``safetensors.torch.save_file``, or Hugging
Face's ``model.safetensors``) as tensors. The format is data only: an 8-byte length, a JSON header that
declares every tensor's dtype, shape and byte range, then the bytes. The header is checked against the
file before anything is read or allocated."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from edgeres.errors import InputError
from edgeres.model.limits import check_weight_bytes, size_text

SAFETENSORS_SUFFIX = ".safetensors"
# the safetensors library refuses larger headers too; a ResNet-152's is ~60 KB
MAX_HEADER_BYTES = 100 << 20
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
               "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
_RESAVE = "re-save it: safetensors.torch.save_file(model.state_dict(), path)"


def read_safetensors(p: Path) -> dict:
    """The tensors of safetensors file ``p`` by name (torch, on the CPU), after checking what the header declares."""
    names = check_header(p)
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        raise InputError(f"{p}: reading .safetensors needs the safetensors package; pip install safetensors") from None
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            return {name: f.get_tensor(name) for name in names}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(f"{p}: is not a readable safetensors file ({first}); the file is corrupt or truncated") from None


def check_header(p: Path) -> list[str]:
    """The tensor names of ``p``'s header once every declared dtype, shape and byte range fits the file."""
    size = p.stat().st_size
    with open(p, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            _refuse(p, f"is {size} bytes, shorter than a safetensors header")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            _refuse(p, f"declares a {size_text(header_len)} header in a {size_text(size)} file")
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as e:
        _refuse(p, f"its header names {e} twice (readers disagree on which one counts)")
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        _refuse(p, f"has no readable JSON header ({type(e).__name__})")
    if not isinstance(header, dict):
        _refuse(p, "has a header that is not a JSON object")
    header.pop("__metadata__", None)
    data_bytes = size - 8 - header_len
    spans = []
    for name, entry in header.items():
        spans.append((*_check_entry(p, name, entry, data_bytes), name))
    # the byte ranges tile the data section, in order, without gaps or overlaps (the format's own rule):
    # no two tensors share bytes, and no bytes hide beside them
    at = 0
    for begin, end, name in sorted(spans):
        if begin != at:
            _refuse(p, f"tensor {name!r} starts at byte {begin} of the data, expected {at} (overlapping or gapped ranges)")
        at = end
    if at != data_bytes:
        _refuse(p, f"its tensors cover {at} of the {data_bytes} data bytes")
    check_weight_bytes(p, data_bytes)
    return list(header)


def _check_entry(p: Path, name: str, entry, data_bytes: int) -> tuple[int, int]:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        _refuse(p, f"tensor {name!r} lacks dtype, shape or data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_BYTES:
        _refuse(p, f"tensor {name!r} has dtype {str(dtype)[:20]!r}, not one of {' '.join(DTYPE_BYTES)}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        _refuse(p, f"tensor {name!r} has shape {str(shape)[:40]}, not a list of sizes")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_bytes):
        _refuse(p, f"tensor {name!r} has data_offsets {str(offsets)[:40]} outside the file's {data_bytes} data bytes")
    declared = DTYPE_BYTES[dtype]
    for d in shape:
        declared *= d
    if declared != offsets[1] - offsets[0]:
        dims = "×".join(map(str, shape)) or "scalar"
        _refuse(p, f"tensor {name!r} ({dims} {dtype}) declares {size_text(declared)} but stores "
                   f"{size_text(offsets[1] - offsets[0])}")
    return offsets[0], offsets[1]


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list) -> dict:
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise _DuplicateKey(repr(key)[:80])
        seen.add(key)
    return dict(pairs)


def _refuse(p: Path, what: str):
    raise InputError(f"{p}: refused: not a valid safetensors file: {what} (nothing was allocated); {_RESAVE}")
