"""Tiling of large slices for the networks (features and flow run tile by tile)."""

from __future__ import annotations

import numpy as np

__all__ = ["blend_ramp", "tile_starts"]


def tile_starts(n: int, size: int, overlap: int) -> list[int]:
    """Starts of tiles of ``size`` covering ``0..n``, neighbours overlapping by at least
    ``overlap``; the last tile ends at ``n``. One tile (start 0) when ``size >= n``."""
    if size >= n:
        return [0]
    step = size - overlap
    starts = list(range(0, n - size, step))
    starts.append(n - size)
    return starts


def blend_ramp(size: int, overlap: int) -> np.ndarray:
    """Blend weights along one tile axis: rise linearly over ``overlap`` at both ends."""
    if overlap == 0:
        return np.ones(size, np.float32)
    d = np.minimum(np.arange(size), np.arange(size)[::-1]).astype(np.float32) + 0.5
    return np.clip(d / overlap, 1e-3, 1.0).astype(np.float32)
