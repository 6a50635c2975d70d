"""Preprocessing as a frozen config: uint8 RGB images in, float32 network input out."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from calibration.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """How a uint8 H×W×3 RGB image becomes the network input.

    ``resize`` is the shorter side to resize to before a centre crop of ``size``; ``None`` means
    the images must already be ``size``×``size`` (CIFAR models take their 32×32 images as is).
    ``scale`` multiplies the uint8 values before mean/std (1/255 for torchvision, 1 for Keras
    caffe-style preprocessing); ``channel_order`` is the order the network expects.
    """

    size: int
    resize: int | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    scale: float = 1.0 / 255.0
    channel_order: str = "RGB"
    layout: str = "NCHW"

    def __post_init__(self):
        if self.layout not in ("NCHW", "NHWC"):
            raise DataError(f"preprocess layout {self.layout!r} is not NCHW or NHWC")
        if self.channel_order not in ("RGB", "BGR"):
            raise DataError(f"preprocess channel order {self.channel_order!r} is not RGB or BGR")
        if self.size <= 0 or (self.resize is not None and self.resize < self.size):
            raise DataError(f"preprocess size {self.size} / resize {self.resize} is not valid")

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        d = dict(d)
        for key in ("mean", "std"):
            if key in d:
                d[key] = tuple(float(v) for v in d[key])
        return cls(**d)

    def with_layout(self, layout: str) -> "Preprocess":
        return Preprocess(**{**self.__dict__, "layout": layout})

    def geometry(self, images: np.ndarray, source: str = "images") -> np.ndarray:
        """Resize/crop a uint8 N×H×W×3 batch to N×size×size×3 (uint8), or fail naming ``source``."""
        check_uint8_rgb(images, source)
        h, w = images.shape[1:3]
        if self.resize is None:
            if (h, w) != (self.size, self.size):
                raise DataError(
                    f"{source}: images are {h}×{w} but the model expects {self.size}×{self.size} "
                    f"and its preprocessing takes images as they are (no resize); give {self.size}×{self.size} "
                    "images (resize them beforehand, e.g. with Pillow)"
                )
            return images
        out = np.empty((images.shape[0], self.size, self.size, 3), np.uint8)
        for i, img in enumerate(images):
            out[i] = resize_center_crop(img, self.resize, self.size)
        return out

    def __call__(self, images: np.ndarray, source: str = "images") -> np.ndarray:
        """uint8 N×H×W×3 RGB → float32 network input in ``layout``."""
        x = self.geometry(images, source).astype(np.float32) * np.float32(self.scale)
        if self.channel_order == "BGR":
            x = x[..., ::-1]
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        if self.layout == "NCHW":
            x = x.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(x, dtype=np.float32)


def check_uint8_rgb(images: np.ndarray, source: str) -> None:
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[-1] != 3:
        shape = getattr(images, "shape", None)
        raise DataError(f"{source}: expected N×H×W×3 RGB images, got shape {shape}")
    if images.dtype != np.uint8:
        raise DataError(f"{source}: expected uint8 images (0..255), got {images.dtype}")
    if images.shape[0] == 0:
        raise DataError(f"{source}: contains no images")


def resize_center_crop(img: np.ndarray, shorter: int, crop: int) -> np.ndarray:
    """Bilinear resize of the shorter side to ``shorter`` then centre crop to ``crop``² (numpy only)."""
    h, w = img.shape[:2]
    if h <= w:
        nh, nw = shorter, max(crop, round(w * shorter / h))
    else:
        nh, nw = max(crop, round(h * shorter / w)), shorter
    resized = bilinear_resize(img, nh, nw)
    top, left = (nh - crop) // 2, (nw - crop) // 2
    return resized[top : top + crop, left : left + crop]


def bilinear_resize(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Half-pixel-centre bilinear resize of an H×W×C uint8 image."""
    h, w = img.shape[:2]
    if (h, w) == (out_h, out_w):
        return img
    ys = np.clip((np.arange(out_h) + 0.5) * h / out_h - 0.5, 0, h - 1)
    xs = np.clip((np.arange(out_w) + 0.5) * w / out_w - 0.5, 0, w - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    wy, wx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    # gather the rows first: a large photo is never converted to float as a whole
    rows0, rows1 = img[y0].astype(np.float32), img[y1].astype(np.float32)
    top = rows0[:, x0] * (1 - wx) + rows0[:, x1] * wx
    bottom = rows1[:, x0] * (1 - wx) + rows1[:, x1] * wx
    return np.clip(np.rint(top * (1 - wy) + bottom * wy), 0, 255).astype(np.uint8)
