"""Dataset readers: an ``.npz`` (``x`` uint8 N×H×W×3 RGB, ``y`` labels) or an image folder
(``root/<class>/*.png|jpg``). Images are read batch by batch so memory stays bounded."""

from __future__ import annotations

import math
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from edgeres.calibration.errors import DataError
from edgeres.calibration.preprocess import Preprocess, check_uint8_rgb

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")  # the formats decoded
# An uncompressed npz member is memory-mapped; anything else is decompressed into memory, so a small
# compressed file could ask for any amount: refuse members that would need more than this.
MAX_IN_MEMORY_BYTES = 2 << 30
_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
# An image folder keeps the images it has decoded and brought to a geometry, up to this many bytes (the first ones
# read), for the next pass over the same photos: eval runs every artifact of a bundle on the same images and the
# preprocessing check every normalisation of a geometry (400 ImageNet photos at 224²: 57 MB; decoding and resizing
# one took ~4 ms, normalising its kept pixels ~0.8 ms)
KEEP_PIXELS_BYTES = 128 << 20  # ~850 photos at 224²: the first read of a bundle's ImageNet-size evaluation


@dataclass
class ImageDataset:
    """Images with optional integer labels; ``read(indices)`` returns uint8 N×H×W×3 RGB."""

    source: str
    count: int
    labels: np.ndarray | None
    class_names: tuple[str, ...] | None = None
    _array: np.ndarray | None = field(default=None, repr=False)
    _files: list[str] | None = field(default=None, repr=False)
    # per image, the position of its class folder in ``class_names`` (labels start out equal to it)
    _folder_index: np.ndarray | None = field(default=None, repr=False)
    class_indices: tuple[int, ...] | None = None  # set by ``number_classes``
    _kept: dict = field(default_factory=dict, repr=False)  # (file index, geometry key) -> uint8 pixels
    _kept_bytes: int = field(default=0, repr=False)

    def number_classes(self, class_indices: Sequence[int]) -> None:
        """Label each class folder with the class index at its position (e.g. matched to a model's labels)."""
        if self._folder_index is None or len(class_indices) != len(self.class_names):
            raise ValueError("number_classes needs one index per class folder")
        self.class_indices = tuple(int(i) for i in class_indices)
        self.labels = np.asarray(self.class_indices, np.int64)[self._folder_index]

    def __len__(self) -> int:
        return self.count

    def read(self, indices: np.ndarray, preprocess: Preprocess | None = None) -> np.ndarray:
        """uint8 images at ``indices``, brought to the preprocessing geometry when given."""
        return self.read_each(indices, [preprocess])[0]

    def read_each(self, indices: np.ndarray, geometries: Sequence[Preprocess | None]) -> list[np.ndarray]:
        """``read(indices, g)`` for every ``g`` of ``geometries``, each file decoded once (decoding an ImageNet
        JPEG costs about as much as resizing it) and not again while its pixels are kept (``KEEP_PIXELS_BYTES``)."""
        if self._array is not None:
            imgs = np.asarray(self._array[np.asarray(indices)])  # a plain copy, also from a memory-mapped x
            return [g.geometry(imgs, self.source) if g else imgs for g in geometries]
        keys = [g.geometry_key() if g else None for g in geometries]
        out: list[list[np.ndarray]] = [[] for _ in geometries]
        for i in np.asarray(indices).tolist():
            img = None
            for images, g, key in zip(out, geometries, keys):
                pixels = self._kept.get((i, key))
                if pixels is None:
                    if img is None:
                        img = _read_image(self._files[i])[None]
                    pixels = g.geometry(img, self._files[i]) if g else img
                    if self._kept_bytes + pixels.nbytes <= KEEP_PIXELS_BYTES:
                        self._kept[(i, key)] = pixels
                        self._kept_bytes += pixels.nbytes
                images.append(pixels)
        # concatenate copies: a caller that changes its batch does not change what is kept
        return [np.concatenate(images) if images else np.zeros((0, 1, 1, 3), np.uint8) for images in out]

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
        with zipfile.ZipFile(p) as zf:
            members = {(i.filename[:-4] if i.filename.endswith(".npy") else i.filename): i for i in zf.infolist()}
            if "x" not in members:
                raise DataError(f"{p}: has no array 'x' (found {sorted(members) or 'none'}); store images as x, uint8 N×H×W×3")
            x = _read_member(p, zf, members["x"], "x")
            y = _read_member(p, zf, members["y"], "y") if "y" in members else None
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError) as e:
        raise DataError(f"{p}: cannot be read as .npz ({type(e).__name__}: {e}); the file is corrupt or truncated") from None
    if np.issubdtype(x.dtype, np.floating) and x.size and not np.isfinite(x).all():
        raise DataError(f"{p}: x contains NaN or Inf values; give uint8 images 0..255")
    if x.ndim == 4 and x.shape[-1] != 3 and x.shape[1] == 3:
        raise DataError(f"{p}: x has shape {_dims(x.shape)}, which looks channels-first (N×3×H×W); images must be "
                        "N×H×W×3: save np.transpose(x, (0, 2, 3, 1)) instead")
    if x.ndim == 4 and x.shape[-1] != 3:
        raise DataError(f"{p}: images have {x.shape[-1]} channel(s) but RGB (3) is needed; x must be N×H×W×3")
    if x.ndim == 4 and x.shape[0] == 0:
        raise DataError(f"{p}: contains no images (x has shape {x.shape})")
    if x.ndim == 4 and 0 in x.shape[1:3]:
        raise DataError(f"{p}: images are {x.shape[1]}×{x.shape[2]} pixels (empty); give N×H×W×3 images with H, W ≥ 1")
    check_uint8_rgb(x, str(p))
    if y is not None:
        y = np.asarray(y)
        if y.ndim != 1 or len(y) != len(x):
            raise DataError(f"{p}: y has shape {y.shape} but x holds {len(x)} images; give one integer label per image")
        if not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{p}: y has dtype {y.dtype}; labels must be integers")
        y = y.astype(np.int64)
    return ImageDataset(source=str(p), count=len(x), labels=y, _array=x)


