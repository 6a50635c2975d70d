"""Preprocessing as a frozen config: uint8 RGB images in, float32 network input out."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from edgeres.calibration.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# shorter_side_crop: torchvision's ImageNet pipeline, Resize(shorter side) then CenterCrop;
# direct: straight to size×size with no crop (the geometry of Keras' load_img(target_size=...), whose
# filter is nearest by default: filter=nearest repeats it)
RESIZE_MODES = ("shorter_side_crop", "direct")
# what the network's input channels hold: colour in either order, or one grey (luma) channel
CHANNEL_ORDERS = ("RGB", "BGR", "L")
# Pillow's resampling filters by the name the manifest records
FILTERS = ("bilinear", "bicubic", "nearest")


@dataclass(frozen=True)
class Preprocess:
    """How a uint8 H×W×3 RGB image becomes the network input.

    ``resize_mode`` "shorter_side_crop" resizes the shorter side to ``resize`` then centre-crops
    ``size`` (torchvision); ``resize`` ``None`` there means the images must already be ``size``×``size``
    (CIFAR models take their 32×32 images as is). "direct" resizes straight to ``size``×``size`` with
    no crop (Keras); ``resize`` is then ``None``. Resizing is Pillow's ``filter`` (bilinear, bicubic or
    nearest); ``antialias`` widens the filter when downscaling, as Pillow's ``resize`` and torchvision do
    (False samples the filter at the output pixel centres only, as OpenCV's and TF's plain resize do).
    ``scale`` multiplies the uint8 values before mean/std (1/255 for torchvision, 1 for Keras
    caffe-style preprocessing); ``channel_order`` is the order the network expects. "L": a one-channel
    (greyscale) network; images are turned grey by Pillow's ``convert("L")`` (ITU-R 601-2 luma) before
    they are resized, as a training pipeline that opens its files with ``.convert("L")`` (or puts
    torchvision's ``Grayscale()`` first) sees them; ``mean``/``std`` then hold one value each.
    """

    size: int
    resize: int | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    scale: float = 1.0 / 255.0
    channel_order: str = "RGB"
    layout: str = "NCHW"
    resize_mode: str = "shorter_side_crop"
    filter: str = "bilinear"
    antialias: bool = True

    def __post_init__(self):
        if self.filter not in FILTERS:
            raise DataError(f"preprocess filter {self.filter!r} is not one of {', '.join(FILTERS)}")
        if not isinstance(self.antialias, bool):
            raise DataError(f"preprocess antialias {self.antialias!r} is not true or false")
        if self.layout not in ("NCHW", "NHWC"):
            raise DataError(f"preprocess layout {self.layout!r} is not NCHW or NHWC")
        if self.channel_order not in CHANNEL_ORDERS:
            raise DataError(f"preprocess channel order {self.channel_order!r} is not one of {', '.join(CHANNEL_ORDERS)}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise DataError(f"preprocess mean/std need {self.channels} value(s) each for channel order "
                            f"{self.channel_order}, got {len(self.mean)}/{len(self.std)}")
        if self.size <= 0 or (self.resize is not None and self.resize < self.size):
            raise DataError(f"preprocess size {self.size} / resize {self.resize} is not valid")
        if self.resize_mode not in RESIZE_MODES:
            raise DataError(f"preprocess resize mode {self.resize_mode!r} is not one of {', '.join(RESIZE_MODES)}")
        if self.resize_mode == "direct" and self.resize is not None:
            raise DataError(f"preprocess resize {self.resize} is for shorter_side_crop; direct resizes to size "
                            f"{self.size} (leave resize out)")

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        d = dict(d)  # a manifest from before resize_mode existed reads as shorter_side_crop (the default)
        for key in ("mean", "std"):
            if key in d:
                d[key] = tuple(float(v) for v in d[key])
        return cls(**d)

    @property
    def channels(self) -> int:
        """Channels of the network input: 1 for greyscale ("L"), else 3."""
        return 1 if self.channel_order == "L" else 3

    def with_layout(self, layout: str) -> "Preprocess":
        return Preprocess(**{**self.__dict__, "layout": layout})

    def describe(self) -> str:
        """One line for ``inspect``: geometry, then the arithmetic."""
        if self.resize_mode == "direct":
            geometry = f"direct resize to {self.size}×{self.size}"
        elif self.resize is None:
            geometry = f"{self.size}×{self.size} as is (no resize)"
        else:
            geometry = f"shorter side to {self.resize}, centre crop {self.size}×{self.size}"
        if self.resize_mode == "direct" or self.resize is not None:
            geometry += f" ({self.filter}{'' if self.filter == 'nearest' else ', antialiased' if self.antialias else ', not antialiased'})"
        numbers = lambda v: ",".join(f"{x:g}" for x in v)  # noqa: E731
        return (f"{geometry}; {self.channel_order}, scale {self.scale:g}, mean {numbers(self.mean)}, "
                f"std {numbers(self.std)}")

    def geometry_key(self) -> tuple:
        """What ``geometry`` depends on: two preprocessings with the same key give the same uint8 pixels (the
        filter and antialiasing only count where an image is resized)."""
        resizes = self.resize_mode == "direct" or self.resize is not None
        return (self.channel_order == "L", self.resize_mode, self.size, self.resize,
                self.filter if resizes else None, self.antialias if resizes else None)

    def geometry(self, images: np.ndarray, source: str = "images") -> np.ndarray:
        """Resize/crop a uint8 N×H×W×3 RGB batch to N×size×size×channels (uint8), or fail naming ``source``."""
        if self.channel_order == "L" and getattr(images, "shape", (0,))[-1] == 1:
            check_uint8_rgb(images, source, channels=1)  # already grey (geometry's own output, read again)
        else:
            check_uint8_rgb(images, source)
            if self.channel_order == "L":
                images = to_grey(images)
        h, w = images.shape[1:3]
        if self.resize_mode == "direct":
            if (h, w) == (self.size, self.size):
                return images
            return np.stack([resize_image(img, self.size, self.size, self.filter, self.antialias) for img in images])
        if self.resize is None:
            if (h, w) != (self.size, self.size):
                raise DataError(
                    f"{source}: images are {h}×{w} but the model expects {self.size}×{self.size} "
                    f"and its preprocessing takes images as they are (no resize); give {self.size}×{self.size} "
                    "images (resize them beforehand, e.g. with Pillow)"
                )
            return images
        out = np.empty((images.shape[0], self.size, self.size, images.shape[3]), np.uint8)
        for i, img in enumerate(images):
            out[i] = resize_center_crop(img, self.resize, self.size, self.filter, self.antialias)
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


def check_uint8_rgb(images: np.ndarray, source: str, channels: int = 3) -> None:
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[-1] != channels:
        shape = getattr(images, "shape", None)
        raise DataError(f"{source}: expected N×H×W×{channels} {'RGB' if channels == 3 else 'grey'} images, got shape {shape}")
    if images.dtype != np.uint8:
        raise DataError(f"{source}: expected uint8 images (0..255), got {images.dtype}")
    if images.shape[0] == 0:
        raise DataError(f"{source}: contains no images")


def to_grey(images: np.ndarray) -> np.ndarray:
    """N×H×W×3 RGB → N×H×W×1 luma, by Pillow's ``Image.convert("L")`` (L = R·299/1000 + G·587/1000 + B·114/1000)."""
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(img)).convert("L")) for img in images])[..., None]


