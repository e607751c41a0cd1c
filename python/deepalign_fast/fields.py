"""Dense displacement fields: composition with affines and with each other, Jacobian, folding.

Conventions (see the package docstring, written once here for fields)
----------------------------------------------------------------------
- A displacement field ``u`` is a ``(2, H, W)`` ``float32`` array in pixels, ``u[0]`` = ``dx``,
  ``u[1]`` = ``dy``, on the OUTPUT (reference) grid. Points are ``(x, y)`` with the origin at
  the centre of the top-left pixel.
- ``u`` is a **pull map**, like every transform in the package: ``phi_u(p) = p + u(p)`` maps an
  output pixel to the input (moving) point it samples, ``out(p) = moving(p + u(p))``
  (:func:`deepalign_fast.warp.warp_displacement`). A positive ``dx`` therefore moves the
  image content LEFT.
- Affines are 2x3 ``float64`` pull maps ``A(x, y) = (a x + b y + tx, c x + d y + ty)``.
- ``f o g`` means "apply ``g`` first": ``(f o g)(p) = f(g(p))``. For pull maps this is the
  reverse of the order in which warps are applied to an image: warping by ``u1`` and then
  warping the result by ``u2`` samples ``moving((phi_u1 o phi_u2)(p))``.

Functions
---------
- :func:`compose_affine_displacement`: ``v`` with ``phi_v = A o phi_u``, i.e.
  ``v(p) = A(p + u(p)) - p``; ``warp_displacement(img, v)`` equals
  ``warp_displacement(img, u, affine=A)`` up to the float32 rounding of ``v``.
- :func:`compose_displacements`: ``v`` with ``phi_v = phi_u1 o phi_u2``, i.e.
  ``v(p) = u2(p) + u1(p + u2(p))`` (``u1`` sampled bilinearly): one field, and one
  interpolation, for "warp by ``u1``, then by ``u2``".
- :func:`jacobian_determinant`: ``det(I + grad u)``; :func:`nonpositive_jacobian_fraction`:
  the share of pixels where it is ``<= 0`` (the map folds there; the design target is
  < 0.1 %). These are THE implementation: :mod:`deepalign_fast.qc.metrics` delegates here.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from . import _core
from ._errors import DeepAlignError
from .checks import BORDER, check_affine, check_field, check_out, check_threads, option_code

__all__ = [
    "compose_affine_displacement",
    "compose_displacements",
    "jacobian_determinant",
    "nonpositive_jacobian_fraction",
    "without_affine_part",
    "without_common_affine",
]


def compose_affine_displacement(
    affine: npt.ArrayLike,
    displacement: npt.ArrayLike,
    *,
    num_threads: int = 0,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Displacement field of the pull map ``A o (id + u)``: ``v(p) = A(p + u(p)) - p``.

    Parameters
    ----------
    affine : array_like, shape (2, 3) or (3, 3)
        Pull affine ``A``, applied AFTER the displacement (it maps ``p + u(p)`` into the
        moving image), as the ``affine`` of :func:`~deepalign_fast.warp.warp_displacement`.
    displacement : ndarray, shape (2, H, W), float32
        ``u`` (``dx``, ``dy``).
    num_threads : int
        Threads over rows; 0 uses all cores.
    out : ndarray, shape (2, H, W), float32, optional
        Where to write ``v``; may be ``displacement`` itself (in place), must not overlap it
        otherwise.

    Returns
    -------
    ndarray, shape (2, H, W), float32
        ``v``, computed in float64 and rounded once to float32.

    Notes
    -----
    For ``(id + u) o A`` (affine first) sample ``u`` at ``A(p)``: that is
    :func:`compose_displacements` with ``second = compose_affine_displacement(A, zeros)``.
    """
    m = check_affine(affine, "affine")
    u = check_field(displacement, "displacement")
    nt = check_threads(num_threads)
    if out is not None and isinstance(out, np.ndarray) and out is u:
        res = out  # in place
        if not (res.flags.c_contiguous and res.flags.writeable):
            raise ValueError("out: must be C-contiguous and writeable")
    else:
        res = check_out(out, np.dtype(np.float32), u.shape, u)
    _core.compose_affine_displacement(m, u, res, nt)
    return res


