"""Top-1 agreement between a bundle's OpenVINO and ONNX artifacts of one precision (default int8).

Both are built from the same calibration ranges (the QDQ ONNX), so they should pick the same class
for nearly every image; issue 5 asks for ≥ 99 %.

    python benchmarks/openvino_onnx_agreement.py BUNDLE --data ../shared/data/cifar10/cifar10_dev.npz
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def agreement(bundle: Path, data: Path, precision: str = "int8", limit: int | None = None,
              threads: int | None = None) -> dict:
    from edgeres.calibration import Preprocess, open_dataset
    from edgeres.bundle import ok_artifacts, read_manifest
    from edgeres.measure.evaluate import collect_logits, topk_accuracy
    from edgeres.targets import get_target

    manifest = read_manifest(bundle)
    pre = Preprocess.from_dict(manifest["preprocess"])
    files = {a["target"]: a["file"] for a in ok_artifacts(manifest) if a["precision"] == precision}
    missing = {"onnx", "openvino"} - set(files)
    if missing:
        raise SystemExit(f"{bundle}: has no ok {precision} artifact for {', '.join(sorted(missing))}")
    ds = open_dataset(data, require_labels=True)
    labels = ds.labels[ds.spread(limit)]
    logits = {t: collect_logits(get_target(t).load_runner(bundle / files[t], threads=threads), ds, pre, limit=limit,
                                description=f"{t} {precision}") for t in ("onnx", "openvino")}
    same = logits["onnx"].argmax(1) == logits["openvino"].argmax(1)
    return {"precision": precision, "images": int(len(labels)), "top1_agreement_pct": round(float(same.mean() * 100), 2),
            "disagreeing_images": int((~same).sum()),
            "top1": {t: topk_accuracy(v, labels)["top1"] for t, v in logits.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--precision", default="int8")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    print(json.dumps(agreement(args.bundle, args.data, args.precision, args.limit, args.threads), indent=2))


if __name__ == "__main__":
    main()
