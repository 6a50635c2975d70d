#!/usr/bin/env python3
"""Classify images with the model beside this script.

Made by `edgeres export-app`; needs only numpy, Pillow and the model's runtime (requirements.txt),
plus OpenCV for --camera. Usage:

    python classify.py IMAGE... | FOLDER [--top K] [--json] [--threads N]
    python classify.py --camera 0        (needs: pip install opencv-python)

The preprocessing below is the bundle's, written out: decode with Pillow by edgeres' own rule (EXIF
orientation applied; 16-bit, greyscale, palette, CMYK and alpha images as edgeres reads them), resize
with Pillow's filter the bundle names (antialiased as torchvision does, unless it says not), scale,
mean/std, layout.
"""

from __future__ import annotations

import argparse
import json
import sys
import unicodedata
from pathlib import Path

import numpy as np
from PIL import Image

CONFIG: dict = {}  # written by edgeres export-app: runtime, model, labels, preprocess, input
HERE = Path(__file__).resolve().parent
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")  # the formats decoded


# -- preprocessing --------------------------------------------------------------------------------

FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """Pillow's resize with the bundle's filter; not antialiased: the filter sampled at output pixel centres."""
    if img.shape[:2] == (h, w):
        return img
    pre = CONFIG["preprocess"]
    name = pre.get("filter", "bilinear")
    if pre.get("antialias", True) or name == "nearest":
        return np.asarray(Image.fromarray(img).resize((w, h), FILTERS[name]))
    src_h, src_w = img.shape[:2]
    return np.asarray(Image.fromarray(img).transform((w, h), Image.AFFINE, (src_w / w, 0, 0, 0, src_h / h, 0),
                                                     FILTERS[name]))


def geometry(img: np.ndarray) -> np.ndarray:
    """H×W×3 uint8 → size×size×3 uint8 as the model was trained (or ValueError naming the size)."""
    pre = CONFIG["preprocess"]
    size, resize, h, w = pre["size"], pre.get("resize"), img.shape[0], img.shape[1]
    if pre.get("resize_mode", "shorter_side_crop") == "direct":
        return _resize(img, size, size)
    if resize is None:
        if (h, w) != (size, size):
            raise ValueError(f"image is {h}×{w} but the model takes {size}×{size} images as they are")
        return img
    nh, nw = (resize, max(size, int(resize * w / h))) if h <= w else (max(size, int(resize * h / w)), resize)
    out = _resize(img, nh, nw)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    return out[top : top + size, left : left + size]


def model_input(pixels: np.ndarray) -> np.ndarray:
    """size×size×3 uint8 pixels → the model's 1×… input."""
    pre, spec = CONFIG["preprocess"], CONFIG["input"]
    if spec["pixels"]:  # the model normalises inside: it takes the pixel values
        x = pixels.astype(np.uint8 if spec["dtype"] == "uint8" else np.float32)[None]
    else:
        x = pixels[None].astype(np.float32) * np.float32(pre["scale"])
        if pre["channel_order"] == "BGR":
            x = x[..., ::-1]
        x = (x - np.asarray(pre["mean"], np.float32)) / np.asarray(pre["std"], np.float32)
    if spec["layout"] == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x)


# -- image files: edgeres' own decoding rule (EXIF orientation, 16-bit, size and format checks) ---------

from calibration.image_file import ImageRefused, decode_image  # export-app puts that module's source here


# -- runtimes: one loader per runtime, each returning run(x) -> logits ------------------------------

def load_onnxruntime(path: Path, threads):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def load_litert(path: Path, threads):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        from tflite_runtime.interpreter import Interpreter
    interp = Interpreter(model_path=str(path), num_threads=threads)
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    interp.resize_tensor_input(inp["index"], [1, *inp["shape"][1:]])
    interp.allocate_tensors()

    def run(x):
        dtype = np.dtype(inp["dtype"])
        if dtype.kind in "iu" and x.dtype != dtype:  # quantised input: scale the float values onto its grid
            scale, zero = inp["quantization"]
            info = np.iinfo(dtype)
            x = np.clip(np.round(x / scale) + zero, info.min, info.max)
        interp.set_tensor(inp["index"], x.astype(dtype))
        interp.invoke()
        y = interp.get_tensor(out["index"])
        if np.dtype(out["dtype"]).kind in "iu":
            scale, zero = out["quantization"]
            y = (y.astype(np.float32) - zero) * scale
        return y.astype(np.float32)
    return run


