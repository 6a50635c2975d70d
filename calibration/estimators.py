"""Activation range estimators: collect statistics batch by batch, compute one (lo, hi) at the end.

Memory per tensor is bounded: ``minmax`` keeps two numbers, the others a fixed-size histogram
whose range doubles (merging bin pairs exactly) when a batch exceeds it, so 10 images or 10 000
cost the same. Every range contains 0 because an 8-bit grid must represent zero exactly (zero
padding, ReLU); the grid the searches model is the asymmetric one onnxruntime uses for
activations: ``scale = (hi - lo) / 255``, ``zero_point = round(-lo / scale)``.

``entropy`` and ``mse`` search one clipping factor ``c`` over ranges ``[c·min, c·max]`` of the
observed extremes, which keeps a ReLU output's low end at 0 and a signed tensor's skew.
"""

from __future__ import annotations

import math

import numpy as np

LEVELS = 255  # steps of the 8-bit activation grid
DEFAULT_BINS = 8192
DEFAULT_PERCENTILE = 99.99


class RangeEstimator:
    """Base: ``update(x)`` per batch, ``compute() -> (lo, hi)`` once; ``nbytes`` is the state size."""

    name = "base"

    def __init__(self):
        self.min = math.inf
        self.max = -math.inf
        self.count = 0

    def update(self, x: np.ndarray, bounds: tuple[float, float] | None = None) -> None:
        """Add a batch; ``bounds``: its (min, max) when the caller has them already (one pass each saved)."""
        x = np.asarray(x)
        if x.size == 0:
            return
        lo, hi = bounds if bounds is not None else (float(x.min()), float(x.max()))
        self.min = min(self.min, lo)
        self.max = max(self.max, hi)
        self.count += x.size

    def compute(self) -> tuple[float, float]:
        if self.count == 0:
            raise ValueError(f"{self.name} estimator saw no values; give it at least one batch")
        lo, hi = self._compute()
        return min(float(lo), 0.0), max(float(hi), 0.0)

    def _compute(self) -> tuple[float, float]:
        return self.min, self.max

    @property
    def nbytes(self) -> int:
        return 24


class MinMaxEstimator(RangeEstimator):
    """The observed extremes: no clipping, so one outlier widens every step."""

    name = "minmax"


