"""Property-based tests: the readers and the manifest loader either accept input or raise their
one-line error — never anything else, whatever bytes or arrays they are given."""

from __future__ import annotations

import json
import string

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgeres.calibration import DataError, Preprocess, open_dataset
from edgeres.bundle import read_manifest
from edgeres.errors import InputError

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

dtypes = st.sampled_from([np.uint8, np.int16, np.float32, np.float64, np.int64])
shapes = hnp.array_shapes(min_dims=1, max_dims=5, min_side=0, max_side=6)


@SETTINGS
@given(x=hnp.arrays(dtypes, shapes), with_y=st.booleans(), y_len=st.integers(0, 8))
def test_npz_reader_accepts_or_raises_data_error(tmp_path_factory, x, with_y, y_len):
    path = tmp_path_factory.mktemp("npz") / "d.npz"
    arrays = {"x": x}
    if with_y:
        arrays["y"] = np.arange(y_len)
    np.savez(path, **arrays)
    try:
        ds = open_dataset(path)
    except DataError as e:
        assert str(path) in str(e) and "\n" not in str(e)
        return
    assert x.ndim == 4 and x.shape[-1] == 3 and x.dtype == np.uint8 and len(x) > 0
    pre = Preprocess(size=max(1, x.shape[1]), resize=None) if x.shape[1] == x.shape[2] else Preprocess(size=2, resize=2)
    for batch, _ in ds.batches(pre, batch_size=4):
        assert np.isfinite(batch).all()


@SETTINGS
@given(data=st.binary(max_size=2048))
def test_npz_reader_on_arbitrary_bytes(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("bytes") / "d.npz"
    path.write_bytes(data)
    try:
        open_dataset(path)
    except DataError as e:
        assert "\n" not in str(e)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(string.printable, max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(string.ascii_letters, max_size=8), children, max_size=5),
    max_leaves=20,
)


@SETTINGS
@given(manifest=st.dictionaries(st.sampled_from(["format", "format_version", "arch", "preprocess", "reference",
                                                 "artifacts", "x"]), json_values, max_size=7))
def test_manifest_loader_accepts_or_raises_input_error(tmp_path_factory, manifest):
    bundle = tmp_path_factory.mktemp("bundle")
    if manifest.get("format") is not None and len(manifest) > 3:
        manifest["format"] = "edgeres-bundle"  # get past the first check often enough to reach the others
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    try:
        read_manifest(bundle)
    except InputError as e:
        assert "\n" not in str(e)


@SETTINGS
@given(data=st.binary(max_size=512))
def test_manifest_loader_on_arbitrary_bytes(tmp_path_factory, data):
    bundle = tmp_path_factory.mktemp("raw")
    (bundle / "manifest.json").write_bytes(data)
    try:
        read_manifest(bundle)
    except InputError as e:
        assert "\n" not in str(e)
