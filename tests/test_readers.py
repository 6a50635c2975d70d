"""Dataset readers and preprocessing."""

import numpy as np
import pytest
from PIL import Image

from edgeres.calibration import DataError, Preprocess, open_dataset


def test_npz_batches_are_preprocessed_nchw(tiny_npz):
    ds = open_dataset(tiny_npz)
    pre = Preprocess(size=16)
    x, y = next(ds.batches(pre, batch_size=10))
    assert x.shape == (10, 3, 16, 16) and x.dtype == np.float32 and y.shape == (10,)
    raw = ds.read(np.arange(1))[0].astype(np.float32) / 255
    expected = (raw - np.array(pre.mean)) / np.array(pre.std)
    np.testing.assert_allclose(x[0], expected.transpose(2, 0, 1), atol=1e-6)


def test_limit_spreads_over_class_major_data(tmp_path):
    x = np.zeros((100, 4, 4, 3), np.uint8)
    y = np.repeat(np.arange(10), 10)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    idx = open_dataset(tmp_path / "d.npz").spread(10)
    assert sorted(set(y[idx])) == list(range(10))


def test_image_folder_with_resize_and_crop(tmp_path):
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(3):
            Image.fromarray(np.full((40, 60, 3), 100 + i, np.uint8)).save(tmp_path / label / f"{i}.png")
    ds = open_dataset(tmp_path, require_labels=True)
    assert ds.class_names == ("cat", "dog") and list(ds.labels) == [0, 0, 0, 1, 1, 1]
    x, _ = next(ds.batches(Preprocess(size=24, resize=32, layout="NHWC"), 8))
    assert x.shape == (6, 24, 24, 3)


@pytest.mark.parametrize("x,match", [
    (np.zeros((0, 8, 8, 3), np.uint8), "contains no images"),
    (np.zeros((2, 8, 8, 1), np.uint8), "1 channel"),
    (np.full((2, 8, 8, 3), np.nan, np.float32), "NaN"),
    (np.zeros((2, 8, 8, 3), np.float32), "uint8"),
])
def test_bad_npz_contents_are_refused(tmp_path, x, match):
    np.savez(tmp_path / "bad.npz", x=x)
    with pytest.raises(DataError, match=match):
        ds = open_dataset(tmp_path / "bad.npz")
        ds.check_image_size(Preprocess(size=8))


def test_wrong_image_size_is_refused_without_resize(tiny_npz):
    with pytest.raises(DataError, match=r"16×16 but the model expects 32×32"):
        open_dataset(tiny_npz).check_image_size(Preprocess(size=32))


def test_truncated_npz_is_refused(tmp_path, tiny_npz):
    (tmp_path / "cut.npz").write_bytes(tiny_npz.read_bytes()[:500])
    with pytest.raises(DataError, match="cut.npz: cannot be read"):
        open_dataset(tmp_path / "cut.npz")


def test_labels_must_match_images(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 4, 4, 3), np.uint8), y=np.zeros(2, np.int64))
    with pytest.raises(DataError, match="one integer label per image"):
        open_dataset(tmp_path / "d.npz")


def test_batches_resize_and_crop_once(tmp_path):
    """A resize+crop preprocess (ImageNet style) must give the same input as calling it on the raw images."""
    from edgeres.calibration import Preprocess, open_dataset

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (3, 40, 50, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(3))
    pre = Preprocess(size=24, resize=28)
    (batch, _), = open_dataset(tmp_path / "d.npz").batches(pre, 8)
    assert np.array_equal(batch, pre(x))


