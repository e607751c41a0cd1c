"""One slice map, one render: how every output slice is made, locally, on Dask and by `apply`.

A :class:`SliceMap` is the pull map of one slice (output pixel -> input pixel), of one of
three kinds:

``affine``        ``p -> A p`` (the global solve alone);
``displacement``  ``p -> A (p + u(p))``: an affine plus a dense displacement field on the
                  output grid (``mode="elastic"``);
``affine-field``  ``p -> A F(p) p``: an affine plus a per-pixel affine field ``F`` given on a
                  grid of ``field_step`` output pixels and interpolated bilinearly in between
                  (``mode="expected-affine"``; ``F`` maps the output frame into the affinely
                  rendered frame).

:func:`render_slice` warps an image with any of them in one pass and one interpolation. The
transforms file persists every kind (:class:`deepalign_fast.transforms.TransformSet`,
:meth:`~deepalign_fast.transforms.TransformSet.slice_map`), so the aligned output and `apply`
on the same input are the same pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from .warp import warp_affine, warp_affine_field, warp_displacement

__all__ = ["MapKind", "SliceMap", "compose_affine_field", "render_slice"]

MapKind = Literal["affine", "displacement", "affine-field"]


@dataclass(frozen=True)
class SliceMap:
    """The pull map of one slice (see the module docstring).

    Attributes
    ----------
    affine : ndarray (2, 3) float64
        ``A``: output -> input.
    displacement : ndarray (2, H, W) float32, optional
        ``u`` on the output grid (``kind == "displacement"``).
    affine_field : ndarray (rows, cols, 2, 3) float64, optional
        ``F`` on a grid of ``field_step`` output pixels (``kind == "affine-field"``).
    field_step : float
        Grid spacing of ``affine_field``.
    """

    affine: np.ndarray
    displacement: np.ndarray | None = None
    affine_field: np.ndarray | None = None
    field_step: float = 0.0

    def __post_init__(self) -> None:
        a = np.asarray(self.affine, np.float64)
        if a.shape == (3, 3):
            a = a[:2]
        if a.shape != (2, 3):
            raise ValueError(f"affine: expected shape (2, 3), got {a.shape}")
        object.__setattr__(self, "affine", a)
        if self.displacement is not None and self.affine_field is not None:
            raise ValueError("a slice map has a displacement field or an affine field, not both")
        if self.affine_field is not None and not self.field_step > 0:
            raise ValueError(f"field_step: must be > 0 with an affine field, got "
                             f"{self.field_step}")

    @property
    def kind(self) -> MapKind:
        if self.displacement is not None:
            return "displacement"
        if self.affine_field is not None:
            return "affine-field"
        return "affine"


def compose_affine_field(affine: npt.ArrayLike, field: npt.ArrayLike) -> np.ndarray:
    """``A o F`` at every node of a per-pixel affine field (``(rows, cols, 2, 3)``)."""
    a = np.asarray(affine, np.float64)[:2]
    f = np.asarray(field, np.float64)
    lin = np.einsum("ij,rcjk->rcik", a[:, :2], f)
    lin[..., 2] += a[:, 2]
    return np.ascontiguousarray(lin)


def render_slice(image: npt.ArrayLike, slice_map: SliceMap, shape: tuple[int, int], *,
                 interpolation: str = "linear", num_threads: int = 0) -> np.ndarray:
    """Warp ``image`` (an input slice) into the output frame of ``shape`` with ``slice_map``.

    One interpolation whatever the kind; outside the input the output is 0. ``interpolation``
    "nearest" is for labels; with it, ``image`` may be of any integer type (8-64 bit, signed
    or not: label IDs), copied exactly.
    """
    image = np.asarray(image)
    h, w = int(shape[0]), int(shape[1])
    if slice_map.displacement is not None:
        u = slice_map.displacement
        if u.shape[1:] != (h, w):
            raise ValueError(f"displacement: field of {u.shape[1:]} for an output of {(h, w)}")
        return warp_displacement(image, u, affine=slice_map.affine,
                                 interpolation=interpolation, num_threads=num_threads)
    if slice_map.affine_field is not None:
        return warp_affine_field(image, compose_affine_field(slice_map.affine,
                                                             slice_map.affine_field),
                                 slice_map.field_step, (h, w), interpolation=interpolation,
                                 num_threads=num_threads)
    return warp_affine(image, slice_map.affine, (h, w), interpolation=interpolation,
                       num_threads=num_threads)
