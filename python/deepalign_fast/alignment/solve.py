"""Global stack solve: one transform per slice from all pairwise matches at once.

Conventions (see :mod:`deepalign_fast.transforms`): points are ``(x, y)`` pixels, origin at
the centre of the top-left pixel; the solved transforms are pull maps ``A_z`` (output ->
slice z). Internally the solve works with their inverses ``B_z = A_z^-1`` (slice z -> output),
because a correspondence ``(p in slice i, q in slice j)`` then gives a constraint that is
*linear* in the unknowns: ``B_i(p) = B_j(q)``.

**The problem.** For every matched pair ``(i, j)`` (slice ``i`` matched to slice ``j`` at
offsets 1, 2, 4, ... on both sides) and every correspondence of that pair::

    minimise   sum_pairs  c_ij * sum_k w_k |B_i(p_k) - B_j(q_k)|^2          (data)
             + lam * sum_z |nonrigid(B_z)|^2                                  (per-slice prior)
             + eps * sum_z |B_z - B_{z+1}|^2                                  (interpolation)
    subject to mean_z B_z = identity (scale about each slice's rotation)      (gauge)

- The per-slice prior pulls each slice's scale, anisotropic stretch and shear toward a rigid
  map, as an *independent* per-slice error (the usual kind in FIB-SEM and serial sections),
  never as a trend. ``model`` other than ``"affine"`` makes the prior (nearly) hard. Its
  strength (``regularise="auto"``) is measured on the stack (empirical Bayes,
  :func:`prior_spread`): each slice fitted to its own pairs alone shows its per-slice
  scale, stretch and shear plus a measurement error of known variance, and the spread of
  the per-slice part sets a Gaussian prior. A fixed strength pulled real per-slice scale
  and shear toward rigid, most along the axis the matches measure least (the short axis
  of a reslice). Slices that cannot measure their own (a damaged slice, 10 times worse
  than the typical one) and the slices their pairs reach keep :data:`FIXED_PRIOR`: with a
  weak prior there, the damaged slice and its neighbours wandered. So do stacks whose
  neighbouring slices differ (``neighbour_score`` below :data:`SIMILAR_CONTENT`, serial
  sections): there the content's own change between sections shows as per-section scale
  and shear, and a prior weakened by it followed the content.
- The prior and the gauge read a slice's scale about its own rotation (from the previous
  IRLS iteration, :func:`_turned_scale`): as ``(a + d) / 2`` a rigid section turned by 10
  degrees reads 1.5 % too small, and was pulled that much too large.
- The gauge fixes the mean of all slices, not slice 0, so no slice is special and the solution
  cannot shrink (a free scale would let every residual vanish).
- The tiny first-difference term only matters for slices without matches (blank or failed):
  they get the transform interpolated between their neighbours.
- Robustness: iteratively reweighted least squares on the pairs (``c_ij``): a pair that
  disagrees with the rest of the stack (its residual beyond what its own best fit leaves) far
  more than the typical pair loses its weight (Cauchy), so a wrong match or a bad slice
  cannot drag its neighbours. A slice with fewer than three agreeing pairs (at the ends of
  the stack, than half the pairs a slice there can have) is flagged, as is
  one none of whose pairs correlates at half the stack's usual where the content persists
  (:func:`unlike_slices`: pairs that agree with each other at a false position), and
  placed as its trusted neighbours are where its own estimate moves it from them far more
  than this stack's slices move (:func:`place_flagged`).

Each pair enters only through the 6x6 second moments of its weighted correspondences, so the
solve needs O(pairs) memory and a banded linear system of 6 x n unknowns: it is cheap for
stacks of any depth.

**Slow drift.** Neighbouring slices that are exactly aligned still appear to move by about
0.1 px per slice (oblique anatomy); slow stage drift looks the same. No image-based method can
tell them apart, so the slow component is a decision (``slow_drift``):

- ``"keep"`` (default): the output keeps the input's slow motion and removes everything
  faster: jitter, per-slice rotation/scale/shear errors, sudden jumps (a change of level
  that stays, :func:`jump_offsets`; one slice off alone is no jump). An aligned stack
  stays where it is. Where neighbouring slices hardly change (``neighbour_score`` >=
  :data:`SIMILAR_CONTENT`, FIB-SEM), a slice whose fast motion stands far out of the
  stack's (a beam glitch, one slice rotated by degrees) is corrected by its own estimate
  but left out of the trend, so it cannot move its neighbours (:data:`OUTLIER_SHIFT`); and
  the slow translation is split from the stage's walk and jitter by a noise model measured
  on the stack itself (:func:`_anatomy_kept`): the anatomy's apparent motion is smooth (its
  velocity changes by :data:`ANATOMY_CHANGE` px per slice per slice), a stage walk has
  independent steps,
  jitter is independent per slice. A strong walk is then followed over long scales, an
  aligned stack kept whole.
  These priors are per slice of 5-nm FIB-SEM; slices farther apart (their neighbours
  correlate less) get them scaled to the spacing that correlation shows
  (:func:`slice_spacing`): the anatomy appears to move faster per slice there.
  The straight-line trend of the kept motion is shared between the anatomy's mean velocity
  (prior :data:`ANATOMY_VELOCITY`) and the straight-line part of the measured walk, and
  never exceeds :data:`ANATOMY_SLOPE` px per slice: the excess of a steeper trend is a
  steady stage drift and is corrected.
  Otherwise the slow translation is a Gaussian of ``drift_sigma`` slices. For the
  rotation, scale and shear the scale of "slow" is chosen from the data, at most
  ``drift_sigma`` (:func:`lowpass_affines` with ``adaptive``): the slowly wandering
  part of the solved linear maps is mostly the anatomy's apparent deformation summed along
  the chain, and the smoothing that best predicts each slice from its neighbours separates
  it from independent per-slice errors. A random walk of any component faster than a stage
  walks (:data:`STAGE_STEP`, 1 px per slice) is the content's apparent motion between thick
  sections and is kept too (:func:`_walk_kept`): 50-nm serial sections whose content walks
  several pixels per section are not dragged along with it. Where the matcher measures that
  neighbouring slices hardly change (``neighbour_score`` >= :data:`SIMILAR_CONTENT`), no
  walk is taken for the content's. (The split reads from few slices: pure jitter of
  dissimilar slices is sometimes taken for a walk in part, leaving more of it; measured in
  benchmarks/RESULTS.md.)
- ``"follow"``: the output follows the slow translation the matches see (stage drift), and
  still keeps the input's slow rotation, scale and shear (never physical drift); use it for
  stacks known to drift. Over hundreds of slices it also follows the apparent motion of the
  anatomy (several pixels).
- ``"none"``: the raw solve, gauged by the mean: follows slow translation *and* slow
  rotation, scale and shear (for tests, and stacks where both are known to be real).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

from ..geometry import compose, invert, rotation_angle

__all__ = ["ANATOMY_CHANGE", "ANATOMY_SLOPE", "ANATOMY_VELOCITY", "FIXED_PRIOR", "FLAGGED_MOVE",
           "FLAG_REASONS", "MEASURED_SLICES", "MOTION_KEYS", "POOR_MEASURE", "PRIOR_KEYS",
           "REFERENCE_CONTENT", "SIMILAR_CONTENT", "SLOW_DRIFT", "STAGE_STEP", "STEEP_SHIFT_MAX",
           "UNLIKE_SHARE", "PairMoments", "SolveResult", "excess_slope", "lowpass_affines",
           "pair_moments", "place_flagged", "prior_spread", "slice_spacing", "solve_stack",
           "unlike_slices"]

SLOW_DRIFT = ("keep", "follow", "none")
#: The keys of :attr:`SolveResult.motion`.
MOTION_KEYS = ("stage_walk_px", "jitter_px", "trend_px_per_slice", "slice_spacing")
#: The keys of :attr:`SolveResult.prior_spread`.
PRIOR_KEYS = ("stretch", "shear", "scale")

# Strength of the prior on the components a restricted model excludes ("hard" constraint).
_HARD = 1e6


@dataclass(frozen=True)
class PairMoments:
    """Weighted second moments of one pair's correspondences in normalised coordinates.

    ``i`` is the reference slice and ``j`` the moving one; ``moments`` is the 6x6 matrix
    ``sum_k w_k v_k v_k^T`` with ``v_k = (p'_k, 1, -q'_k, -1)`` (``p'``, ``q'`` normalised as
    in :func:`pair_moments`); ``weight`` the sum of the weights, ``count`` the number of
    correspondences and ``correlation`` the median correlation of all the pair's measured
    blocks once aligned (NaN where not measured, as for keypoint matches).
    """

    i: int
    j: int
    moments: NDArray[np.float64]
    weight: float
    count: int
    correlation: float = float("nan")


def _normaliser(shape: tuple[int, int]) -> tuple[NDArray[np.float64], float]:
    h, w = shape
    centre = np.array([(w - 1) / 2.0, (h - 1) / 2.0])
    radius = max(1.0, 0.5 * float(np.hypot(w, h)))
    return centre, radius


def pair_moments(i: int, j: int, src: NDArray[np.float64], dst: NDArray[np.float64],
                 weights: NDArray[np.float64], shape: tuple[int, int],
                 correlation: float = float("nan")) -> PairMoments:
    """Summarise correspondences ``src`` (slice ``i``) -> ``dst`` (slice ``j``) for the solve.

    Coordinates are centred on the frame and divided by half its diagonal, which keeps the
    normal equations well conditioned; ``shape`` is the slice shape ``(h, w)``;
    ``correlation`` the median block correlation of the pair (:class:`PairMoments`).
    """
    centre, radius = _normaliser(shape)
    p = (np.asarray(src, np.float64) - centre) / radius
    q = (np.asarray(dst, np.float64) - centre) / radius
    wt = np.asarray(weights, np.float64)
    ones = np.ones((len(p), 1))
    v = np.hstack([p, ones, -q, -ones])
    mom = (v * wt[:, None]).T @ v
    return PairMoments(i, j, mom, float(wt.sum()), int(len(p)), float(correlation))


#: Why a slice is flagged (``SolveResult.flag_reasons``; the first that applies, in this
#: order), with the words the command line prints. ``unrefined`` is set where the elastic or
#: expected-affine refinement of a slice failed (:meth:`Aligner.align_stack`).
FLAG_REASONS = {
    "blank": "blank (one value throughout)",
    "unmatched": "no trusted match with its nearest slices",
    "unlike": "unlike its neighbours (no pair correlates at half the stack's usual)",
    "disagrees": "too few of its pairs agree with the rest of the stack",
    "unrefined": "its refinement failed (affine kept)",
}


@dataclass
class SolveResult:
    """Per-slice transforms (pull maps, pixels) and what the solve learnt about each slice."""

    affines: NDArray[np.float64]  # (n, 2, 3) output -> slice
    residuals: list[float | None]  # weighted RMS residual of the slice's pairs, px
    flagged: list[int]  # slices without enough trusted matches
    pair_weights: dict[tuple[int, int], float] = field(default_factory=dict)  # final IRLS
    # What the noise model measured where it split the slow translation (keep, similar
    # slices), keyed by MOTION_KEYS: rms step per slice and rms jitter (2-D), the slope of
    # the straight-line trend (px per slice), and the slice spacing its anatomy priors were
    # scaled to (1: as measured on 5-nm FIB-SEM); else None.
    motion: dict[str, float] | None = None
    # Trusted slices whose own motion stood far out of the stack's (a beam glitch, one slice
    # rotated): corrected by their own estimates, left out of the slow trend (_outliers).
    outliers: list[int] = field(default_factory=list)
    # The spread of the slices' own stretch, shear and scale (percent, keyed by PRIOR_KEYS)
    # that set the rigid prior's strength (regularise="auto"); None where the fixed strength
    # was used.
    prior_spread: dict[str, float] | None = None
    # Why each flagged slice was flagged: a key of FLAG_REASONS.
    flag_reasons: dict[int, str] = field(default_factory=dict)
    # Where "keep" kept a Gaussian trend of similar slices (noise_model=False: a window of
    # the stream): the slope of its straight line (px per slice, x and y, in the output
    # frame) and the steepest the anatomy explains (px per slice, both axes together); what
    # is steeper (excess_slope) is a steady stage drift, which the stream corrects slice by
    # slice (the whole-stack solve corrects it in the trend itself: _steep_excess).
    kept_slope: NDArray[np.float64] | None = None
    slope_limit: float | None = None


def _nonrigid_rows(model: str, lam: float) -> NDArray[np.float64]:
    """Rows acting on one slice's parameters ``(a, b, tx, c, d, ty)`` that measure the
    deviation from the model, each scaled by the square root of its prior weight (relative
    to the slice's own match weight)."""
    stretch = np.array([0.5, 0, 0, 0, -0.5, 0])    # (a - d) / 2
    shear = np.array([0, 0.5, 0, 0.5, 0, 0])       # (b + c) / 2
    scale = np.array([0.5, 0, 0, 0, 0.5, 0])       # (a + d) / 2 - 1 (about the gauge)
    rotation = np.array([0, -0.5, 0, 0.5, 0, 0])   # (c - b) / 2
    soft, hard = np.sqrt(lam), np.sqrt(_HARD)
    weights = {"affine": (soft, soft, soft, 0.0), "similarity": (hard, hard, soft, 0.0),
               "rigid": (hard, hard, hard, 0.0), "translation": (hard, hard, hard, hard)}
    ws = weights[model]
    return np.stack([stretch * ws[0], shear * ws[1], scale * ws[2], rotation * ws[3]])


def _angles(theta: NDArray[np.float64]) -> NDArray[np.float64]:
    """Rotation angle (radians) of each slice's parameters ``(a, b, tx, c, d, ty)`` (n, 6)
    (:func:`~deepalign_fast.geometry.rotation_angle`)."""
    return rotation_angle(theta.reshape(-1, 2, 3))


def _turned_scale(row: NDArray[np.float64], angle: NDArray[np.float64]
                  ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The scale row of the prior (``(a + d) / 2`` times its weight) measured about each
    slice's own rotation ``angle`` (n,): rows (n, 6) and targets (n,) such that
    ``row . delta - target`` is the slice's scale minus 1, to first order about ``angle``.

    ``(a + d) / 2 - 1`` is ``s cos(angle) - 1`` for a similarity of scale ``s``: a rigid
    slice turned by 10 degrees would read as 1.5 % too small, and the prior would pull it
    that much too large. ``cos(angle) (a + d) / 2 + sin(angle) (c - b) / 2`` is ``s`` itself
    near ``angle``."""
    w = row[0]  # 0.5 x the row's weight, on a and on d
    c, s = np.cos(angle), np.sin(angle)
    rows = np.zeros((len(angle), 6))
    rows[:, 0] = rows[:, 4] = w * c
    rows[:, 1], rows[:, 3] = -w * s, w * s
    return rows, 2.0 * w * (1.0 - c)


def _turned_rows(rows: NDArray[np.float64], angle: NDArray[np.float64]
                 ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """``rows`` (k, 6), whose row 2 is the scale row, for each slice (n, k, 6) with the scale
    measured about the slice's ``angle`` (:func:`_turned_scale`), and the targets (n, k) the
    rows are penalised against (0 but for the scale)."""
    out = np.broadcast_to(rows, (len(angle), *rows.shape)).copy()
    targets = np.zeros((len(angle), len(rows)))
    out[:, 2], targets[:, 2] = _turned_scale(rows[2], angle)
    return out, targets


# Solves per IRLS iteration at most, and the change of every slice's rotation (radians)
# below which the prior's scale is taken as measured about it (second order: 5e-9 in scale).
_TURN_SOLVES = 4
_TURN_STILL = 1e-4


_IX = np.array([0, 1, 2, 6, 7, 8])     # a, b, tx of slice i; a, b, tx of slice j
_IY = np.array([3, 4, 5, 9, 10, 11])   # c, d, ty of slice i; c, d, ty of slice j


def _expand(m6: NDArray[np.float64]) -> NDArray[np.float64]:
    """The pairs' 12x12 normal matrices over ``(slice i params, slice j params)`` from their
    ``(P, 6, 6)`` moments (x and y rows share the moments)."""
    out = np.zeros((len(m6), 12, 12))
    out[:, _IX[:, None], _IX[None, :]] = m6
    out[:, _IY[:, None], _IY[None, :]] = m6
    return out


_IDENTITY = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])


def _add_blocks(ab: NDArray[np.float64], u: int, rows: NDArray[np.intp],
                blocks: NDArray[np.float64]) -> None:
    """Add dense symmetric ``blocks`` ``(B, k, k)`` at global indices ``rows`` ``(B, k)`` to
    upper banded storage (LAPACK layout: ``ab[u + r - c, c] = a[r, c]`` for ``r <= c``)."""
    k = rows.shape[1]
    iu, ju = np.triu_indices(k)
    gr, gc = rows[:, iu], rows[:, ju]
    lo, hi = np.minimum(gr, gc), np.maximum(gr, gc)
    _scatter_add(ab, (u + lo - hi) * ab.shape[1] + hi, blocks[:, iu, ju])


def _scatter_add(target: NDArray[np.float64], flat: NDArray[np.intp],
                 values: NDArray[np.float64]) -> None:
    """``target.flat[flat] += values`` with repeated indices summed (``np.add.at``, by
    ``np.bincount``: many times faster)."""
    target += np.bincount(flat.ravel(), weights=values.ravel(),
                          minlength=target.size).reshape(target.shape)


class _System:
    """The parts of the normal equations that do not change between IRLS iterations."""

    def __init__(self, n: int, pairs: Sequence[PairMoments], prior: NDArray[np.float64],
                 eps: float) -> None:
        self.n = n
        self.ij = np.array([(pm.i, pm.j) for pm in pairs], np.intp).reshape(-1, 2)
        self.h = _expand(np.array([pm.moments for pm in pairs]).reshape(-1, 6, 6))
        self.weight = np.array([pm.weight for pm in pairs], np.float64)
        self.count = np.array([pm.count for pm in pairs], np.float64)
        span = int(np.abs(self.ij[:, 0] - self.ij[:, 1]).max()) if len(pairs) else 1
        self.u = 6 * (max(span, 1) + 1) - 1
        six = np.arange(6)
        self.rows = np.concatenate([6 * self.ij[:, :1] + six, 6 * self.ij[:, 1:] + six], axis=1)
        self.prior = prior
        self.outer = np.einsum("ci,cj->cij", prior, prior)  # one 6x6 block per prior row
        self.eps = eps

    def solve(self, weights: NDArray[np.float64], strength: NDArray[np.float64],
              angle: NDArray[np.float64] | None = None) -> NDArray[np.float64]:
        """Minimise the weighted problem for ``delta = theta - identity`` under the gauge
        (``sum delta = 0``, the scale part about each slice's rotation where ``angle`` is
        given); the prior's scale is measured about each slice's rotation
        ``angle`` (n,) radians (None: unturned).

        The normal matrix is banded (a pair couples slices at most ``max |i - j|`` apart) and
        positive definite (the small first-difference and ridge terms); the gauge is added by
        Lagrange multipliers through a 6x6 Schur complement, so the cost is linear in ``n``.
        """
        from scipy.linalg import cho_solve_banded, cholesky_banded

        n, u, eps = self.n, self.u, self.eps
        size = 6 * n
        ab = np.zeros((u + 1, size))
        b = np.zeros(size)
        if len(self.h):
            h = weights[:, None, None] * self.h
            _add_blocks(ab, u, self.rows, h)
            theta_i = np.concatenate([_IDENTITY, _IDENTITY])
            _scatter_add(b, self.rows, -(h @ theta_i))
        own_rows = 6 * np.arange(n)[:, None] + np.arange(6)
        if angle is None:
            own = np.einsum("zc,cij->zij", strength, self.outer)
        else:
            prior, targets = _turned_rows(self.prior, angle)
            own = np.einsum("zc,zci,zcj->zij", strength, prior, prior)
            _scatter_add(b, own_rows, np.einsum("zc,zci,zc->zi", strength, prior, targets))
        _add_blocks(ab, u, own_rows, own + 1e-4 * eps * np.eye(6))
        if n > 1:
            diff = eps * np.block([[np.eye(6), -np.eye(6)], [-np.eye(6), np.eye(6)]])
            pair_rows = 6 * np.arange(n - 1)[:, None] + np.arange(12)
            _add_blocks(ab, u, pair_rows, np.broadcast_to(diff, (n - 1, 12, 12)))
        chol = cholesky_banded(ab, lower=False)
        # Gauge: the mean of the slices is the identity (C = [I I ... I]). With ``angle``,
        # its scale is the slices' scale about their own rotation (the prior's), so that a
        # stack of rigid slices turned apart meets it: a mean of (a + d) / 2 of 1 would
        # need their mean cos(angle) to be 1, and the prior and the gauge would fight over
        # the rotations.
        c_t = np.tile(np.eye(6), (n, 1))
        gauge = np.zeros(6)
        if angle is not None:
            turned, target = _turned_scale(_SOFT_ROWS[2], angle)
            c_t[:, 0] = c_t[:, 4] = 0.0  # a and d: stretch and the turned scale instead
            c_t[6 * np.arange(n) + 0, 0], c_t[6 * np.arange(n) + 4, 0] = 0.5, -0.5
            c_t[:, 4] = turned.reshape(-1)
            gauge[4] = float(np.sum(target))
        sol = cho_solve_banded((chol, False), np.column_stack([b, c_t]))
        x, y = sol[:, 0], sol[:, 1:]
        mu = np.linalg.solve(c_t.T @ y, c_t.T @ x - gauge)
        return (x - y @ mu).reshape(n, 6)

    def pair_excess(self, theta: NDArray[np.float64]) -> NDArray[np.float64]:
        """How far (RMS, normalised units) each pair's correspondences are from the solution
        *beyond* what the pair's own best fit leaves: the pair's disagreement with the rest
        of the stack, without the scatter of its blocks (the anatomy's local motion)."""
        if not len(self.h):
            return np.zeros(0)
        t_i = theta[self.ij[:, 0]]
        e = self.pair_energy(theta)
        h_ii, h_ij, h_jj = self.h[:, :6, :6], self.h[:, :6, 6:], self.h[:, 6:, 6:]
        # Best slice-j parameters for the given slice i: the pair alone.
        rhs = -np.einsum("pji,pj->pi", h_ij, t_i)
        t_best = np.linalg.solve(h_jj + 1e-12 * np.eye(6), rhs[..., None])[..., 0]
        e_min = (np.einsum("pi,pij,pj->p", t_i, h_ii, t_i)
                 + 2 * np.einsum("pi,pij,pj->p", t_i, h_ij, t_best)
                 + np.einsum("pi,pij,pj->p", t_best, h_jj, t_best))
        return np.sqrt(np.maximum(e - e_min, 0.0) / np.maximum(self.weight, 1e-12))

    def pair_energy(self, theta: NDArray[np.float64]) -> NDArray[np.float64]:
        """Weighted sum of squared residuals (normalised units) of every pair under
        ``theta``."""
        t = np.concatenate([theta[self.ij[:, 0]], theta[self.ij[:, 1]]], axis=1)
        return np.maximum(np.einsum("pi,pij,pj->p", t, self.h, t), 0.0)

    def pair_rms(self, theta: NDArray[np.float64]) -> NDArray[np.float64]:
        """Weighted RMS residual (normalised units) of every pair under ``theta``."""
        if not len(self.h):
            return np.zeros(0)
        return np.sqrt(self.pair_energy(theta) / np.maximum(self.weight, 1e-12))


    def own_fits(self, theta: NDArray[np.float64], weights: NDArray[np.float64]
                 ) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.bool_]]:
        """Each slice's parameters fitted to its own pairs alone, its partners held at
        ``theta``: ``(fits (n, 6), information matrices (n, 6, 6), ok (n,))``; ``ok`` marks
        the slices whose information can be inverted."""
        n = self.n
        info = np.zeros((n, 6, 6))
        rhs = np.zeros((n, 6))
        if len(self.h):
            h = weights[:, None, None] * self.h
            i, j = self.ij[:, 0], self.ij[:, 1]
            np.add.at(info, i, h[:, :6, :6])
            np.add.at(info, j, h[:, 6:, 6:])
            np.add.at(rhs, i, -np.einsum("pij,pj->pi", h[:, :6, 6:], theta[j]))
            np.add.at(rhs, j, -np.einsum("pij,pj->pi", h[:, 6:, :6], theta[i]))
        size = np.maximum(np.einsum("zii->z", info), 1e-300)
        ok = np.linalg.cond(info / size[:, None, None]) < 1e10
        fits = theta.copy()
        fits[ok] = np.linalg.solve(info[ok], rhs[ok][..., None])[..., 0]
        return fits, info, ok

    def noise_variance(self, theta: NDArray[np.float64], weights: NDArray[np.float64]
                       ) -> float:
        """Variance of one coordinate of a correspondence of unit weight (normalised units)
        under ``theta``: the pairs' weighted squared residuals over their correspondences."""
        if not len(self.h):
            return 1.0
        e = self.pair_energy(theta)
        return float(np.sum(weights * e) / max(2.0 * float(np.sum(weights * self.count)), 1.0))


def _to_pixels(theta: NDArray[np.float64], shape: tuple[int, int]) -> NDArray[np.float64]:
    """Normalised slice -> output maps ``(n, 6)`` as pixel pull maps ``A_z = B_z^-1``."""
    centre, radius = _normaliser(shape)
    to_norm = np.array([[1 / radius, 0, -centre[0] / radius], [0, 1 / radius, -centre[1] / radius]])
    from_norm = invert(to_norm)
    b_norm = theta.reshape(-1, 2, 3)
    b_pix = compose(from_norm, b_norm, to_norm)
    return invert(b_pix)


def _radius(sigma: float, n: int) -> int:
    """Half-width (slices) of the Gaussian window of ``sigma`` slices over ``n`` slices: 3
    sigma, but never beyond the stack, where no slice lies (a sigma of 1e9 would otherwise
    loop over 6e9 empty offsets; the result is the same)."""
    return max(2, int(min(np.ceil(3 * sigma), n)))


def _local_linear(values: NDArray[np.float64], sigma: float) -> NDArray[np.float64]:
    """Gaussian-weighted local straight-line fit along axis 0 (the slow component).

    Inside the stack this is a Gaussian smoothing of ``sigma`` slices; unlike a plain
    Gaussian it keeps straight lines exactly and, at the first and last slices, fits a line
    through the nearby slices instead of pinning (or flattening) the end values. Two
    slices give their mean: a line through two points would take all of their difference
    for slow, and a pair of slices is given to be registered.
    """
    n = len(values)
    if n == 2 and sigma > 0:
        return np.broadcast_to(values.mean(axis=0), values.shape).copy()
    if n < 3 or sigma <= 0:
        return values.copy()
    return _line_fit(values, sigma, leave_out=False)


def _line_fit(values: NDArray[np.float64], sigma: float, *, leave_out: bool
              ) -> NDArray[np.float64]:
    """The value at each slice of the Gaussian-weighted straight line fitted along axis 0 to
    the slices within :func:`_radius` (itself left out with ``leave_out``); where the line
    is undetermined, the weighted mean."""
    n = len(values)
    flat = values.reshape(n, -1)
    radius = _radius(sigma, n)
    sw, swk, swkk = (np.zeros((n, 1)) for _ in range(3))
    sy, syk = np.zeros_like(flat), np.zeros_like(flat)
    for k in range(-radius, radius + 1):
        lo, hi = max(0, -k), min(n, n - k)  # slices z in [lo, hi) have a neighbour z + k
        if (k == 0 and leave_out) or hi <= lo:
            continue
        wk = float(np.exp(-0.5 * (k / sigma) ** 2))
        y = flat[lo + k:hi + k]
        sw[lo:hi] += wk
        swk[lo:hi] += wk * k
        swkk[lo:hi] += wk * k * k
        sy[lo:hi] += wk * y
        syk[lo:hi] += (wk * k) * y
    det = sw * swkk - swk * swk
    ok = det > 1e-12 * sw * sw
    line = (swkk * sy - swk * syk) / np.where(ok, det, 1.0)
    return np.where(ok, line, sy / sw).reshape(values.shape)


def jump_offsets(positions: NDArray[np.float64], *, floor: float = 5.0) -> NDArray[np.float64]:
    """The step part of a sequence of positions ``(n, 2)``: the cumulative sum of the steps
    between consecutive slices that stand out (larger than ``floor`` px and than 8 times the
    median step) and that change the level for good (the median of the 3 slices after the
    step differs from that of the 3 before by that much too), zero elsewhere.

    A slice that is off alone (a glitch: a step out and a step back) is no jump: taken for
    two, the slices after it would move by the sum of the two steps' own motion. Nor is a
    step with fewer than 3 slices on either side, which cannot tell a jump from a glitch (a
    stream's window that starts at a glitch: taken for a jump, every later slice of the
    window moved by it)."""
    n = len(positions)
    steps = np.diff(positions, axis=0)
    size = np.linalg.norm(steps, axis=1)
    limit = max(floor, 8.0 * float(np.median(size)) if len(size) else floor)
    jump = np.zeros_like(steps)
    for i in np.flatnonzero(size > limit):
        if i < 2 or i + 4 > n:  # (fewer than 3 slices before or after the step)
            continue
        level = (np.median(positions[i + 1:i + 4], axis=0)
                 - np.median(positions[i - 2:i + 1], axis=0))
        if np.linalg.norm(level) > limit:
            jump[i] = steps[i]
    return np.concatenate([np.zeros((1, 2)), np.cumsum(jump, axis=0)])


def _loo_error(values: NDArray[np.float64], sigma: float) -> NDArray[np.float64]:
    """Mean squared error, per column of ``values`` (n, m), of predicting each slice from
    its neighbours, itself left out, by the Gaussian-weighted local straight-line fit of
    :func:`_local_linear`."""
    return np.mean((values - _line_fit(values, sigma, leave_out=True)) ** 2, axis=0)


# The linear part (a, b, c, d) as stretch, shear, scale and rotation components, and back.
_TO_COMPONENTS = 0.5 * np.array([[1, 0, 0, -1], [0, 1, 1, 0], [1, 0, 0, 1], [0, -1, 1, 0]])
_FROM_COMPONENTS = np.linalg.inv(_TO_COMPONENTS)
_TREND_SIGMAS = (2.0, 3.0, 4.0, 6.0, 8.0, 11.0, 16.0, 24.0, 32.0)


def _trend_sigma(values: NDArray[np.float64], cap: float, *,
                 smoothest: bool = False) -> NDArray[np.float64]:
    """The smoothing (sigma in slices, at most ``cap``) of the slow part of each linear
    component (the columns of ``values`` (n, m)): the one whose leave-one-out prediction of
    the column is best.

    A per-slice linear error of the slices is independent from slice to slice; the error
    the matches add (the anatomy's apparent rotation, scale and shear, summed along the
    chain) wanders slowly. The smoothing that predicts each slice best from its neighbours
    is the one that best follows the wandering part and ignores the independent one: short
    where the wander dominates (an aligned stack: its linear parts are left nearly as they
    are), up to ``cap`` where the per-slice part does.

    ``smoothest`` (slices whose content hardly changes, FIB-SEM): of the scales that predict
    as well as the best within its standard error, the smoothest (the one-standard-error
    rule). Where the errors hardly differ, the per-slice part is not told from the wander,
    and a short scale keeps much of it: lucchi XY with 3 degrees of independent rotation per
    slice chose 2 slices and kept 1.45 degrees rms (jitter error 2.73 px, now 0.64; XZ
    chose 16). Between serial sections the content's own rotation, scale and shear change
    from section to section, and the smoothest scale corrected more of it (the aligned
    drosophila stack moved 3.67 px instead of 3.19): there, the best scale.
    """
    if len(values) < 8:
        return np.full(values.shape[1], float(cap))
    cands = np.array([s for s in _TREND_SIGMAS if s < cap] + [cap], np.float64)
    sq = np.stack([(values - _line_fit(values, s, leave_out=True)) ** 2 for s in cands])
    best = np.argmin(sq.mean(axis=1), axis=0)  # (m,)
    if not smoothest:
        return cands[best]
    diff = sq - np.take_along_axis(sq, best[None, None, :], axis=0)  # (candidates, n, m)
    se = diff.std(axis=1) / np.sqrt(len(values))
    within = diff.mean(axis=1) <= se  # (candidates, m); the best itself always
    return np.array([cands[np.flatnonzero(within[:, k]).max()] for k in range(sq.shape[2])])


# A random walk of the solved positions faster than this (px per slice: at the frame centre
# for translation, at the frame's edge for rotation, scale and shear) is more than a stage
# drifts; the excess is the anatomy's apparent motion and is kept (see _walk_kept). It
# applies only to slices whose content changes (below SIMILAR_CONTENT: serial sections, whose
# content walks 3-8 px per section); 2 px moved an aligned isbi stack by 1.70 px, 1 px by 1.19
# (before x and y were read together by _variogram: now 0.93; benchmarks/RESULTS.md).
STAGE_STEP = 1.0
# Neighbouring slices whose content correlates at least this well, noise discounted
# (StackMatcher.neighbour_score), hardly change, so their content cannot appear to walk far:
# every walk of such a stack is the stage's and is corrected. Lucchi FIB-SEM (XY, XZ, YZ,
# artifacts down to an SNR of 0.3 included): 0.90-0.94; raw shale FIB-SEM 0.80 (its 224^2
# test crop 0.77); 50-nm sections 0.01-0.11, binned 2x 0.25 (benchmarks/RESULTS.md).
SIMILAR_CONTENT = 0.5
_VARIOGRAM_LAGS = (1, 2, 3, 4)


def _variogram(values: NDArray[np.float64]) -> tuple[float, float]:
    """``(white, step)``: the variance of the independent per-slice part of ``values`` (n,)
    and the step variance of its random-walk part, from the robust variogram
    ``gamma(k) = 2 white + k step`` at lags 1-4 (medians, so a few bad slices do not count).

    ``values`` (n, m) are ``m`` sequences of one statistics (the x and y translation: a
    section's jitter and the content's walk have no preferred axis); each lag's median is
    taken over all of them, twice the differences for a stack of 20-30 sections.
    """
    lags = np.array([k for k in _VARIOGRAM_LAGS if k < len(values) - 2], np.float64)
    if len(lags) < 2:
        return float(np.var(values)), 0.0
    # median of a squared N(0, s^2) is 0.4549 s^2
    gamma = np.array([np.median((values[int(k):] - values[:-int(k)]) ** 2) / 0.4549
                      for k in lags])
    design = np.stack([np.full_like(lags, 2.0), lags], axis=1)
    (white, step), *_ = np.linalg.lstsq(design, gamma, rcond=None)
    if white < 0:
        return 0.0, float(lags @ gamma / (lags @ lags))
    if step < 0:
        return float(gamma.mean() / 2), 0.0
    return float(white), float(step)


def _walk_kept(resid: NDArray[np.float64], stage_step: float, *,
               variogram: tuple[float, float] | None = None) -> NDArray[np.float64]:
    """The part of ``resid`` (n,), a component's fast motion, that is the anatomy's random
    walk and is kept rather than corrected.

    Model: ``resid = jitter + stage walk + anatomy walk``, the jitter independent per slice,
    the two walks with independent steps. The variogram gives the jitter variance and the
    total step variance; a stage walks at most ``stage_step`` per slice, the rest of the
    step variance is the anatomy's. The anatomy walk is then estimated by the Wiener filter
    ``G(f) = q_a / (4 s^2 sin^2(pi f) + q_s + q_a)`` (``s^2`` jitter, ``q_s``/``q_a`` stage
    and anatomy step variances), on the mirrored sequence so the ends are not pulled.

    FIB-SEM slices a few nm apart: the anatomy's steps are a fraction of a pixel, nothing is
    kept and all fast motion is corrected. Serial sections 50 nm thick: the anatomy moves
    several pixels per section, and correcting that moves an aligned stack by many pixels;
    only what stands out from the walk (per-section jitter) is corrected.

    ``variogram`` (white, step) replaces the one of ``resid`` (measured on another residual).
    """
    n = len(resid)
    if n < 8:
        return np.zeros_like(resid)
    white, step = _variogram(resid) if variogram is None else variogram
    anatomy = max(0.0, step - stage_step ** 2)
    if anatomy <= 0:
        return np.zeros_like(resid)
    mirrored = np.concatenate([resid, resid[::-1]])
    f = np.fft.rfftfreq(2 * n)
    gain = anatomy / (4 * white * np.sin(np.pi * f) ** 2 + step)
    return np.fft.irfft(gain * np.fft.rfft(mirrored), 2 * n)[:n]


# The anatomy's apparent motion between slices a few nm apart is smooth: its velocity (about
# 0.1-0.15 px per slice, oblique structures) changes by about this much per slice. Measured on
# the exactly aligned lucchi reslices (XZ 0.011-0.013, YZ 0.013-0.026, XY 0.007-0.033, as the
# velocity random walk of a three-part spectral fit); see benchmarks/RESULTS.md.
ANATOMY_CHANGE = 0.02
# ... and its mean velocity over a whole stack stays below this (px per slice, both axes
# together): the exactly aligned lucchi stacks show 0.07-0.17 over their full length (XZ,
# YZ, XY), but up to 0.46 over 32-256 planes or a 256-px wide part of the frame (a crop
# of another region). A steeper straight-line trend is a steady stage drift: "keep"
# corrects its excess (see benchmarks/RESULTS.md).
ANATOMY_SLOPE = 0.4
# The correction of such a drift reaches at most this share of the frame's width in x and of
# its height in y, either way from the stack's middle (align_stack) or from the first slice
# (a stream): slices keep overlapping the frame, and a longer drift is kept beyond that,
# never rendered off it.
STEEP_SHIFT_MAX = 0.5
# The prior of that mean velocity, per axis (rms px per slice; the lucchi stacks: 0.04-0.12,
# rms 0.08). The kept straight-line trend is shared between it and the straight-line part
# of the measured stage walk by their variances (maximum a posteriori).
ANATOMY_VELOCITY = 0.1
_MODEL_LAGS = tuple(range(1, 9))
_ANATOMY_MIN_SLICES = 16  # fewer: too few lags to tell a walk from jitter
# The three anatomy priors above are per slice of stacks whose neighbours correlate, noise
# discounted (StackMatcher.neighbour_score), at least this much: the lucchi stacks, 5 nm per
# slice (XZ 0.93, YZ 0.89, XY 0.90). Farther apart slices correlate less: on the lucchi
# stacks taking every 2nd / 3rd / 4th plane, -ln(score) grows about as the spacing to the
# power _CONTENT_DECAY (XZ 0.93 / 0.76 / 0.59 / 0.44, YZ 0.89 / 0.68 / 0.51 / 0.41, XY 0.90 /
# 0.68 / 0.46 / 0.29; benchmarks/RESULTS.md).
REFERENCE_CONTENT = 0.89
_CONTENT_DECAY = 1.75


def slice_spacing(neighbour_score: float | None) -> float:
    """How far apart the slices are, in slices of the stacks the anatomy priors were measured
    on (:data:`REFERENCE_CONTENT`), from how alike neighbouring slices are: 1 for those or
    closer (or unknown); the lucchi stacks taking every 2nd / 3rd / 4th plane measure
    1.6-2.0 / 2.4-3.0 / 3.1-3.9.

    Per slice, the anatomy then appears to move ``spacing`` times as fast (the mean velocity
    and the steepest trend the anatomy explains scale by it), and its velocity changes by
    ``spacing ** 1.5`` as much (an integrated random walk sampled ``spacing`` times as
    sparsely)."""
    if neighbour_score is None or not 0.0 < neighbour_score < REFERENCE_CONTENT:
        return 1.0
    ratio = np.log(neighbour_score) / np.log(REFERENCE_CONTENT)
    return float(ratio ** (1.0 / _CONTENT_DECAY))


def _motion_model(values: NDArray[np.float64], good: NDArray[np.bool_] | None = None
                  ) -> tuple[float, float]:
    """``(white, step)``: the variances of the independent per-slice part of ``values`` (n,)
    and of the steps of its random walk.

    From the robust variogram of second differences, ``var(y[z+k] - 2 y[z] + y[z-k]) =
    6 white + 2 k step`` at lags 1-8: a locally constant velocity (a drift, the anatomy's
    steady apparent motion) cancels exactly, and the anatomy's slowly changing velocity adds
    little at these lags. Medians (a few bad slices do not count), non-negative least
    squares, the short lags (measured from more slices) weighted more. Only differences of
    three ``good`` slices count (flagged slices carry interpolated values, without jitter).
    """
    from scipy.optimize import nnls

    ok = np.ones(len(values), bool) if good is None else good
    lags, gamma = [], []
    for k in _MODEL_LAGS:
        if 2 * k >= len(values) - 2:
            break
        three = ok[2 * k:] & ok[k:-k] & ok[:-2 * k]
        if three.sum() < 3:  # (a periodic pattern of flagged slices can empty one lag only)
            continue
        diff = (values[2 * k:] - 2 * values[k:-k] + values[:-2 * k])[three]
        lags.append(float(k))
        gamma.append(float(np.median(diff ** 2)) / 0.4549)  # median of a squared N(0, 1)
    if len(lags) < 2:
        return (float(np.var(np.diff(values[ok]))) / 2 if ok.sum() > 2 else 0.0), 0.0
    lag = np.array(lags)
    design = np.stack([np.full_like(lag, 6.0), 2.0 * lag], axis=1)
    weight = 1.0 / np.sqrt(lag)
    (white, step), _ = nnls(design * weight[:, None], np.array(gamma) * weight)
    return float(white), float(step)


def _step_noise(white: float, good_slices: int) -> float:
    """The rms of :func:`_motion_model`'s walk step variance on pure jitter of variance
    ``white`` over ``good_slices`` slices (simulated: 0.51 white at 16 slices, 0.21 at 32,
    0.078 at 128, 0.039 at 512; twice it is about the 95th percentile)."""
    return 3.9 * white * good_slices ** -0.74


def _uses_noise_model(good_slices: int, sigma: float) -> bool:
    """Whether the slow translation of similar slices is split by the noise model: enough
    trusted slices to measure it, and a trend at all (``sigma`` > 0)."""
    return good_slices >= _ANATOMY_MIN_SLICES and sigma > 0


def _measured(values: NDArray[np.float64], good: NDArray[np.bool_]
              ) -> tuple[NDArray[np.float64], NDArray[np.float64], float, float]:
    """``(line, resid, white, step)`` of one translation component: the straight line
    through its ``good`` slices (free in the anatomy, so split off first, which also keeps
    the split well scaled), the rest, and what :func:`_motion_model` measures in the rest."""
    z = np.arange(len(values), dtype=np.float64)
    line = np.asarray(np.polyval(np.polyfit(z[good], values[good], 1), z), np.float64)
    resid = values - line
    white, step = _motion_model(resid, good)
    return line, resid, white, step


def _anatomy_kept(values: NDArray[np.float64], good: NDArray[np.bool_] | None = None,
                  change: float = ANATOMY_CHANGE, velocity: float = ANATOMY_VELOCITY
                  ) -> NDArray[np.float64]:
    """The slow part of one translation component ``values`` (n,) of a stack whose content
    hardly changes between slices: the part that is the anatomy's apparent motion and is
    kept rather than corrected.

    Model: ``values = anatomy + stage walk + jitter``. The anatomy moves smoothly: its
    velocity wanders by ``change`` px per slice per slice (an integrated random walk; a
    straight line costs nothing, as a constant drift looks like oblique anatomy). The
    stage walk (step variance ``q``) and the jitter (variance ``s^2``) are measured by
    :func:`_motion_model`. The anatomy is their joint maximum a-posteriori split (the
    Kalman smoother of this model, solved as one sparse least-squares problem)::

        min  sum_good (y - a - w)^2 / s^2 + sum (a[z+1] - 2 a[z] + a[z-1])^2 / change^2
           + sum (w[z+1] - w[z])^2 / q                     (mean of w: zero)

    Slices not ``good`` (flagged: their values are interpolated) are not observations; the
    priors carry the split across them.

    An aligned stack (no walk, no jitter) is left where it is; jitter is removed down to the
    scale where the anatomy's motion exceeds it; a stage walk is followed down to the scale
    where the anatomy's motion exceeds the walk's, so a strong walk is corrected over long
    scales and a weak one only over short ones. The ends need no extension.
    """
    from scipy import sparse
    from scipy.sparse.linalg import spsolve

    n = len(values)
    ok = np.ones(n, bool) if good is None else good
    line, resid, white, step = _measured(values, ok)
    # (1e-3 px)^2: below any measurement, keeps the system well conditioned for an exactly
    # aligned stack.
    floor = 1e-6 + 1e-6 * (change ** 2 + white + step)
    s2, q = max(white, floor), max(step, floor)
    data = sparse.diags(ok.astype(np.float64) / s2)
    d1 = sparse.diags([-np.ones(n - 1), np.ones(n - 1)], [0, 1], shape=(n - 1, n))
    d2 = sparse.diags([np.ones(n - 2), -2 * np.ones(n - 2), np.ones(n - 2)], [0, 1, 2],
                      shape=(n - 2, n))
    # A faint pull of the walk toward zero fixes its mean (the gauge: no slice is special);
    # far below what the walk's steps cost at the stack's longest scale.
    ridge = sparse.identity(n) * (1e-3 * (np.pi / n) ** 2 / q)
    system = sparse.bmat([[data + (d2.T @ d2) / change ** 2, data],
                          [data, data + ridge + (d1.T @ d1) / q]], format="csc")
    rhs = np.concatenate([ok * resid / s2, ok * resid / s2])
    solved = spsolve(system, rhs)
    anatomy, walk = solved[:n], solved[n:]
    # The optimum has a zero-mean walk; put any round-off in its mean back where it belongs.
    kept = line + anatomy + walk.mean()
    # The kept trend's straight line is free in the model above. It is the anatomy's mean
    # velocity (prior variance ``velocity^2``) or the straight-line part of the stage
    # walk over the stack (the slope of a random walk over m slices has variance
    # 6 q / (5 m); m spans the good slices, flagged ones between them included): keep the
    # anatomy's share, follow the walk's. Only the walk that stands out of the estimate's
    # own noise (twice its rms, about the 95th percentile on jitter alone, where the
    # estimate is positive about half the time) counts.
    z = np.arange(n, dtype=np.float64)
    slope = float(np.polyfit(z[ok], kept[ok], 1)[0])
    span = float(z[ok][-1] - z[ok][0] + 1)
    walk_step = max(0.0, step - 2.0 * _step_noise(white, int(ok.sum())))
    share = velocity ** 2 / (velocity ** 2 + 1.2 * walk_step / span)
    return kept - (1.0 - share) * slope * (z - z[ok].mean())


def _line_slope(ctr: NDArray[np.float64], good: NDArray[np.bool_]) -> NDArray[np.float64]:
    """The slope (px per slice, per axis) of the straight line through the ``good`` slices of
    a translation ``ctr`` (n, 2)."""
    z = np.flatnonzero(good).astype(np.float64)
    return np.array([np.polyfit(z, ctr[good, k], 1)[0] for k in range(2)])


def excess_slope(slope: NDArray[np.float64], limit: float = ANATOMY_SLOPE
                 ) -> NDArray[np.float64]:
    """How much a straight-line trend of ``slope`` (px per slice, x and y) is steeper than
    the anatomy moves (``limit`` px per slice, both axes together): px per slice (x, y),
    zeros if it is not that steep."""
    slope = np.asarray(slope, np.float64)
    norm = float(np.hypot(*slope))
    return np.zeros(2) if norm <= limit else slope * (1.0 - limit / norm)


def _excess_slope(ctr: NDArray[np.float64], good: NDArray[np.bool_],
                  limit: float = ANATOMY_SLOPE) -> NDArray[np.float64]:
    """:func:`excess_slope` of the straight-line trend of the kept translation ``ctr``
    (n, 2), fitted to the ``good`` slices."""
    return excess_slope(_line_slope(ctr, good), limit)


def _steep_excess(ctr: NDArray[np.float64], good: NDArray[np.bool_],
                  limit: float, cap: NDArray[np.float64]) -> NDArray[np.float64]:
    """The part of the straight-line trend of the kept translation ``ctr`` (n, 2) steeper
    than the anatomy moves (:func:`_excess_slope`): a steady stage drift, zero at the mean of
    the ``good`` slices (so the gauge does not move), at most ``cap`` (x, y) px either way
    (beyond, the drift is kept: corrected further, the slices would leave the frame).
    (Measured on what the split keeps, not on the input: where the walk takes the curvature
    of a smooth drift, the anatomy's line runs from end to end of the stack, steeper than
    the input's straight-line fit.)"""
    z = np.arange(len(ctr), dtype=np.float64)
    return np.clip(np.outer(z - z[good].mean(), _excess_slope(ctr, good, limit)), -cap, cap)


def _stage_motion(affines: NDArray[np.float64], shape: tuple[int, int],
                  good: NDArray[np.bool_], spacing: float) -> dict[str, float]:
    """The stage walk (rms step per slice) and jitter (rms) that :func:`_motion_model`
    measures in the translation of ``affines`` (slice -> output) at the frame centre, as
    2-D magnitudes (both axes together), the slope of its straight-line trend (px per
    slice; what exceeds :data:`ANATOMY_SLOPE` times ``spacing`` is corrected as a steady
    stage drift), and ``spacing``."""
    centre, _ = _normaliser(shape)
    ctr = affines[:, :, :2] @ centre + affines[:, :, 2]
    white = step = 0.0
    for k in range(2):
        _, _, w, q = _measured(ctr[:, k], good)
        white, step = white + w, step + q
    values = (np.sqrt(step), np.sqrt(white), np.hypot(*_line_slope(ctr, good)), spacing)
    return {k: float(v) for k, v in zip(MOTION_KEYS, values, strict=True)}


def lowpass_affines(affines: NDArray[np.float64], shape: tuple[int, int],
                    sigma: float, *, adaptive: bool = False,
                    stage_step: float | None = STAGE_STEP,
                    noise_model: bool = True,
                    good: NDArray[np.bool_] | None = None,
                    spacing: float = 1.0) -> NDArray[np.float64]:
    """Slow component of a sequence of 2x3 affines (Gaussian of ``sigma`` slices along z).

    The linear parts and the image of the frame centre are smoothed separately, so rotation
    about the centre does not leak into translation. With ``adaptive``:

    - each component of the linear part (stretch, shear, scale, rotation) is smoothed over
      its own scale, at most ``sigma``, chosen by leave-one-out prediction
      (:func:`_trend_sigma`);
    - the random walk of every component (translation included) beyond what a stage drifts
      (``stage_step`` px per slice) counts as slow too: the anatomy's apparent motion in
      thick sections (:func:`_walk_kept`);
    - ``stage_step`` None means the content hardly changes between slices (FIB-SEM): no walk
      is the content's, and the slow translation is what the noise model takes for the
      anatomy's smooth motion (:func:`_anatomy_kept`, for 16 good slices or more and with
      ``noise_model``), not a fixed Gaussian of ``sigma``; with ``noise_model``, the kept
      translation's straight-line trend never exceeds :data:`ANATOMY_SLOPE`, however few
      the slices. ``good`` (n,) marks the slices whose values are observations (not
      interpolated over flagged slices). ``spacing`` (:func:`slice_spacing`) scales the
      anatomy's priors to slices farther apart than those they were measured on (>= 1).
    """
    if not (np.isfinite(spacing) and spacing >= 1.0):
        raise ValueError(f"spacing must be a finite number >= 1, got {spacing}")
    centre, radius = _normaliser(shape)
    lin = affines[:, :, :2]
    ctr = lin @ centre + affines[:, :, 2]
    ctr_s = _local_linear(ctr, sigma)
    if adaptive and len(affines) >= 3 and sigma > 0:
        comp = lin.reshape(-1, 4) @ _TO_COMPONENTS.T
        comp_s = np.empty_like(comp)
        # The walk is measured against the full-scale trend (as for the translation): the
        # adaptive one has already followed part of it. One pass for all four components.
        full = _local_linear(comp, sigma) if stage_step is not None else None
        scales = _trend_sigma(comp, sigma, smoothest=stage_step is None)
        for k in range(4):
            y = comp[:, k]
            comp_s[:, k] = _local_linear(y, float(scales[k]))
            if full is not None and stage_step is not None:
                comp_s[:, k] += _walk_kept(y - comp_s[:, k], stage_step / radius,
                                           variogram=_variogram(y - full[:, k]))
        lin_s = (comp_s @ _FROM_COMPONENTS.T).reshape(lin.shape)
        if stage_step is not None:
            both = _variogram(ctr - ctr_s)  # x and y together (see _variogram)
            for k in range(2):
                ctr_s[:, k] += _walk_kept(ctr[:, k] - ctr_s[:, k], stage_step, variogram=both)
        elif noise_model:
            ok = np.ones(len(affines), bool) if good is None else good
            n_good = int(np.count_nonzero(ok))
            if _uses_noise_model(n_good, sigma):
                change, velocity = ANATOMY_CHANGE * spacing ** 1.5, ANATOMY_VELOCITY * spacing
                ctr_s = np.stack([_anatomy_kept(ctr[:, k], ok, change, velocity)
                                  for k in range(2)], axis=1)
            if n_good >= 3 and sigma > 0:  # (fewer than 16 slices: the trend's line)
                cap = STEEP_SHIFT_MAX * np.array([shape[1], shape[0]], np.float64)
                ctr_s -= _steep_excess(ctr_s, ok, ANATOMY_SLOPE * spacing, cap)
    else:
        lin_s = _local_linear(lin, sigma)
    out = np.empty_like(affines)
    out[:, :, :2] = lin_s
    out[:, :, 2] = ctr_s - lin_s @ centre
    return out


# The soft components of the rigid prior (stretch, shear, scale) as rows over one slice's
# parameters (a, b, tx, c, d, ty).
_SOFT_ROWS = 0.5 * np.array([[1, 0, 0, 0, -1, 0], [0, 1, 0, 1, 0, 0], [1, 0, 0, 0, 1, 0]],
                            np.float64)
_SPREAD_GRID = np.geomspace(1e-5, 0.2, 161)


def _soft_rows(theta: NDArray[np.float64]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """:data:`_SOFT_ROWS` of each slice (m, 3, 6), the scale measured about the slice's own
    rotation, and their targets (m, 3) (:func:`_turned_scale`)."""
    return _turned_rows(_SOFT_ROWS, _angles(theta))


#: The per-slice rigid prior's strength where it is not measured on the stack, relative to a
#: slice's match weight (``regularise="auto"`` on stacks where some slices cannot measure
#: their own scale and shear, and near those slices).
FIXED_PRIOR = 0.05
# A slice whose fit to its own pairs measures one of its stretch, shear or scale this many
# times worse (variance) than the typical slice's cannot measure its own (a damaged or
# partly blank slice): it and the slices within its pairs' reach keep FIXED_PRIOR.
POOR_MEASURE = 10.0
# The measured strength needs this many slices with a measure of their own.
MEASURED_SLICES = 16


def prior_spread(fits: NDArray[np.float64], info: NDArray[np.float64],
                 use: NDArray[np.bool_], noise: float) -> NDArray[np.float64]:
    """The spread (standard deviation, normalised units) of the stack's independent
    per-slice stretch, shear and scale, measured on the stack (empirical Bayes).

    ``fits`` (n, 6) are the slices' parameters (slice -> output, normalised) fitted to their
    own pairs alone, ``info`` their information matrices and ``noise`` the variance of a
    correspondence of unit weight. Each slice's component is then its own per-slice error
    plus a measurement error of known variance. The slow part (the anatomy's apparent
    deformation along the chain) is removed by the slice's neighbours (a leave-one-out
    Gaussian of 3 slices). The spread is the maximum-likelihood one over the ``use`` slices,
    each slice weighted by its own measurement variance; squared deviations beyond 16
    variances count as 16, so a few wild slices cannot inflate it.
    """
    idx = np.flatnonzero(use)
    if idx.size < 3:
        return np.full(3, _SPREAD_GRID[0])
    rows, targets = _soft_rows(fits[idx])
    x = np.einsum("mci,mi->mc", rows, fits[idx] - _IDENTITY) - targets  # (m, 3)
    var = noise * np.einsum("mci,mij,mcj->mc", rows, np.linalg.inv(info[idx]), rows)
    lag = idx[None, :] - idx[:, None]
    g = np.exp(-0.5 * (lag / 3.0) ** 2) * (lag != 0) * (np.abs(lag) <= 9)
    g /= np.maximum(g.sum(axis=1, keepdims=True), 1e-300)
    fast = x - g @ x
    var = var + (g * g) @ var
    gain = 1.0 + np.sum(g * g, axis=1)  # a per-slice error enters through the neighbours too
    total = _SPREAD_GRID[:, None, None] ** 2 * gain[None, :, None] + var[None]  # (grid, m, 3)
    nll = np.sum(np.log(total) + np.minimum(fast[None] ** 2 / total, 16.0), axis=1)
    return np.asarray(_SPREAD_GRID[np.argmin(nll, axis=0)])


def _measured_strength(system: _System, theta: NDArray[np.float64], w: NDArray[np.float64],
                       fixed: NDArray[np.float64], reach: int
                       ) -> tuple[NDArray[np.float64], NDArray[np.float64]] | None:
    """The per-slice prior strengths (n, 3) measured on the stack (in the units of
    ``fixed``, the :data:`FIXED_PRIOR` strengths) and the spread they come from
    (:func:`prior_spread`), or None where too few slices measure their own scale and
    shear."""
    fits, info, ok = system.own_fits(theta, w)
    n = len(fits)
    if np.count_nonzero(ok) < MEASURED_SLICES:
        return None
    measure = np.full((n, 3), np.inf)
    rows = _soft_rows(fits[ok])[0]
    measure[ok] = np.einsum("zci,zij,zcj->zc", rows, np.linalg.inv(info[ok]), rows)
    poor = (measure > POOR_MEASURE * np.median(measure[ok], axis=0)).any(axis=1) & ok
    near = np.zeros(n, bool)
    for z in np.flatnonzero(poor):
        near[max(0, z - reach):z + reach + 1] = True
    noise = system.noise_variance(theta, w)
    spread = prior_spread(fits, info, ok & ~poor, noise)
    # Gaussian prior of that spread: noise / spread^2 in the data term's units, which the
    # prior rows carry scaled by sqrt(FIXED_PRIOR).
    measured = np.broadcast_to(noise / spread ** 2 / FIXED_PRIOR, (n, 3))
    return np.where(near[:, None], fixed, measured), spread


# A flagged slice keeps its own estimate only if that moves it from its neighbours by at most
# this many times what the trusted slices typically move (see place_flagged).
FLAGGED_MOVE = 3.0


def _corner_gap(a: NDArray[np.float64], b: NDArray[np.float64],
                corners: NDArray[np.float64]) -> NDArray[np.float64]:
    """Largest distance (px) over ``corners`` between the maps ``a`` and ``b`` (n, 2, 3)."""
    pa = np.einsum("nij,kj->nki", a[:, :, :2], corners) + a[:, None, :, 2]
    pb = np.einsum("nij,kj->nki", b[:, :, :2], corners) + b[:, None, :, 2]
    return np.asarray(np.linalg.norm(pa - pb, axis=-1).max(axis=1))


def _between(maps: NDArray[np.float64], targets: NDArray[np.intp],
             known: NDArray[np.intp]) -> NDArray[np.float64]:
    """``maps`` (n, 2, 3) at slices ``targets``, each parameter interpolated linearly along z
    from the slices ``known`` (held constant beyond the first and last)."""
    flat = maps.reshape(len(maps), 6)
    return np.stack([np.interp(targets, known, flat[known, k]) for k in range(6)],
                    axis=1).reshape(-1, 2, 3)


# A trusted slice whose fast motion (its solved map against the trend) stands out this far
# from the trusted slices' is left out of the trend's fit: its translation (at the frame
# centre, both axes) by more than OUTLIER_SHIFT times their median, or one component of its
# linear part (stretch, shear, scale, rotation; px at the frame's edge) by more than
# OUTLIER_LINEAR times theirs, and by OUTLIER_FLOOR px. Measured on 17 FIB-SEM stacks
# without one (lucchi XZ, YZ, XY, drift, artifacts and aligned; benchmarks/RESULTS.md): up to
# 3.6 and 7.4 times (heavier tails than Gaussian errors); a slice 15 px off stands out
# 4.4-7.9 times, one rotated by 3 degrees 20-80 times. A slice left out by chance only costs
# the trend one observation.
OUTLIER_SHIFT = 5.0
OUTLIER_LINEAR = 12.0
OUTLIER_FLOOR = 1.0


def _outliers(maps: NDArray[np.float64], trend: NDArray[np.float64], good: NDArray[np.intp],
              shape: tuple[int, int]) -> NDArray[np.intp]:
    """The slices of ``good`` whose map (slice -> output) stands out from ``trend`` (see
    :data:`OUTLIER_SHIFT`)."""
    if good.size < 8:
        return np.zeros(0, np.intp)
    centre, radius = _normaliser(shape)
    fast = maps[good] - trend[good]
    shift = np.linalg.norm(fast[:, :, :2] @ centre + fast[:, :, 2], axis=1)
    linear = np.abs(fast[:, :, :2].reshape(-1, 4) @ _TO_COMPONENTS.T) * radius
    out = shift > max(OUTLIER_FLOOR, OUTLIER_SHIFT * float(np.median(shift)))
    limits = np.maximum(OUTLIER_FLOOR, OUTLIER_LINEAR * np.median(linear, axis=0))
    out |= (linear > limits).any(axis=1)
    return np.asarray(good[out], np.intp)


def place_flagged(final: NDArray[np.float64], flagged: Sequence[int],
                  shape: tuple[int, int]) -> NDArray[np.float64]:
    """Where the flagged slices go (``final``: the slice -> output maps (n, 2, 3)).

    A flagged slice has too few pairs that agree with the rest of the stack; its own
    estimate rests on the others, which may be wrong (an inverted or mostly blank slice
    matches somewhere by chance). It is kept where the output moves it from the line between
    its nearest trusted neighbours (frame corners) by no more than :data:`FLAGGED_MOVE`
    times the median of the same measure over the trusted slices (how much the output moves
    this stack's slices against their neighbours: their jitter, and between serial sections
    not the content's walk, which is kept); otherwise the slice is placed as its neighbours
    are (interpolated along z), i.e. left with its own misalignment rather than a wrong one.
    """
    n = len(final)
    bad = np.asarray(sorted(set(flagged)), np.intp)
    good = np.setdiff1d(np.arange(n), bad)
    if good.size < 3 or not bad.size:
        return final
    h, w = shape
    corners = np.array([[0.0, 0.0], [w - 1.0, 0.0], [0.0, h - 1.0], [w - 1.0, h - 1.0]])
    # each trusted slice against the line through its trusted neighbours
    before, inner, after = good[:-2], good[1:-1], good[2:]
    t = ((inner - before) / (after - before))[:, None, None]
    line = (1.0 - t) * final[before] + t * final[after]
    typical = float(np.median(_corner_gap(final[inner], line, corners)))
    own = _corner_gap(final[bad], _between(final, bad, good), corners)
    out = final.copy()
    far = bad[own > FLAGGED_MOVE * max(typical, 1e-6)]
    if far.size:
        out[far] = _between(final, far, good)
    return out


# A slice none of whose pairs correlates at this share of the stack's usual nearest pair
# (where the content persists from slice to slice) matched nothing it resembles.
UNLIKE_SHARE = 0.5


def unlike_slices(n: int, pairs: Sequence[PairMoments]) -> list[int]:
    """Slices none of whose pairs correlates at :data:`UNLIKE_SHARE` of the stack's usual
    nearest pair (the median :attr:`PairMoments.correlation` of the pairs at the shortest
    distance), and runs of slices linked to the rest of the stack only by pairs below that
    share of the usual correlation at their own distance (which decays per slice of distance
    as the two nearest distances' medians do); pairs without a measured correlation do not
    count.

    The matcher leaves such a nearest pair out once it knows the stack's usual correlation
    (``StackMatcher._unlike``), but not among the first slices. A slice there that is off
    alone (a beam glitch 30 px and 5 degrees off on a 67-px high reslice, a slice of noise)
    matched its neighbours at a false position (block correlation 0.05 against the
    stack's 0.91); the farther pairs predicted from that position confirmed it, and it was
    left 20-145 px off, unflagged. Likewise a run: slices 0-3 of a small stack 20-33 px
    apart from slice to slice matched one another well, but slice 4 only through one pair
    at 0.23 against the usual 0.88, at a false position; the run was left 30 px off the
    rest, two of its slices unflagged. Of the groups the well-correlating pairs link, the
    largest (the earliest of equals) is the stack; the others are flagged. For slices whose
    content persists (FIB-SEM)."""
    measured = [pm for pm in pairs if np.isfinite(pm.correlation)]
    if not measured:
        return []
    dist = np.array([abs(pm.j - pm.i) for pm in measured])
    corr = np.array([pm.correlation for pm in measured])
    usual = float(np.median(corr[dist == dist.min()]))
    # A link between groups is judged at its own distance: farther pairs correlate less by
    # nature (the pairs over a blank slice), a pair at a false position far less. The decay
    # per slice of distance is read from the two nearest distances (medians: the few pairs
    # of a bad slice or run do not move them).
    classes = [int(d) for d in np.unique(dist) if np.count_nonzero(dist == d) >= 3]
    decay = 1.0
    if len(classes) >= 2 and usual > 0:
        d1, d2 = classes[:2]
        ratio = float(np.median(corr[dist == d2])) / float(np.median(corr[dist == d1]))
        decay = float(np.clip(ratio, 0.0, 1.0)) ** (1.0 / (d2 - d1))
    best = np.full(n, -np.inf)
    for pm, c in zip(measured, corr, strict=True):
        best[pm.i] = max(best[pm.i], c)
        best[pm.j] = max(best[pm.j], c)
    alone = np.isfinite(best) & (best < UNLIKE_SHARE * usual)  # no pair correlates
    root = np.arange(n)

    def find(z: int) -> int:
        while root[z] != z:
            root[z] = root[root[z]]
            z = int(root[z])
        return z

    for pm, c, d in zip(measured, corr, dist, strict=True):
        if not (alone[pm.i] or alone[pm.j]) and \
                c >= UNLIKE_SHARE * usual * decay ** (d - dist.min()):
            root[find(pm.i)] = find(pm.j)
    groups: dict[int, list[int]] = {}
    for z in np.flatnonzero(np.isfinite(best) & ~alone):
        groups.setdefault(find(int(z)), []).append(int(z))
    main = max(groups.values(), key=len) if groups else []  # (the earliest of equals)
    return sorted([int(z) for z in np.flatnonzero(alone)]
                  + [z for g in groups.values() if g is not main for z in g])


# The IRLS's Cauchy scale (px) is twice the robust spread of the pairs' disagreement,
# within these limits (see solve_stack).
_SCALE_RANGE = (0.5, 2.0)


def _agreeing(system: _System, theta: NDArray[np.float64], w: NDArray[np.float64],
              radius: float) -> NDArray[np.bool_]:
    """Which pairs agree with the solution ``theta``, for the flags: those the IRLS kept
    (weight ``w`` above 1/4), and those that disagree no more than pairs as far apart
    typically do.

    Pairs farther apart disagree more by nature (the anatomy's apparent motion over the
    slices between them): on a lucchi crop the median disagreement is 0.17 / 0.32 / 0.67 /
    1.34 px at 1 / 2 / 4 / 8 slices apart, about in proportion. The IRLS judges every pair by
    one scale, the stack's mix of distances; a window of a stream, with few far pairs, has a
    smaller one (0.5 px against 1.2 for the whole stack), and good slices near a blank run,
    whose nearest pairs are missing, were flagged "disagrees" for their far pairs (each
    judged here by the same rule as the IRLS's weight, at a scale in proportion to its
    distance, within the same limits). For slices whose content persists (FIB-SEM): between
    thick sections every pair disagrees by pixels, and a section 15 px off on isbi was
    no longer flagged.
    """
    agrees = w > 0.25
    if not len(w):
        return agrees
    excess = system.pair_excess(theta) * radius
    dist = np.abs(system.ij[:, 0] - system.ij[:, 1]).astype(np.float64)
    per_slice = float(np.median(excess / dist))
    scale = np.clip(2.0 * 1.4826 * per_slice * dist, *_SCALE_RANGE)
    # (a Cauchy weight 1 / (1 + (excess / scale)^2) above 1/4)
    return agrees | (excess < np.sqrt(3.0) * scale)


@functools.cache
def _blas_controller() -> Any:
    """The process's BLAS libraries (threadpoolctl), found once scipy.linalg has loaded its
    own."""
    import scipy.linalg  # noqa: F401  (loads the BLAS the solve uses, so it is found)
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


_F = TypeVar("_F", bound=Callable[..., Any])


def _one_blas_thread(func: _F) -> _F:
    """Run ``func`` with every BLAS library on one thread, restoring the caller's setting.

    The solve's linear algebra is small (a banded Cholesky of 6 unknowns per slice and a band
    of ~50, a few sparse solves); OpenBLAS's threads on it cost more than they save, and on a
    busy machine, where they spin waiting for a core, far more: a stream of 64 slices spent
    152 s in 384 banded Cholesky factorisations with two threads and 1.6 s with one
    (benchmarks/RESULTS.md). The limit is process-wide while it lasts (threadpoolctl).
    """
    @functools.wraps(func)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with _blas_controller().limit(limits=1, user_api="blas"):
            return func(*args, **kwargs)
    return wrapped  # type: ignore[return-value]


@_one_blas_thread
def solve_stack(n: int, pairs: Sequence[PairMoments], shape: tuple[int, int], *,
                model: str = "affine", regularise: float | str = "auto",
                slow_drift: str = "keep",
                drift_sigma: float = 16.0, blank: Sequence[int] = (), failed: Sequence[int] = (),
                neighbour_score: float | None = None, spacing: float = 1.0,
                noise_model: bool = True, iterations: int = 6) -> SolveResult:
    """Solve one transform per slice from the pairs' moments (see module docstring).

    Parameters
    ----------
    n : int
        Number of slices.
    pairs : sequence of PairMoments
        The matched pairs (any offsets, either direction).
    shape : (int, int)
        Slice shape ``(h, w)``; the output frame has the same shape.
    model : {"translation", "rigid", "similarity", "affine"}
        Per-slice model; "affine" regularises toward rigid with strength ``regularise``.
    regularise : float or "auto"
        Strength of the per-slice rigid prior (``model="affine"``), relative to a slice's
        match weight. ``"auto"``: measured on the stack (:func:`prior_spread`, a Gaussian
        prior of the spread the slices' own fits show) where neighbouring slices hardly
        change (``neighbour_score`` >= :data:`SIMILAR_CONTENT`); :data:`FIXED_PRIOR` near
        slices that cannot measure their own scale and shear, on stacks with fewer than
        :data:`MEASURED_SLICES` slices that can, and between dissimilar slices.
    slow_drift : {"keep", "follow", "none"}
        What to do with motion slower than ``drift_sigma`` slices (module docstring).
    drift_sigma : float
        Gaussian sigma (slices) separating slow motion from jitter for ``slow_drift="keep"``:
        the longest trend of rotation, scale and shear, and the translation's trend where
        the content changes between slices (below :data:`SIMILAR_CONTENT` or unknown), with
        fewer than 16 trusted slices, or without ``noise_model``.
    blank : sequence of int
        Slices known to be blank (flagged whatever their matches).
    failed : sequence of int
        Slices that matched none of their nearest predecessors (flagged whatever their
        matches with later slices, which were predicted from a guess).
    neighbour_score : float, optional
        How alike neighbouring slices are, noise discounted, where the matcher measures it
        (:meth:`~deepalign_fast.alignment.matcher.StackMatcher.neighbour_score`). At
        :data:`SIMILAR_CONTENT` or above, ``keep`` corrects every random walk (the content
        changes too little between slices to appear to walk); below it or unknown, a walk
        beyond :data:`STAGE_STEP` px per slice is the content's and is kept.
    spacing : float
        How far apart the slices are, in slices of 5-nm FIB-SEM (>= 1; :func:`slice_spacing`
        of a noise-discounted neighbour score,
        :meth:`~deepalign_fast.alignment.matcher.StackMatcher.slice_spacing`): the noise
        model of similar slices scales the anatomy's priors by it. 1 (the default) where
        the noise could not be discounted: a noisy score would read as slices far apart.
    noise_model : bool
        Split the slow translation of similar slices by the noise model measured on them
        (the default, a two-sided estimate over the whole stack). False: the Gaussian trend
        of ``drift_sigma`` slices, for the windows of a stream, whose newest slices have no
        neighbours after them (the model's split follows them too closely there).
    iterations : int
        IRLS iterations.

    Returns
    -------
    SolveResult
    """
    if slow_drift not in SLOW_DRIFT:
        raise ValueError(f"slow_drift must be one of {', '.join(SLOW_DRIFT)}; got {slow_drift!r}")
    if n < 1:
        raise ValueError("n must be >= 1")
    measured = regularise == "auto"
    if not measured and not (isinstance(regularise, (int, float)) and np.isfinite(regularise)
                             and regularise >= 0):
        raise ValueError(f"regularise must be 'auto' or a finite number >= 0, got {regularise!r}")
    lam = FIXED_PRIOR if measured else float(regularise)
    if not (np.isfinite(spacing) and spacing >= 1.0):
        raise ValueError(f"spacing must be a finite number >= 1, got {spacing}")
    pairs = [pm for pm in pairs if pm.i != pm.j and 0 <= pm.i < n and 0 <= pm.j < n]
    _, radius = _normaliser(shape)
    per_slice = np.zeros(n)
    for pm in pairs:
        per_slice[pm.i] += pm.weight
        per_slice[pm.j] += pm.weight
    typical = float(np.median(per_slice[per_slice > 0])) if np.any(per_slice > 0) else 1.0
    prior = _nonrigid_rows(model, lam)
    soft = np.array([0 < np.abs(r).max() < np.sqrt(_HARD) * 0.5 for r in prior])
    unit = np.linalg.norm(prior, axis=1)  # component value = row . delta / unit
    unit[unit == 0] = 1.0
    # The prior of each slice scales with its own match weight, so that it means the same at
    # the ends of the stack (fewer pairs) as in the middle. It is robust (Huber): once a
    # component exceeds what half a pixel at the frame's edge allows, its pull stops growing,
    # so a real deformation (a compressed section) is followed with a bounded bias instead of
    # being shrunk in proportion.
    base = np.where(per_slice > 0, per_slice, typical)
    strength = np.repeat(base[:, None], len(prior), axis=1)
    huber = 0.5 / radius * np.sqrt(2.0)  # prior rows carry a factor 1/sqrt(2)
    eps = 1e-6 * typical
    system = _System(n, pairs, prior, eps)

    def robust(base: NDArray[np.float64], delta: NDArray[np.float64]) -> NDArray[np.float64]:
        """``base`` strengths whose soft components stop pulling harder beyond the Huber
        limit under ``delta`` (theta - identity)."""
        rows, targets = _turned_rows(prior, _angles(delta + _IDENTITY))
        comp = np.abs(np.einsum("zci,zi->zc", rows, delta) - targets) / unit  # (n, 4)
        return np.where(soft[None, :], base * np.minimum(1.0, huber / np.maximum(comp, 1e-15)),
                        base)

    def turned_solve(w: NDArray[np.float64], strength: NDArray[np.float64],
                      start: NDArray[np.float64] | None) -> NDArray[np.float64]:
        """``system.solve`` with the prior's scale about each slice's rotation, from those
        of ``start`` (None: from an unturned solve), solved again while the rotations still
        move (up to :data:`_TURN_SOLVES` times): sections turned by tens of degrees are
        several solves from their rotations, and the pairs must not be reweighted from a
        solution still pulled by a wrong scale (it dropped good pairs at 30 degrees)."""
        if n == 1:
            return np.zeros((1, 6))
        if start is None:
            start = system.solve(w, strength) + _IDENTITY
        turn = _angles(start)
        for _ in range(_TURN_SOLVES):
            delta = system.solve(w, strength, turn)
            again = _angles(delta + _IDENTITY)
            if np.abs(again - turn).max() < _TURN_STILL:
                break
            turn = again
        return delta

    def irls(base: NDArray[np.float64], w: NDArray[np.float64], iterations: int,
             start: NDArray[np.float64] | None = None
             ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Solve with per-slice prior strengths ``base`` (n, 4), reweighting the pairs
        ``iterations - 1`` times from ``w``; ``start`` is an earlier solution (its rotations
        set where the prior measures scale)."""
        strength = base
        theta = np.tile(_IDENTITY, (n, 1)) if start is None else start
        for it in range(max(1, iterations)):
            delta = turned_solve(w, strength, None if start is None and it == 0 else theta)
            theta = delta + _IDENTITY
            if not pairs or it == iterations - 1:
                break
            strength = robust(base, delta)
            excess = system.pair_excess(theta) * radius  # px
            # Cauchy weights on each pair's disagreement with the others, around the typical
            # one (between 0.5 and 2 px: a stack whose pairs disagree by many pixels
            # everywhere, as 50-nm sections whose anatomy moves between sections, is not
            # taken at its word), so wrong pairs and slices lose their influence.
            scale = float(np.clip(2.0 * 1.4826 * np.median(excess), *_SCALE_RANGE))
            w = 1.0 / (1.0 + (excess / scale) ** 2)
            w[w < 0.01] = 0.0  # clearly wrong pairs: out, so they cannot pull at all
        return theta, w

    theta, w = irls(strength, np.ones(len(pairs)), iterations)
    spread_pct = None
    similar = neighbour_score is not None and neighbour_score >= SIMILAR_CONTENT
    if measured and model == "affine" and pairs and similar:
        # The fixed strength pulls real per-slice scale and shear toward rigid, and more
        # where the matches measure them less (the short axis of a reslice): measure the
        # stack's spread of them and solve once more with that prior, the pairs' weights
        # kept. Only where neighbouring slices hardly change (FIB-SEM): between thick
        # sections the content's own change shows as per-section scale and shear too, and
        # a prior weakened by it follows the content.
        reach = int(np.abs(system.ij[:, 0] - system.ij[:, 1]).max())
        own = _measured_strength(system, theta, w, strength[:, :3], reach)
        if own is not None:
            again = strength.copy()
            again[:, :3] = own[0]
            # (robust as in the first solve: a component beyond the Huber limit there pulls
            # no harder, so a real deformation keeps a bounded bias)
            theta, w = irls(robust(again, theta - _IDENTITY), w, 1, theta)
            spread_pct = {k: float(100 * v) for k, v in zip(PRIOR_KEYS, own[1], strict=True)}

    rms_px = system.pair_rms(theta) * radius
    agrees = _agreeing(system, theta, w, radius) if similar else w > 0.25
    num = np.zeros(n)
    den = np.zeros(n)
    support = np.zeros(n, int)  # pairs that agree with the solution
    available = np.zeros(n, int)
    for pm, wi, r, ok in zip(pairs, w, rms_px, agrees, strict=True):
        for z in (pm.i, pm.j):
            num[z] += wi * pm.weight * r * r
            den[z] += wi * pm.weight
            support[z] += ok
            available[z] += 1
    residuals: list[float | None] = [float(np.sqrt(num[z] / den[z])) if den[z] > 0 else None
                                     for z in range(n)]
    # A slice is trusted when enough of its pairs agree with the solution: a chain of single
    # pairs has nothing to be checked against, and one agreeing pair among several
    # disagreeing ones cannot tell which is right. Three, or as many as it has; but at the
    # ends of the stack, where a slice can have only half the pairs (those to one side, its
    # farthest the noisiest), half of those it could have (SIFT flagged good end slices of
    # aligned lucchi stacks that needed 3 of 4). A slice inside whose pairs failed gets no
    # such allowance.
    zs = np.arange(n)
    possible = sum((zs - d >= 0).astype(int) + (zs + d < n)
                   for d in {abs(pm.j - pm.i) for pm in pairs}) if pairs else np.zeros(n, int)
    need = np.minimum(np.minimum(3, available), (np.asarray(possible) + 1) // 2)
    unlike = set(unlike_slices(n, pairs)) if similar else set()
    flagged = sorted({z for z in range(n) if support[z] < need[z]
                      or support[z] == 0} | set(blank) | set(failed) | unlike)
    if n == 1:
        flagged = sorted(set(blank) | set(failed))
    reasons = {z: "blank" if z in blank else
               "unmatched" if z in failed or available[z] == 0 else
               "unlike" if z in unlike else "disagrees" for z in flagged}

    b_pix = invert(_to_pixels(theta, shape))  # slice -> output, pixels
    final = b_pix
    motion = None
    kept_slope = slope_limit = None
    outliers: list[int] = []
    if n > 1 and slow_drift != "none":
        good = np.setdiff1d(np.arange(n), flagged)
        modelled = similar and noise_model and slow_drift == "keep"
        apart = spacing if similar else 1.0
        centre, _ = _normaliser(shape)

        def slow(trusted: NDArray[np.intp]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
            """The slow part of ``b_pix`` fitted to the ``trusted`` slices only, and the
            signal it was fitted to."""
            trend_src = b_pix.copy()
            if 0 < trusted.size < n:  # the others must not bend the trend
                trend_src = _between(b_pix, np.arange(n), trusted)
            # Sudden jumps (a stage jump, a re-acquired frame) are fast motion however slow
            # the rest is: take them out of the signal the trend is fitted to, so the trend
            # does not smear them into a ramp over the neighbouring slices.
            trend_src[:, :, 2] -= jump_offsets(trend_src[:, :, :2] @ centre + trend_src[:, :, 2])
            # Slow rotation, scale and shear come mostly from the matches (the anatomy's
            # apparent deformation, summed along the chain), not from the stage: their slow
            # part is separated on the scale that best tells it from per-slice errors (at
            # most drift_sigma), so it is neither corrected as if it were real nor left in as
            # jitter.
            return lowpass_affines(trend_src, shape, drift_sigma, adaptive=True,
                                   stage_step=None if similar else STAGE_STEP,
                                   noise_model=modelled, good=np.isin(np.arange(n), trusted),
                                   spacing=apart), trend_src

        trend, trend_src = slow(good)
        # A trusted slice whose own fast motion (jumps aside) stands far out of the stack's (a
        # beam glitch, one slice rotated by degrees) is corrected by its own estimate, but
        # must not pull the trend, and with it its neighbours: fit the trend again without it.
        # Only where the content hardly changes between slices: between thick sections a
        # section's fast motion may be the content's walk, which the trend keeps.
        odd = _outliers(trend_src, trend, good, shape) if similar else np.zeros(0, np.intp)
        outliers = [int(z) for z in odd]
        if odd.size:
            good = np.setdiff1d(good, odd)
            trend, trend_src = slow(good)
        if modelled and _uses_noise_model(good.size, drift_sigma):
            motion = _stage_motion(trend_src, shape, np.isin(np.arange(n), good), apart)
        if similar and slow_drift == "keep" and not modelled and good.size >= 3 and \
                drift_sigma > 0:
            ctr_s = trend[:, :, :2] @ centre + trend[:, :, 2]
            kept_slope = _line_slope(ctr_s, np.isin(np.arange(n), good))
            slope_limit = ANATOMY_SLOPE * apart
        if slow_drift == "follow":
            # Follow slow translation (stage drift) only: slow rotation, scale and shear are
            # not physical drift and would accumulate from the anatomy's apparent motion.
            trend[:, :, 2] = centre - trend[:, :, :2] @ centre
        final = compose(invert(trend), b_pix)
    if flagged and n > 2:
        final = place_flagged(final, flagged, shape)
    return SolveResult(invert(final), residuals, flagged,
                       {(pm.i, pm.j): float(wi) for pm, wi in zip(pairs, w, strict=True)},
                       motion, outliers, spread_pct, reasons, kept_slope, slope_limit)
