"""Dataset readers and preprocessing."""

import numpy as np
import pytest
from PIL import Image

from calibration import DataError, Preprocess, open_dataset


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
    from calibration import Preprocess, open_dataset

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (3, 40, 50, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(3))
    pre = Preprocess(size=24, resize=28)
    (batch, _), = open_dataset(tmp_path / "d.npz").batches(pre, 8)
    assert np.array_equal(batch, pre(x))
