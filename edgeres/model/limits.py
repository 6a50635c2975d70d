"""Caps on what a model file may declare, checked before anything is allocated: a file of a few MB
can describe tens of GB (stride-0 tensors, zip or HDF5 compression, huge declared shapes), and
edgeres refuses that in one line instead of running out of memory."""

from __future__ import annotations

import zipfile
from pathlib import Path

from edgeres.errors import InputError

# every weight of one model; ResNet-152 in fp32 is 0.24 GB
MAX_WEIGHT_BYTES = 2 << 30
# one input batch while a mapping is verified; a ResNet's activations reach ~20× its input
MAX_BATCH_BYTES = 64 << 20
# one layer's output at that batch (ResNet-50 at 224², batch 2: 6 MB)
MAX_ACTIVATION_BYTES = 1 << 30
# the side of the square input images a model may declare
MAX_INPUT_SIDE = 4096
# a compressed member or dataset may shrink its data this much (trained float weights barely
# compress); only members that inflate past MIN_BOMB_BYTES are held to it
MAX_INFLATION = 100
MIN_BOMB_BYTES = 64 << 20
# the text of a model config (ResNet-152: 0.4 MB)
MAX_CONFIG_BYTES = 64 << 20


def size_text(n: float) -> str:
    """``n`` bytes for a person: 1.5 KiB, 23.4 MiB, 37.3 GiB."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def check_weight_bytes(p: Path, declared: int, what: str = "its tensors") -> None:
    if declared > MAX_WEIGHT_BYTES:
        raise InputError(f"{p}: {what} declare {size_text(declared)} of weights, more than the "
                         f"{size_text(MAX_WEIGHT_BYTES)} edgeres loads (nothing was allocated); this is no ResNet "
                         "checkpoint, or a damaged or hostile one")


def check_inflation(p: Path, name: str, declared: int, stored: int) -> None:
    """Refuse a compressed member / dataset that inflates like a decompression bomb."""
    if declared > MIN_BOMB_BYTES and declared > MAX_INFLATION * max(stored, 1):
        raise InputError(f"{p}: {name} inflates from {size_text(stored)} to {size_text(declared)} (more than "
                         f"{MAX_INFLATION}×), a decompression bomb, refused (nothing was extracted); re-save the model")


def check_archive(p: Path, what: str) -> list[zipfile.ZipInfo]:
    """The members of zip ``p`` after checking their declared (uncompressed) sizes; nothing is extracted."""
    try:
        with zipfile.ZipFile(p) as z:
            members = z.infolist()
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        raise InputError(f"{p}: is not a readable {what} ({type(e).__name__}); the file is corrupt or truncated") from None
    names = [m.filename for m in members]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise InputError(f"{p}: the {what} lists {dup!r} twice (readers disagree on which one counts), refused; "
                         "re-save the model")
    for m in members:
        check_inflation(p, f"member {m.filename}", m.file_size, m.compress_size)
    check_weight_bytes(p, sum(m.file_size for m in members), f"the {what}'s members")
    return members


def check_batch(p: Path, name: str, shape: tuple, itemsize: int = 4) -> None:
    """Refuse an input or activation batch of ``shape`` too large to run while verifying the mapping."""
    elements = 1
    for d in shape:
        elements *= int(d)
    if elements * itemsize > MAX_BATCH_BYTES:
        dims = "×".join(str(int(d)) for d in shape)
        raise InputError(f"{p}: {name} is {dims} ({size_text(elements * itemsize)} per batch), more than the "
                         f"{size_text(MAX_BATCH_BYTES)} edgeres runs to verify a model (nothing was allocated); "
                         "export it with a dynamic or small batch and the model's real image size")


def check_input_side(p: Path, name: str, side: int | None) -> None:
    if side is not None and not 0 < side <= MAX_INPUT_SIDE:
        raise InputError(f"{p}: {name} declares {side}×{side} images; edgeres takes square images of 1 to "
                         f"{MAX_INPUT_SIDE} pixels a side; re-export the model with its real input size")
