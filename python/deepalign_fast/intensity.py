"""Intensity conversions shared by the matchers and the QC pictures."""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["to_uint8"]


def to_uint8(image: np.ndarray, *, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Contrast-stretch a slice of any supported dtype to uint8 between two percentiles.

    Percentiles (not min/max) keep a few saturated pixels from flattening the contrast; a
    constant slice maps to zeros. Non-finite pixels are ignored for the percentiles.
    """
    img = np.asarray(image)
    if img.dtype == np.uint8 and low <= 0 and high >= 100:
        return img
    sample = img[:: max(1, img.shape[0] // 256), :: max(1, img.shape[1] // 256)]
    if sample.dtype.kind == "f":
        sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return np.zeros(img.shape, np.uint8)
    lo, hi = np.percentile(sample, [low, high])
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros(img.shape, np.uint8)
    scale = 255.0 / (hi - lo)
    out = cv2.convertScaleAbs(img.astype(np.float32, copy=False), alpha=scale, beta=-lo * scale)
    return out
