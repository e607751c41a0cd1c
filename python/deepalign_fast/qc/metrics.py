"""Evaluation metrics: target registration error, overlap, Jacobian, similarity.

Conventions (see the package docstring): points ``(x, y)`` in pixels with the origin at the
centre of the top-left pixel; transforms are pull maps (output -> input coordinates), 2x3
float64; displacement fields are ``(2, H, W)`` ``float32``, ``dx`` then ``dy``, and describe the
map ``phi(x) = x + u(x)``.

Target registration error and the gauge
---------------------------------------
An aligner returns, for each slice ``z``, ``estimated[z]``: aligned-output coordinates ->
coordinates in MISALIGNED slice ``z``. The synthetic ground truth (:mod:`deepalign_fast.qc.synth`)
maps misaligned coordinates to CLEAN coordinates. The composite ``C_z = truth[z] o
estimated[z]`` maps aligned-output coordinates to clean coordinates. A perfect alignment need
not reproduce the clean frame, only a common one: ``C_z`` must equal ONE affine ``G`` for every
``z`` (a global rotation/shift/scale of the whole volume is not a misalignment). ``G`` is fitted
by least squares over all slices and a grid of points, and the error of each point is
``|C_z(p) - G(p)|`` in clean pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import cv2
import numpy as np
from numpy.typing import ArrayLike, NDArray

from .._errors import DeepAlignError
from ..geometry import compose
from .truth import GroundTruth

__all__ = [
    "ExactTruthScore",
    "TREResult",
    "dice",
    "exact_truth_score",
    "gauge_residuals",
    "iou",
    "jitter_error",
    "ncc",
    "neighbour_similarity",
    "normalized_improvement",
    "slow_translation",
    "ssim",
    "target_registration_error",
    "tre_from_composites",
]


class _Stack(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> Any: ...


# --------------------------------------------------------------------------------------------
# target registration error
# --------------------------------------------------------------------------------------------
@dataclass
class TREResult:
    """Target registration error of an alignment against synthetic ground truth.

    Attributes
    ----------
    per_slice_median, per_slice_max : ndarray, shape (n,)
        Median / max point error of each slice in clean pixels (NaN for failed slices).
    median, mean, p95, max : float
        Over all points of all non-failed slices.
    gauge : ndarray, shape (2, 3)
        The common frame ``G`` (aligned-output -> clean coordinates) removed before scoring.
    failed : tuple of int
        Slices without an estimate (``None`` rows), excluded from the statistics.
    n_points : int
        Grid points per slice used (those whose ``G``-image lies inside the clean frame).
    """

    per_slice_median: NDArray[np.float64]
    per_slice_max: NDArray[np.float64]
    median: float
    mean: float
    p95: float
    max: float
    gauge: NDArray[np.float64]
    failed: tuple[int, ...] = field(default_factory=tuple)
    n_points: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (NaN per-slice values become ``None``)."""

        def _list(a: NDArray[np.float64]) -> list[float | None]:
            return [None if not np.isfinite(v) else float(v) for v in a]

        return {
            "median": self.median, "mean": self.mean, "p95": self.p95, "max": self.max,
            "per_slice_median": _list(self.per_slice_median),
            "per_slice_max": _list(self.per_slice_max),
            "gauge": self.gauge.tolist(), "failed": list(self.failed),
            "n_points": self.n_points,
        }


def _grid_points(shape: tuple[int, int], grid: int) -> NDArray[np.float64]:
    h, w = int(shape[0]), int(shape[1])
    if grid < 2 or h < 1 or w < 1:
        raise DeepAlignError(f"need grid >= 2 and a non-empty frame, got grid={grid}, {shape}")
    xs, ys = np.linspace(0, w - 1, grid), np.linspace(0, h - 1, grid)
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([gx.ravel(), gy.ravel()], -1)


def _fit_affine(src: NDArray[np.float64], dst: NDArray[np.float64]) -> NDArray[np.float64]:
    a = np.hstack([src, np.ones((len(src), 1))])
    sol, *_ = np.linalg.lstsq(a, dst, rcond=None)
    return np.ascontiguousarray(sol.T)


