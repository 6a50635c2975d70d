"""Dataset readers: an ``.npz`` (``x`` uint8 N×H×W×3 RGB, ``y`` labels) or an image folder
(``root/<class>/*.png|jpg``). Images are read batch by batch so memory stays bounded."""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np

from calibration.errors import DataError
from calibration.preprocess import Preprocess, check_uint8_rgb

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass
class ImageDataset:
    """Images with optional integer labels; ``read(indices)`` returns uint8 N×H×W×3 RGB."""

    source: str
    count: int
    labels: np.ndarray | None
    class_names: tuple[str, ...] | None = None
    _array: np.ndarray | None = field(default=None, repr=False)
    _files: list[str] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return self.count

    def read(self, indices: np.ndarray, preprocess: Preprocess | None = None) -> np.ndarray:
        """uint8 images at ``indices``, brought to the preprocessing geometry when given."""
        if self._array is not None:
            imgs = self._array[np.asarray(indices)]
            return preprocess.geometry(imgs, self.source) if preprocess else imgs
        out = []
        for i in np.asarray(indices):
            img = _read_image(self._files[int(i)])[None]
            out.append(preprocess.geometry(img, self._files[int(i)]) if preprocess else img)
        return np.concatenate(out) if out else np.zeros((0, 1, 1, 3), np.uint8)

    def spread(self, limit: int | None) -> np.ndarray:
        """Indices of at most ``limit`` images spread evenly over the set (files are often class-major)."""
        if limit is None or limit >= self.count:
            return np.arange(self.count)
        if limit <= 0:
            raise DataError(f"{self.source}: asked for {limit} images; give a positive count")
        return np.unique(np.linspace(0, self.count - 1, limit).round().astype(int))

    def batches(
        self, preprocess: Preprocess, batch_size: int = 64, limit: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """Yield (float32 network input, labels or None) batches of at most ``batch_size``."""
        indices = self.spread(limit)
        at_size = replace(preprocess, resize=None)  # read() already resized and cropped: do not do it twice
        for start in range(0, len(indices), batch_size):
            idx = indices[start : start + batch_size]
            x = at_size(self.read(idx, preprocess), self.source)
            yield x, (None if self.labels is None else self.labels[idx])

    def check_image_size(self, preprocess: Preprocess) -> None:
        """Fail early (before any work) if the first image cannot take this preprocessing."""
        self.read(np.arange(min(1, self.count)), preprocess)


def open_dataset(path: str | os.PathLike, *, require_labels: bool = False, min_images: int = 1) -> ImageDataset:
    """Open an ``.npz`` file or an image folder; raise ``DataError`` naming the file on bad input."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder; give an .npz (x uint8 N×H×W×3, y labels) or an image folder root/<class>/*.png")
    ds = _open_folder(p) if p.is_dir() else _open_npz(p)
    if ds.count < min_images:
        raise DataError(f"{p}: has {ds.count} image(s) but at least {min_images} are needed")
    if require_labels and ds.labels is None:
        raise DataError(f"{p}: has no labels (y) but accuracy needs them; add y to the npz or use class folders")
    return ds


def _open_npz(p: Path) -> ImageDataset:
    if p.suffix.lower() != ".npz":
        raise DataError(f"{p}: not an .npz file or image folder; give x uint8 N×H×W×3 and y in an .npz")
    try:
        npz = np.load(p, allow_pickle=False)
        keys = set(npz.files)
        if "x" not in keys:
            raise DataError(f"{p}: has no array 'x' (found {sorted(keys) or 'none'}); store images as x, uint8 N×H×W×3")
        x = npz["x"]
        y = npz["y"] if "y" in keys else None
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{p}: cannot be read as .npz ({type(e).__name__}: {e}); the file is corrupt or truncated") from None
    if np.issubdtype(x.dtype, np.floating) and x.size and not np.isfinite(x).all():
        raise DataError(f"{p}: x contains NaN or Inf values; give uint8 images 0..255")
    if x.ndim == 4 and x.shape[-1] != 3:
        raise DataError(f"{p}: images have {x.shape[-1]} channel(s) but RGB (3) is needed; x must be N×H×W×3")
    if x.ndim == 4 and x.shape[0] == 0:
        raise DataError(f"{p}: contains no images (x has shape {x.shape})")
    check_uint8_rgb(x, str(p))
    if y is not None:
        y = np.asarray(y)
        if y.ndim != 1 or len(y) != len(x):
            raise DataError(f"{p}: y has shape {y.shape} but x holds {len(x)} images; give one integer label per image")
        if not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{p}: y has dtype {y.dtype}; labels must be integers")
        y = y.astype(np.int64)
    return ImageDataset(source=str(p), count=len(x), labels=y, _array=x)


def _open_folder(p: Path) -> ImageDataset:
    class_dirs = sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))
    if class_dirs:
        files, labels = [], []
        for label, d in enumerate(class_dirs):
            for f in sorted(d.iterdir()):
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    files.append(str(f))
                    labels.append(label)
        names = tuple(d.name for d in class_dirs)
        y = np.asarray(labels, np.int64)
    else:  # unlabelled folder of images: fine for calibration
        files = [str(f) for f in sorted(p.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
        names, y = None, None
    if not files:
        raise DataError(f"{p}: folder holds no images ({', '.join(IMAGE_SUFFIXES)}); use root/<class>/*.png")
    return ImageDataset(source=str(p), count=len(files), labels=y, class_names=names, _files=files)


def _read_image(path: str) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow ships with the install
        raise DataError("reading image folders needs Pillow: pip install pillow") from None
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot be read as an image ({e}); remove or replace it") from None
