"""The int8 stage: calibrate on the fp32 reference once, estimate every activation's range once, and
hand each int8 consumer what it compiles from, with the recipe chosen for that consumer.

``options``   its own ``--option int8.*`` settings (the old ``onnx.*`` spellings are lifted with a note)
``ranges``    activation ranges of the reference ONNX over the calibration images (bounded memory)
``recipe``    the recipe per consumer: what each runtime's int8 kernels need (``TargetInfo.int8_recipe``),
              with the user's options on top
``qdq``       the QDQ ONNX written from the shared ranges with one recipe (what QDQ consumers compile)

Runtimes (onnxruntime, onnx) are imported inside the functions that need them.
"""

from edgeres.int8.options import LEGACY_TARGET, OPTIONS, STAGE, check_options, lift_legacy_options
from edgeres.int8.qdq import qdq_record, quantize_qdq
from edgeres.int8.ranges import compute_ranges, reference_activations
from edgeres.int8.recipe import choose_recipe, recipes_for

__all__ = ["LEGACY_TARGET", "OPTIONS", "STAGE", "check_options", "choose_recipe", "compute_ranges", "reference_activations",
           "lift_legacy_options", "qdq_record", "quantize_qdq", "recipes_for"]