def tre_from_composites(
    composites: Sequence[ArrayLike | None],
    shape: tuple[int, int],
    *,
    clean_shape: tuple[int, int] | None = None,
    grid: int = 16,
) -> TREResult:
    """TRE from composites ``C_z`` (aligned-output -> clean coordinates), gauge removed.

    Parameters
    ----------
    composites : sequence of (2, 3) array_like or None
        ``C_z`` for each slice; ``None`` marks a failed slice.
    shape : tuple of int
        ``(h, w)`` of the aligned output frame; a ``grid x grid`` lattice of points spans it.
    clean_shape : tuple of int, optional
        ``(h, w)`` of the clean frame. When given, only points whose ``G``-image lies inside it
        are scored (points outside correspond to no data).
    grid : int
        Lattice size per axis.

    Returns
    -------
    TREResult
    """
    n = len(composites)
    ok = [z for z in range(n) if composites[z] is not None]
    failed = tuple(z for z in range(n) if composites[z] is None)
    if not ok:
        raise DeepAlignError("no slice has an estimated transform: cannot compute TRE")
    cz = np.stack([np.asarray(composites[z], dtype=np.float64) for z in ok])
    if cz.shape[1:] != (2, 3) or not np.isfinite(cz).all():
        raise DeepAlignError(f"composites must be finite (2, 3) affines, got shape {cz.shape}")
    pts = _grid_points(shape, grid)
    mapped = np.einsum("nij,kj->nki", cz[:, :, :2], pts) + cz[:, None, :, 2]  # (m, k, 2)
    use = np.ones(len(pts), dtype=bool)
    gauge = np.zeros((2, 3))
    for _ in range(5):  # refit on the points that land inside the clean frame until stable
        src = np.tile(pts[use], (len(ok), 1))
        gauge = _fit_affine(src, mapped[:, use].reshape(-1, 2))
        if clean_shape is None:
            break
        g = pts @ gauge[:, :2].T + gauge[:, 2]
        h, w = clean_shape
        inside = (g[:, 0] >= -0.5) & (g[:, 0] <= w - 0.5) & (g[:, 1] >= -0.5) & (g[:, 1] <= h - 0.5)
        if inside.sum() < 3:
            raise DeepAlignError(
                "the common frame G maps fewer than 3 grid points of the aligned frame inside "
                "the clean frame: the estimates are inconsistent or the frames do not overlap"
            )
        if (inside == use).all():
            break
        use = inside
    g = pts[use] @ gauge[:, :2].T + gauge[:, 2]
    err = np.linalg.norm(mapped[:, use] - g[None], axis=-1)  # (m, k)
    med = np.full(n, np.nan)
    mx = np.full(n, np.nan)
    med[ok] = np.median(err, axis=1)
    mx[ok] = err.max(axis=1)
    return TREResult(
        per_slice_median=med, per_slice_max=mx, median=float(np.median(err)),
        mean=float(err.mean()), p95=float(np.percentile(err, 95)), max=float(err.max()),
        gauge=gauge, failed=failed, n_points=int(use.sum()),
    )


def target_registration_error(
    estimated: Sequence[ArrayLike | None] | NDArray[np.float64],
    truth: GroundTruth | ArrayLike,
    shape: tuple[int, int],
    *,
    grid: int = 16,
    clean_shape: tuple[int, int] | None = None,
) -> TREResult:
    """Target registration error of an aligner's transforms against synthetic ground truth.

    Parameters
    ----------
    estimated : sequence of (2, 3) array_like or None
        ``estimated[z]`` maps ALIGNED-output coordinates to coordinates of MISALIGNED slice
        ``z`` (what an aligner returns); ``None`` marks a failed slice.
    truth : GroundTruth or array_like (n, 2, 3)
        ``truth[z]`` maps misaligned coordinates to clean coordinates.
    shape : tuple of int
        ``(h, w)`` of the aligned output frame.
    grid : int
        Points per axis of the lattice over the output frame.
    clean_shape : tuple of int, optional
        Clean frame ``(h, w)``; taken from ``truth`` when it is a :class:`GroundTruth`.

    Returns
    -------
    TREResult
        Errors in clean pixels after removing the best common frame ``G`` (see module
        docstring).
    """
    if isinstance(truth, GroundTruth):
        t = truth.transforms
        clean_shape = clean_shape or truth.clean_shape
    else:
        t = np.asarray(truth, dtype=np.float64)
    if len(estimated) != len(t):
        raise DeepAlignError(
            f"{len(estimated)} estimated transforms for {len(t)} ground-truth slices"
        )
    comps: list[NDArray[np.float64] | None] = [
        None if e is None else compose(t[z], np.asarray(e, dtype=np.float64))
        for z, e in enumerate(estimated)
    ]
    return tre_from_composites(comps, shape, clean_shape=clean_shape, grid=grid)