def _dims(shape: tuple) -> str:
    return "×".join(map(str, shape))


@dataclass(frozen=True)
class _NpyHeader:
    shape: tuple[int, ...]
    fortran_order: bool
    dtype: np.dtype
    length: int  # bytes before the array data inside the member

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _read_npy_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> _NpyHeader:
    with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version not in _NPY_HEADER_READERS:
            raise ValueError(f"npy format version {version[0]}.{version[1]} is not supported")
        shape, fortran_order, dtype = _NPY_HEADER_READERS[version](f)
        return _NpyHeader(tuple(shape), bool(fortran_order), dtype, f.tell())


def _read_member(p: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo, key: str) -> np.ndarray:
    """Array ``key`` of the npz, after its declared shape and dtype (the header only) were found sane."""
    if info.flag_bits & 0x1:
        raise DataError(f"{p}: {key} is encrypted; save the arrays with np.savez (no password)")
    header = _read_npy_header(zf, info)
    if header.dtype.hasobject:
        raise DataError(f"{p}: {key} is an object array ({header.dtype}); object arrays are refused because reading "
                        f"them needs pickle, which can run code; save plain arrays, e.g. np.savez(path, "
                        "x=np.asarray(x, np.uint8), y=np.asarray(y, np.int64))")
    if header.length + header.nbytes != info.file_size:
        raise DataError(f"{p}: {key} declares {_dims(header.shape)} {header.dtype} ({header.nbytes:,} bytes) but holds "
                        f"{max(0, info.file_size - header.length):,}; the file is corrupt or truncated")
    if key == "x" and header.dtype == np.uint8 and info.compress_type == zipfile.ZIP_STORED and header.nbytes:
        return _map_member(p, info, header)
    if header.nbytes > MAX_IN_MEMORY_BYTES:
        raise DataError(
            f"{p}: {key} declares {_dims(header.shape)} {header.dtype} ({header.nbytes / 2**30:.1f} GiB), more than the "
            f"{MAX_IN_MEMORY_BYTES / 2**30:.0f} GiB read into memory; save uint8 images uncompressed with np.savez "
            "(read memory-mapped) or as an image folder")
    with zf.open(info) as f:
        return np.lib.format.read_array(f, allow_pickle=False)


def _map_member(p: Path, info: zipfile.ZipInfo, header: _NpyHeader) -> np.ndarray:
    """Memory-map an uncompressed member: its bytes sit as they are in the zip, after the local header."""
    with open(p, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            raise zipfile.BadZipFile(f"no local header for {info.filename}")
        name_length, extra_length = struct.unpack("<HH", local[26:30])
        offset = info.header_offset + 30 + name_length + extra_length + header.length
        if offset + header.nbytes > os.fstat(f.fileno()).st_size:
            raise EOFError(f"{info.filename} ends past the end of the file")
    return np.memmap(p, dtype=header.dtype, mode="r", shape=header.shape, offset=offset,
                     order="F" if header.fortran_order else "C")


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
    return ImageDataset(source=str(p), count=len(files), labels=y, class_names=names, _files=files,
                        _folder_index=None if y is None else y.copy())


def read_image(path: str) -> np.ndarray:
    """One image file as uint8 H×W×3 RGB, upright, decoded by the rule of ``calibration.image_file`` (the
    exported Python app's too); ``DataError`` naming the file when it is refused."""
    return _read_image(path)


def _read_image(path: str) -> np.ndarray:
    try:
        from edgeres.calibration.image_file import ImageRefused, decode_image  # Pillow: imported when images are read
    except ImportError:  # pragma: no cover - Pillow ships with the install
        raise DataError("reading image folders needs Pillow: pip install pillow") from None
    try:
        return decode_image(path)
    except ImageRefused as e:
        raise DataError(f"{path}: {e}") from None