def test_a_folder_decodes_each_photo_once_while_its_pixels_are_kept(tmp_path, monkeypatch):
    """eval runs every artifact on the same photos: the second pass takes the kept pixels (the same ones, not a
    view a caller could change), a second geometry of a kept photo is not decoded again, and past the budget a
    photo is decoded each time."""
    from edgeres.calibration import readers

    rng = np.random.default_rng(1)
    (tmp_path / "a").mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(tmp_path / "a" / f"{i}.png")
    decoded = []
    real = readers._read_image
    monkeypatch.setattr(readers, "_read_image", lambda path: decoded.append(path) or real(path))
    ds = open_dataset(tmp_path)
    crop, direct = Preprocess(size=16, resize=20), Preprocess(size=16, resize_mode="direct", filter="bicubic")
    list(ds.batches(crop, 3))
    assert len(decoded) == 4
    mine = ds.read(np.arange(4), crop)
    kept = mine.copy()
    mine[:] = 0  # the caller's pixels are its own
    again = [x for x, _ in ds.batches(crop, 3)]
    assert len(decoded) == 4 and np.array_equal(ds.read(np.arange(4), crop), kept)
    fresh = [x for x, _ in open_dataset(tmp_path).batches(crop, 3)]
    assert all(np.array_equal(a, b) for a, b in zip(again, fresh))
    decoded.clear()
    both = ds.read_each(np.arange(4), [crop, direct])
    assert len(decoded) == 4  # each photo once, for the geometry not kept yet
    assert np.array_equal(both[1], direct.geometry(np.stack([real(f) for f in ds._files])))
    decoded.clear()
    ds.read(np.arange(4), direct)
    assert decoded == []
    monkeypatch.setattr(readers, "KEEP_PIXELS_BYTES", 16 * 16 * 3)  # one photo's pixels
    small = open_dataset(tmp_path)
    decoded.clear()
    for _ in range(2):
        small.read(np.arange(4), crop)
    assert len(decoded) == 4 + 3  # the first photo kept, the others decoded on each pass


# -- every pixel mode decodes by one rule (the exported app copies it: tests/test_export_app.py) ------

