"""Expected affine: registration of damaged (folded / cracked) sections.

Method (Xin et al. 2022, "Expected affine: a registration method for damaged section in serial
sections electron microscopy", Front. Neuroinform., doi 10.3389/fninf.2022.944050), as read
and implemented here:

1. Keypoints of the reference and of the damaged moving section are matched (mutual nearest
   neighbour; SIFT, or dense NCC blocks). Keypoints inside the damage mask are dropped.
2. The matched moving keypoints are clustered by K-means (``n_clusters``). With a damage
   mask, distances are *path* distances through undamaged tissue, so a cluster never spans a
   fold: points are assigned to the geodesically nearest centre, and a centre moves to the
   member nearest its members' mean (so it stays on its side of the damage).
3. Each cluster gets a local affine by RANSAC (C++ core); its inliers are the cluster's
   evidence. A cluster with fewer than ``min_cluster_matches`` inliers is dropped (reported
   in ``notes``); if none survives, the result falls back to the global affine and says so.
4. KNN density estimation: among the ``k`` nearest clustered keypoints of a point q (path
   distance where a mask is given, else Euclidean), ``k_c`` belong to cluster c, so
   ``P(c | q) = k_c / k``; the expected affine is ``E(q) = sum_c P(c | q) A_c``.
5. ``E`` lives in moving coordinates on a coarse grid (``grid_step`` px); the pull field on the
   output grid (``field_step`` px) takes at output point p the fixed point of
   ``A <- E(A p)`` started from the global affine (``iterations`` steps), so p takes the
   affine of the side of the damage its source lies on. The warp interpolates that field
   bilinearly per pixel (C++ core, one parameter row per output row materialised).

Damaged pixels: as in the authors' code, the damage region of the moving section carries no
tissue to register; :meth:`ExpectedAffineResult.warp` can blank (``mask_damage=True``) the
output pixels whose source lies in the mask. Path distances are computed on the coarse grid:
a node is blocked when damage lies within ``grid_step / 2 + 1`` px of it (so thin cracks never
leak), and the 8-neighbour metric overestimates straight lengths by at most 8 %.

Conventions: arrays are (y, x); points are (x, y) px with the origin at the centre of the
top-left pixel; affines are 2x3 float64 pull maps, output (reference) -> input (moving).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from .. import _core
from .._errors import DeepAlignError
from ..estimate import estimate_transform
from ..fields import without_common_affine
from ..render import SliceMap, render_slice
from ..warp import warp_affine, warp_affine_field
from .order import TOWARD_NEIGHBOURS, InOrder, Neighbours

__all__ = ["FIELD_STEP", "SIDE_MARGIN", "ExpectedAffineResult", "PairMatcher", "StackRefiner",
           "check_masks", "drop_damaged", "knn_grid", "match_pair", "register_pair"]

Features = Literal["sift", "learned", "blocks"]
#: Grid spacing (output pixels) of the fields of a stack refinement (and of their store).
FIELD_STEP = 8


def knn_grid(points: npt.ArrayLike, shape: tuple[int, int], *, step: int, k: int,
             mask: npt.ArrayLike | None = None, num_threads: int = 0
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """k nearest points of every node of a coarse grid over an image of ``shape``.

    Nodes sit at (x, y) = (j * step, i * step). Without ``mask`` distances are Euclidean;
    with a damage ``mask`` (non-zero = damage, same shape) they are path distances that do not
    cross the damage (see the module docstring).

    Returns
    -------
    dist : ndarray (rows, cols, k) float32
        Sorted distances in pixels (+inf where fewer than k points are reachable).
    index : ndarray (rows, cols, k) int32
        Point indices (-1 where fewer than k).
    blocked : ndarray (rows, cols) uint8 or None
        The blocked nodes used (None without a mask).
    """
    pts = np.ascontiguousarray(np.asarray(points, np.float64).reshape(-1, 2))
    h, w = shape
    rows, cols = _core.grid_size(h, step), _core.grid_size(w, step)
    blocked = None
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != (h, w):
            raise DeepAlignError(f"mask shape {m.shape} != image shape {(h, w)}")
        blocked = _core.coarsen_mask(np.ascontiguousarray(m != 0, dtype=np.uint8), step,
                                     num_threads)
    dist, index, _ = _core.knn_grid(pts, rows, cols, float(step), k, blocked, num_threads)
    return dist, index, blocked


@dataclass
class ExpectedAffineResult:
    """Outcome of :func:`register_pair`; falsy when not even a global affine was found.

    Attributes
    ----------
    field : ndarray (rows, cols, 2, 3) float64
        Pull affines (reference -> moving) on the output grid of spacing ``field_step``.
    field_step : int
    output_shape : (int, int)
        Shape of the reference (the output frame).
    global_affine : ndarray (2, 3)
        Single RANSAC affine over all matches (the fallback).
    cluster_affines : ndarray (C, 2, 3)
        Local affines of the clusters that were kept.
    cluster_inliers : list of int
        RANSAC inliers per kept cluster.
    points_reference, points_moving : ndarray (N, 2)
        Keypoints used for the density (cluster inliers), with ``labels`` (N,) their cluster.
    fallback : bool
        True when the field is the global affine everywhere (see ``reason``).
    success : bool
    reason : str
        Why ``fallback`` or not ``success``; empty otherwise.
    notes : list of str
        Everything else worth reporting (dropped clusters, an empty mask, ...).
    """

    field: np.ndarray
    field_step: int
    output_shape: tuple[int, int]
    global_affine: np.ndarray
    cluster_affines: np.ndarray
    cluster_inliers: list[int]
    points_reference: np.ndarray
    points_moving: np.ndarray
    labels: np.ndarray
    mask: np.ndarray | None
    fallback: bool
    success: bool
    reason: str
    notes: list[str] = dc_field(default_factory=list)
    num_threads: int = 0

    def __bool__(self) -> bool:
        return self.success

    def warp(self, image: npt.ArrayLike, *, interpolation: str = "linear", fill: float = 0.0,
             mask_damage: bool = False) -> np.ndarray:
        """Warp a moving-frame image (the damaged section, or its labels) onto the reference.

        ``mask_damage=True`` sets to ``fill`` the output pixels whose source lies in the damage
        mask (they carry no registrable tissue).
        """
        out = warp_affine_field(image, self.field, self.field_step, self.output_shape,
                                interpolation=interpolation, fill=fill,
                                num_threads=self.num_threads)
        if mask_damage and self.mask is not None:
            out[self.damaged_output()] = fill
        return out

    def damaged_output(self) -> np.ndarray:
        """Boolean (H, W): output pixels whose source lies in the damage (all False without)."""
        if self.mask is None:
            return np.zeros(self.output_shape, bool)
        m = warp_affine_field((self.mask != 0).astype(np.uint8), self.field, self.field_step,
                              self.output_shape, interpolation="nearest",
                              num_threads=self.num_threads)
        return m != 0

    def displacement(self) -> np.ndarray:
        """The field as a (2, H, W) float32 displacement (dx, dy): source - output position."""
        h, w = self.output_shape
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
        f = self.field.reshape(self.field.shape[0], self.field.shape[1], 6)
        out = np.empty((2, h, w), np.float32)
        from scipy.ndimage import map_coordinates
        gy, gx = ys / self.field_step, xs / self.field_step
        p = [map_coordinates(f[..., c], [gy, gx], order=1, mode="nearest") for c in range(6)]
        out[0] = p[0] * xs + p[1] * ys + p[2] - xs
        out[1] = p[3] * xs + p[4] * ys + p[5] - ys
        return out


class PairMatcher:
    """Matches of ``features`` between sections, each section prepared once: keypoints and
    descriptors (``"sift"``, ``"learned"``) or the block matcher's pyramid (``"blocks"``).
    ``reach`` is how far from its point a match's evidence extends (the half block of the
    dense blocks, 0 for keypoints): a match that near the damage straddles it
    (:func:`drop_damaged`)."""

    def __init__(self, features: Features = "learned", *, num_threads: int = 0) -> None:
        self.features = features
        self.reach = 0
        self._extractor: Any = None
        self._blocks: Any = None
        if features == "sift":
            from ..match.keypoints import SiftExtractor
            self._extractor = SiftExtractor(max_features=4000)
        elif features == "learned":
            from ..match.learned import LearnedExtractor
            self._extractor = LearnedExtractor(max_features=4000, num_threads=num_threads)
        elif features == "blocks":
            from ..match.blocks import BlockMatcher
            # A loose final threshold keeps the blocks on both sides of a fold (the global
            # fit is only the prediction the blocks are searched around). Correlation with a
            # search window down to the finest level: the blocks on each side of a fold move
            # several pixels away from any single affine.
            self._blocks = BlockMatcher(step=32, search=16, threshold=25.0, finest_level=0,
                                        lk_iterations=0, num_threads=num_threads)
            self.reach = self._blocks.block // 2
        else:
            raise DeepAlignError(f"features must be 'sift', 'learned' or 'blocks', got "
                                 f"{features!r}")

    def prepare(self, image: np.ndarray, mask: np.ndarray | None = None) -> Any:
        """One section, ready to match; ``mask`` (non-zero = damage) keeps keypoints off the
        damage (the blocks ignore it: see :func:`drop_damaged`)."""
        if self._extractor is not None:
            return self._extractor.extract(image, None if mask is None else
                                           (mask == 0).astype(np.uint8))
        return (image.shape, self._blocks.prepare(image))

    def match(self, reference: Any, moving: Any) -> tuple[np.ndarray, np.ndarray]:
        """Matched points ``(reference (N, 2), moving (N, 2))`` of two prepared sections."""
        if self._extractor is not None:
            from ..match.keypoints import match_features
            ia, ib = match_features(reference, moving)
            return (reference.keypoints[ia].astype(np.float64),
                    moving.keypoints[ib].astype(np.float64))
        (ref_shape, ref), (mov_shape, mov) = reference, moving
        _one_size(ref_shape, mov_shape)
        _, corr = self._blocks.match(ref, mov)
        return corr.src.astype(np.float64), corr.dst.astype(np.float64)


def _one_size(reference: tuple[int, ...], moving: tuple[int, ...]) -> None:
    if reference != moving:  # the blocks' whole-frame search compares like frames
        raise DeepAlignError(f"features='blocks' matches sections of one size; reference "
                             f"is {reference} and moving {moving} (y, x): crop or pad one, or "
                             "use features='sift' or 'learned'")


def drop_damaged(reference_points: np.ndarray, moving_points: np.ndarray,
                 mask: np.ndarray | None, reach: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The matches whose moving point lies more than ``reach`` px from the damage ``mask``
    (of the moving section, non-zero = damage; None keeps all)."""
    pr = np.asarray(reference_points, np.float64).reshape(-1, 2)
    pm = np.asarray(moving_points, np.float64).reshape(-1, 2)
    if mask is not None and len(pm):
        h, w = mask.shape
        bad = (np.asarray(mask) != 0).astype(np.uint8)
        if reach:
            import cv2
            bad = cv2.dilate(bad, np.ones((2 * reach + 1, 2 * reach + 1), np.uint8))
        xi = np.clip(np.rint(pm[:, 0]).astype(np.intp), 0, w - 1)
        yi = np.clip(np.rint(pm[:, 1]).astype(np.intp), 0, h - 1)
        keep = bad[yi, xi] == 0
        pr, pm = pr[keep], pm[keep]
    return np.ascontiguousarray(pr), np.ascontiguousarray(pm)