# --------------------------------------------------------------------------------------------
# overlap
# --------------------------------------------------------------------------------------------
def _overlap(a: ArrayLike, b: ArrayLike, labels: Sequence[int] | None, kind: str,
             per_label: bool) -> float | dict[int, float]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise DeepAlignError(f"{kind}: shapes differ, {a.shape} vs {b.shape}")
    masks = [(a != 0, b != 0)] if labels is None else [(a == v, b == v) for v in labels]
    if labels is not None and len(masks) == 0:
        raise DeepAlignError(f"{kind}: empty label list")
    scores: list[float] = []
    for ma, mb in masks:
        inter = float(np.count_nonzero(ma & mb))
        sa, sb = float(np.count_nonzero(ma)), float(np.count_nonzero(mb))
        if sa + sb == 0:
            scores.append(1.0)  # absent from both: perfect agreement
        elif kind == "dice":
            scores.append(2.0 * inter / (sa + sb))
        else:
            scores.append(inter / (sa + sb - inter))
    if per_label:
        keys = [1] if labels is None else [int(v) for v in labels]
        return dict(zip(keys, scores, strict=False))
    return float(np.mean(scores))


def dice(a: ArrayLike, b: ArrayLike, *, labels: Sequence[int] | None = None,
         per_label: bool = False) -> float | dict[int, float]:
    """Dice coefficient ``2|A∩B| / (|A|+|B|)``.

    Parameters
    ----------
    a, b : array_like
        Label images/volumes of the same shape.
    labels : sequence of int, optional
        Without it, non-zero voxels are foreground (binary Dice). With it, Dice of each label
        value, averaged (or returned per label).
    per_label : bool
        Return ``{label: score}`` instead of the mean.

    Returns
    -------
    float or dict
        A label absent from both inputs scores 1.
    """
    return _overlap(a, b, labels, "dice", per_label)


def iou(a: ArrayLike, b: ArrayLike, *, labels: Sequence[int] | None = None,
        per_label: bool = False) -> float | dict[int, float]:
    """Intersection over union (Jaccard) ``|A∩B| / |A∪B|``; options as :func:`dice`."""
    return _overlap(a, b, labels, "iou", per_label)


