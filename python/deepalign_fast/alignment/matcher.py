"""The pairwise part of an alignment: each new slice matched with its predecessors.

Slice z is matched with its predecessors at the ranks in ``offsets`` (1, 2, 4, 8 by default;
rank 1 is the nearest slice that is not blank). The nearest pair is matched from scratch
(coarse to fine; where that fails or the pair correlates at less than half the usual, again
from starts turned by :data:`TURNS` degrees); farther pairs start from the prediction given by
the chain of nearest-pair estimates and are refined at the finest level only. After a nearest
pair with few correspondences (a partly blank, damaged or inverted slice on either side,
:meth:`StackMatcher._few`) each farther pair is also matched from scratch, the one with more
correspondences kept, and the pair with the most correspondences places the slice. Each pair
contributes its correspondences, summarised as moments
(:func:`~deepalign_fast.alignment.solve.pair_moments`), to the global solve.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from ..geometry import compose, invert
from ..match import Correspondences, make_backend, turned_start
from ..progress import StageTimes
from .options import AlignOptions
from .solve import SIMILAR_CONTENT, PairMoments, pair_moments, slice_spacing

__all__ = ["SECTION_UNLIKE_SHARE", "TURNS", "MatchFn", "StackMatcher", "backend_for", "is_blank",
           "persistence"]

# Nearest pairs whose blocks correlate less than this (median) say too little for the noise
# to be discounted (see StackMatcher.neighbour_score).
_MEASURABLE = 0.05
_RECENT = 32  # slices whose pairs tell whether the stack's content persists
_BASELINE = 5  # nearest pairs seen last: what the stack's neighbours look like now
#: Turned starts (degrees) of a pair matched from scratch that failed (StackMatcher._turned).
TURNS = (3.0, -3.0, 6.0, -6.0)
# How much better a turned match must correlate than a first one that held.
_TURN_GAIN = 0.1
#: Between serial sections, a nearest pair correlating at less than this share of the recent
#: median is unlike (StackMatcher._unlike).
SECTION_UNLIKE_SHARE = 1.0 / 3.0


def persistence(alike: np.ndarray) -> float | None:
    """How alike the content of neighbouring slices is, noise discounted, from ``alike``
    (n, 2): per slice the correlation of its nearest and of its second-nearest pair. The
    median over slices of their ratio (slices whose nearest pair correlates at least
    :data:`_MEASURABLE`), or None with fewer than three such slices or ratios for fewer than
    half the slices measured (``offsets`` without 2). Per slice, so that a stack whose noise
    changes part way through is measured as well as one whose noise does not."""
    near, far = np.asarray(alike, np.float64).reshape(-1, 2).T
    measured = np.isfinite(near)
    both = measured & np.isfinite(far) & (near >= _MEASURABLE)
    if both.sum() < 3 or 2 * both.sum() < measured.sum():
        return None
    return float(np.median(np.clip(far[both] / near[both], -1.0, 1.0)))


def backend_for(opts: AlignOptions) -> Any:
    """The matching back-end of ``opts`` (``features``, ``model``, ``threshold``, ...)."""
    return make_backend(opts.features, model=opts.model, threshold=opts.threshold,
                        num_threads=opts.num_threads, provider=opts.provider)


def is_blank(image: np.ndarray) -> bool:
    """Whether a slice holds no structure at all (a constant image, e.g. a missing section)."""
    sample = image[:: max(1, image.shape[0] // 128), :: max(1, image.shape[1] // 128)]
    return bool(np.ptp(sample) == 0)


# (z_ref, state_ref, z_mov, state_mov, init) -> (matrix or None, correspondences). The slice
# indices let a distributed driver find a cached or remote result; the local one ignores them.
# ``init`` as in MatchBackend.match (None, a prediction, or a turn with a NaN translation).
MatchFn = Callable[[int, Any, int, Any, "np.ndarray | None"],
                   tuple["np.ndarray | None", Correspondences]]


class StackMatcher:
    """Matches each new slice with its predecessors at ``opts.offsets`` and keeps the pairs.

    State is bounded: the ``max(offsets)`` most recent prepared slices and, per pair, 36
    numbers of moments. ``match`` defaults to the local back-end's ``match``; a distributed
    driver passes its own (remote, cached) function and opaque ``state`` handles instead of
    prepared slices.

    Attributes
    ----------
    pairs : list of PairMoments
        Every pair matched so far.
    history : deque of (z, state, pose)
        Recent non-blank slices, oldest first, with their chained pose (output -> slice, from
        the nearest-pair estimates; used only to predict far pairs).
    blank, failed : list of int
        Blank slices, and slices that matched none of their predecessors.
    matches : list of int
        Inlier correspondences of each slice with its nearest matched predecessor.
    scores : list of float
        Median block correlation of each slice's nearest trusted pair, NaN for a blank or
        failed slice (:meth:`neighbour_score`).
    alike : list of (float, float)
        Per slice, :attr:`Correspondences.correlation` of its pairs with the nearest and the
        second-nearest predecessor (NaN where not trusted, left out or not measured).
    nearest_seen : list of float
        Per slice, the correlation of its first trusted nearest pair, left out or not (what
        the stack's neighbours look like now: :meth:`_unlike`).
    """

    def __init__(self, opts: AlignOptions, match: MatchFn | None = None,
                 shape: tuple[int, int] | None = None) -> None:
        self.opts = opts
        if match is None:
            self.backend = backend_for(opts)
            backend = self.backend
            match = lambda _zr, ref, _zm, mov, init: backend.match(ref, mov, init)  # noqa: E731
        self._match = match
        self.shape = shape
        self.history: deque[tuple[int, Any, np.ndarray]] = deque(maxlen=max(opts.offsets))
        self.pairs: list[PairMoments] = []
        self.blank: list[int] = []
        self.failed: list[int] = []
        self.matches: list[int] = []
        self.scores: list[float] = []  # per slice, as matches
        self.alike: list[tuple[float, float]] = []  # per slice, as matches
        self.nearest_seen: list[float] = []  # per slice, as matches
        self.count = 0
        self.times = StageTimes()

    def state(self) -> dict[str, np.ndarray]:
        """Everything needed to continue matching later except the prepared slices (plain
        arrays, for a checkpoint): see :meth:`restore`."""
        pairs = self.pairs
        return {
            "count": np.array(self.count),
            "pair_ij": np.array([(pm.i, pm.j) for pm in pairs], np.int64).reshape(-1, 2),
            "pair_moments": np.array([pm.moments for pm in pairs]).reshape(-1, 6, 6),
            "pair_weight": np.array([pm.weight for pm in pairs], np.float64),
            "pair_count": np.array([pm.count for pm in pairs], np.int64),
            "pair_correlation": np.array([pm.correlation for pm in pairs], np.float64),
            "blank": np.array(self.blank, np.int64),
            "failed": np.array(self.failed, np.int64),
            "matches": np.array(self.matches, np.int64),
            "scores": np.array(self.scores, np.float64),
            "alike": np.array(self.alike, np.float64).reshape(-1, 2),
            "nearest_seen": np.array(self.nearest_seen, np.float64),
            "history_z": np.array([z for z, _, _ in self.history], np.int64),
            "history_pose": np.array([p for _, _, p in self.history]).reshape(-1, 2, 3),
        }

    def restore(self, saved: dict[str, np.ndarray], prepare: Callable[[int], Any]) -> int:
        """Continue from :meth:`state`; ``prepare(z)`` re-prepares the slices still needed as
        neighbours. Returns the first slice still to be added."""
        self.count = int(saved["count"])
        self.pairs = [PairMoments(int(i), int(j), m, float(w), int(c), float(r))
                      for (i, j), m, w, c, r in
                      zip(saved["pair_ij"], saved["pair_moments"], saved["pair_weight"],
                          saved["pair_count"], saved["pair_correlation"], strict=True)]
        self.blank = [int(z) for z in saved["blank"]]
        self.failed = [int(z) for z in saved["failed"]]
        self.matches = [int(m) for m in saved["matches"]]
        self.scores = [float(v) for v in saved["scores"]]
        # (checkpoints written before the noise-discounted score: not measured)
        alike = saved.get("alike", np.full((len(self.scores), 2), np.nan))
        self.alike = [(float(a), float(b)) for a, b in np.asarray(alike).reshape(-1, 2)]
        seen = saved.get("nearest_seen", np.full(len(self.scores), np.nan))
        self.nearest_seen = [float(v) for v in np.asarray(seen).ravel()]
        self.history.clear()
        for z, pose in zip(saved["history_z"], saved["history_pose"], strict=True):
            self.history.append((int(z), prepare(int(z)), np.asarray(pose, np.float64)))
        return self.count

    def _trusted(self, m: np.ndarray | None, corr: Correspondences) -> bool:
        """Whether a pair's match is good enough to enter the solve: enough correspondences,
        a plausible map (scale within 0.8-1.25 in every direction) and a median block
        correlation of at least ``min_pair_score``."""
        if m is None or len(corr) < self.opts.min_matches or not np.all(np.isfinite(m)):
            return False
        sv = np.linalg.svd(m[:, :2], compute_uv=False)
        if sv.min() < 0.8 or sv.max() > 1.25:
            return False
        return bool(np.median(corr.weights) >= self.opts.min_pair_score)

    def _unlike(self, corr: Correspondences) -> bool:
        """Whether a slice's nearest pair, trusted, is still too unlike the stack's usual
        neighbours for its map to predict the farther pairs: where the content persists from
        slice to slice (noise-discounted neighbour score >= SIMILAR_CONTENT over the recent
        slices), a nearest pair that correlates at less than half the median of the last
        :data:`_BASELINE` nearest pairs seen (a slice of noise, a damaged slice; those seen
        include the ones left out, so a lasting change of the imaging, as a drop of the SNR,
        becomes the new baseline within a few slices). A farther pair refined from a wrong
        prediction finds no structure to move it and confirms the prediction; matched from
        scratch, it finds the true position, and the solve then sees the disagreement.

        Where the content changes from slice to slice (serial sections), the correlation of
        neighbours varies more (isbi: 0.57-2 times the recent median), so only a third of the
        median counts as unlike (:data:`SECTION_UNLIKE_SHARE`): a section with inverted
        contrast (0.1 of it) moved by 100 px, unflagged, and its neighbours with it; with a
        quarter, inverted sections among misaligned ones (0.29 of it) were placed 26-118 px
        off, unflagged (benchmarks/RESULTS.md, "Inverted sections: a third")."""
        seen = np.asarray(self.nearest_seen[-_BASELINE:], np.float64)
        seen = seen[np.isfinite(seen)]
        if not np.isfinite(corr.correlation) or seen.size < 3:
            return False
        persists = persistence(np.asarray(self.alike[-_RECENT:], np.float64))
        if persists is None:
            return False
        share = 0.5 if persists >= SIMILAR_CONTENT else SECTION_UNLIKE_SHARE
        return corr.correlation < share * float(np.median(seen))

    def _few(self, count: int) -> bool:
        """Whether a slice's nearest pair has fewer than half the correspondences of the last
        :data:`_RECENT` matched nearest pairs (the median: a run of damaged slices does not
        become the baseline), i.e. one of the two slices shows only part of its content or
        hardly matches at all (a damaged or partly blank section, a fold, inverted
        contrast). Its map may be wrong, and farther pairs refined from the prediction it
        gives find no structure to move them: a good FIB-SEM slice after a run of damaged
        ones inherited their error, and every later slice with it (63 px); one inverted
        isbi section moved every other by 35-39 px. Each farther pair is then matched from
        scratch as well, the match with more correspondences kept (between serial sections a
        farther pair from scratch can be the worse one), and the slice is placed by the pair
        with the most correspondences.

        Until three nearest pairs have matched, the stack's usual count is not known and
        every pair counts as few (a match from scratch then replaces the prediction, or
        places the slice, only with half as many correspondences again): a slice among the
        first three that is off alone (a beam glitch, a slice of noise) matched its
        neighbour at a false position, the farther pairs predicted through it confirmed that
        position, and every later slice moved with it (by up to 39 px; the solve flags the
        slice itself, ``solve.unlike_slices``)."""
        recent = self._recent_counts()
        return recent.size < 3 or count < 0.5 * float(np.median(recent))

    def _recent_counts(self) -> np.ndarray:
        """The correspondence counts of the last :data:`_RECENT` matched nearest pairs."""
        return np.asarray([k for k in self.matches[-_RECENT:] if k > 0], np.float64)

    def _turned(self, z_k: int, state_k: Any, z: int, state: Any, m: np.ndarray | None,
                corr: Correspondences) -> tuple[np.ndarray | None, Correspondences]:
        """A pair matched from scratch that failed or came out unlike the stack's usual
        neighbours (:meth:`_unlike`), matched again from scratch through starts turned by
        :data:`TURNS` degrees about the frame centre (the back-end searches the translation
        under the turn, then matches every level); the best turned match (highest block
        correlation, then refined once more from itself) replaces it where it is trusted
        and correlates better by :data:`_TURN_GAIN` (or the first did not hold at all).

        The correlation levels search translation only: on a small frame (the short side of
        an XZ/YZ reslice: no coarser level) two slices a few degrees apart leave the frame's
        edges beyond the refinement's reach, and the pair was lost (2 degrees of per-slice
        rotation: 5-17 of 191-255 nearest pairs). Serial sections 9-11 degrees apart lose
        their whole-frame translation as well: a turned start with the translation of a
        plain turn found nothing (benchmarks/RESULTS.md)."""
        best: tuple[np.ndarray, Correspondences] | None = None
        for degrees in TURNS:
            # Only the turn is predicted (NaN translation): the back-end searches the
            # translation and matches every level from scratch through the turn.
            m2, corr2 = self._match(z_k, state_k, z, state, turned_start(degrees))
            if self._trusted(m2, corr2) and (best is None
                                             or corr2.correlation > best[1].correlation):
                best = (np.asarray(m2), corr2)
        if best is None:
            return m, corr
        m2, corr2 = self._match(z_k, state_k, z, state, best[0])  # from closer: converge
        if not self._trusted(m2, corr2) or corr2.correlation < best[1].correlation:
            m2, corr2 = best
        held = self._trusted(m, corr) and np.isfinite(corr.correlation)
        if held and corr2.correlation < corr.correlation + _TURN_GAIN:
            return m, corr
        return m2, corr2

    def neighbour_score(self, start: int = 0) -> float | None:
        """How alike the content of neighbouring slices is, noise discounted (slices
        ``start`` on), or None where the matcher does not measure it (keypoints) or no
        trusted pair exists.

        Noise lowers the correlation of a slice with its nearest and with its second-nearest
        neighbour alike; a change of the content from slice to slice lowers the farther pair
        more. The correlation of all blocks of a slice's second-nearest pair over that of its
        nearest pair (median over slices: :func:`persistence`) is therefore the neighbours'
        correlation without the noise (for a correlation that decays geometrically with
        distance, exactly): FIB-SEM 0.77-0.94 even at an SNR of 0.3, 50-nm sections
        0.01-0.25 (benchmarks/RESULTS.md). Where it
        cannot be measured (no second-nearest pairs, or nearest pairs that hardly
        correlate, or second-nearest pairs for fewer than half the slices, as with
        ``offsets`` without 2), the median inlier block correlation of the nearest pairs.
        """
        scores = np.asarray(self.scores[start:], np.float64)
        scores = scores[np.isfinite(scores)]
        if self.opts.features != "blocks" or not scores.size:
            return None
        persists = persistence(np.asarray(self.alike[start:], np.float64))
        return float(np.median(scores)) if persists is None else persists

    def _discounted(self, start: int) -> float | None:
        """The noise-discounted score of slices ``start`` on (:func:`persistence`), None
        where it cannot be measured (keypoint features, or too few second-nearest pairs)."""
        if self.opts.features != "blocks":
            return None
        return persistence(np.asarray(self.alike[start:], np.float64))

    def noise_discounted(self, start: int = 0) -> bool:
        """Whether :meth:`neighbour_score` (slices ``start`` on) has the noise discounted,
        not the raw fallback."""
        return self._discounted(start) is not None

    def slice_spacing(self, start: int = 0) -> float:
        """How far apart the slices are (:func:`~deepalign_fast.alignment.solve.slice_spacing`
        of the noise-discounted :meth:`neighbour_score`, slices ``start`` on); 1 where the
        noise could not be discounted, whose lower raw score would read as slices far
        apart."""
        return slice_spacing(self._discounted(start))

    def add(self, z: int, state: Any | None) -> None:
        """Match slice z (``state`` None = blank slice) with its predecessors."""
        if self.shape is None:
            raise ValueError("StackMatcher needs the slice shape")
        self.count = max(self.count, z + 1)
        ident = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        if state is None:
            self.blank.append(z)
            self.matches.append(0)
            self.scores.append(float("nan"))
            self.alike.append((float("nan"), float("nan")))
            self.nearest_seen.append(float("nan"))
            return
        t0 = time.perf_counter()
        ranked = list(reversed(self.history))  # nearest first
        pose: np.ndarray | None = None
        nearest_n = 0
        score = float("nan")
        alike = [float("nan"), float("nan")]
        unlike = 0  # nearest pairs that matched but are too unlike the stack's (_unlike)
        seen = float("nan")
        wanted = set(self.opts.offsets)
        # Before the usual count is known, a match must be clearly better to replace the one
        # from the prediction or to place the slice (a pair from scratch a little richer
        # than a sound prediction is no reason to prefer it).
        margin = 1.0
        few = False  # the nearest pair has few correspondences (_few): farther pairs are
        most = 0  # matched from scratch too, and the pair with the most of them places z
        for rank, (z_k, state_k, pose_k) in enumerate(ranked, start=1):
            if pose is None and rank > 2 + min(unlike, 1):
                break  # none of the nearest slices matched: this slice fails
            if rank not in wanted and pose is not None:
                continue
            init = None if pose is None else compose(pose, invert(pose_k))
            m, corr = self._match(z_k, state_k, z, state, init)
            # (keypoint back-ends match the same whatever the start: no turned retries)
            if init is None and self.opts.features == "blocks" and (
                    not self._trusted(m, corr) or self._unlike(corr)):
                m, corr = self._turned(z_k, state_k, z, state, m, corr)
            if few:  # the prediction may be wrong: from scratch too, the better one kept
                m2, corr2 = self._match(z_k, state_k, z, state, None)
                if self._trusted(m2, corr2) and (not self._trusted(m, corr)
                                                 or len(corr2) > margin * len(corr)):
                    m, corr = m2, corr2
            if m is None or not self._trusted(m, corr):
                continue
            if pose is None:
                if not unlike:
                    seen = corr.correlation
                if self._unlike(corr):
                    # Left out, and the next slice back is matched from scratch: a slice of
                    # noise (or its neighbour) must not place this one, nor predict its pairs.
                    unlike += 1
                    continue
                pose = compose(m, pose_k)
                nearest_n = len(corr)
                score = float(np.median(corr.weights))
                few = self._few(nearest_n)
                margin = 1.5 if self._recent_counts().size < 3 else 1.0
            if few and len(corr) > margin * most:
                most = len(corr)
                pose = compose(m, pose_k)
            if rank <= 2:
                alike[rank - 1] = corr.correlation
            # Content changes with distance along z, so a far pair says less about the
            # relative position than a near one: weight 1 / slice distance (independent
            # increments).
            self.pairs.append(pair_moments(z_k, z, corr.src, corr.dst,
                                           corr.weights / (z - z_k), self.shape,
                                           corr.correlation))
        self.times.add("match", t0)
        if ranked and pose is None:
            self.failed.append(z)
            pose = ranked[0][2]
        self.matches.append(nearest_n)
        self.scores.append(score)
        self.alike.append((alike[0], alike[1]))
        self.nearest_seen.append(seen)
        self.history.append((z, state, ident if pose is None else pose))
