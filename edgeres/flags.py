"""Range checks for numeric command-line flags, shared by every command so each bad value is refused
before any work, in the same words. NaN compares False with every bound, so a plain ``x < 1`` lets it
through (``--seconds nan`` then never ends): finiteness is checked first."""

from __future__ import annotations

import math
from typing import Iterable

from edgeres.errors import InputError

# No edge CPU has more cores, more threads than cores only slows inference down, and runtimes stall
# for minutes creating tens of thousands of threads instead of failing.
MAX_THREADS = 256
THREADS_WHY = "more threads than an edge CPU has cores only slows inference, and runtimes stall creating them"


def check_number(flag: str, value: float | int | None, *, at_least: float | None = None,
                 above: float | None = None, at_most: float | None = None, why: str = "") -> None:
    """Refuse a non-finite ``value`` or one outside the bounds; ``None`` (flag not given) passes.

    ``why`` explains the upper bound, which is a choice of ours rather than a law of arithmetic."""
    if value is None:
        return
    given = f"{flag} {_show(value)}"
    if not math.isfinite(value):
        raise InputError(f"{given}: must be a finite number")
    if at_least is not None and value < at_least:
        raise InputError(f"{given}: must be at least {_show(at_least)}")
    if above is not None and value <= above:
        raise InputError(f"{given}: must be " + ("positive" if above == 0 else f"more than {_show(above)}"))
    if at_most is not None and value > at_most:
        raise InputError(f"{given}: must be at most {_show(at_most)}" + (f" ({why})" if why else ""))


def _show(number: float | int) -> str:
    return f"{number:g}" if isinstance(number, float) else str(number)


def check_threads(flag: str, values: int | Iterable[int] | None) -> None:
    """One thread count or several, each in 1..MAX_THREADS."""
    if values is None:
        return
    for value in [values] if isinstance(values, int) else values:
        check_number(flag, value, at_least=1, at_most=MAX_THREADS, why=THREADS_WHY)


def check_remote(flag: str, destination: str | None) -> None:
    """An ssh destination: ``USER@HOST`` or an ~/.ssh/config alias, never empty, an option or half an address.

    ``None`` (flag not given) passes; an empty value is refused rather than read as "run here"."""
    if destination is None:
        return
    given = f"{flag} {destination!r}"
    expected = "expected USER@HOST (or an ssh config alias), e.g. pi@raspberrypi.local"
    if not destination.strip():
        raise InputError(f"{given}: empty; {expected}, or leave {flag} out to run here")
    if destination.startswith("-") or any(c.isspace() or not c.isprintable() for c in destination):
        raise InputError(f"{given}: {expected}")
    user, at, host = destination.rpartition("@")
    if at and (not user or not host or host.startswith("-")):
        raise InputError(f"{given}: the {'host' if not host or host.startswith('-') else 'user'} is missing; "
                         f"{expected}")