class _HistogramEstimator(RangeEstimator):
    """A histogram over ``[-R, R]`` (``bins`` bins, a multiple of 4) that doubles ``R`` as needed."""

    def __init__(self, bins: int = DEFAULT_BINS):
        super().__init__()
        if bins < 4 * LEVELS or bins % 4:
            raise ValueError(f"bins={bins}: need a multiple of 4 and at least {4 * LEVELS}")
        self.bins = bins
        self.radius = 0.0
        self.hist = np.zeros(bins, np.int64)
        self.zeros = 0  # exact zeros (ReLU's clamp); they sit in bin N/2 = [0, width)
        self._zeros_before_radius = 0  # values seen while every value so far was exactly 0

    def update(self, x: np.ndarray, bounds: tuple[float, float] | None = None) -> None:
        x = np.asarray(x, dtype=np.float32).ravel()
        if x.size == 0:
            return
        super().update(x, bounds)
        zeros = x.size - int(np.count_nonzero(x))
        self.zeros += zeros
        amax = max(abs(self.min), abs(self.max))
        if amax == 0.0:
            self._zeros_before_radius += x.size
            return
        if self.radius == 0.0:
            self.radius = amax
            self.hist[self.bins // 2] += self._zeros_before_radius
            self._zeros_before_radius = 0
        while amax > self.radius:
            self._double_radius()
        radius, scale = np.float32(self.radius), np.float32(self.bins / (2 * self.radius))
        # every value binned in one float32 pass (no compaction of the non-zeros: the calibration's
        # hot loop); -R <= x <= R puts t in [0, N] (N only at x = R, or by rounding just below it), and
        # bin N is folded into bin N-1: the bins clipping t to [0, N-1] gave, one pass fewer
        t = x + radius
        t *= scale
        counts = np.bincount(t.astype(np.intp), minlength=self.bins + 1)
        counts[self.bins - 1] += counts[self.bins:].sum()
        counts = counts[:self.bins]
        if zeros:  # exact zeros belong in bin N/2 = [0, width): float rounding could put them one bin low
            counts[int(min(max(radius * scale, 0), self.bins - 1))] -= zeros
            counts[self.bins // 2] += zeros
        self.hist += counts

    def _double_radius(self) -> None:
        # bin pairs (2i, 2i+1) of [-R, R] are exactly bin N/4 + i of [-2R, 2R]
        merged = self.hist.reshape(-1, 2).sum(axis=1)
        self.hist = np.zeros(self.bins, np.int64)
        self.hist[self.bins // 4 : 3 * self.bins // 4] = merged
        self.radius *= 2.0

    @property
    def width(self) -> float:
        return 2 * self.radius / self.bins

    def edges(self) -> np.ndarray:
        return np.linspace(-self.radius, self.radius, self.bins + 1)

    def quantile(self, q: float) -> float:
        """Value below which a fraction ``q`` of the samples lie (linear within a bin)."""
        cdf = np.cumsum(self.hist)
        target = q * cdf[-1]
        i = int(np.searchsorted(cdf, target, side="left"))
        i = min(i, self.bins - 1)
        below = cdf[i - 1] if i > 0 else 0
        inside = self.hist[i]
        frac = (target - below) / inside if inside else 0.0
        value = -self.radius + (i + frac) * self.width
        return float(np.clip(value, self.min, self.max))

    def _candidates(self, count: int, fewest_bins: int) -> np.ndarray:
        """Clipping factors c in (0, 1] whose range [c·min, c·max] spans at least ``fewest_bins`` bins."""
        span_bins = (self.max - min(self.min, 0.0)) / self.width
        c_min = min(1.0, fewest_bins / max(span_bins, 1e-12))
        return np.linspace(c_min, 1.0, count)

    def _compute(self) -> tuple[float, float]:
        if self.radius == 0.0:  # every value was exactly zero
            return 0.0, 0.0
        return self._search()

    def _search(self) -> tuple[float, float]:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        return int(self.hist.nbytes) + 48


class PercentileEstimator(_HistogramEstimator):
    """Clip both tails at ``percentile`` % (default 99.99) of the observed values."""

    name = "percentile"

    def __init__(self, percentile: float = DEFAULT_PERCENTILE, bins: int = DEFAULT_BINS):
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile={percentile}: must be in (50, 100]")
        super().__init__(bins)
        self.percentile = percentile

    def _search(self) -> tuple[float, float]:
        p = self.percentile / 100.0
        return self.quantile(1.0 - p), self.quantile(p)


class EntropyEstimator(_HistogramEstimator):
    """The clipping that minimises KL(P‖Q) between the histogram P (tails folded into the edge bins)
    and Q, the same values merged into the 255 levels of the 8-bit grid and spread back over their
    non-empty bins (the TensorRT-style search, generalised to asymmetric ranges).

    Exact zeros are left out: every candidate grid holds 0 exactly, and spreading a ReLU's spike at
    0 over its level's bins would make the divergence favour ranges so narrow they clip most values.
    """

    name = "entropy"

    def __init__(self, bins: int = DEFAULT_BINS, candidates: int = 256, levels: int = LEVELS):
        super().__init__(bins)
        self.candidates, self.levels = candidates, levels

    def _search(self) -> tuple[float, float]:
        lo_full, hi_full = min(self.min, 0.0), max(self.max, 0.0)
        best, best_c = math.inf, 1.0
        values = self.hist.copy()
        values[self.bins // 2] -= self.zeros
        for c in self._candidates(self.candidates, fewest_bins=self.levels):
            kl = self._divergence(values, c * lo_full, c * hi_full)
            if kl < best:
                best, best_c = kl, c
        return best_c * lo_full, best_c * hi_full

    def _divergence(self, values: np.ndarray, lo: float, hi: float) -> float:
        start = int(np.clip(math.floor((lo + self.radius) / self.width), 0, self.bins - 1))
        stop = int(np.clip(math.ceil((hi + self.radius) / self.width), start + 1, self.bins))
        inside = values[start:stop].astype(np.float64)
        n = inside.size
        p = inside.copy()
        p[0] += values[:start].sum()
        p[-1] += values[stop:].sum()
        levels = min(self.levels, n)
        level_of_bin = (np.arange(n) * levels) // n
        level_mass = np.bincount(level_of_bin, weights=inside, minlength=levels)
        nonzero = p > 0
        level_support = np.bincount(level_of_bin, weights=nonzero.astype(np.float64), minlength=levels)
        q = np.where(nonzero, level_mass[level_of_bin] / np.maximum(level_support[level_of_bin], 1.0), 0.0)
        p_sum, q_sum = p.sum(), q.sum()
        if p_sum == 0 or q_sum == 0:
            return math.inf
        p, q = p[nonzero] / p_sum, q[nonzero] / q_sum
        # a bin holding only clipped tail mass has q == 0: smooth it so clipping is penalised, not infinite
        q = np.maximum(q, 1e-12)
        return float(np.sum(p * np.log(p / q)))


class MSEEstimator(_HistogramEstimator):
    """The clipping that minimises the expected squared error of fake-quantising the observed values
    to the 8-bit grid (rounding inside the range, clamping outside), estimated from the histogram with
    ``subsamples`` stratified points per non-empty bin."""

    name = "mse"

    def __init__(self, bins: int = DEFAULT_BINS, candidates: int = 48, subsamples: int = 2, levels: int = LEVELS):
        super().__init__(bins)
        self.candidates, self.subsamples, self.levels = candidates, subsamples, levels

    def _search(self) -> tuple[float, float]:
        lo_full, hi_full = min(self.min, 0.0), max(self.max, 0.0)
        nz = np.flatnonzero(self.hist)
        offsets = (np.arange(self.subsamples) + 0.5) / self.subsamples
        points = (-self.radius + (nz[:, None] + offsets[None, :]) * self.width).ravel()
        points = np.clip(points, self.min, self.max)
        weights = np.repeat(self.hist[nz].astype(np.float64) / self.subsamples, self.subsamples)

        def error(c: float) -> float:
            return float(np.dot(weights, (points - fake_quantize(points, c * lo_full, c * hi_full, self.levels)) ** 2))

        # the histogram cannot resolve steps finer than a bin: start where a step spans >= 1 bin
        coarse = self._candidates(self.candidates, fewest_bins=self.levels)
        errs = [error(c) for c in coarse]
        i = int(np.argmin(errs))
        step = coarse[1] - coarse[0] if len(coarse) > 1 else 0.0
        fine = np.linspace(max(coarse[0], coarse[i] - step), min(1.0, coarse[i] + step), 17)
        best_c = min(fine, key=error)
        return best_c * lo_full, best_c * hi_full


def fake_quantize(x: np.ndarray, lo: float, hi: float, levels: int = LEVELS) -> np.ndarray:
    """Round ``x`` to the asymmetric 8-bit grid of range [lo, hi] (0 exactly representable) and back."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo <= 0:
        return np.zeros_like(x)
    scale = (hi - lo) / levels
    zero_point = round(-lo / scale)
    q = np.clip(np.rint(x / scale) + zero_point, 0, levels)
    return (q - zero_point) * scale


ESTIMATORS = {
    "minmax": MinMaxEstimator,
    "percentile": PercentileEstimator,
    "entropy": EntropyEstimator,
    "mse": MSEEstimator,
}


def make_estimator(name: str, **options) -> RangeEstimator:
    """A fresh estimator by name (``minmax``, ``percentile``, ``entropy``, ``mse``) with its options."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; choose from {', '.join(ESTIMATORS)}")
    try:
        return ESTIMATORS[name](**options)
    except TypeError as e:
        raise ValueError(f"estimator {name!r}: bad options {sorted(options)} ({e})") from None
