"""``python -m edgeres.sources.keras_process MODEL ARCH OUT``: a Keras model mapped in a process of its own
(``loading.map_in_child``). Loads, maps and verifies it (``loading.map_keras_here``) and writes the spec as JSON
and the weights as an ``.npz`` to the folder OUT (never a pickle), or the one-line ``InputError`` that refused
it; the caller reads them back, so TensorFlow and the Keras model never enter its process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from edgeres.errors import InputError
from edgeres.sources.loading import KERAS_ERROR_FILE, KERAS_SPEC_FILE, KERAS_WEIGHTS_FILE, map_keras_here
from edgeres.targets.base import die_with_parent, rarer_collections


def main(argv: list[str]) -> int:
    die_with_parent()
    rarer_collections()
    model, arch, out = Path(argv[0]), argv[1] or None, Path(argv[2])
    import numpy as np

    try:
        spec, state_dict = map_keras_here(model, arch)
    except InputError as e:
        (out / KERAS_ERROR_FILE).write_text(str(e))
        return 2
    np.savez(out / KERAS_WEIGHTS_FILE, **{k: v.detach().cpu().numpy() for k, v in state_dict.items()})
    (out / KERAS_SPEC_FILE).write_text(json.dumps(spec.to_dict()))  # last: its presence says the weights are whole
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
