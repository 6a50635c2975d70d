"""Evaluation's memory: batches sized by the image (a runtime's buffers grow with the batch)."""

from __future__ import annotations

import numpy as np

from edgeres.calibration import Preprocess
from edgeres.measure.evaluate import EVAL_BATCH, collect_logits, eval_batch_size


class _Images:
    """A dataset stub: ``n`` images batched as asked."""

    source = "stub"

    def __init__(self, n: int, size: int):
        self.n, self.size = n, size

    def spread(self, limit):
        return np.arange(self.n if limit is None else min(limit, self.n))

    def batches(self, pre, batch_size, limit):
        n = len(self.spread(limit))
        for i in range(0, n, batch_size):
            k = min(batch_size, n - i)
            yield np.zeros((k, 3, self.size, self.size), np.float32), np.zeros(k, np.int64)


def test_batches_shrink_with_the_image_and_stay_100_at_cifar_size():
    assert eval_batch_size(Preprocess(size=32)) == EVAL_BATCH == 100
    assert eval_batch_size(Preprocess(size=224)) == 16
    assert eval_batch_size(Preprocess(size=1024)) == 1


def test_collect_logits_runs_batches_of_that_size():
    seen = []

    def run(x):
        seen.append(len(x))
        return np.zeros((len(x), 10), np.float32)

    out = collect_logits(run, _Images(40, 224), Preprocess(size=224))
    assert out.shape == (40, 10) and max(seen) == 16 and sum(seen) == 40
    seen.clear()
    collect_logits(run, _Images(40, 32), Preprocess(size=32))
    assert seen == [40]