# --------------------------------------------------------------------------------------------
# similarity
# --------------------------------------------------------------------------------------------
def ncc(a: ArrayLike, b: ArrayLike, mask: ArrayLike | None = None) -> float:
    """Zero-normalised cross-correlation of two images (optionally over ``mask`` only).

    Returns NaN when either image is constant over the evaluated pixels.
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise DeepAlignError(f"ncc: shapes differ, {x.shape} vs {y.shape}")
    if mask is not None:
        m = np.asarray(mask).astype(bool)
        x, y = x[m], y[m]
    x = x.ravel() - x.mean()
    y = y.ravel() - y.mean()
    # elementwise sums, not BLAS dot products: these stay single-threaded and do not fight the
    # C++ pool for cores
    den = float(np.sqrt(np.sum(x * x) * np.sum(y * y)))
    return float(np.sum(x * y)) / den if den > 0 else float("nan")


def _data_range(a: NDArray[Any], b: NDArray[Any]) -> float:
    if np.issubdtype(a.dtype, np.integer) and a.dtype == b.dtype:
        info = np.iinfo(a.dtype)
        return float(info.max) - float(min(info.min, 0))
    return float(max(a.max(), b.max()) - min(a.min(), b.min()))


def ssim(a: ArrayLike, b: ArrayLike, *, data_range: float | None = None,
         sigma: float = 1.5, full: bool = False, mask: ArrayLike | None = None,
         ) -> float | tuple[float, NDArray[np.float64]]:
    """Structural similarity with a Gaussian window (Wang et al. 2004).

    Matches ``skimage.metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=...)``: window truncated at 3.5 sigma, reflected
    borders, mean over the map without a border of the window radius.

    Parameters
    ----------
    a, b : array_like, 2-D
    data_range : float, optional
        Default: the dtype range for integer images, the joint value range for floats.
    sigma : float
        Gaussian window standard deviation.
    full : bool
        Also return the SSIM map.
    mask : array_like of bool, optional
        Average the map only where the whole window lies inside ``mask`` (e.g. to leave out
        the fill borders of a warped slice). NaN if no such pixel exists.
    """
    x, y = np.asarray(a), np.asarray(b)
    if x.shape != y.shape or x.ndim != 2:
        raise DeepAlignError(f"ssim: need two 2-D images of equal shape, got {x.shape}, {y.shape}")
    rng = _data_range(x, y) if data_range is None else float(data_range)
    if rng <= 0:
        raise DeepAlignError("ssim: data_range must be > 0")
    radius = int(3.5 * sigma + 0.5)
    k = 2 * radius + 1
    if min(x.shape) < k:
        raise DeepAlignError(f"ssim: images smaller than the {k}x{k} window")
    xf, yf = x.astype(np.float64), y.astype(np.float64)

    def blur(img: NDArray[np.float64]) -> NDArray[np.float64]:
        # BORDER_REFLECT == scipy.ndimage mode "reflect" used by scikit-image
        return np.asarray(cv2.GaussianBlur(img, (k, k), sigma, borderType=cv2.BORDER_REFLECT))

    mx, my = blur(xf), blur(yf)
    vx = blur(xf * xf) - mx * mx
    vy = blur(yf * yf) - my * my
    cxy = blur(xf * yf) - mx * my
    c1, c2 = (0.01 * rng) ** 2, (0.03 * rng) ** 2
    smap = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    if mask is None:
        value = float(smap[radius:-radius, radius:-radius].mean())
    else:
        m = np.asarray(mask).astype(np.uint8)
        if m.shape != x.shape:
            raise DeepAlignError(f"ssim: mask shape {m.shape} != image shape {x.shape}")
        inner = cv2.erode(m, np.ones((k, k), np.uint8), borderType=cv2.BORDER_CONSTANT,
                          borderValue=0).astype(bool)
        value = float(smap[inner].mean()) if inner.any() else float("nan")
    return (value, smap) if full else value


def neighbour_similarity(
    stack: _Stack | NDArray[Any],
    metric: str | Callable[..., float] = "ncc",
    *,
    masks: Sequence[ArrayLike | None] | None = None,
) -> NDArray[np.float64]:
    """Similarity of each pair of consecutive slices.

    Parameters
    ----------
    stack : ndarray (z, y, x) or lazy stack
        Anything with ``__len__`` and ``__getitem__(i)`` (or ``read(i)``) returning a slice;
        slices are read one at a time.
    metric : {"ncc", "ssim"} or callable
        ``metric(slice_z, slice_z_plus_1) -> float`` (called with ``mask=`` when masks are
        given).
    masks : sequence of (y, x) bool arrays or None, optional
        Valid pixels of each slice (e.g. not fill border of a warped slice); a pair is compared
        where both are valid. ``None`` entries mean all valid.

    Returns
    -------
    ndarray, shape (n - 1,)
        Entry ``z`` compares slices ``z`` and ``z + 1``.
    """
    fn: Callable[..., float]
    if metric == "ncc":
        fn = ncc
    elif metric == "ssim":
        fn = ssim  # type: ignore[assignment]
    elif callable(metric):
        fn = metric
    else:
        raise DeepAlignError(f"unknown metric {metric!r}; use 'ncc', 'ssim' or a callable")
    n = len(stack)
    if masks is not None and len(masks) != n:
        raise DeepAlignError(f"{len(masks)} masks for {n} slices")
    out = np.empty(max(n - 1, 0))
    prev = _read(stack, 0) if n else None
    for z in range(1, n):
        cur = _read(stack, z)
        if masks is None or (masks[z - 1] is None and masks[z] is None):
            out[z - 1] = fn(prev, cur)
        else:
            ma, mb = (np.ones(cur.shape, bool) if m is None else np.asarray(m).astype(bool)
                      for m in (masks[z - 1], masks[z]))
            out[z - 1] = fn(prev, cur, mask=ma & mb)
        prev = cur
    return out


def _read(stack: Any, i: int) -> NDArray[Any]:
    reader = getattr(stack, "read", None)
    return np.asarray(reader(i) if callable(reader) else stack[i])


def normalized_improvement(after: ArrayLike, before: ArrayLike) -> Any:
    """Seed 002's normalised improvement ``(after - before) / (1 - before)``.

    1 means the remaining gap to a perfect score was closed, 0 no change, negative worse.
    NaN where ``before == 1`` (nothing left to improve). Scalars give a float.
    """
    a, b = np.asarray(after, dtype=np.float64), np.asarray(before, dtype=np.float64)
    den = 1.0 - b
    out = np.divide(a - b, den, out=np.full(np.broadcast(a, b).shape, np.nan), where=den != 0)
    return float(out) if out.ndim == 0 else out


# --------------------------------------------------------------------------------------------
# exact-truth scoring: full TRE, its trend along z, and the jitter error
# --------------------------------------------------------------------------------------------
@dataclass
class ExactTruthScore:
    """Scores of an alignment against an exact truth (see :func:`exact_truth_score`).

    Attributes
    ----------
    per_slice_tre : ndarray, shape (n,)
        Mean over the point grid of ``|C_z(p) - G(p)|`` for each slice, in clean pixels.
    per_slice_jitter : ndarray, shape (n,)
        The same after subtracting the slow part of the residual translation
        (:func:`slow_translation`).
    tre_median, tre_p95 : float
        Median and 95th percentile of ``per_slice_tre`` over slices.
    slope_per_100 : float
        Least-squares slope of ``per_slice_tre`` against ``z``, in px per 100 slices (how fast
        the error grows along the stack; chained estimates drift).
    jitter_median, jitter_p95 : float
        Median and 95th percentile of ``per_slice_jitter``.
    gauge : ndarray, shape (2, 3)
        The one global affine ``G`` removed before scoring.
    per_pair_error : ndarray, shape (n - 1,)
        Neighbour-to-neighbour error: mean over the grid of ``|r_{z+1}(p) - r_z(p)|`` (how
        far slice ``z + 1`` is misplaced relative to slice ``z``).
    pair_median : float
        Median of ``per_pair_error`` (0 for a single slice).
    drift_per_100 : ndarray, shape (2,)
        Least-squares slope of the slice-mean residual ``(x, y)`` along ``z``, in px per 100
        slices: a per-pair bias that a chain adds up.
    per_slice_linear : ndarray, shape (n,)
        The part of the error a slice's rotation, scale and shear make: mean over the grid of
        ``|r_z(p) - mean_p r_z(p)|`` (the residual about the frame centre, its translation
        taken out). Slow rotation, scale and shear are not forgiven by the jitter error, so
        this tells how much of it the linear parts leave.
    linear_median, linear_p95 : float
        Median and 95th percentile of ``per_slice_linear``.
    """

    per_slice_tre: NDArray[np.float64]
    per_slice_jitter: NDArray[np.float64]
    tre_median: float
    tre_p95: float
    slope_per_100: float
    jitter_median: float
    jitter_p95: float
    gauge: NDArray[np.float64]
    per_pair_error: NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    pair_median: float = 0.0
    drift_per_100: NDArray[np.float64] = field(default_factory=lambda: np.zeros(2))
    per_slice_linear: NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    linear_median: float = 0.0
    linear_p95: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict."""
        return {
            "pair_median": self.pair_median, "drift_per_100": self.drift_per_100.tolist(),
            "per_pair_error": self.per_pair_error.tolist(),
            "tre_median": self.tre_median, "tre_p95": self.tre_p95,
            "slope_per_100": self.slope_per_100, "jitter_median": self.jitter_median,
            "jitter_p95": self.jitter_p95, "per_slice_tre": self.per_slice_tre.tolist(),
            "per_slice_jitter": self.per_slice_jitter.tolist(), "gauge": self.gauge.tolist(),
            "linear_median": self.linear_median, "linear_p95": self.linear_p95,
            "per_slice_linear": self.per_slice_linear.tolist(),
        }


