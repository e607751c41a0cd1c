"""Warping of 2-D slices (affine, dense displacement) with the multithreaded C++ kernels.

Conventions (see the package docstring): a point is ``(x, y)`` in pixels with the origin at
the centre of the top-left pixel, and every transform is the **pull map** from output
(reference) coordinates to input (moving) coordinates: ``out[y, x] = image[T(x, y)]``. For an
affine this is the matrix ``cv2.warpAffine`` expects with ``WARP_INVERSE_MAP``; a displacement
field ``u`` (``(2, H, W)`` ``float32``, ``dx`` then ``dy``) defines ``T(p) = p + u(p)``, so
``cv2.remap`` with maps ``x + u[0]``, ``y + u[1]`` samples the same points.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from . import _core
from .checks import BORDER as _BORDER
from .checks import INTERPOLATION as _INTERPOLATION
from .checks import check_affine as _affine
from .checks import check_field as _field
from .checks import check_image as _image
from .checks import check_out as _out
from .checks import check_shape as _shape
from .checks import check_threads as _threads
from .checks import option_code as _option

__all__ = ["warp_affine", "warp_affine_field", "warp_displacement"]

_KERNEL_TYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))


def _in_lanes(image: npt.ArrayLike, interpolation: str, fill: float,
              out: np.ndarray | None, warp: Callable[[np.ndarray, float], np.ndarray]
              ) -> np.ndarray | None:
    """A nearest-neighbour warp of a 2-D integer or boolean image of a type the kernels do
    not take (label IDs of 8-64 bit, signed or not; masks): its bytes split into 8- or 16-bit
    lanes, each warped by the same map (``warp(lane, lane_fill)``; so each output pixel
    takes every lane from the same input pixel), and joined again: the values are copied
    exactly. None for any other image (the kernels' own checks apply)."""
    arr = np.asarray(image)
    if arr.dtype.kind not in "iub" or arr.dtype in _KERNEL_TYPES:
        return None
    if arr.ndim != 2:
        raise ValueError(f"image: expected a 2-D slice (y, x), got shape {arr.shape}")
    if interpolation != "nearest":
        raise ValueError(f"image: {arr.dtype} is warped with nearest interpolation only "
                         "(labels); cast images to float32 for linear")
    value: int | None
    if isinstance(fill, (int, np.integer)):  # exactly: a float would round 64-bit IDs
        value = int(fill)
    else:
        number = float(fill)
        value = int(number) if number.is_integer() else None
    limits = (0, 1) if arr.dtype.kind == "b" else (int(np.iinfo(arr.dtype).min),
                                                   int(np.iinfo(arr.dtype).max))
    if value is None or not limits[0] <= value <= limits[1]:
        raise ValueError(f"fill: {fill} is not a value of a {arr.dtype} image")
    native = arr.dtype.newbyteorder("=")
    arr = np.ascontiguousarray(arr, native)
    lane = np.dtype(np.uint8) if arr.dtype.itemsize == 1 else np.dtype(np.uint16)
    lanes = arr.view(lane).reshape(*arr.shape, -1)
    fills = np.array([value], arr.dtype).view(lane)
    parts = [warp(np.ascontiguousarray(lanes[..., k]), float(fills[k]))
             for k in range(lanes.shape[-1])]
    result = np.stack(parts, axis=-1).view(arr.dtype).reshape(parts[0].shape)
    if out is None:
        return result
    if not isinstance(out, np.ndarray) or out.dtype.newbyteorder("=") != native or \
            out.shape != result.shape:
        raise ValueError(f"out: expected a {arr.dtype} array of shape {result.shape}")
    out[...] = result
    return out


def warp_affine(
    image: npt.ArrayLike,
    matrix: npt.ArrayLike,
    output_shape: tuple[int, int] | None = None,
    *,
    interpolation: str = "linear",
    border: str = "constant",
    fill: float = 0.0,
    num_threads: int = 0,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Warp a 2-D image with an affine pull map.

    Parameters
    ----------
    image : ndarray, shape (H, W)
        Source (moving) slice, dtype ``uint8``, ``uint16`` or ``float32``; with
        ``interpolation="nearest"`` also any other integer or boolean type (labels: 8-64 bit
        IDs are copied exactly). Other dtypes are rejected rather than converted: cast
        explicitly (e.g. ``image.astype(np.float32)``). Non-contiguous input is copied once
        to C order.
    matrix : array_like, shape (2, 3) or (3, 3)
        Affine ``[[a, b, tx], [c, d, ty]]`` mapping output pixel ``(x, y)`` to source
        ``(a*x + b*y + tx, c*x + d*y + ty)``. A 3x3 matrix must have last row ``[0, 0, 1]``.
    output_shape : tuple of int, optional
        ``(height, width)`` of the result; defaults to ``image.shape`` (or ``out.shape``).
    interpolation : {"linear", "nearest"}
        ``"linear"``: bilinear. ``"nearest"``: the pixel at ``floor(x' + 0.5)``,
        ``floor(y' + 0.5)`` (ties round up); values are copied, never blended, so use it for
        label images.
    border : {"constant", "replicate"}
        ``"constant"``: samples outside the image are ``fill``; for bilinear, taps outside
        contribute ``fill`` (as ``cv2.BORDER_CONSTANT``). ``"replicate"``: clamp to the edge.
    fill : float
        Value outside the image, rounded and saturated to the dtype for integer images
        (NaN is only allowed for ``float32``).
    num_threads : int
        Threads over output rows; 0 uses all cores. Output does not depend on it. One thread
        is best when slices are already warped in parallel by the caller.
    out : ndarray, optional
        Preallocated C-contiguous, writeable result of the image's dtype (and
        ``output_shape`` if given). Must not overlap ``image``.

    Returns
    -------
    ndarray
        The warped image (``out`` if given), same dtype as ``image``.

    Raises
    ------
    ValueError
        On an unsupported dtype, a non-2-D image, a malformed or non-finite matrix, a bad
        output shape, an unknown option, or an unsuitable ``out``.

    Notes
    -----
    Source coordinates are exact float64 per pixel (OpenCV 4.x quantises them to 1/32 pixel).
    Bilinear weights are float32 for ``float32``/``uint16`` and 1/2048-pixel fixed point for
    ``uint8``; integer results are rounded to nearest and saturated.

    Examples
    --------
    >>> import numpy as np
    >>> img = np.arange(12, dtype=np.float32).reshape(3, 4)
    >>> warp_affine(img, [[1, 0, 1], [0, 1, 0]], border="replicate")[0]
    array([1., 2., 3., 3.], dtype=float32)
    """
    labels = _in_lanes(image, interpolation, fill, out, lambda lane, f: warp_affine(
        lane, matrix, output_shape if output_shape is not None else
        (out.shape if isinstance(out, np.ndarray) else np.shape(image)),
        interpolation="nearest", border=border, fill=f, num_threads=num_threads))
    if labels is not None:
        return labels
    arr = _image(image, "warp_affine")
    m = _affine(matrix, "matrix")
    interp_code = _option(_INTERPOLATION, interpolation, "interpolation")
    border_code = _option(_BORDER, border, "border")
    nt = _threads(num_threads)
    fill_f = float(fill)
    if np.isnan(fill_f) and arr.dtype != np.float32:
        raise ValueError(f"fill: NaN cannot be stored in a {arr.dtype} image")
    if output_shape is None:
        output_shape = out.shape if isinstance(out, np.ndarray) else arr.shape
    h, w = _shape(output_shape)
    out = _out(out, arr.dtype, (h, w), arr)
    _core.warp_affine(arr, out, m, interp_code, border_code, fill_f, nt)
    return out


def warp_displacement(
    image: npt.ArrayLike,
    displacement: npt.ArrayLike,
    *,
    affine: npt.ArrayLike | None = None,
    interpolation: str = "linear",
    border: str = "constant",
    fill: float = 0.0,
    num_threads: int = 0,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Warp a 2-D image with a dense displacement field, optionally followed by an affine.

    ``out(p) = image(A(p + u(p)))`` for every output pixel ``p = (x, y)``: the pull map is
    ``A o (id + u)``. Without ``affine`` it is ``image(p + u(p))``. This renders a residual
    flow measured on the output grid on top of an affine pre-alignment in one pass and one
    interpolation (:func:`deepalign_fast.fields.compose_affine_displacement` gives the single
    field of the same map).

    Parameters
    ----------
    image : ndarray, shape (H_in, W_in)
        Source (moving) slice, dtype ``uint8``, ``uint16`` or ``float32``; with
        ``interpolation="nearest"`` also any other integer or boolean type (labels, copied
        exactly). Others are rejected: cast explicitly. Non-contiguous input is copied once to
        C order.
    displacement : ndarray, shape (2, H, W), float32
        ``u``: ``dx`` then ``dy`` in pixels, on the OUTPUT grid (the output has shape
        ``(H, W)``, which may differ from the image's). Pixels whose displacement is NaN or
        infinite get ``fill``.
    affine : array_like, shape (2, 3) or (3, 3), optional
        Pull affine ``A`` applied after the displacement (into the image's coordinates).
    interpolation : {"linear", "nearest"}
        As :func:`warp_affine`: bilinear, or the pixel at ``floor(x' + 0.5)``,
        ``floor(y' + 0.5)`` (never blends: use it for labels).
    border : {"constant", "replicate"}
        As :func:`warp_affine`.
    fill : float
        Value outside the image (rounded and saturated for integer images; NaN only for
        ``float32``).
    num_threads : int
        Threads over output rows; 0 uses all cores. The output does not depend on it.
    out : ndarray, optional
        Preallocated C-contiguous, writeable ``(H, W)`` result of the image's dtype; must not
        overlap the image or the field.

    Returns
    -------
    ndarray, shape (H, W)
        The warped image (``out`` if given), same dtype as ``image``.

    Raises
    ------
    ValueError
        On an unsupported dtype or shape, a malformed or non-finite affine, an unknown option,
        or an unsuitable ``out``.

    Notes
    -----
    Same sampling as :func:`warp_affine`: float64 source coordinates per pixel (``cv2.remap``
    quantises them to 1/32 pixel), float32 bilinear weights for ``float32``/``uint16``,
    1/2048-pixel fixed point for ``uint8``, integer results rounded and saturated. No
    coordinate maps are built (``cv2.remap`` needs two full-size float32 maps).

    Examples
    --------
    >>> import numpy as np
    >>> img = np.arange(12, dtype=np.float32).reshape(3, 4)
    >>> u = np.zeros((2, 3, 4), np.float32); u[0] = 1.0          # sample one pixel to the right
    >>> warp_displacement(img, u, border="replicate")[0]
    array([1., 2., 3., 3.], dtype=float32)
    """
    labels = _in_lanes(image, interpolation, fill, out, lambda lane, f: warp_displacement(
        lane, displacement, affine=affine, interpolation="nearest", border=border, fill=f,
        num_threads=num_threads))
    if labels is not None:
        return labels
    arr = _image(image, "warp_displacement")
    u = _field(displacement, "displacement")
    m = None if affine is None else _affine(affine, "affine")
    interp_code = _option(_INTERPOLATION, interpolation, "interpolation")
    border_code = _option(_BORDER, border, "border")
    nt = _threads(num_threads)
    fill_f = float(fill)
    if np.isnan(fill_f) and arr.dtype != np.float32:
        raise ValueError(f"fill: NaN cannot be stored in a {arr.dtype} image")
    res = _out(out, arr.dtype, u.shape[1:], arr, u)
    _core.warp_displacement(arr, res, u, m, interp_code, border_code, fill_f, nt)
    return res


def warp_affine_field(image: npt.ArrayLike, field: npt.ArrayLike, step: float,
                      output_shape: tuple[int, int], *, interpolation: str = "linear",
                      border: str = "constant", fill: float = 0.0,
                      num_threads: int = 0) -> np.ndarray:
    """Warp a 2-D image with a per-pixel affine pull field (expected affine).

    Parameters
    ----------
    image : ndarray, shape (H, W)
        uint8, uint16 or float32 source (moving) image; with ``interpolation="nearest"``
        also any other integer or boolean type (labels, copied exactly).
    field : ndarray, shape (rows, cols, 2, 3)
        float64 pull affines on a grid of spacing ``step``: node (i, j) is output pixel
        (x, y) = (j * step, i * step); between nodes the affine parameters are interpolated
        bilinearly and applied to the pixel. Must cover ``output_shape``.
    step : float
        Grid spacing in pixels.
    output_shape : (int, int)
        Output (height, width).
    interpolation : {"linear", "nearest"}
    border : {"constant", "replicate"}
    fill : float
        Value outside the source with ``border="constant"``.
    num_threads : int
        Threads of the C++ kernel (0 = all cores).

    Returns
    -------
    ndarray
        The warped image, same dtype as ``image``.
    """
    labels = _in_lanes(image, interpolation, fill, None, lambda lane, f: warp_affine_field(
        lane, field, step, output_shape, interpolation="nearest", border=border, fill=f,
        num_threads=num_threads))
    if labels is not None:
        return labels
    img = _image(image, "warp_affine_field")
    interp = _option(_INTERPOLATION, interpolation, "interpolation")
    bord = _option(_BORDER, border, "border")
    nt = _threads(num_threads)
    f = np.ascontiguousarray(field, dtype=np.float64)
    if f.ndim != 4 or f.shape[2:] != (2, 3):
        raise ValueError(f"field: expected shape (rows, cols, 2, 3), got {f.shape}")
    if not (np.isfinite(step) and step > 0):
        raise ValueError(f"step: must be a finite number > 0, got {step}")
    out = np.empty(_shape(output_shape), img.dtype)
    _core.warp_affine_field(img, out, f, float(step), interp, bord, float(fill), nt)
    return out
