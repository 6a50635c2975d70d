"""Device profiles are data (``edgeres/device/profiles/*.json``): targets, precisions, threads and
quantiser options that suit a device. ``auto`` picks the profile ``doctor`` suggests."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from edgeres.errors import InputError

PROFILE_DIR = Path(__file__).with_name("profiles")


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    targets: tuple[str, ...]
    precisions: tuple[str, ...]
    threads: int | None
    bench_threads: tuple[int, ...]
    options: dict = field(default_factory=dict)


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def load_profile(name: str) -> DeviceProfile:
    """The profile ``name`` (or the suggested one for ``auto``)."""
    if name == "auto":
        from edgeres.device.doctor import cpu_info, suggest_profile

        name = suggest_profile(cpu_info())
    path = PROFILE_DIR / f"{name}.json"
    if not path.exists():
        raise InputError(f"--device: unknown profile {name!r}; choose auto or one of {', '.join(profile_names())}")
    d = json.loads(path.read_text())
    return DeviceProfile(name=d["name"], description=d["description"], targets=tuple(d["targets"]),
                         precisions=tuple(d["precisions"]), threads=d.get("threads"),
                         bench_threads=tuple(d.get("bench_threads", [1])), options=d.get("options", {}))