def gauge_residuals(
    composites: ArrayLike, shape: tuple[int, int], *, grid: int = 16,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Residuals of composites ``C_z`` after removing ONE global affine fitted over all slices.

    Parameters
    ----------
    composites : array_like, shape (n, 2, 3)
        ``C_z`` maps aligned-output coordinates to clean coordinates (see module docstring).
    shape : tuple of int
        ``(h, w)`` of the aligned output frame; a ``grid x grid`` lattice of points spans it.
    grid : int
        Lattice size per axis.

    Returns
    -------
    residuals : ndarray, shape (n, grid * grid, 2)
        ``C_z(p) - G(p)`` for every slice and lattice point, in clean pixels.
    gauge : ndarray, shape (2, 3)
        The least-squares common frame ``G``.
    """
    cz = np.asarray(composites, dtype=np.float64)
    if cz.ndim != 3 or cz.shape[1:] != (2, 3) or len(cz) < 1:
        raise DeepAlignError(f"composites must be (n, 2, 3) with n >= 1, got shape {cz.shape}")
    if not np.isfinite(cz).all():
        raise DeepAlignError("composites contain NaN or inf")
    pts = _grid_points(shape, grid)
    mapped = np.einsum("nij,kj->nki", cz[:, :, :2], pts) + cz[:, None, :, 2]
    gauge = _fit_affine(np.tile(pts, (len(cz), 1)), mapped.reshape(-1, 2))
    return mapped - (pts @ gauge[:, :2].T + gauge[:, 2])[None], gauge


def slow_translation(translations: ArrayLike, sigma: float = 8.0) -> NDArray[np.float64]:
    """The slow part of a per-slice translation: Gaussian smoothing along ``z``.

    A Gaussian-weighted local linear fit (standard deviation ``sigma`` slices) at every slice.
    Away from the ends of the stack this is exactly Gaussian smoothing (the symmetric weights
    cancel the slope term); at the ends it does not bend a straight line toward the inside, so
    a linear drift is reproduced exactly on every slice.

    Parameters
    ----------
    translations : array_like, shape (n, d)
        Per-slice values (e.g. the slice-mean residual ``(x, y)``).
    sigma : float
        Standard deviation of the Gaussian, in slices (> 0).

    Returns
    -------
    ndarray, shape (n, d)
    """
    t = np.asarray(translations, dtype=np.float64)
    if t.ndim != 2:
        raise DeepAlignError(f"translations must be (n, d), got shape {t.shape}")
    if not (np.isfinite(sigma) and sigma > 0):
        raise DeepAlignError(f"sigma must be a finite number > 0, got {sigma}")
    n = len(t)
    if n < 2:
        return t.copy()
    z = np.arange(n, dtype=np.float64)
    d = z[None, :] - z[:, None]  # d[i, j] = z_j - z_i
    w = np.exp(-0.5 * (d / sigma) ** 2)
    s0, s1, s2 = w.sum(1), (w * d).sum(1), (w * d * d).sum(1)
    det = s0 * s2 - s1 * s1
    # local fit y ~ a + b d around slice i; a = (s2 * sum(w y) - s1 * sum(w d y)) / det
    coef = (s2[:, None] * w - s1[:, None] * (w * d)) / det[:, None]
    return np.asarray(coef @ t)


def jitter_error(residuals: ArrayLike, sigma: float = 8.0) -> NDArray[np.float64]:
    """Per-slice error left after forgiving the slow part of the residual translation.

    Slow translation of the content and slow stage drift cannot be told apart from the images,
    so this error forgives it: the slice-mean residual translation is smoothed along ``z``
    (:func:`slow_translation`, Gaussian of ``sigma`` slices) and subtracted from every point's
    residual before taking the norm. Jitter, per-slice rotation/scale/shear errors and fast
    (few-slice) drift are still counted.

    Parameters
    ----------
    residuals : array_like, shape (n, k, 2)
        Per-slice, per-point residuals after the global affine (:func:`gauge_residuals`).
    sigma : float
        Smoothing scale along ``z`` in slices.

    Returns
    -------
    ndarray, shape (n,)
        Mean over the points of ``|r_z(p) - slow_z|`` for each slice.
    """
    r = np.asarray(residuals, dtype=np.float64)
    if r.ndim != 3 or r.shape[2] != 2:
        raise DeepAlignError(f"residuals must be (n, k, 2), got shape {r.shape}")
    slow = slow_translation(r.mean(axis=1), sigma)
    return np.asarray(np.linalg.norm(r - slow[:, None, :], axis=-1).mean(axis=1))


def exact_truth_score(
    estimated: ArrayLike,
    truth: ArrayLike,
    shape: tuple[int, int],
    *,
    grid: int = 16,
    sigma: float = 8.0,
) -> ExactTruthScore:
    """Score per-slice transforms against an exact truth: TRE, its slope, jitter error.

    Parameters
    ----------
    estimated : array_like, shape (n, 2, 3)
        ``estimated[z]`` maps aligned-output coordinates to coordinates of (misaligned) input
        slice ``z``, the package convention.
    truth : array_like, shape (n, 2, 3)
        ``truth[z]`` maps input-slice coordinates to clean coordinates
        (:attr:`deepalign_fast.qc.synth.GroundTruth.transforms`; identity for an unchanged stack).
    shape : tuple of int
        ``(h, w)`` of the aligned output frame (the lattice of scored points spans it).
    grid : int
        Lattice points per axis.
    sigma : float
        Smoothing scale along ``z`` (slices) of the slow translation forgiven by the jitter
        error.

    Returns
    -------
    ExactTruthScore
        The composite ``C_z = truth[z] o estimated[z]`` minus one global affine ``G`` fitted
        over all slices is the residual; ``TRE_z`` is its mean norm over the lattice.
    """
    est = np.asarray(estimated, dtype=np.float64)
    t = np.asarray(truth, dtype=np.float64)
    if est.shape != t.shape or est.ndim != 3 or est.shape[1:] != (2, 3):
        raise DeepAlignError(
            f"estimated {est.shape} and truth {t.shape} must both be (n, 2, 3) of the same n")
    if not np.isfinite(est).all():
        bad = sorted({int(z) for z in np.nonzero(~np.isfinite(est))[0]})
        raise DeepAlignError(f"estimated transforms of slices {bad[:10]} contain NaN or inf")
    res, gauge = gauge_residuals(compose(t, est), shape, grid=grid)
    tre = np.linalg.norm(res, axis=-1).mean(axis=1)
    jit = jitter_error(res, sigma)
    # The grid is symmetric about the frame centre, so the slice-mean residual is the
    # residual translation at the centre; what is left is the linear part's.
    lin = np.linalg.norm(res - res.mean(axis=1, keepdims=True), axis=-1).mean(axis=1)
    n = len(tre)
    z = np.arange(n, dtype=np.float64)
    slope = float(np.polyfit(z, tre, 1)[0] * 100) if n > 1 else 0.0
    pairs = np.linalg.norm(np.diff(res, axis=0), axis=-1).mean(axis=1)
    drift = np.polyfit(z, res.mean(axis=1), 1)[0] * 100 if n > 1 else np.zeros(2)
    return ExactTruthScore(
        per_pair_error=pairs, pair_median=float(np.median(pairs)) if n > 1 else 0.0,
        drift_per_100=np.asarray(drift, np.float64),
        per_slice_tre=tre, per_slice_jitter=jit, tre_median=float(np.median(tre)),
        tre_p95=float(np.percentile(tre, 95)), slope_per_100=slope,
        jitter_median=float(np.median(jit)), jitter_p95=float(np.percentile(jit, 95)),
        gauge=gauge, per_slice_linear=lin, linear_median=float(np.median(lin)),
        linear_p95=float(np.percentile(lin, 95)),
    )
