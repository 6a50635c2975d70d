"""The int8 recipe per consumer: each runtime declares what its int8 kernels need on a CPU
(``TargetInfo.int8_recipe``); the user's ``--option int8.*`` settings go on top."""

from __future__ import annotations

from edgeres.calibration.cpu import CpuFeatures
from edgeres.int8.options import STAGE, check_options

FULL_LEVELS = 127  # symmetric int8 weights, ±127
REDUCED_LEVELS = 64  # 7-bit weights (reduce_range), ±64
QDQ_KEYS = ("activation_type", "weight_type", "per_channel", "reduce_range")  # what shapes a QDQ model


def choose_recipe(info, cpu: CpuFeatures, options: dict | None = None) -> dict:
    """The recipe of consumer ``info`` (a ``TargetInfo``) on ``cpu``: activation type, ``reduce_range``,
    per-channel weights, with the reason; ``options`` (``int8.*``) override what the runtime would choose."""
    options = check_options(dict(options or {}))
    if info.int8_recipe is None:
        raise ValueError(f"{info.name} declares no int8 recipe")
    activation_type, reduce_range, reason = info.int8_recipe(cpu)
    if "activation_type" in options:
        activation_type = str(options["activation_type"]).lower()
        reason = f"set by option {STAGE}.activation_type"
    if "reduce_range" in options:
        reduce_range, reason = options["reduce_range"], f"set by option {STAGE}.reduce_range"
    per_channel = options.get("per_channel", True)
    return {"activation_type": activation_type, "weight_type": "int8", "per_channel": per_channel,
            "reduce_range": reduce_range, "reason": reason, "cpu_features": list(cpu.flags)}


def weight_levels(recipe: dict) -> int:
    """The int8 weight grid a recipe quantises to (steps a side), which ``--quant accurate|finetune`` fit."""
    return REDUCED_LEVELS if recipe.get("reduce_range") else FULL_LEVELS


def same_qdq(a: dict, b: dict) -> bool:
    """Do two recipes make the same QDQ model (the reason may differ)?"""
    return all(a.get(k) == b.get(k) for k in QDQ_KEYS)


def recipes_for(infos, cpu: CpuFeatures, options: dict | None = None) -> dict[str, dict]:
    """{target name: recipe} for the int8 consumers ``infos``."""
    return {info.name: choose_recipe(info, cpu, options) for info in infos}
