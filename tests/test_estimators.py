"""Range estimators: what each one clips, that MSE beats MinMax on heavy tails, bounded memory."""

import numpy as np
import pytest

from edgeres.calibration.estimators import ESTIMATORS, fake_quantize, make_estimator


def feed(name, batches, **options):
    est = make_estimator(name, **options)
    for b in batches:
        est.update(b)
    return est.compute()


def relu_with_outlier(seed=0):
    rng = np.random.default_rng(seed)
    batches = [np.maximum(rng.normal(0, 1, 100_000), 0).astype(np.float32) for _ in range(10)]
    batches[2][7] = 20.0  # one activation in a million, far outside the bulk (whose max is ~5)
    return batches


def quant_mse(x, lo, hi):
    return float(np.mean((x - fake_quantize(x, lo, hi)) ** 2))


def test_minmax_keeps_the_outlier():
    assert feed("minmax", relu_with_outlier()) == (0.0, 20.0)


@pytest.mark.parametrize("name", ["percentile", "entropy", "mse"])
def test_clipping_estimators_cut_the_outlier(name):
    lo, hi = feed(name, relu_with_outlier())
    assert lo == 0.0
    assert 2.5 < hi < 15.0


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_ranges_always_contain_zero(name):
    positive = [np.random.default_rng(1).uniform(2, 3, 5000).astype(np.float32)]
    lo, hi = feed(name, positive)
    assert lo == 0.0 and 2.0 < hi <= 3.0


def test_percentile_matches_numpy_on_signed_data_across_range_growth():
    rng = np.random.default_rng(2)
    # growing scale forces the histogram to double its range several times
    batches = [rng.normal(0, s, 50_000).astype(np.float32) for s in (0.1, 1.0, 4.0)]
    lo, hi = feed("percentile", batches, percentile=99.0)
    allx = np.concatenate(batches)
    width = 2 * np.abs(allx).max() * 2 / 8192  # at most two bin widths after doubling
    assert abs(hi - np.percentile(allx, 99.0)) < width
    assert abs(lo - np.percentile(allx, 1.0)) < width


def test_mse_range_has_lower_error_than_minmax_on_heavy_tails():
    rng = np.random.default_rng(3)
    batches = [rng.standard_t(3, 50_000).astype(np.float32) for _ in range(4)]  # Student-t, 3 d.o.f.
    allx = np.concatenate(batches)
    mse_range, minmax_range = feed("mse", batches), feed("minmax", batches)
    assert quant_mse(allx, *mse_range) < 0.8 * quant_mse(allx, *minmax_range)


def test_entropy_search_clips_a_gaussian_unlike_minmax():
    """onnxruntime's default Entropy settings return the MinMax range; ours must actually search."""
    g = [np.random.default_rng(4).normal(0, 1, 200_000).astype(np.float32)]
    lo_e, hi_e = feed("entropy", g)
    lo_m, hi_m = feed("minmax", g)
    assert hi_e < 0.97 * hi_m and lo_e > 0.97 * lo_m


def test_entropy_is_not_fooled_by_the_relu_spike_at_zero():
    rng = np.random.default_rng(5)
    x = np.maximum(rng.normal(0, 1, 200_000), 0).astype(np.float32)  # half exact zeros
    _, hi = feed("entropy", [x])
    assert hi > 2.5  # the 99th percentile of the positive half is ~2.6


def test_memory_is_bounded_for_ten_thousand_images():
    rng = np.random.default_rng(6)
    est = make_estimator("entropy")
    est.update(rng.normal(0, 1, (100, 16, 8, 8)).astype(np.float32))
    first = est.nbytes
    for i in range(99):  # 10 000 images of 16×8×8 activations, the range keeps growing
        est.update(rng.normal(0, 1 + i / 10, (100, 16, 8, 8)).astype(np.float32))
    assert est.nbytes == first < 100_000
    assert est.count == 10_000 * 16 * 8 * 8
    assert np.isfinite(est.compute()).all()


def test_all_zero_tensor_gives_a_zero_range():
    assert feed("percentile", [np.zeros(100, np.float32)]) == (0.0, 0.0)


def test_unknown_estimator_name_is_rejected():
    with pytest.raises(ValueError, match="choose from"):
        make_estimator("kl")


def test_estimator_options_are_passed_through():
    x = [np.arange(10_000, dtype=np.float32)]
    assert feed("percentile", x, percentile=90.0)[1] < feed("percentile", x, percentile=99.9)[1]


def test_an_estimator_that_saw_nothing_says_so():
    with pytest.raises(ValueError, match="saw no values"):
        make_estimator("minmax").compute()


def test_histogram_bins_every_value_as_the_per_value_rule_says_across_growth_and_zeros():
    """Each non-zero value in bin floor((x + R) · N / 2R) (clipped to the ends), each exact zero (±0)
    in bin N/2, for the radius R the estimator ends with — however the batches arrived."""
    rng = np.random.default_rng(3)
    for _ in range(50):
        est = make_estimator("percentile")
        seen = []
        for _ in range(4):
            x = (rng.standard_normal(int(rng.integers(0, 3000))) * 10 ** rng.uniform(-3, 3)).astype(np.float32)
            if rng.random() < 0.5:
                x = np.maximum(x, 0)
            if rng.random() < 0.3:
                x[::3] = -0.0
            est.update(x)
            seen.append(x)
        x = np.concatenate(seen)
        if not x.any():
            continue
        # the rule, batch by batch at the radius each batch met, then merged up to the final radius
        expected = np.zeros(est.bins, np.int64)
        radius = 0.0
        amax = 0.0
        zeros_first = 0
        for batch in seen:
            if batch.size:
                amax = max(amax, float(np.abs(batch).max()))
            if amax == 0.0:
                zeros_first += batch.size
                continue
            if radius == 0.0:
                radius, expected[est.bins // 2] = amax, zeros_first
            while amax > radius:
                merged = expected.reshape(-1, 2).sum(axis=1)
                expected = np.zeros(est.bins, np.int64)
                expected[est.bins // 4: 3 * est.bins // 4] = merged
                radius *= 2
            nz = batch[batch != 0]
            idx = np.clip(((nz + np.float32(radius)) * np.float32(est.bins / (2 * radius))).astype(np.int64), 0, est.bins - 1)
            np.add.at(expected, idx, 1)
            expected[est.bins // 2] += batch.size - nz.size
        assert est.radius == radius
        assert np.array_equal(est.hist, expected)
        assert est.zeros == int(np.sum(x == 0))
