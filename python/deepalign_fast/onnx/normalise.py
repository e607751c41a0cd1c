"""Intensity normalisation shared by training (export/) and inference (learned.py).

Kept in its own torch-free module so the two can never drift apart.
"""

from __future__ import annotations

import numpy as np

#: Human-readable description written into the ONNX metadata and the model card.
NORMALISATION = "p0.5,p99.5->0,1;(x-0.5)/0.25"


def normalise_slice(image: np.ndarray) -> np.ndarray:
    """Map a slice's 0.5th/99.5th percentiles to 0/1, then centre: ``(x - 0.5) / 0.25``.

    Percentiles are taken on a strided sample (about 256 x 256 points) for speed. A constant
    slice maps to zeros. Returns float32.
    """
    img = np.asarray(image, dtype=np.float32)
    sample = img[:: max(1, img.shape[0] // 256), :: max(1, img.shape[1] // 256)]
    lo, hi = (float(v) for v in np.percentile(sample, [0.5, 99.5]))
    if not (np.isfinite(lo) and np.isfinite(hi)) or hi <= lo:
        return np.zeros(img.shape, np.float32)
    scale = 1.0 / (0.25 * (hi - lo))
    out = (img - (lo + 0.5 * (hi - lo))) * scale
    return out.astype(np.float32, copy=False)