def match_pair(reference: np.ndarray, moving: np.ndarray, *, mask: np.ndarray | None = None,
               features: Features = "learned", num_threads: int = 0
               ) -> tuple[np.ndarray, np.ndarray]:
    """Matched points ``(reference (N, 2), moving (N, 2))``; moving points avoid the mask.

    ``features``: ``"sift"`` (RootSIFT keypoints, mutual nearest neighbour + ratio test),
    ``"learned"`` (the shipped self-supervised encoder's keypoints and descriptors, same
    matching) or ``"blocks"`` (dense NCC blocks over the whole frame; a block whose window
    in the moving section touches the damage is dropped, since it straddles two sides).
    """
    matcher = PairMatcher(features, num_threads=num_threads)
    if features == "blocks":
        _one_size(reference.shape, moving.shape)  # before the work
    pr, pm = matcher.match(matcher.prepare(reference), matcher.prepare(moving, mask))
    return drop_damaged(pr, pm, mask, matcher.reach)


def _kmeans(points: np.ndarray, n_clusters: int, *, seed: int, shape: tuple[int, int],
            grid_step: int, blocked: np.ndarray | None, num_threads: int,
            iterations: int = 30) -> np.ndarray:
    """Cluster labels (N,) of moving keypoints; -1 for points the path metric cannot place."""
    n = len(points)
    rng = np.random.default_rng(seed)
    # k-means++ seeding (Euclidean), deterministic for a seed.
    centres = [int(rng.integers(n))]
    d2 = np.sum((points - points[centres[0]]) ** 2, axis=1)
    for _ in range(1, n_clusters):
        if d2.sum() <= 0:
            break
        centres.append(int(rng.choice(n, p=d2 / d2.sum())))
        d2 = np.minimum(d2, np.sum((points - points[centres[-1]]) ** 2, axis=1))
    c = points[centres].copy()
    labels = np.full(n, -1, np.int64)
    h, w = shape
    rows, cols = _core.grid_size(h, grid_step), _core.grid_size(w, grid_step)
    if blocked is not None:
        xi = np.clip(np.rint(points[:, 0] / grid_step).astype(np.intp), 0, cols - 1)
        yi = np.clip(np.rint(points[:, 1] / grid_step).astype(np.intp), 0, rows - 1)
    for _ in range(iterations):
        if blocked is None:
            d = np.linalg.norm(points[:, None, :] - c[None, :, :], axis=2)
            new = np.argmin(d, axis=1)
        else:
            # Geodesic Voronoi of the centres (one 1-nearest multi-source Dijkstra).
            _, idx, _ = _core.knn_grid(np.ascontiguousarray(c), rows, cols, float(grid_step), 1,
                                       blocked, num_threads)
            new = idx[yi, xi, 0].astype(np.int64)
        if np.array_equal(new, labels):
            break
        labels = new
        for j in range(len(c)):
            members = points[labels == j]
            if len(members):
                mean = members.mean(axis=0)
                # The member nearest the mean: a centre that stays in tissue on its side.
                c[j] = members[np.argmin(np.sum((members - mean) ** 2, axis=1))]
    return labels