def _rgb(seed: int = 0, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _png16(path, values: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG (48 bits a pixel), written by hand: Pillow cannot save one."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">L", len(data)) + kind + data + struct.pack(">L", zlib.crc32(kind + data))

    h, w, _ = values.shape
    rows = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(h))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">LLBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def _palette_rgb(im) -> np.ndarray:
    return np.asarray(im.getpalette("RGB"), np.uint8).reshape(-1, 3)[np.asarray(im)]


def _make(folder, name):
    """(file, the uint8 RGB the rule gives) for one kind of image, the expectation computed independently."""
    rgb, grey = _rgb(1), _rgb(2)[..., 0]
    alpha = _rgb(3)[..., 0]
    path = folder / name
    if name == "grey.png":
        Image.fromarray(grey).save(path)
        return path, np.repeat(grey[..., None], 3, -1)
    if name == "grey16.png":  # 16-bit greyscale: the high byte (Pillow's convert clips to 255: white)
        deep = (grey.astype(np.uint16) << 8) | _rgb(4)[..., 0]
        Image.fromarray(deep).save(path)
        return path, np.repeat(grey[..., None], 3, -1)
    if name == "rgb48.png":
        deep = (rgb.astype(np.uint16) << 8) | _rgb(5)
        _png16(path, deep)
        return path, rgb
    if name in ("rgba.png", "rgba.webp"):  # alpha dropped, as torchvision's and Keras' loaders drop it
        Image.fromarray(np.dstack([rgb, alpha])).save(path, **({"lossless": True, "exact": True} if name.endswith("webp") else {}))
        return path, rgb
    if name == "grey-alpha.png":
        Image.fromarray(np.dstack([grey, alpha])).save(path)
        return path, np.repeat(grey[..., None], 3, -1)
    if name in ("palette.png", "palette.gif", "palette.bmp"):
        im = Image.fromarray(rgb).quantize(32)
        im.save(path)
        return path, _palette_rgb(im)
    if name == "palette-transparent.png":
        im = Image.fromarray(rgb).quantize(32)
        im.info["transparency"] = 0
        im.save(path, transparency=0)
        return path, _palette_rgb(im)
    if name == "bilevel.png":
        bits = grey > 127
        Image.fromarray(bits).save(path)
        return path, np.repeat(np.where(bits, 255, 0).astype(np.uint8)[..., None], 3, -1)
    if name == "cmyk.tiff":  # Pillow's CMYK → RGB: (255 − C)(255 − K)/255 per channel
        cmyk = np.dstack([rgb, grey]).astype(np.uint8)
        Image.fromarray(cmyk, "CMYK").save(path)
        c, k = cmyk[..., :3].astype(int), cmyk[..., 3:].astype(int)
        return path, np.round((255 - c) * (255 - k) / 255).astype(np.uint8)
    if name == "int32.tiff":  # 32-bit integer greyscale: 0..65535 scaled like 16-bit
        deep = grey.astype(np.int32) * 256 + 7
        deep[0, 0] = 70_000  # beyond 16 bits: clipped
        Image.fromarray(deep).save(path)
        scaled = grey.copy()
        scaled[0, 0] = 255
        return path, np.repeat(scaled[..., None], 3, -1)
    if name == "rgb.bmp":
        Image.fromarray(rgb).save(path)
        return path, rgb
    raise ValueError(name)


IMAGE_KINDS = ["grey.png", "grey16.png", "rgb48.png", "rgba.png", "rgba.webp", "grey-alpha.png", "palette.png",
               "palette.gif", "palette.bmp", "palette-transparent.png", "bilevel.png", "cmyk.tiff", "int32.tiff", "rgb.bmp"]


def image_kinds(folder) -> dict:
    """{name: (file, expected RGB)} for every kind in IMAGE_KINDS, written into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    return {name: _make(folder, name) for name in IMAGE_KINDS}


@pytest.mark.parametrize("name", IMAGE_KINDS)
def test_every_pixel_mode_becomes_the_rules_rgb(tmp_path, name):
    from edgeres.calibration.readers import read_image

    path, expected = _make(tmp_path, name)
    got = read_image(str(path))
    assert got.dtype == np.uint8 and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


def test_a_fifo_is_refused_without_opening_it(tmp_path):
    import os
    import signal

    from edgeres.calibration.readers import read_image

    os.mkfifo(tmp_path / "pipe.png")

    def hung(*_):
        raise TimeoutError("read_image waited on the FIFO")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        with pytest.raises(DataError, match=r"pipe.png: is a FIFO \(named pipe\), not an image file"):
            read_image(str(tmp_path / "pipe.png"))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("suffix", [".png", ".tiff", ".webp", ".jpg"])
def test_image_folders_apply_the_exif_orientation(tmp_path, suffix):
    """Calibration and eval read a phone's sideways-stored photo upright (lossless formats: exactly)."""
    from tests.test_predict import STORED_AS

    upright = np.repeat(np.repeat(_rgb(7, 8)[:, :6], 4, 0), 4, 1)  # 32×24, blocks survive JPEG well
    for orientation in (1, *STORED_AS):
        exif = Image.Exif()
        exif[0x0112] = orientation
        stored = Image.fromarray(upright)
        stored = stored if orientation == 1 else stored.transpose(STORED_AS[orientation])
        (tmp_path / "cat").mkdir(exist_ok=True)
        stored.save(tmp_path / "cat" / f"o{orientation}{suffix}", exif=exif,
                    **({"lossless": True} if suffix == ".webp" else {"quality": 100, "subsampling": 0} if suffix == ".jpg" else {}))
    ds = open_dataset(tmp_path)
    images = ds.read(np.arange(len(ds)))
    assert images.shape == (8, 32, 24, 3)
    for got in images:  # JPEG re-encodes each orientation's blocks: close on average, not exact
        error = np.abs(got.astype(int) - upright)
        assert (error.mean() < 2) if suffix == ".jpg" else not error.any()
