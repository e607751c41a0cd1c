"""Robust estimation of 2D transforms from point matches (LO-RANSAC in the C++ core).

Points are ``(x, y)`` pixels, origin at the centre of the top-left pixel, one row per match.
The estimated 2x3 ``float64`` matrix ``M = [[a, b, tx], [c, d, ty]]`` maps ``src`` points onto
``dst`` points: ``dst ~= M @ (x, y, 1)``. To get the package's pull map (reference -> moving,
what a warp samples with) pass the *reference* keypoints as ``src`` and the *moving* keypoints
as ``dst``.

Models, by degrees of freedom: ``"translation"`` (2), ``"rigid"`` (rotation + translation, 3),
``"similarity"`` (+ uniform scale, 4), ``"affine"`` (6). Prefer the smallest model the data
demand: over long stacks, free scale and shear accumulate into drift.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from . import _core

__all__ = ["MODELS", "Model", "RansacOptions", "RansacResult", "estimate_transform",
           "fit_transform"]

# Model names; validated at run time, so any str is accepted by the type checker.
Model = str
MODELS: tuple[Model, ...] = ("translation", "rigid", "similarity", "affine")


#: Outcome of :func:`estimate_transform` (bound from the C++ core); falsy when no transform
#: could be estimated. Attributes: ``matrix`` ((2, 3) float64 mapping ``src`` to ``dst``, NaN
#: when unsuccessful), ``inliers`` ((N,) bool), ``num_inliers``, ``iterations`` (hypotheses
#: drawn), ``rms`` (RMS reprojection distance of the inliers, px; NaN when unsuccessful),
#: ``success`` (``bool(result)`` is the same) and ``reason`` (why not; empty on success).
RansacResult = _core.RansacResult
#: Options of the C++ RANSAC, as a bound class (:func:`estimate_transform` fills it).
RansacOptions = _core.RansacOptions


def _as_points(points: npt.ArrayLike, name: str) -> npt.NDArray[np.float64]:
    arr = np.asarray(points)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(
            f"{name}: expected an (N, 2) array of (x, y) points, got shape {arr.shape}"
        )
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{name}: expected real (float or integer) coordinates, got {arr.dtype}")
    # The core takes float64 C-contiguous buffers only; cast here, visibly (no copy if already so).
    return np.ascontiguousarray(arr, dtype=np.float64)


def _check_model(model: str) -> None:
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")


def estimate_transform(
    src: npt.ArrayLike,
    dst: npt.ArrayLike,
    model: Model = "affine",
    *,
    threshold: float = 2.0,
    confidence: float = 0.999,
    max_iterations: int = 10_000,
    seed: int = 0,
    num_threads: int = 0,
    refine: bool = True,
) -> RansacResult:
    """Robustly estimate the transform mapping ``src`` points to ``dst`` points (LO-RANSAC).

    Minimal samples are drawn, fitted and scored by their number of inliers (reprojection
    distance ``|M @ src - dst| < threshold``). Whenever a sample beats the best so far, the model
    is refitted by least squares on its inliers until that stops improving (local optimisation),
    and the number of samples still needed is updated from ``confidence`` and the best inlier
    ratio. The final model is a least-squares fit on all its inliers. (Samples are scored in
    float32 on centred points, and one that clearly cannot beat the best is dropped after a
    random sample of the points; the fits, the inlier mask and ``rms`` are float64.)

    Parameters
    ----------
    src, dst : array_like, shape (N, 2)
        Matched ``(x, y)`` points; row ``i`` of ``src`` corresponds to row ``i`` of ``dst``.
        Any real dtype; converted to float64.
    model : {"translation", "rigid", "similarity", "affine"}
        Transform family.
    threshold : float
        Inlier distance in pixels. A value ``<= 0`` gives an unsuccessful result.
    confidence : float
        In ``(0, 1]``: stop drawing samples once the chance that a better model was missed
        is below ``1 - confidence``. ``1`` draws ``max_iterations`` samples.
    max_iterations : int
        Upper bound on the number of samples drawn (``>= 1``).
    seed : int
        Seed (``>= 0``). Sample ``k`` depends only on ``(seed, k)``, so the result is identical
        for a given seed whatever ``num_threads`` is.
    num_threads : int
        Threads scoring samples (0 = all cores). Threads pay off from a few thousand matches
        or high outlier ratios; below ~1000 matches one thread is as fast.
    refine : bool
        Local least-squares refits (LO-RANSAC) and a final refit on all inliers. With
        ``False`` the result is the best minimal-sample model, as in plain RANSAC.

    Returns
    -------
    RansacResult
        Falsy, with ``reason`` set, when the data do not determine a transform: fewer
        matches than the model needs, mismatched ``src``/``dst`` lengths, non-finite
        coordinates, coincident (or, for affine, collinear) points, ``threshold <= 0``.

    Raises
    ------
    ValueError
        Wrong array shapes, unknown model, ``confidence`` outside ``(0, 1]``,
        ``max_iterations < 1``, ``seed < 0`` or ``num_threads < 0``.
    TypeError
        Non-numeric point arrays.

    Examples
    --------
    >>> result = estimate_transform(ref_xy, mov_xy, "rigid", threshold=3.0)
    >>> if result:
    ...     pull_map = result.matrix  # reference -> moving
    """
    _check_model(model)
    s = _as_points(src, "src")
    d = _as_points(dst, "dst")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    opts = RansacOptions()
    opts.model = _core.TransformModel(model)
    opts.threshold = float(threshold)
    opts.confidence = float(confidence)
    opts.max_iterations = int(max_iterations)
    opts.seed = int(seed)
    opts.num_threads = int(num_threads)
    opts.refine = bool(refine)
    return _core.ransac(s, d, opts)


def fit_transform(
    src: npt.ArrayLike,
    dst: npt.ArrayLike,
    model: Model = "affine",
    *,
    weights: npt.ArrayLike | None = None,
) -> npt.NDArray[np.float64] | None:
    """Weighted least-squares transform mapping ``src`` points to ``dst`` points.

    Closed form: weighted mean offset (translation), Umeyama/Procrustes on centred points
    (rigid, similarity; proper rotations only), normal equations on centred points (affine).

    Parameters
    ----------
    src, dst : array_like, shape (N, 2)
        Matched ``(x, y)`` points.
    model : {"translation", "rigid", "similarity", "affine"}
        Transform family.
    weights : array_like, shape (N,), optional
        Non-negative weight of each match (default: all 1).

    Returns
    -------
    numpy.ndarray or None
        ``(2, 3)`` float64 matrix, or None when the points do not determine the model
        (too few, coincident or collinear, non-finite, or all weights zero).

    Raises
    ------
    ValueError
        Wrong shapes, mismatched lengths, unknown model, negative or non-finite weights.
    """
    _check_model(model)
    s = _as_points(src, "src")
    d = _as_points(dst, "dst")
    w = None
    if weights is not None:
        w = np.ascontiguousarray(weights, dtype=np.float64)
        if w.shape != (s.shape[0],):
            raise ValueError(f"weights: expected shape ({s.shape[0]},), got {w.shape}")
    return _core.fit_transform(s, d, _core.TransformModel(model), w)