def load_openvino(path: Path, threads):
    import openvino as ov

    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    request = ov.Core().compile_model(str(path), "CPU", config).create_infer_request()

    def run(x):
        request.infer({0: x})
        return np.array(request.get_output_tensor(0).data, dtype=np.float32)
    return run


LOADERS = {"onnxruntime": load_onnxruntime, "litert": load_litert, "openvino": load_openvino}


# -- classify -------------------------------------------------------------------------------------

def top_k(logits: np.ndarray, labels: list[str], k: int) -> list[dict]:
    z = logits.astype(np.float64) - logits.max()
    probs = np.exp(z) / np.exp(z).sum()
    return [{"index": int(i), "label": labels[i], "score": round(float(probs[i]), 6)}
            for i in np.argsort(-probs, kind="stable")[:k]]


def image_files(items: list[str]) -> list[str]:
    files = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            files += sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        elif p.is_file():
            files.append(str(p))
        elif p.exists():  # a FIFO or a device would block or never end: refused without opening it
            sys.exit(f"classify: error: {printable(str(p))}: is not a regular file; give image files or folders")
        else:
            sys.exit(f"classify: error: {printable(str(p))}: no such image file or folder")
    return files


BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def printable(text: str) -> str:
    """``text`` with control characters escaped, so a file name or label cannot drive the terminal (the
    rule of edgeres.tables.printable; --json keeps the exact text)."""
    if text.isprintable():
        return text
    return "".join(ascii(c)[1:-1] if unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp") or c in BIDI_CONTROLS
                   else c for c in text)


def camera(run, labels: list[str], index: int, k: int) -> None:
    """Classify frames from camera ``index`` until Ctrl-C (OpenCV captures; the rest is as for files)."""
    try:
        import cv2
    except ImportError:
        sys.exit("classify: error: --camera needs OpenCV: pip install opencv-python")
    cap = cv2.VideoCapture(index)
    if not cap.isOpened():
        sys.exit(f"classify: error: camera {index} cannot be opened")
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            h, w = rgb.shape[:2]
            side = min(h, w)  # a centre square, so a model that takes images as they are gets its size
            square = rgb[(h - side) // 2 : (h + side) // 2, (w - side) // 2 : (w + side) // 2]
            pre = CONFIG["preprocess"]
            as_is = pre.get("resize") is None and pre.get("resize_mode") != "direct"
            # a model that takes images as they are gets the square scaled to its size first
            pixels = geometry(_resize(np.ascontiguousarray(square), pre["size"], pre["size"]) if as_is else square)
            best = top_k(run(model_input(pixels))[0], labels, k)
            print(", ".join(f"{printable(t['label'])} {t['score']:.3f}" for t in best), flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        cap.release()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Classify images with the model beside this script.")
    parser.add_argument("inputs", nargs="*", help="image files and/or folders of images")
    parser.add_argument("--top", type=int, default=5, help="classes to show per image")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--threads", type=int, default=None, help="runtime threads")
    parser.add_argument("--camera", type=int, default=None, metavar="INDEX", help="classify a camera's frames")
    args = parser.parse_args(argv)
    if args.top < 1:
        parser.error("--top must be at least 1")
    if not args.inputs and args.camera is None:
        parser.error("give image files or folders, or --camera INDEX")
    labels = (HERE / CONFIG["labels"]).read_text(encoding="utf-8").splitlines()
    try:
        run = LOADERS[CONFIG["runtime"]](HERE / CONFIG["model"], args.threads)
    except ImportError as e:
        sys.exit(f"classify: error: the runtime is not installed ({e}); pip install -r requirements.txt")
    if args.camera is not None:
        camera(run, labels, args.camera, args.top)
        return 0
    predictions, skipped = [], 0
    for f in image_files(args.inputs):
        try:
            x = model_input(geometry(decode_image(f)))
        except (OSError, ValueError) as e:  # ImageRefused is a ValueError
            print(f"classify: warning: {printable(f)}: {printable(str(e))}; skipped", file=sys.stderr)
            skipped += 1
            continue
        predictions.append({"file": f, "top": top_k(run(x)[0], labels, min(args.top, len(labels)))})
        if not args.json:
            print(f"{printable(f)}: " + ", ".join(f"{printable(t['label'])} {t['score']:.3f}"
                                                  for t in predictions[-1]["top"]), flush=True)
    if args.json:
        print(json.dumps({"predictions": predictions}, indent=2))
    if skipped:
        print(f"classify: warning: skipped {skipped} file(s) that could not be read as images", file=sys.stderr)
    return 0 if predictions else 2


if __name__ == "__main__":
    sys.exit(main())
