"""The CPU features that decide the int8 recipe (VNNI on x86, dot-product on ARM). Reads /proc/cpuinfo."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimd", "asimddp", "i8mm")


@dataclass(frozen=True)
class CpuFeatures:
    """``arch`` is "x86", "arm" or the machine name; ``flags`` the int8-relevant ones present."""

    arch: str
    flags: tuple[str, ...]

    @property
    def vnni(self) -> bool:
        """x86 int8 dot products accumulate straight into int32 (no int16 saturation)."""
        return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(self.flags))


def read_cpuinfo(cpuinfo_path: str | Path = "/proc/cpuinfo") -> tuple[dict[str, str], set[str]]:
    """(first value of each "model name" / "hardware" / "model" key, all feature flags); empty if unreadable."""
    names: dict[str, str] = {}
    flags: set[str] = set()
    try:
        text = Path(cpuinfo_path).read_text(errors="replace")
    except OSError:  # not Linux (macOS, Windows): no flags known
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "model") and value.strip():
            names.setdefault(key, value.strip())
        elif key in ("flags", "features"):
            flags.update(value.split())
    return names, flags


# the int8-relevant aarch64 HWCAP bits (linux/arch/arm64/include/uapi/asm/hwcap.h): (AT_HWCAP or AT_HWCAP2, bit)
HWCAP_BITS = {"asimd": (16, 1), "asimddp": (16, 20), "sve": (16, 22), "i8mm": (26, 13), "bf16": (26, 14)}


def hwcap_flags(machine: str | None = None) -> set[str]:
    """aarch64 features from the auxiliary vector: what the runtimes pick their kernels by, and there even
    where /proc/cpuinfo is not the aarch64 kernel's (qemu-user shows the x86 host's). Empty elsewhere."""
    machine = (machine or platform.machine()).lower()
    if machine not in ("aarch64", "arm64") or machine != platform.machine().lower():
        return set()
    try:
        import ctypes

        getauxval = ctypes.CDLL(None).getauxval
        getauxval.restype, getauxval.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
    except (OSError, AttributeError):
        return set()
    return {name for name, (word, bit) in HWCAP_BITS.items() if getauxval(word) >> bit & 1}


def cpu_features(cpuinfo_path: str | Path = "/proc/cpuinfo", machine: str | None = None) -> CpuFeatures:
    """Flags from ``cpuinfo_path`` (none if unreadable, e.g. on macOS or Windows)."""
    machine = (machine or platform.machine()).lower()
    arch = "x86" if machine in ("x86_64", "amd64", "i686", "x86") else "arm" if machine in ("aarch64", "arm64") or machine.startswith("arm") else machine
    _, flags = read_cpuinfo(cpuinfo_path)
    if arch == "arm" and not {"asimd", "asimddp", "i8mm"} & flags:
        flags |= hwcap_flags(machine)
    return CpuFeatures(arch, tuple(f for f in INT8_FLAGS if f in flags))
