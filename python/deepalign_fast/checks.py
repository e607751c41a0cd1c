"""Argument checks shared by the kernels' Python wrappers (warp, fields).

Every check raises ``ValueError`` naming the argument and what was expected, and never copies
silently except where it says so.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from . import _core

__all__ = ["BORDER", "DTYPES", "INTERPOLATION", "check_affine", "check_field", "check_image",
           "check_out", "check_shape", "check_threads", "option_code"]

#: The bound enums by name (the kernels take the enum; the wrappers accept either).
INTERPOLATION = {"nearest": _core.Interpolation.nearest, "linear": _core.Interpolation.linear}
BORDER = {"constant": _core.Border.constant, "replicate": _core.Border.replicate}
E = TypeVar("E")
DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))


def check_image(image: npt.ArrayLike, fn: str) -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype not in DTYPES:
        raise ValueError(
            f"image: unsupported dtype {arr.dtype}; {fn} takes uint8, uint16 or float32, "
            "cast explicitly, e.g. image.astype(np.float32)"
        )
    if arr.ndim != 2:
        raise ValueError(f"image: expected a 2-D slice (y, x), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"image: is empty (shape {arr.shape})")
    return np.ascontiguousarray(arr)


def check_affine(matrix: npt.ArrayLike, name: str) -> np.ndarray:
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape == (3, 3):
        if not np.array_equal(m[2], [0.0, 0.0, 1.0]):
            raise ValueError(f"{name}: a 3x3 affine needs last row [0, 0, 1], got {m[2].tolist()}")
        m = m[:2]
    if m.shape != (2, 3):
        raise ValueError(f"{name}: expected shape (2, 3) or (3, 3), got {m.shape}")
    if not np.all(np.isfinite(m)):
        raise ValueError(f"{name}: contains NaN or infinity")
    return np.ascontiguousarray(m)


def option_code(table: dict[str, E], value: object, name: str) -> E:
    """The enum member ``value`` names (or ``value`` itself when it is a member)."""
    if value in table.values():
        return value  # type: ignore[return-value]
    try:
        return table[value]  # type: ignore[index]
    except (KeyError, TypeError):
        raise ValueError(f"{name}: expected one of {sorted(table)}, got {value!r}") from None


def check_shape(shape: object, name: str = "output_shape") -> tuple[int, int]:
    """Two positive ints ``(height, width)``."""
    items = list(shape) if isinstance(shape, Iterable) else []
    if len(items) != 2 or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool)
                                  for s in items) or min(int(s) for s in items) <= 0:
        raise ValueError(f"{name}: expected two positive ints (height, width), got {shape}")
    return int(items[0]), int(items[1])


def check_threads(num_threads: object) -> int:
    if isinstance(num_threads, bool) or not isinstance(num_threads, (int, np.integer)):
        raise ValueError(f"num_threads: expected an int, got {num_threads!r}")
    if num_threads < 0:
        raise ValueError(f"num_threads: must be >= 0 (0 = all cores), got {num_threads}")
    return int(num_threads)


def check_field(displacement: npt.ArrayLike, name: str) -> np.ndarray:
    """A ``(2, H, W)`` float32 C-contiguous field (non-contiguous input is copied once)."""
    u = np.asarray(displacement)
    if u.dtype != np.float32:
        raise ValueError(
            f"{name}: expected dtype float32, got {u.dtype}; cast explicitly, e.g. "
            f"{name}.astype(np.float32)"
        )
    if u.ndim != 3 or u.shape[0] != 2 or min(u.shape[1:]) <= 0:
        raise ValueError(f"{name}: expected shape (2, H, W) (dx, dy) with H, W >= 1, got {u.shape}")
    return np.ascontiguousarray(u)


def check_out(out: object, dtype: np.dtype, shape: tuple[int, ...],
              *inputs: np.ndarray) -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype=dtype)
    if not isinstance(out, np.ndarray):
        raise ValueError(f"out: expected a numpy array, got {type(out).__name__}")
    if out.dtype != dtype:
        raise ValueError(f"out: dtype {out.dtype} differs from the expected {dtype}")
    if out.shape != shape:
        raise ValueError(f"out: shape {out.shape} differs from the output shape {shape}")
    if not out.flags.c_contiguous:
        raise ValueError("out: must be C-contiguous (results are never silently copied)")
    if not out.flags.writeable:
        raise ValueError("out: is read-only")
    for a in inputs:
        if np.shares_memory(out, a):
            raise ValueError("out: must not overlap the inputs")
    return out
