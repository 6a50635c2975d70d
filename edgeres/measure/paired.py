"""How sure a top-1 drop is: the paired per-image outcomes of an artifact and its fp32 reference.

Both run on the same images, so the drop is a difference of two *paired* proportions and only the
discordant images (one right, the other wrong) carry information about it. The 95 % interval is
Newcombe's hybrid score interval for paired data (Newcombe 1998, *Statistics in Medicine* 17:2635,
method 10): closed form, so a bundle always reports the same interval (a bootstrap would differ per
run); near-nominal coverage with few discordant images, where the Wald interval is far too narrow;
and, unlike a bootstrap or an interval conditional on the discordant count, it does not shrink to
[0, 0] when the two models happen to disagree on no image. No maintained Python library ships the
paired version (statsmodels has it only for independent samples), so it is written out here.

Per-image correctness is stored compactly (``np.packbits``, base64: 5000 images take 836 characters),
so the counts can be recomputed and two artifacts compared image by image later.
"""

from __future__ import annotations

import base64
import math
from dataclasses import asdict, dataclass

import numpy as np

CI_METHOD = "newcombe-paired-score-95"  # Newcombe (1998) method 10, Wilson score limits, z = 1.96
Z95 = 1.959963984540054


@dataclass(frozen=True)
class PairedCounts:
    """Images both got right, only the reference got right, only the artifact got right, both got wrong."""

    both_right: int
    reference_only: int
    artifact_only: int
    both_wrong: int

    @property
    def images(self) -> int:
        return self.both_right + self.reference_only + self.artifact_only + self.both_wrong

    @property
    def drop_pp(self) -> float:
        """Reference top-1 − artifact top-1 in percentage points (positive = accuracy lost)."""
        return 100.0 * (self.reference_only - self.artifact_only) / self.images if self.images else 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def paired_counts(reference_correct: np.ndarray, artifact_correct: np.ndarray) -> PairedCounts:
    r, a = np.asarray(reference_correct, bool), np.asarray(artifact_correct, bool)
    return PairedCounts(int((r & a).sum()), int((r & ~a).sum()), int((~r & a).sum()), int((~r & ~a).sum()))


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def drop_interval_pp(c: PairedCounts, z: float = Z95) -> tuple[float, float]:
    """95 % interval of the drop (reference − artifact top-1, pp), Newcombe's method 10."""
    n = c.images
    if n == 0:
        return -100.0, 100.0
    a, b, cc, d = c.both_right, c.reference_only, c.artifact_only, c.both_wrong
    p1, p2 = (a + b) / n, (a + cc) / n
    l1, u1 = wilson(a + b, n, z)
    l2, u2 = wilson(a + cc, n, z)
    denom = (a + b) * (cc + d) * (a + cc) * (b + d)
    if denom == 0:
        phi = 0.0
    else:  # the correlation of the two outcomes, continuity-corrected when positive (as Newcombe does)
        num = a * d - b * cc
        phi = (max(num - n / 2, 0.0) if num > 0 else num) / math.sqrt(denom)
    dl1, du1, dl2, du2 = p1 - l1, u1 - p1, p2 - l2, u2 - p2
    delta = math.sqrt(max(dl1 ** 2 - 2 * phi * dl1 * du2 + du2 ** 2, 0.0))
    eps = math.sqrt(max(du1 ** 2 - 2 * phi * du1 * dl2 + dl2 ** 2, 0.0))
    theta = p1 - p2
    return round(100 * max(theta - delta, -1.0), 4), round(100 * min(theta + eps, 1.0), 4)


def pack_bits(correct: np.ndarray) -> str:
    return base64.b64encode(np.packbits(np.asarray(correct, bool)).tobytes()).decode("ascii")


def unpack_bits(text: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(base64.b64decode(text), np.uint8))[:n].astype(bool)


def pack_classes(classes: np.ndarray) -> str:
    """Class indices, one per image, as base64 of little-endian uint16 (uint32 past 65 536 classes)."""
    classes = np.asarray(classes)
    dtype = "<u2" if classes.size == 0 or int(classes.max()) < 1 << 16 else "<u4"
    return base64.b64encode(classes.astype(dtype).tobytes()).decode("ascii")


def unpack_classes(text: str, n: int) -> np.ndarray:
    """``pack_classes``' indices for ``n`` images (the width read off the length)."""
    raw = base64.b64decode(text)
    if len(raw) not in (2 * n, 4 * n):
        raise ValueError(f"{len(raw)} bytes of classes for {n} images")
    return np.frombuffer(raw, "<u2" if len(raw) == 2 * n else "<u4").astype(np.int64)


def intervals_overlap(a: tuple[float, float] | None, b: tuple[float, float] | None) -> bool:
    """Whether two intervals share a point; a missing one overlaps everything (nothing is known)."""
    if a is None or b is None:
        return True
    return a[0] <= b[1] and b[0] <= a[1]
