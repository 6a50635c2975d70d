"""``--option int8.NAME=VALUE``: the int8 stage's own settings, checked before any work.

Until the int8 stage had its own name these were spelled ``onnx.NAME`` (the ONNX target used to be the
stage); those spellings are still accepted, moved here with a note, so old commands and device
profiles keep working."""

from __future__ import annotations

from edgeres.targets.base import TargetOption

STAGE = "int8"
LEGACY_TARGET = "onnx"
ACTIVATION_TYPES = ("uint8", "int8")
OPTIONS = (
    TargetOption("activation_type", str, None, "int8 activations: uint8 or int8 [chosen per runtime for the CPU]",
                 ACTIVATION_TYPES),
    TargetOption("reduce_range", bool, None, "7-bit weights (x86 without VNNI) [chosen per runtime for the CPU]"),
    TargetOption("per_channel", bool, True, "per-channel int8 weights"),
    TargetOption("float_nodes", list, (), "ONNX node names of the reference kept in float (comma list)"),
)
NAMES = tuple(o.name for o in OPTIONS)


def _option(name: str) -> TargetOption:
    from edgeres.targets.base import OptionError

    for o in OPTIONS:
        if o.name == name:
            return o
    raise OptionError(f"--option: unknown option {STAGE}.{name}; {STAGE} takes "
                      + ", ".join(f"{STAGE}.{n}" for n in NAMES))


def check_options(options: dict, *, spelled: str = STAGE) -> dict:
    """``options`` with each value checked (unknown names refused, naming the flag as the user wrote it)."""
    return {k: _option(k).parse(spelled, v) for k, v in options.items()}


def lift_legacy_options(target_options: dict) -> tuple[dict, list[str]]:
    """``target_options`` with ``onnx.<int8 option>`` moved to ``int8.<option>`` (an explicit ``int8.*``
    wins), and a note for each one moved."""
    legacy = {k: v for k, v in (target_options.get(LEGACY_TARGET) or {}).items() if k in NAMES}
    if not legacy:
        return target_options, []
    check_options(legacy, spelled=LEGACY_TARGET)
    lifted = {t: dict(o) for t, o in target_options.items()}
    rest = {k: v for k, v in lifted.pop(LEGACY_TARGET).items() if k not in legacy}
    if rest:
        lifted[LEGACY_TARGET] = rest
    lifted[STAGE] = {**legacy, **lifted.get(STAGE, {})}
    notes = [f"--option {LEGACY_TARGET}.{k} is now spelled --option {STAGE}.{k} (it sets the int8 stage "
             "for every runtime); taken as such" for k in legacy]
    return lifted, notes