def compose_displacements(
    first: npt.ArrayLike,
    second: npt.ArrayLike,
    *,
    border: str = "replicate",
    num_threads: int = 0,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """One field for "warp by ``first``, then warp the result by ``second``".

    ``v(p) = u2(p) + u1(p + u2(p))`` with ``u1 = first`` sampled bilinearly and
    ``u2 = second``: the pull map ``(id + u1) o (id + u2)``, so
    ``warp_displacement(warp_displacement(img, u1), u2)`` ~= ``warp_displacement(img, v)``
    (equal up to the extra interpolation of the two-step version).

    Parameters
    ----------
    first : ndarray, shape (2, H1, W1), float32
        ``u1``, on the grid of the intermediate image (the output of the first warp).
    second : ndarray, shape (2, H, W), float32
        ``u2``, on the final output grid; the result has its shape.
    border : {"replicate", "constant"}
        How ``u1`` is extended outside its grid: ``"replicate"`` repeats its edge values,
        ``"constant"`` treats it as 0 (identity) there, taps outside contributing 0.
    num_threads : int
        Threads over rows; 0 uses all cores.
    out : ndarray, shape (2, H, W), float32, optional
        Where to write ``v``; may be ``second`` itself (in place), must not overlap ``first``.

    Returns
    -------
    ndarray, shape (2, H, W), float32
        ``v`` (NaN where ``p + u2(p)`` is not finite).
    """
    u1 = check_field(first, "first")
    u2 = check_field(second, "second")
    border_code = option_code(BORDER, border, "border")
    nt = check_threads(num_threads)
    if out is not None and isinstance(out, np.ndarray) and out is u2:
        if np.shares_memory(out, u1):
            raise ValueError("out: must not overlap first")
        res = out
        if not (res.flags.c_contiguous and res.flags.writeable):
            raise ValueError("out: must be C-contiguous and writeable")
    else:
        res = check_out(out, np.dtype(np.float32), u2.shape, u1, u2)
    _core.compose_displacements(u1, u2, res, border_code, nt)
    return res


def _jacobian_field(displacement: npt.ArrayLike) -> np.ndarray:
    u = np.asarray(displacement)
    if u.dtype not in (np.float32, np.float64):
        raise ValueError(
            f"displacement: expected dtype float32 or float64, got {u.dtype}; cast explicitly"
        )
    if u.ndim != 3 or u.shape[0] != 2 or min(u.shape[1:]) < 2:
        raise ValueError(f"displacement: expected shape (2, H, W) with H, W >= 2, got {u.shape}")
    return np.ascontiguousarray(u)


def jacobian_determinant(
    displacement: npt.ArrayLike, *, num_threads: int = 0, out: np.ndarray | None = None
) -> np.ndarray:
    """Jacobian determinant of ``phi(p) = p + u(p)`` per pixel.

    ``(1 + dux/dx)(1 + duy/dy) - dux/dy * duy/dx`` with the differences of
    ``numpy.gradient`` (central inside, one-sided at the borders, unit spacing), evaluated in
    float64: the result equals the numpy expression on ``u.astype(np.float64)`` bit for bit
    (then rounded once for a float32 field).

    Parameters
    ----------
    displacement : ndarray, shape (2, H, W), float32 or float64
        ``u`` (``dx``, ``dy``), ``H, W >= 2``.
    num_threads : int
        Threads over rows; 0 uses all cores.
    out : ndarray, shape (H, W), optional
        Preallocated result of the field's dtype.

    Returns
    -------
    ndarray, shape (H, W)
        The determinant, dtype of the field. Values ``<= 0`` mean folding.
    """
    u = _jacobian_field(displacement)
    nt = check_threads(num_threads)
    res = check_out(out, u.dtype, u.shape[1:], u)
    _core.jacobian_determinant(u, res, nt)
    return res


def nonpositive_jacobian_fraction(
    displacement: npt.ArrayLike, *, mask: npt.ArrayLike | None = None, num_threads: int = 0
) -> float:
    """Fraction (0..1) of pixels whose Jacobian determinant is ``<= 0`` (folding).

    Computed row by row without materialising the determinant map; the same determinant as
    :func:`jacobian_determinant`, compared in float64 (a NaN determinant counts as positive,
    as ``det <= 0`` in numpy).

    Parameters
    ----------
    displacement : ndarray, shape (2, H, W), float32 or float64
        ``u`` (``dx``, ``dy``), ``H, W >= 2``.
    mask : array_like, shape (H, W), optional
        Count only pixels where ``mask`` is non-zero (bool and uint8 are used without a copy;
        other dtypes are converted with ``mask != 0``).
    num_threads : int
        Threads over rows; 0 uses all cores.

    Returns
    -------
    float
        ``count(det <= 0) / count(pixels considered)``.

    Raises
    ------
    DeepAlignError
        If the mask selects no pixel (a ``ValueError``, as every bad input here).
    """
    u = _jacobian_field(displacement)
    nt = check_threads(num_threads)
    m = None
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != u.shape[1:]:
            raise ValueError(f"mask: shape {m.shape} differs from the field's {u.shape[1:]}")
        m = np.ascontiguousarray(m if m.dtype in (np.bool_, np.uint8) else m != 0)
    nonpositive, total = _core.nonpositive_jacobian_count(u, m, nt)
    if total == 0:
        raise DeepAlignError("nonpositive_jacobian_fraction: the mask selects no pixel")
    return float(nonpositive) / float(total)


def without_affine_part(displacement: npt.ArrayLike) -> np.ndarray:
    """``displacement`` (2, H, W) less its least-squares affine part (``a x + b y + c`` per
    component, fitted on every 4th pixel): what no affine describes.

    The affine part of each slice's field is the solve's job: a refinement that kept it
    would move the slice the solve placed (see :func:`without_common_affine`)."""
    u = np.asarray(displacement, np.float32)
    if u.ndim != 3 or u.shape[0] != 2:
        raise ValueError(f"displacement: expected shape (2, H, W), got {u.shape}")
    h, w = u.shape[1:]
    ys, xs = np.mgrid[0:h:4, 0:w:4]
    design = np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)], axis=1).astype(np.float64)
    coef, *_ = np.linalg.lstsq(design, u[:, ::4, ::4].reshape(2, -1).T.astype(np.float64),
                               rcond=None)  # (3, 2)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    fit = (coef[0][:, None, None] * xx + coef[1][:, None, None] * yy
           + coef[2][:, None, None]).astype(np.float32)
    return np.ascontiguousarray(u - fit)


def without_common_affine(field: npt.ArrayLike, step: float) -> np.ndarray:
    """A per-pixel affine field (rows, cols, 2, 3) on a grid of ``step`` pixels less the
    affine that best describes the displacement it makes (``F(p) [p, 1] - p``, least
    squares over the nodes): the part no single affine describes (as
    :func:`without_affine_part` for displacements)."""
    f = np.array(field, np.float64)
    if f.ndim != 4 or f.shape[2:] != (2, 3):
        raise ValueError(f"field: expected shape (rows, cols, 2, 3), got {f.shape}")
    rows, cols = f.shape[:2]
    ys, xs = np.mgrid[0:rows, 0:cols] * float(step)
    p = np.stack([xs, ys, np.ones_like(xs)], axis=-1)  # (rows, cols, 3)
    moved = np.einsum("rcij,rcj->rci", f, p) - p[..., :2]
    coef, *_ = np.linalg.lstsq(p.reshape(-1, 3), moved.reshape(-1, 2), rcond=None)  # (3, 2)
    f -= coef.T[None, None]  # subtracting G from every node takes G p from every displacement
    return f