def register_pair(reference: npt.ArrayLike, moving: npt.ArrayLike, *,
                  mask: npt.ArrayLike | None = None, n_clusters: int = 4, k: int = 20,
                  features: Features = "learned", grid_step: int = 8,
                  field_step: int = 8, iterations: int = 3, threshold: float = 3.0,
                  min_cluster_matches: int = 12, seed: int = 0,
                  matches: tuple[npt.ArrayLike, npt.ArrayLike] | None = None,
                  num_threads: int = 0) -> ExpectedAffineResult:
    """Register a damaged moving section onto a reference with the expected affine.

    Parameters
    ----------
    reference, moving : ndarray (H, W)
        Reference (output frame) and damaged moving section.
    mask : ndarray (H_m, W_m), optional
        Damage (fold / crack) mask of the *moving* section, non-zero = damage, same shape as
        ``moving``. Switches distances to path distances. An all-zero mask means "no damage"
        (Euclidean, noted). A mask covering the whole section is an error.
    n_clusters : int
        K of K-means (number of local affines).
    k : int
        Neighbours of the KNN density estimate.
    features : {"sift", "learned", "blocks"}
        How matches are found (ignored when ``matches`` is given; see :func:`match_pair`).
    grid_step : int
        Spacing (px) of the moving-frame grid of the KNN density and path distances.
    field_step : int
        Spacing (px) of the output affine field that the warp interpolates.
    iterations : int
        Fixed-point steps of the output field (module docstring, step 5).
    threshold : float
        RANSAC inlier threshold (px) of the global and of the cluster affines.
    min_cluster_matches : int
        A cluster with fewer RANSAC inliers is dropped.
    seed : int
        Seed of K-means++ and RANSAC.
    matches : (reference points, moving points), optional
        Precomputed (N, 2) matches (x, y) instead of feature matching.
    num_threads : int
        Threads of the C++ kernels (0 = all cores).

    Returns
    -------
    ExpectedAffineResult
        Falsy (``success=False``, identity-free global field of NaN replaced by identity)
        when no global affine could be estimated; ``fallback=True`` when the field is the
        global affine (reason given).
    """
    ref = np.asarray(reference)
    mov = np.asarray(moving)
    if ref.ndim != 2 or mov.ndim != 2:
        raise DeepAlignError(f"reference and moving must be 2-D, got {ref.shape} and {mov.shape}")
    for name, value in (("n_clusters", n_clusters), ("k", k), ("grid_step", grid_step),
                        ("field_step", field_step), ("iterations", iterations)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    notes: list[str] = []
    m: np.ndarray | None = None
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != mov.shape:
            raise DeepAlignError(f"mask shape {m.shape} != moving shape {mov.shape}: the mask "
                                 "marks damage in the moving section")
        m = m != 0
        if m.all():
            raise DeepAlignError("mask covers the whole moving section: nothing to register")
        if not m.any():
            notes.append("mask is empty (no damage): Euclidean distances used")
            m = None
    blocked = None
    if m is not None:
        blocked = _core.coarsen_mask(np.ascontiguousarray(m, dtype=np.uint8), grid_step,
                                     num_threads)
        if blocked.all():
            raise DeepAlignError(f"mask leaves no undamaged node on the {grid_step}-px grid; "
                                 "mark less of the section as damaged (API: a smaller "
                                 "grid_step)")
    if matches is not None:
        pr = np.asarray(matches[0], np.float64).reshape(-1, 2)
        pm = np.asarray(matches[1], np.float64).reshape(-1, 2)
        if len(pr) != len(pm):
            raise DeepAlignError("matches: reference and moving point counts differ")
        if m is not None and len(pm):
            xi = np.clip(np.rint(pm[:, 0]).astype(np.intp), 0, mov.shape[1] - 1)
            yi = np.clip(np.rint(pm[:, 1]).astype(np.intp), 0, mov.shape[0] - 1)
            keep = ~m[yi, xi]
            pr, pm = pr[keep], pm[keep]
    else:
        pr, pm = match_pair(ref, mov, mask=None if m is None else m.astype(np.uint8),
                            features=features, num_threads=num_threads)
    out_shape = (int(ref.shape[0]), int(ref.shape[1]))
    orows, ocols = _core.grid_size(out_shape[0], field_step), _core.grid_size(out_shape[1],
                                                                              field_step)

    def constant(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.broadcast_to(a, (orows, ocols, 2, 3)))

    empty = np.zeros((0, 2))
    glob = estimate_transform(pr, pm, "affine", threshold=threshold, seed=seed,
                              num_threads=num_threads) if len(pr) >= 3 else None
    if not glob:
        why = glob.reason if glob is not None else f"only {len(pr)} matches"
        return ExpectedAffineResult(constant(np.eye(2, 3)), field_step, out_shape,
                                    np.full((2, 3), np.nan), np.zeros((0, 2, 3)), [], empty,
                                    empty, np.zeros(0, np.int32), m, True, False,
                                    f"no global affine: {why}", notes, num_threads)
    g = glob.matrix
    labels = _kmeans(pm, min(n_clusters, len(pm)), seed=seed, shape=mov.shape,
                     grid_step=grid_step, blocked=blocked, num_threads=num_threads)
    affs: list[np.ndarray] = []
    inl: list[int] = []
    kept_r: list[np.ndarray] = []
    kept_m: list[np.ndarray] = []
    kept_l: list[np.ndarray] = []
    for c in range(int(labels.max()) + 1 if len(labels) else 0):
        sel = np.flatnonzero(labels == c)
        if len(sel) < max(3, min_cluster_matches):
            notes.append(f"cluster {c}: {len(sel)} matches < {min_cluster_matches}, dropped")
            continue
        fit = estimate_transform(pr[sel], pm[sel], "affine", threshold=threshold,
                                 seed=seed + 1 + c, num_threads=num_threads)
        if not fit or fit.num_inliers < min_cluster_matches:
            why = fit.reason if not fit else f"{fit.num_inliers} inliers"
            notes.append(f"cluster {c}: RANSAC failed ({why}), dropped")
            continue
        keep = sel[fit.inliers]
        kept_r.append(pr[keep])
        kept_m.append(pm[keep])
        kept_l.append(np.full(len(keep), len(affs), np.int32))
        affs.append(fit.matrix)
        inl.append(int(fit.num_inliers))
    if not affs:
        return ExpectedAffineResult(constant(g), field_step, out_shape, g, np.zeros((0, 2, 3)),
                                    [], empty, empty, np.zeros(0, np.int32), m, True, True,
                                    "no cluster kept enough RANSAC inliers: global affine",
                                    notes, num_threads)
    cl_aff = np.ascontiguousarray(np.stack(affs))
    p_ref, p_mov = np.concatenate(kept_r), np.ascontiguousarray(np.concatenate(kept_m))
    lab = np.ascontiguousarray(np.concatenate(kept_l))
    rows, cols = _core.grid_size(mov.shape[0], grid_step), _core.grid_size(mov.shape[1],
                                                                           grid_step)
    _, index, _ = _core.knn_grid(p_mov, rows, cols, float(grid_step), k, blocked, num_threads)
    _, fld = _core.expected_affine_field(index, float(grid_step), lab, cl_aff,
                                         np.ascontiguousarray(g), blocked, orows, ocols,
                                         float(field_step), iterations, num_threads)
    return ExpectedAffineResult(fld, field_step, out_shape, g, cl_aff, inl, p_ref, p_mov, lab,
                                m, False, True, "", notes, num_threads)


def check_masks(masks: str | os.PathLike[str], shape: tuple[int, int, int]) -> list[int]:
    """Check a damage-mask stack against the ``(z, y, x)`` shape of the stack it belongs to,
    before any work: it opens, holds one mask per slice, each of the slice's size, and every
    mask reads (the whole file is read once, one mask at a time). Returns the slices whose
    mask marks damage (non-zero pixels).

    Raises
    ------
    DeepAlignError
        Naming the masks file (``--masks``) and, for a mask that does not read, the slice.
    """
    from ..io import open_stack

    def flagged(exc: DeepAlignError) -> DeepAlignError:  # "FILE[, slice Z]: (--masks) ..."
        head, sep, tail = str(exc).partition(": ")
        return DeepAlignError(f"{head}: (--masks) {tail}" if sep else f"{masks}: (--masks) {exc}")

    n, h, w = (int(v) for v in shape)
    try:
        reader = open_stack(masks)
    except DeepAlignError as exc:
        raise flagged(exc) from None
    with reader:
        if len(reader) != n:
            raise DeepAlignError(f"{masks}: (--masks) {len(reader)} masks for the {n} slices of "
                                 "the stack; give one mask per slice")
        mh, mw = (int(v) for v in reader.shape[1:])
        if (mh, mw) != (h, w):
            raise DeepAlignError(f"{masks}: (--masks) masks are {mh} x {mw} (y, x), the "
                                 f"slices {h} x {w}; give masks of the input slices' size")
        damaged = []
        for z in range(n):
            try:
                mask = reader.read(z)
            except DeepAlignError as exc:
                raise flagged(exc) from None
            if mask.shape != (h, w):
                raise DeepAlignError(f"{masks}, slice {z}: (--masks) mask shape {mask.shape} "
                                     f"!= slice shape {(h, w)}")
            if mask.any():
                damaged.append(z)
    return damaged


#: A candidate other than the mean of a damaged slice's registrations is taken for one side
#: of the damage only where it correlates with the neighbours better by this much
#: (:meth:`StackRefiner._best_per_side`).
SIDE_MARGIN = 0.02
_IDENTITY = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # a node that keeps the affine


def _side_ncc(a: np.ndarray, b: np.ndarray, side: np.ndarray, count: int,
              min_share: float = 0.01) -> np.ndarray:
    """The normalised cross-correlation of the pixels ``a`` and ``b`` (1-D) of each side
    1..count (``side``: the side of each pixel), indexed by side (entry 0 unused); -inf for
    a side with fewer than ``min_share`` of all the pixels, or no contrast."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    n = np.bincount(side, minlength=count + 1).astype(np.float64)

    def total(x: np.ndarray) -> np.ndarray:
        return np.bincount(side, weights=x, minlength=count + 1)

    with np.errstate(invalid="ignore", divide="ignore"):
        ma, mb = total(a) / n, total(b) / n
        va = total(a * a) / n - ma * ma
        vb = total(b * b) / n - mb * mb
        out = (total(a * b) / n - ma * mb) / np.sqrt(va * vb)
    out[(n < min_share * max(len(a), 1)) | ~(va > 1e-9) | ~(vb > 1e-9)] = -np.inf
    out[0] = -np.inf
    return out


class StackRefiner:
    """Expected-affine refinement of a stack render (``AlignOptions(mode="expected-affine")``).

    Called as ``refiner(z, image, affine, neighbours)`` for z = 0, 1, 2, ... in order (from
    any thread; :class:`~deepalign_fast.refine.order.InOrder`). The slice's affine render is
    registered with :func:`register_pair` onto the affine renders of its neighbours z - 1
    and z + 1 (``neighbours``; its damage mask warped into the output frame by its affine),
    and moves toward the mean of the two registrations:

    - the whole way, the field's common affine included, if its mask marks damage: a fold or
      crack is the section's own and is undone, and the solve's single affine for it (held
      toward rigid, or placed from its neighbours when flagged) is not what its sides need.
      Its field is one registration onto the matches with both neighbours at once (twice
      the evidence); each side of the damage keeps it, or where it fits the neighbours
      clearly better, one neighbour's registration or the plain affine
      (:meth:`_best_per_side`; a registration can fail on one side of a fold);
    - otherwise two thirds of the way
      (:data:`~deepalign_fast.refine.order.TOWARD_NEIGHBOURS`, as the elastic mode), less
      the field's common affine (the solve's job).

    A slice without damage is never moved toward one with damage (a damaged slice uses
    damaged neighbours only if it has no other). The slice's map is the affine plus that
    per-pixel affine field (:class:`~deepalign_fast.render.SliceMap`, kind
    ``affine-field``), stored in ``store`` so ``apply`` reproduces the render.

    Each field depends only on the input slices z - 1, z and z + 1, never on an earlier
    output, so nothing is carried down the stack. (Before, each slice was registered onto
    the previous *output* slice, and each took on its predecessor's refinement: an aligned
    lucchi crop moved by 2.6 px over 16 slices; benchmarks/RESULTS.md, "Expected affine
    toward both neighbours".) Each section is prepared for matching once (a stream
    prepares the next slice again at its own affine).

    A slice the solve flagged (placed from its neighbours) is refined only if its mask marks
    damage (it stays flagged). A slice without usable neighbours keeps its plain affine; a
    slice whose registrations all fail or fall back keeps it too, and is listed in
    ``failed`` (flagged "unrefined"); ``notes`` says why.

    Parameters
    ----------
    masks : path or None
        Damage mask stack (any stack :func:`deepalign_fast.io.open_stack` reads: TIFF, folder
        of slices, Zarr), one mask per slice, non-zero = damage. None = no damage anywhere.
    shape : (int, int)
        Output frame.
    store : FieldStore, optional
        Of kind ``"affine"`` with stride :data:`FIELD_STEP`: where each slice's field is kept.
    """

    def __init__(self, masks: object | None, shape: tuple[int, int], *, num_slices: int | None,
                 features: Features = "learned", store: Any | None = None,
                 num_threads: int = 0) -> None:
        from ..io import open_stack

        self._masks = None
        self._masks_path = masks
        if masks is not None:
            self._masks = open_stack(masks)  # type: ignore[arg-type]
            if num_slices is not None and len(self._masks) != num_slices:
                count = len(self._masks)
                self.close()
                raise DeepAlignError(f"{masks}: (--masks) {count} masks for the "
                                     f"{num_slices} slices of the stack")
        self.shape = shape
        self.features = features
        self.store = store
        self.num_threads = num_threads
        self.notes: dict[int, str] = {}
        self.failed: list[int] = []
        self._matcher: PairMatcher | None = None  # made at the first registration
        self._order = InOrder()
        # by slice: (affine, render, prepared for matching); its mask (read once)
        self._sections: dict[int, tuple[np.ndarray, np.ndarray, Any]] = {}
        self._mask_read: dict[int, np.ndarray] = {}

    def __call__(self, z: int, image: np.ndarray, affine: np.ndarray,
                 neighbours: Neighbours | None = None, *,
                 flagged: bool = False) -> tuple[SliceMap, np.ndarray]:
        with self._order.turn(z):
            out = self._refine(z, image, np.asarray(affine, np.float64), neighbours, flagged)
            # what the next slice can use: its neighbour z and its own section
            self._sections = {k: v for k, v in self._sections.items() if k >= z}
            self._mask_read = {k: v for k, v in self._mask_read.items() if k >= z}
            return out

    def close(self) -> None:
        """Close the damage-mask stack (once; again does nothing)."""
        if self._masks is not None:
            self._masks.close()
            self._masks = None

    def _read_mask(self, z: int) -> np.ndarray:
        """Slice z's mask as read (once: the next slice's is read first by its neighbour)."""
        assert self._masks is not None
        if z not in self._mask_read:
            if z >= len(self._masks):  # (a stream: the slices' count is not known ahead)
                raise DeepAlignError(f"{self._masks_path}, slice {z}: (--masks) holds "
                                     f"{len(self._masks)} masks, none for slice {z}; give "
                                     "one mask per slice")
            self._mask_read[z] = np.asarray(self._masks.read(z))
        return self._mask_read[z]

    def _mask(self, z: int, image_shape: tuple[int, ...]) -> np.ndarray | None:
        """Slice z's damage mask (input frame; None where it marks none)."""
        if self._masks is None:
            return None
        m = self._read_mask(z)
        if m.shape != image_shape:
            raise DeepAlignError(f"{self._masks_path}, slice {z}: (--masks) mask shape "
                                 f"{m.shape} != slice shape {image_shape}")
        return m if m.any() else None

    def _sides(self, z: int, damaged: bool, neighbours: Neighbours | None) -> list[int]:
        """The neighbours slice z moves toward: the usable ones without damage, or (a damaged
        slice with no other) the damaged ones."""
        if neighbours is None:
            return []
        usable = [k for k in (z - 1, z + 1) if neighbours.usable(k)]
        if self._masks is None:
            return usable
        clean = [k for k in usable if not self._read_mask(k).any()]
        return clean if clean or not damaged else usable

    def _section(self, z: int, image: np.ndarray, affine: np.ndarray
                 ) -> tuple[np.ndarray, Any]:
        """Slice z's affine render and its preparation for matching (kept for its
        neighbours)."""
        kept = self._sections.get(z)
        if kept is not None and np.array_equal(kept[0], affine):
            return kept[1], kept[2]
        if self._matcher is None:
            self._matcher = PairMatcher(self.features, num_threads=self.num_threads)
        render = render_slice(image, SliceMap(affine), self.shape,
                              num_threads=self.num_threads)
        prepared = self._matcher.prepare(render)
        self._sections[z] = (affine, render, prepared)
        return render, prepared

    def _neighbour(self, k: int, neighbours: Neighbours) -> tuple[np.ndarray, Any]:
        """Slice k's affine render and preparation: the previous slice's at its own affine,
        kept from its call (:meth:`_refine` drops one made at another), or the next slice's
        at the affine ``neighbours`` gives."""
        kept = self._sections.get(k)
        if kept is not None:
            return kept[1], kept[2]
        image, affine = neighbours.read(k)
        return self._section(k, np.asarray(image), np.asarray(affine, np.float64))

    def _valid(self, affine: np.ndarray, input_shape: tuple[int, ...]) -> np.ndarray:
        """Where the affine render of a slice of ``input_shape`` shows the slice (1) or
        nothing (0)."""
        ones = np.ones(input_shape[:2], np.float32)
        return render_slice(ones, SliceMap(affine), self.shape, num_threads=self.num_threads)

    def _best_per_side(self, plain: np.ndarray, affine: np.ndarray,
                       input_shape: tuple[int, ...], damage: np.ndarray,
                       fields: list[np.ndarray],
                       references: list[tuple[np.ndarray, np.ndarray]],
                       pooled: np.ndarray | None = None) -> np.ndarray:
        """The field of a damaged slice (affine render ``plain``, ``damage`` in its frame):
        ``pooled`` (its registration onto both neighbours' matches at once; without it the
        mean of its registrations), except on a side of the damage (a part of the frame it
        separates) where one registration alone, or the plain affine, correlates with the
        mean of the neighbours' renders better by :data:`SIDE_MARGIN`. A registration can
        fail on one side of a fold (few matches there, a cluster spanning it): that side then
        keeps what fits it, and no side is split between candidates."""
        from scipy import ndimage

        mean = np.mean(fields, axis=0) if pooled is None else pooled
        candidates = [mean] + (fields if len(fields) > 1 else []) + \
            [np.ascontiguousarray(np.broadcast_to(_IDENTITY, fields[0].shape))]
        reference = np.mean([np.asarray(r, np.float32) for r, _ in references], axis=0)
        seen = np.prod([self._valid(a, input_shape) for _, a in references], axis=0) > 0.999
        # the sides, in the render's frame: what the (slightly widened) damage separates
        sides, count = ndimage.label(~ndimage.binary_dilation(damage != 0, iterations=2))
        shown = (self._valid(affine, input_shape) > 0.999).astype(np.float32)
        warp = functools.partial(warp_affine_field, step=FIELD_STEP, output_shape=self.shape,
                                 num_threads=self.num_threads)
        rows, cols = fields[0].shape[:2]
        iy = np.minimum(np.arange(rows) * FIELD_STEP, self.shape[0] - 1)
        ix = np.minimum(np.arange(cols) * FIELD_STEP, self.shape[1] - 1)
        labels = sides.astype(np.float32)
        scores, node_side = [], np.zeros((rows, cols), np.intp)
        for k, c in enumerate(candidates):  # one at a time: a few full-frame images held
            side = warp(labels, c, interpolation="nearest").astype(np.int32)
            if k == 0:
                node_side = side[np.ix_(iy, ix)]  # the sides of the nodes, by the mean field
            ok = (warp(shown, c) > 0.999) & seen & (side > 0)
            scores.append(_side_ncc(warp(np.asarray(plain, np.float32), c)[ok],
                                    reference[ok], side[ok], count))
        field = np.array(mean)
        for s in range(1, count + 1):
            best = int(np.argmax([sc[s] for sc in scores]))
            if best != 0 and scores[best][s] > scores[0][s] + SIDE_MARGIN:
                field[node_side == s] = candidates[best][node_side == s]
        return np.ascontiguousarray(field)

    def _refine(self, z: int, image: np.ndarray, affine: np.ndarray,
                neighbours: Neighbours | None, flagged: bool) -> tuple[SliceMap, np.ndarray]:
        plain_map = SliceMap(affine)
        kept = self._sections.get(z)
        if kept is not None and not np.array_equal(kept[0], affine):
            # made as the previous slice's neighbour at another estimate (a stream): the next
            # slice must be registered onto this slice as it goes out
            del self._sections[z]
        mask = self._mask(z, image.shape)
        # A flagged slice (placed from its neighbours) is refined only where its mask marks
        # damage: the damage is what this mode undoes, and often why the solve flagged it.
        sides = [] if flagged and mask is None else self._sides(z, mask is not None,
                                                                neighbours)
        if not sides or neighbours is None:
            return plain_map, render_slice(image, plain_map, self.shape,
                                           num_threads=self.num_threads)
        plain, prepared = self._section(z, image, affine)
        assert self._matcher is not None
        mask_out = None if mask is None else warp_affine(
            (mask != 0).astype(np.uint8), affine, self.shape, interpolation="nearest",
            num_threads=self.num_threads)
        fields, references, why, matched = [], [], [], []
        for k in sides:
            other, other_prepared = self._neighbour(k, neighbours)
            try:
                pr, pm = drop_damaged(*self._matcher.match(other_prepared, prepared),
                                      mask_out, self._matcher.reach)
                res = register_pair(other, plain, mask=mask_out, matches=(pr, pm),
                                    field_step=FIELD_STEP, num_threads=self.num_threads)
            except DeepAlignError as exc:  # e.g. the warped mask covers the frame
                why.append(f"onto slice {k}: {exc}")
                continue
            if not res or res.fallback:
                why.append(f"onto slice {k}: {res.reason}")
                continue
            fields.append(res.field)
            references.append((other, self._sections[k][0]))
            matched.append((pr, pm))
        if not fields:
            self.notes[z] = "affine kept: " + "; ".join(why)
            self.failed.append(z)  # flagged "unrefined" by the pipeline
            return plain_map, plain
        if why:
            self.notes[z] = "refined toward one neighbour: " + "; ".join(why)
        if mask is not None:
            # A damaged slice goes the whole way, its affine part included: the damage is
            # its own, and the solve's single affine for it (held toward rigid, or placed
            # from the neighbours when flagged) is not what its sides need. Each side of the
            # damage takes what fits the neighbours (a registration can fail on one side).
            assert mask_out is not None
            pooled = None
            if len(matched) > 1:  # one registration onto both neighbours: twice the matches
                both = register_pair(references[0][0], plain, mask=mask_out,
                                     matches=(np.concatenate([m[0] for m in matched]),
                                              np.concatenate([m[1] for m in matched])),
                                     field_step=FIELD_STEP, num_threads=self.num_threads)
                if both and not both.fallback:
                    pooled = both.field
            field = self._best_per_side(plain, affine, image.shape, mask_out, fields,
                                        references, pooled)
        else:
            # Two thirds of the way, and only what no single affine describes (see
            # ElasticRefiner): the affine part is the solve's.
            field = without_common_affine(
                _IDENTITY + TOWARD_NEIGHBOURS * (np.mean(fields, axis=0) - _IDENTITY),
                FIELD_STEP)
        if self.store is not None:
            self.store.put_affine(z, field)
        slice_map = SliceMap(affine, affine_field=field, field_step=FIELD_STEP)
        return slice_map, render_slice(image, slice_map, self.shape,
                                       num_threads=self.num_threads)
