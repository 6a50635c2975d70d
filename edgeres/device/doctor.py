"""What this machine has: Python, runtimes, CPU features, and the device profile that suits it."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path

from edgeres import targets
from edgeres.calibration.cpu import hwcap_flags, read_cpuinfo

# what edgeres itself builds with; each target's runtime and tools come from its record (targets.infos)
CORE_DISTS = ("torch", "torch-pruning", "onnx")
FLAG_NAMES = {"avx2": "avx2", "avx512f": "avx512", "avx512_vnni": "avx512-vnni", "avx_vnni": "avx-vnni",
              "asimddp": "dotprod", "asimd": "neon", "sve": "sve", "i8mm": "i8mm", "fma": "fma"}
ARM_FLAGS = ("asimddp", "asimd", "sve", "i8mm")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def installed_versions() -> dict[str, str | None]:
    """Version (or None) of every distribution edgeres and its targets use, by distribution name."""
    dists = list(CORE_DISTS)
    for info in targets.infos().values():
        dists += [d for d in (info.dist, *info.tools) if d not in dists]
    return {d: _version(d) for d in dists}


def target_status() -> dict[str, dict]:
    """Per target: its runtime distribution, whether that is installed, and what it makes."""
    return {name: {"title": info.title, "dist": info.dist, "version": _version(info.dist),
                   "precisions": list(info.precisions), "options": [o.name for o in info.options]}
            for name, info in targets.infos().items()}


def cpu_info(cpuinfo_path: str = "/proc/cpuinfo", machine: str | None = None) -> dict:
    """CPU model, cores and the SIMD features that decide int8 speed (VNNI on x86; on aarch64 the
    ``Features`` line: asimd = NEON, asimddp = dot-product, i8mm = int8 matrix multiply)."""
    machine = machine or platform.machine()
    names, flags = read_cpuinfo(cpuinfo_path)
    arm = machine.lower() in ("aarch64", "arm64")
    if arm and not set(ARM_FLAGS) & flags:  # no aarch64 Features line (e.g. under qemu-user): ask the kernel
        flags |= hwcap_flags(machine)
    # x86 has "model name" (and a numeric "model"); a Raspberry Pi has "Model : Raspberry Pi 5 ..."
    model = names.get("model name") or names.get("hardware") or names.get("model") or machine
    features = sorted({FLAG_NAMES[f] for f in flags if f in FLAG_NAMES and (f in ARM_FLAGS) == arm})
    return {"model": model, "machine": machine, "cores": os.cpu_count() or 1, "features": features}


def suggest_profile(cpu: dict, model_file: str = "/proc/device-tree/model",
                    android_marker: str = "/system/build.prop") -> str:
    """The device profile name for this CPU (see ``edgeres/profiles``): a Pi by its board name, else an
    aarch64 CPU by its int8 features (A76-class dot-product like a Pi 5, A72-class without like a Pi 4)."""
    machine = cpu["machine"].lower()
    try:
        board = Path(model_file).read_text(errors="replace")
    except OSError:
        board = ""
    if "Raspberry Pi 5" in board:
        return "rpi5"
    if "Raspberry Pi 4" in board:
        return "rpi4"
    if machine in ("aarch64", "arm64"):
        if Path(android_marker).exists():
            return "android-arm64"
        return "rpi5" if "dotprod" in cpu["features"] else "rpi4"
    if machine in ("x86_64", "amd64"):
        if {"avx512-vnni", "avx-vnni"} & set(cpu["features"]):
            return "x86-vnni"
        if "avx2" in cpu["features"]:
            return "x86-avx2"
    return "generic"


def doctor() -> dict:
    cpu = cpu_info()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "runtimes": installed_versions(),
        "targets": target_status(),
        "cpu": cpu,
        "suggested_profile": suggest_profile(cpu),
    }
