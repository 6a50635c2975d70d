"""One image file → uint8 H×W×3 RGB as the photo is meant to be seen: the one decoding rule of edgeres.

``export-app --kind python`` copies this module's source into the app's classify.py (standalone: numpy
and Pillow only, no edgeres), so calibration, eval, ``predict`` and the app decode every file alike.
Keep it importable on its own: standard library, numpy and Pillow only; messages name no path (the
caller puts its own in front).

The rule: only a regular file is opened; only JPEG/PNG/BMP/WebP/TIFF/GIF content is decoded (never
EPS, whose decoder is Ghostscript); the size the header declares is checked before any pixel is
decoded; the EXIF orientation is applied (a phone stores a portrait photo as landscape pixels plus a
tag); 16-bit greyscale is scaled to 8 bits; every other mode becomes RGB by Pillow's convert —
greyscale repeated, palette looked up, CMYK converted, alpha dropped as torchvision's and Keras'
loaders drop it; a GIF or TIFF with several frames gives its first.
"""

from __future__ import annotations

import os
import stat
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps

IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "TIFF", "GIF")  # Pillow's names; JPEG includes phones' MPO
# Pillow's own warning threshold (~89 MP, 268 MB decoded as RGB): far beyond any photo a ResNet is fed
MAX_IMAGE_PIXELS = 89_478_485
# JPEG cannot store a longer side (WebP: 16383), so no camera photo or panorama is refused by it
MAX_IMAGE_SIDE_PX = 65_535
# the shorter side is scaled to the model's input, so a 1×65535 strip would become 256×16.7M pixels
MAX_IMAGE_ASPECT = 50
EXIF_ORIENTATION = 0x0112
_SPECIAL_FILES = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                  (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))
# what a damaged file (or a damaged EXIF block) makes Pillow raise while reading headers or pixels
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError, KeyError, TypeError)


class ImageRefused(ValueError):
    """A file that is not decoded; the message says why and what to do, without the path."""


def decode_image(path: str) -> np.ndarray:
    """The file at ``path`` as uint8 H×W×3 RGB, upright (or ``ImageRefused``)."""
    try:
        _check_regular(os.stat(path).st_mode)
        # O_NONBLOCK: should the path have become a FIFO since the stat, the open returns instead of waiting
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise ImageRefused(f"cannot be opened ({e.strerror or e}); check that it exists and can be read") from None
    with os.fdopen(fd, "rb") as f:
        _check_regular(os.fstat(f.fileno()).st_mode)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, in one line
                with Image.open(f, formats=IMAGE_FORMATS) as im:  # reads the header only
                    check_declared_size(*im.size)
                    orientation = _orientation(im)
                    im.load()
                    if orientation != 1:
                        im = ImageOps.exif_transpose(im)
                    return to_rgb8(im)
        except ImageRefused:
            raise
        except Image.UnidentifiedImageError:
            raise ImageRefused(f"cannot be read as an image: its content is not {_formats_text()}; "
                               "convert it to one of those or remove it") from None
        except Image.DecompressionBombError as e:  # Pillow refuses in open() itself beyond twice its limit
            raise ImageRefused(_too_large(f"is too large to decode ({e})")) from None
        except _DECODE_ERRORS as e:
            raise ImageRefused(f"cannot be read as an image ({type(e).__name__}: {e}); the file is damaged or "
                               "truncated: remove or replace it") from None


def _check_regular(mode: int) -> None:
    for test, kind in _SPECIAL_FILES:
        if test(mode):
            raise ImageRefused(f"is {kind}, not an image file; give a regular image file")


def check_declared_size(width: int, height: int) -> None:
    """Refuse a size that would take gigabytes to decode or to resize, before any pixel is decoded."""
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageRefused(_too_large(f"is {width}×{height} pixels"))
    if max(width, height) > MAX_IMAGE_SIDE_PX:
        raise ImageRefused(f"image is {width}×{height} pixels; a side above {MAX_IMAGE_SIDE_PX} pixels is refused "
                           "(no camera makes one); crop or downscale it, or remove it")
    if width < 1 or height < 1:
        raise ImageRefused(f"image is {width}×{height} pixels (empty); remove it")
    if max(width, height) > MAX_IMAGE_ASPECT * min(width, height):
        raise ImageRefused(f"image is {width}×{height} pixels, its longer side more than {MAX_IMAGE_ASPECT} times its "
                           "shorter (scaling the shorter side to the model's input would take gigabytes); crop it or "
                           "remove it")


def _too_large(what: str) -> str:
    return (f"image {what}; images above {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels are refused "
            "(decoding would take gigabytes); downscale it or remove it")


def _formats_text() -> str:
    names = [{"WEBP": "WebP"}.get(n, n) for n in IMAGE_FORMATS]
    return ", ".join(names[:-1]) + " or " + names[-1]


def _orientation(im) -> int:
    """The EXIF orientation 1..8 (1: stored upright); a damaged EXIF block leaves the pixels as stored."""
    try:
        value = im.getexif().get(EXIF_ORIENTATION, 1)
    except _DECODE_ERRORS:
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def to_rgb8(im) -> np.ndarray:
    """uint8 H×W×3 RGB of a decoded Pillow image, by the rule in the module docstring."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # Pillow's convert would clip 16-bit values at 255
        grey = (np.clip(np.asarray(im), 0, 65535).astype(np.uint16) >> 8).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=-1))
    if im.mode not in ("RGB", "RGBA", "RGBX", "L", "LA", "1", "P", "PA", "CMYK", "YCbCr", "F"):
        raise ImageRefused(f"has pixel mode {im.mode}, which is not converted to RGB here; save it as an RGB JPEG or PNG")
    return np.asarray(im.convert("RGB"), dtype=np.uint8)
