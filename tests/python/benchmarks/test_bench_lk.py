"""bench_lk: the C++ block sums against the numpy + OpenCV way, on the same images."""

from __future__ import annotations

import numpy as np


def test_both_ways_give_the_float64_sums() -> None:
    """The benchmark's two methods agree with its float64 reference on the grid it times, so
    its speed ratio compares equal work."""
    from deepalign_fast.match.blocks import lk_block_sums

    from benchmarks.bench_lk import BLOCK, STEP, numpy_way, reference

    rng = np.random.default_rng(3)
    ref, mov, gx, gy = (rng.normal(size=(96, 96)).astype(np.float32) for _ in range(4))
    xs = np.arange(0, 96 - BLOCK + 1, STEP)
    corners = np.stack(np.meshgrid(xs, xs), -1).reshape(-1, 2).astype(np.int64)
    want, mag = reference(ref, mov, gx, gy, corners)
    for got in (numpy_way(ref, mov, gx, gy, corners),
                lk_block_sums(ref, mov, gx, gy, corners, BLOCK, num_threads=1)):
        assert got.shape == want.shape
        assert np.all(np.abs(got - want) <= 1e-6 * mag + 1e-9)
