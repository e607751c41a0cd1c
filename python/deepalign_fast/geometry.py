"""2x3 affine helpers shared by the whole package (see the package docstring for conventions)."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["apply_affine", "as_3x3", "compose", "invert", "rotation_angle"]


def as_3x3(t: ArrayLike) -> NDArray[np.float64]:
    """``(..., 2, 3)`` affines as homogeneous ``(..., 3, 3)`` matrices."""
    t = np.asarray(t, np.float64)
    out = np.zeros(t.shape[:-2] + (3, 3))
    out[..., :2, :] = t
    out[..., 2, 2] = 1.0
    return out


def compose(first_applied_last: ArrayLike, *rest: ArrayLike) -> NDArray[np.float64]:
    """Compose 2x3 affines as functions: ``compose(A, B)(p) = A(B(p))``.

    Works on stacks ``(..., 2, 3)`` by broadcasting.
    """
    out = as_3x3(first_applied_last)
    for t in rest:
        out = out @ as_3x3(t)
    return np.ascontiguousarray(out[..., :2, :])


def invert(transform: ArrayLike) -> NDArray[np.float64]:
    """Inverse of a 2x3 affine (or a stack of them)."""
    return np.ascontiguousarray(np.linalg.inv(as_3x3(transform))[..., :2, :])


def rotation_angle(t: ArrayLike) -> NDArray[np.float64]:
    """The turn (radians) of ``(..., 2, 3)`` affines: that of the nearest similarity,
    ``atan2(c - b, a + d)`` for a linear part ``[[a, b], [c, d]]``."""
    t = np.asarray(t, np.float64)
    return np.arctan2(t[..., 1, 0] - t[..., 0, 1], t[..., 0, 0] + t[..., 1, 1])


def apply_affine(t: ArrayLike, pts: ArrayLike) -> NDArray[np.float64]:
    """Apply a 2x3 affine to points ``(N, 2)`` given as ``(x, y)``."""
    t = np.asarray(t, np.float64)
    return np.asarray(pts, np.float64) @ t[:, :2].T + t[:, 2]