def resize_center_crop(img: np.ndarray, shorter: int, crop: int, filter: str = "bilinear",
                       antialias: bool = True) -> np.ndarray:
    """Resize the shorter side to ``shorter`` then centre-crop ``crop``², as torchvision's
    ``Resize(shorter)`` + ``CenterCrop(crop)`` on a PIL image (same sizes, same offsets)."""
    h, w = img.shape[:2]
    if h <= w:
        nh, nw = shorter, max(crop, int(shorter * w / h))
    else:
        nh, nw = max(crop, int(shorter * h / w)), shorter
    resized = resize_image(img, nh, nw, filter, antialias)
    top, left = int(round((nh - crop) / 2.0)), int(round((nw - crop) / 2.0))
    return resized[top : top + crop, left : left + crop]


def bilinear_resize(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Pillow's antialiased bilinear resize of an H×W×C uint8 image (C 1 or 3)."""
    return resize_image(img, out_h, out_w)


def resize_image(img: np.ndarray, out_h: int, out_w: int, filter: str = "bilinear", antialias: bool = True) -> np.ndarray:
    """Pillow's resize of an H×W×C uint8 image (C 1 or 3) with ``filter``. Antialiased: ``Image.resize``, which
    widens the filter when downscaling (how the images torchvision and Keras models were trained on were
    resized). Not antialiased: an affine ``Image.transform``, the filter at each output pixel centre."""
    h, w = img.shape[:2]
    if (h, w) == (out_h, out_w):
        return img
    gray = img.ndim == 3 and img.shape[2] == 1
    pil = Image.fromarray(np.ascontiguousarray(img[:, :, 0] if gray else img))
    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}[filter]
    if antialias or filter == "nearest":
        out = np.asarray(pil.resize((out_w, out_h), resample))
    else:
        out = np.asarray(pil.transform((out_w, out_h), Image.AFFINE, (w / out_w, 0, 0, 0, h / out_h, 0), resample))
    return out[:, :, None] if gray else out
