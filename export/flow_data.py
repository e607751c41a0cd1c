"""Random smooth deformations for flow training and the flow benchmark (numpy + OpenCV only).

Kept torch-free so ``benchmarks/bench_flow.py`` can use exactly the deformation model that
``export/train_flow.py`` trains with. Convention: a field ``d`` ``(2, H, W)`` (dx, dy, pixels)
deforms an image by pulling, ``deformed(p) = image(p + d(p))``.
"""

from __future__ import annotations

import cv2
import numpy as np


def random_smooth_field(rng: np.random.Generator, shape: tuple[int, int], *, amplitude: float,
                        spacing: float) -> np.ndarray:
    """Random smooth displacement ``(2, H, W)`` float32: a coarse random grid, cubic-upsampled.

    Control points about every ``spacing`` pixels get independent N(0, 1) displacements,
    scaled so that the field's largest magnitude is ``amplitude`` pixels.
    """
    h, w = shape
    gh, gw = max(2, int(round(h / spacing)) + 1), max(2, int(round(w / spacing)) + 1)
    coarse = rng.normal(size=(2, gh, gw)).astype(np.float32)
    field = np.stack([cv2.resize(c, (w, h), interpolation=cv2.INTER_CUBIC) for c in coarse])
    peak = float(np.sqrt((field ** 2).sum(0)).max()) or 1.0
    return (field * (amplitude / peak)).astype(np.float32)


def remap(image: np.ndarray, field: np.ndarray, *, nearest: bool = False,
          border: int = cv2.BORDER_REFLECT) -> np.ndarray:
    """``out(p) = image(p + field(p))`` with ``cv2.remap``."""
    h, w = image.shape
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return cv2.remap(image, gx + field[0], gy + field[1],
                     cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR, borderMode=border)


def invert_field(field: np.ndarray, *, iterations: int = 30) -> np.ndarray:
    """Field ``u`` undoing ``field`` (``p + u(p) + field(p + u(p)) = p``), by fixed-point iteration.

    ``deformed(p + u(p)) = image(p)``: ``u`` is the registration that maps the deformed image
    back onto the original, in the same pull convention.
    """
    u = -field.copy()
    for _ in range(iterations):
        u = -np.stack([remap(c, u, border=cv2.BORDER_REPLICATE) for c in field])
    return u.astype(np.float32)
