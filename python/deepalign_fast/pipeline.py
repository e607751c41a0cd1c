"""Stack alignment: estimate one affine per slice, then render every slice once.

Data flow (each stage overlaps the next through small bounded queues, so memory does not grow
with the stack depth)::

    read slice z -> prepare (features / pyramids) -> match with slices z-1..z-K
      -> joint robust fit of slice z's transform -> [drift model] -> render -> write

**Joint fit over several neighbours.** Each slice is matched to up to ``neighbours``
predecessors. Every correspondence ``(p in slice z-k, q in slice z)`` is lifted to the
output frame through the already-solved transform of slice z-k, so all of them constrain
slice z's transform ``A_z`` (output -> slice z) directly: one weighted least-squares fit
over the union, after dropping correspondences that disagree with the consensus. One bad
pair therefore cannot break the stack, and errors do not simply add up along the chain.

**Drift model.** Chaining pairwise estimates accumulates error as a random walk. Physical
stage drift in FIB-SEM is a translation, so by default (``drift="linear"``) the low-frequency
trend of the *linear* part (rotation, scale, shear) of the solved transforms is removed: each
slice's linear part is divided by its moving average over ``drift_window`` slices. Translation
drift is kept (it is real). ``drift="all"`` also removes the translation trend (for stacks
known to have no real drift, e.g. already drift-corrected acquisitions); ``drift="none"``
keeps the raw chain.

**Failed slices.** A blank slice, or one with too few consistent matches, is flagged, gets a
transform interpolated from its neighbours, and is reported; later slices match against the
last good ones, so the run never stops.

See :mod:`deepalign_fast.transforms` for the transform convention.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ._errors import DeepAlignError
from .blocks import BlockMatcher, Correspondences
from .estimate import MODELS, estimate_transform, fit_transform
from .features import FeatureExtractor, SiftExtractor, match_features
from .geometry import compose, invert
from .transforms import FieldStore, TransformSet
from .warp import warp_affine, warp_displacement

__all__ = ["AlignOptions", "AlignResult", "Aligner"]

T = TypeVar("T")
R = TypeVar("R")

FEATURES = ("blocks", "sift", "learned")
DRIFT = ("linear", "all", "none")
MODES = ("affine", "expected-affine", "elastic")
CANVAS = ("reference", "union")


@dataclass(frozen=True)
class AlignOptions:
    """Options of :class:`Aligner` (all keyword; the CLI flags have the same names).

    Parameters
    ----------
    features : {"blocks", "sift", "learned"}
        How slices are matched: dense NCC block matching on the raw slices (default),
        SIFT keypoints on the raw slices, or keypoints on the learned feature maps.
    model : {"translation", "rigid", "similarity", "affine"}
        Transform model of each slice.
    neighbours : int
        Each slice is matched to this many predecessors (>= 1).
    threshold : float
        Inlier threshold in pixels for RANSAC and the joint fit.
    min_matches : int
        A slice with fewer consistent correspondences is flagged.
    drift : {"linear", "all", "none"}
        Drift model (see module docstring).
    drift_window : int
        Moving-average window (slices) of the drift model.
    canvas : {"reference", "union"}
        Output frame: that of the first slice (same shape as the input), or the bounding box
        of all aligned slices.
    num_threads : int
        Threads of the C++ kernels (0 = all cores).
    provider : {"cpu", "cuda", "tensorrt"}
        onnxruntime execution provider for ``features="learned"``; asking for a GPU provider
        that is not installed is an error naming the package to install.
    mode : {"affine", "expected-affine", "elastic"}
        Rendering: one affine per slice, or (damaged serial sections) each slice refined
        after the affine solve by an expected-affine field against the previous aligned
        slice (:class:`deepalign_fast.expected_affine.StackRefiner`; ``render`` only).
        ``"elastic"``: each slice refined by the learned flow network against the previous
        output slice (:class:`deepalign_fast.elastic.ElasticRefiner`); the fields are kept in
        the transforms file so ``apply`` carries labels through them.
    masks : path, optional
        Damage masks for ``mode="expected-affine"`` (stack or folder, non-zero = damage).
    max_folding : float
        ``mode="elastic"``: largest accepted fraction of non-positive Jacobian determinants
        per slice (a field that folds more is damped, or dropped and reported).
    field_stride : int
        ``mode="elastic"``: the fields are stored every ``field_stride`` output pixels.
    """

    features: str = "blocks"
    model: str = "affine"
    neighbours: int = 2
    threshold: float = 2.0
    min_matches: int = 12
    drift: str = "linear"
    drift_window: int = 64
    canvas: str = "reference"
    num_threads: int = 0
    provider: str = "cpu"
    mode: str = "affine"
    masks: str | None = None
    max_folding: float = 0.001
    field_stride: int = 4

    def __post_init__(self) -> None:
        checks = [("features", self.features, FEATURES), ("model", self.model, MODELS),
                  ("mode", self.mode, MODES),
                  ("drift", self.drift, DRIFT), ("canvas", self.canvas, CANVAS)]
        for name, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        if self.neighbours < 1:
            raise ValueError(f"neighbours must be >= 1, got {self.neighbours}")
        if self.threshold <= 0:
            raise ValueError(f"threshold must be > 0, got {self.threshold}")
        if self.drift_window < 2:
            raise ValueError(f"drift_window must be >= 2, got {self.drift_window}")
        if self.num_threads < 0:
            raise ValueError(f"num_threads must be >= 0, got {self.num_threads}")
        if not 0 <= self.max_folding < 1:
            raise ValueError(f"max_folding must be in [0, 1), got {self.max_folding}")
        if self.field_stride < 1:
            raise ValueError(f"field_stride must be >= 1, got {self.field_stride}")


@dataclass
class AlignResult:
    """What :meth:`Aligner.estimate` found, with a summary of the run."""

    transforms: TransformSet
    matches: list[int]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def flagged(self) -> list[int]:
        return self.transforms.flagged

    def summary(self) -> dict[str, Any]:
        res = [r for r in self.transforms.residuals if r is not None]
        n = len(self.transforms)
        total = self.timings.get("total", 0.0)
        return {
            "slices": n,
            "flagged": list(self.flagged),
            "residual_median_px": float(np.median(res)) if res else None,
            "residual_max_px": float(np.max(res)) if res else None,
            "matches_median": float(np.median(self.matches)) if self.matches else 0.0,
            "time_s": total,
            "slices_per_s": n / total if total > 0 else None,
            "timings_s": dict(self.timings),
            "peak_memory_mb": _peak_memory_mb(),
        }


# --------------------------------------------------------------------------------------------
# Matching back-ends: prepare(slice) -> state, match(state_ref, state_mov) -> (M, corr)
# --------------------------------------------------------------------------------------------


class _KeypointBackend:
    """Keypoints + descriptors (SIFT or learned) -> mutual-NN matches -> RANSAC."""

    def __init__(self, extractor: FeatureExtractor, opts: AlignOptions) -> None:
        self.extractor = extractor
        self.opts = opts

    def prepare(self, image: np.ndarray) -> Any:
        return self.extractor.extract(image)

    def match(self, ref: Any, mov: Any, init: np.ndarray | None = None
              ) -> tuple[np.ndarray | None, Correspondences]:
        ia, ib = match_features(ref, mov)
        if ia.size < 3:
            return None, Correspondences.empty()
        src = ref.keypoints[ia].astype(np.float64)
        dst = mov.keypoints[ib].astype(np.float64)
        fit = estimate_transform(src, dst, self.opts.model, threshold=self.opts.threshold,
                                 num_threads=self.opts.num_threads)
        if not fit:
            return None, Correspondences.empty()
        keep = fit.inliers
        return fit.matrix, Correspondences(src[keep], dst[keep], np.ones(int(keep.sum())))


class _BlockBackend:
    def __init__(self, opts: AlignOptions) -> None:
        self.matcher = BlockMatcher(model=opts.model, threshold=opts.threshold,
                                    num_threads=opts.num_threads)

    def prepare(self, image: np.ndarray) -> Any:
        return self.matcher.prepare(image)

    def match(self, ref: Any, mov: Any, init: np.ndarray | None = None
              ) -> tuple[np.ndarray | None, Correspondences]:
        return self.matcher.match(ref, mov, init)


def _make_backend(opts: AlignOptions) -> Any:
    if opts.features == "blocks":
        return _BlockBackend(opts)
    if opts.features == "sift":
        return _KeypointBackend(SiftExtractor(), opts)
    from .learned import LearnedExtractor  # onnxruntime is imported only when asked for

    return _KeypointBackend(LearnedExtractor(provider=opts.provider,
                                             num_threads=opts.num_threads), opts)


# --------------------------------------------------------------------------------------------
# Estimation
# --------------------------------------------------------------------------------------------


def _is_blank(image: np.ndarray) -> bool:
    sample = image[:: max(1, image.shape[0] // 128), :: max(1, image.shape[1] // 128)]
    return bool(np.ptp(sample) == 0)


@dataclass(frozen=True)
class _Pair:
    """One neighbour's match for slice z: the pairwise-correspondence part of the solve.

    ``rank`` is 1 for the nearest accepted predecessor, 2 for the next, ...; ``a_ref`` is that
    predecessor's solved transform (output -> slice), ``matrix`` the estimated
    predecessor -> slice z affine and ``corr`` its correspondences.
    """

    rank: int
    a_ref: np.ndarray
    matrix: np.ndarray
    corr: Correspondences


# (z_ref, state_ref, z_mov, state_mov, init) -> (matrix or None, correspondences). The slice
# indices let a distributed driver find a cached or remote result; the local one ignores them.
MatchFn = Callable[[int, Any, int, Any, "np.ndarray | None"],
                   tuple["np.ndarray | None", Correspondences]]


def _match_neighbours(history: Iterable[tuple[int, Any, np.ndarray]], z: int, state: Any,
                      match: MatchFn) -> list[_Pair]:
    """Match slice ``z`` against its accepted predecessors, nearest first.

    ``history`` is oldest first, as kept by :class:`_Solver`. The nearest neighbour is matched
    from scratch; farther ones start from the prediction (slice z-k -> slice z) given by the
    nearest one that matched, so they skip the coarse levels. That makes each far match depend
    on already solved transforms, so the matches of one slice are issued in this order.
    """
    pairs: list[_Pair] = []
    predicted: np.ndarray | None = None  # A_z from the nearest neighbour that matched
    for k, (z_k, state_k, a_k) in enumerate(reversed(list(history)), start=1):
        init = None if predicted is None else compose(predicted, invert(a_k))
        m, corr = match(z_k, state_k, z, state, init)
        if m is None or len(corr) < 3:
            continue
        if predicted is None:
            predicted = compose(m, a_k)
        pairs.append(_Pair(k, a_k, m, corr))
    return pairs


def _residuals(a: np.ndarray, x: np.ndarray, q: np.ndarray) -> np.ndarray:
    return np.linalg.norm(x @ a[:, :2].T + a[:, 2] - q, axis=1)


def _solve_slice(pairs: list[_Pair], opts: AlignOptions
                 ) -> tuple[np.ndarray, float, int] | None:
    """Joint weighted least-squares fit of one slice's transform from its neighbours' matches.

    Every correspondence ``(p in slice z-k, q in slice z)`` is lifted to the output frame
    through ``A_{z-k}^-1``; the consensus candidate selects inliers, then the transform is
    refitted three times. Returns ``(A_z, rms_px, inliers)``, or None when the slice must be
    flagged (no pairs, or fewer than ``opts.min_matches`` consistent correspondences).
    """
    if not pairs:
        return None
    lifted_src, lifted_dst, weights, candidates = [], [], [], []
    for pair in pairs:
        # x = A_k^-1(p) is the output-frame position of correspondence (p, q).
        a_k_inv = invert(pair.a_ref)
        lifted_src.append(pair.corr.src @ a_k_inv[:, :2].T + a_k_inv[:, 2])
        lifted_dst.append(pair.corr.dst)
        weights.append(pair.corr.weights / pair.rank)
        candidates.append((len(pair.corr), compose(pair.matrix, pair.a_ref)))
    x = np.concatenate(lifted_src)
    q = np.concatenate(lifted_dst)
    w = np.concatenate(weights)
    # Consensus: the candidate transform that most correspondences agree with.
    best = max(candidates,
               key=lambda c: int(np.sum(_residuals(c[1], x, q) < opts.threshold)))[1]
    keep = _residuals(best, x, q) < 2.0 * opts.threshold
    a_z = None
    for _ in range(3):  # refit, re-select inliers
        if keep.sum() < max(3, opts.min_matches):
            break
        a_z = fit_transform(x[keep], q[keep], opts.model, weights=w[keep])
        if a_z is None:
            break
        keep = _residuals(a_z, x, q) < opts.threshold
    if a_z is None or keep.sum() < opts.min_matches:
        return None
    rms = float(np.sqrt(np.mean(_residuals(a_z, x[keep], q[keep]) ** 2)))
    return a_z, rms, int(keep.sum())


class _Solver:
    """Causal multi-neighbour solver: one call per slice, bounded state (K prepared slices).

    ``match`` defaults to the local back-end's ``match``; a distributed driver passes its own
    (remote, cached) function and opaque ``state`` handles instead of prepared slices. The
    pairwise part (:func:`_match_neighbours`) and the solve (:func:`_solve_slice`) are the same
    functions either way.
    """

    def __init__(self, opts: AlignOptions, match: MatchFn | None = None) -> None:
        self.opts = opts
        if match is None:
            self.backend = _make_backend(opts)
            backend = self.backend
            match = lambda _zr, ref, _zm, mov, init: backend.match(ref, mov, init)  # noqa: E731
        self._match = match
        self.history: deque[tuple[int, Any, np.ndarray]] = deque(maxlen=opts.neighbours)
        self.raw: list[np.ndarray] = []  # raw chained transforms, output -> slice
        self.flagged: list[int] = []
        self.residuals: list[float | None] = []
        self.matches: list[int] = []
        self.times = _StageTimes()

    def add(self, z: int, state: Any | None) -> np.ndarray:
        """Solve slice z (``state`` None = blank slice); returns its raw transform."""
        ident = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        if state is None:
            return self._flag(z, self.raw[-1] if self.raw else ident)
        if not self.history:  # first usable slice defines the frame
            first = ident if not self.raw else self.raw[-1]
            self._accept(z, state, first, None, 0)
            return first
        t0 = time.perf_counter()
        pairs = _match_neighbours(self.history, z, state, self._match)
        t0 = self.times.add("match", t0)
        fit = _solve_slice(pairs, self.opts)
        self.times.add("solve", t0)
        if fit is None:
            return self._flag(z, self.raw[-1])
        a_z, rms, n = fit
        self._accept(z, state, a_z, rms, n)
        return a_z

    def _accept(self, z: int, state: Any, a_z: np.ndarray, rms: float | None, n: int) -> None:
        self.history.append((z, state, a_z))
        self.raw.append(a_z)
        self.residuals.append(rms)
        self.matches.append(n)

    def _flag(self, z: int, a_z: np.ndarray) -> np.ndarray:
        self.flagged.append(z)
        self.raw.append(a_z)
        self.residuals.append(None)
        self.matches.append(0)
        return a_z


def _interpolate_flagged(affines: np.ndarray, flagged: list[int]) -> np.ndarray:
    """Linear interpolation of the parameters of flagged slices between good neighbours."""
    n = len(affines)
    good = np.setdiff1d(np.arange(n), flagged)
    if good.size == 0 or len(flagged) == 0:
        return affines
    out = affines.copy()
    flat = affines.reshape(n, 6)
    for j in range(6):
        out.reshape(n, 6)[flagged, j] = np.interp(flagged, good, flat[good, j])
    return out


def _local_linear_trend(values: np.ndarray, window: int, *, causal: bool) -> np.ndarray:
    """Trend of ``values`` (axis 0 = z) by a local linear fit over ``window`` slices.

    A straight-line fit, rather than a plain moving average, follows a steady ramp (the usual
    shape of accumulated drift) right up to the ends of the stack without bias. ``causal``
    uses only the current and past slices (streaming).
    """
    n = len(values)
    flat = values.reshape(n, -1)
    out = np.empty_like(flat)
    half = window // 2
    for z in range(n):
        lo, hi = (max(0, z - window + 1), z + 1) if causal else (max(0, z - half),
                                                                 min(n, z + half + 1))
        zs = np.arange(lo, hi, dtype=np.float64)
        seg = flat[lo:hi]
        if len(zs) < 3:
            out[z] = seg.mean(axis=0)
            continue
        zc = zs - zs.mean()
        slope = (zc[:, None] * (seg - seg.mean(axis=0))).sum(axis=0) / (zc**2).sum()
        out[z] = seg.mean(axis=0) + slope * (z - zs.mean())
    return out.reshape(values.shape)


def remove_drift(affines: np.ndarray, shape: tuple[int, int], mode: str, window: int,
                 *, causal: bool = False) -> np.ndarray:
    """Apply the drift model (see module docstring) to ``(n, 2, 3)`` output->input affines.

    The correction acts about the frame centre ``c``: the linear part ``L_z`` becomes
    ``L_z @ inv(trend(L)_z)`` while ``A_z(c)`` is kept (``mode="linear"``); ``mode="all"``
    also replaces the trend of ``A_z(c)`` by its value at the first slice.
    """
    if mode == "none" or len(affines) < 2:
        return affines
    c = np.array([(shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0])
    lin = affines[:, :, :2]
    centre = lin @ c + affines[:, :, 2]
    lin_trend = _local_linear_trend(lin, window, causal=causal)
    new_lin = lin @ np.linalg.inv(lin_trend)
    if mode == "all":
        trend = _local_linear_trend(centre, window, causal=causal)
        centre = centre - trend + trend[0]
    out = np.empty_like(affines)
    out[:, :, :2] = new_lin
    out[:, :, 2] = centre - new_lin @ c
    return out


def _canvas(affines: np.ndarray, in_shape: tuple[int, int], mode: str
            ) -> tuple[np.ndarray, tuple[int, int]]:
    """Re-gauge so slice 0 defines the frame; for "union", grow the canvas to fit all slices."""
    a0_inv = invert(affines[0])
    gauged = np.stack([compose(a, a0_inv) for a in affines])
    h, w = in_shape
    if mode == "reference":
        return gauged, (h, w)
    corners = np.array([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]], np.float64)
    pts = []
    for a in gauged:
        inv = invert(a)
        pts.append(corners @ inv[:, :2].T + inv[:, 2])
    allp = np.concatenate(pts)
    lo = np.floor(allp.min(axis=0))
    hi = np.ceil(allp.max(axis=0))
    shift = np.array([[1.0, 0.0, lo[0]], [0.0, 1.0, lo[1]]])
    return np.stack([compose(a, shift) for a in gauged]), (int(hi[1] - lo[1] + 1),
                                                           int(hi[0] - lo[0] + 1))


# --------------------------------------------------------------------------------------------
# Stage overlap
# --------------------------------------------------------------------------------------------


def _prefetch(fn: Callable[[T], R], items: Iterable[T], pool: ThreadPoolExecutor,
              depth: int) -> Iterator[R]:
    """``map(fn, items)`` computed up to ``depth`` items ahead on ``pool``, in order."""
    pending: deque[Future[R]] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) > depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


class _StageTimes:
    """Seconds spent per stage, summed over the threads that ran it (stages overlap, so the
    sum can exceed the wall time; the wall time is reported separately as ``total``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds: dict[str, float] = {}

    def add(self, stage: str, t0: float) -> float:
        now = time.perf_counter()
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + now - t0
        return now


def _peak_memory_mb() -> float | None:
    """Peak resident memory of this process (Linux ``VmHWM``), None where unavailable."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


class _Progress:
    """A one-line progress indicator on stderr, silent when stderr is not a terminal."""

    def __init__(self, total: int | None, label: str, enabled: bool | None = None) -> None:
        self.total, self.label = total, label
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.t0 = time.perf_counter()
        self.done = 0

    def step(self) -> None:
        self.done += 1
        if not self.enabled:
            return
        rate = self.done / max(1e-9, time.perf_counter() - self.t0)
        tot = f"/{self.total}" if self.total else ""
        sys.stderr.write(f"\r{self.label}: {self.done}{tot} slices ({rate:.1f}/s)")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _fields_path(path: str | os.PathLike[str]) -> Path:
    """The field store of a transforms file (``*.json``) or of an output's default transforms
    file (names: :mod:`deepalign_fast.outputs`)."""
    from .outputs import fields_path_for, transforms_path_for

    p = Path(path)
    return fields_path_for(p if p.name.endswith(".json") else transforms_path_for(p))


class Aligner:
    """Align volume-EM stacks; see :class:`AlignOptions` for the options.

    Examples
    --------
    >>> aligner = Aligner(model="rigid")                       # doctest: +SKIP
    >>> result = aligner.align_stack("stack.tif", "aligned.tif")  # doctest: +SKIP
    >>> for aligned in aligner.stream(microscope_slices()):      # doctest: +SKIP
    ...     save(aligned)
    """

    def __init__(self, options: AlignOptions | None = None, **kwargs: Any) -> None:
        if options is not None and kwargs:
            raise TypeError("pass either an AlignOptions or keyword options, not both")
        self.options = options or AlignOptions(**kwargs)

    # -- estimation -----------------------------------------------------------------------
    def estimate(self, stack: Any, *, progress: bool | None = None) -> AlignResult:
        """Estimate the per-slice transforms of ``stack`` (path, array or stack reader)."""
        from .io import as_reader

        opts = self.options
        t_start = time.perf_counter()
        with as_reader(stack) as reader:
            n, h, w = reader.shape
            if n < 1:
                raise DeepAlignError(f"{reader.path}: the stack has no slices")
            solver = _Solver(opts)
            bar = _Progress(n, "estimate", progress)

            times = solver.times

            def load(z: int) -> tuple[int, Any]:
                t0 = time.perf_counter()
                img = reader.read(z)
                t0 = times.add("read", t0)
                state = None if _is_blank(img) else solver.backend.prepare(img)
                times.add("features", t0)
                return z, state

            t_prep0 = time.perf_counter()
            with ThreadPoolExecutor(max_workers=2) as pool:
                for z, state in _prefetch(load, range(n), pool, depth=2):
                    solver.add(z, state)
                    bar.step()
            bar.close()
            t_est = time.perf_counter() - t_prep0
        ts = self._transform_set(solver, (n, h, w))
        timings = {**solver.times.seconds, "estimate": t_est,
                   "total": time.perf_counter() - t_start}
        return AlignResult(ts, list(solver.matches), timings)

    def _transform_set(self, solver: _Solver, shape: tuple[int, int, int]) -> TransformSet:
        """Flagged-slice interpolation, drift model and canvas over a finished solve."""
        n, h, w = shape
        affines = self._finish(np.stack(solver.raw), solver.flagged, (h, w), causal=False)
        affines, out_shape = _canvas(affines, (h, w), self.options.canvas)
        return TransformSet(affines, (n, h, w), out_shape, list(solver.flagged),
                            list(solver.residuals), asdict(self.options))

    def _finish(self, raw: np.ndarray, flagged: list[int], shape: tuple[int, int],
                *, causal: bool) -> np.ndarray:
        affines = _interpolate_flagged(raw, flagged)
        return remove_drift(affines, shape, self.options.drift, self.options.drift_window,
                            causal=causal)

    # -- rendering ------------------------------------------------------------------------
    def render(self, stack: Any, transforms: TransformSet, output: str | os.PathLike[str], *,
               interpolation: str = "linear", progress: bool | None = None,
               writer_options: dict[str, Any] | None = None,
               fields_path: str | os.PathLike[str] | None = None,
               before_publish: Callable[[], None] | None = None) -> dict[str, float]:
        """Warp every slice of ``stack`` once with ``transforms`` and write ``output``.

        Transforms that carry displacement fields are applied with them. With
        ``mode="elastic"`` the fields are computed here, kept in ``transforms.fields`` and
        written to ``fields_path`` (default: next to ``output``); a slice whose flow is not
        finite keeps its affine and is added to ``transforms.flagged``. The output (and the
        field store) appear only when complete; ``before_publish`` runs just before the
        output is renamed into place (``align_stack`` writes the transforms file there).
        ``writer_options={"resume": True}`` continues an unfinished Zarr output, skipping
        its finished slices. Returns the seconds spent reading, rendering and writing (summed
        over threads).
        """
        from .io import as_reader, check_distinct, open_writer, reader_path

        with as_reader(stack) as reader:
            if len(reader) != len(transforms):
                raise DeepAlignError(
                    f"{reader.path}: {len(reader)} slices but the transforms have "
                    f"{len(transforms)}")
            if tuple(reader.shape[1:]) != tuple(transforms.input_shape[1:]):
                ty, tx = transforms.input_shape[1:]
                raise DeepAlignError(
                    f"{reader.path}: slices are {reader.shape[1]} x {reader.shape[2]} (y, x), but "
                    f"the transforms were made for {ty} x {tx}; use the matching stack, or "
                    "--scale (API: TransformSet.rescaled) for a binned or finer copy")
            source = reader_path(reader)
            if source is not None:
                check_distinct(source, output)
            h, w = transforms.output_shape
            from .io import check_slice_size

            check_slice_size(output, (h, w), reader.dtype)
            bar = _Progress(len(reader), "render", progress)
            threads = self.options.num_threads
            fields_out = _fields_path(output) if fields_path is None else Path(fields_path)

            times = _StageTimes()
            refine: Any = None
            store: FieldStore | None = None
            if self.options.mode == "elastic":
                from .elastic import ElasticRefiner

                store = FieldStore.create(fields_out, len(reader), (h, w),
                                          stride=self.options.field_stride)
                refine = ElasticRefiner((h, w), store=store, provider=self.options.provider,
                                        num_threads=threads,
                                        max_folding=self.options.max_folding)
            elif self.options.mode == "expected-affine":
                from .expected_affine import StackRefiner
                refine = StackRefiner(self.options.masks, (h, w), num_slices=len(reader),
                                      num_threads=threads)

            def warp(z: int) -> np.ndarray:
                t0 = time.perf_counter()
                image = reader.read(z)
                t0 = times.add("read", t0)
                field = None if transforms.fields is None or refine is not None else \
                    transforms.fields.get(z, num_threads=threads)
                if refine is not None:
                    out = refine(z, image, transforms.affines[z])
                elif field is not None:
                    out = warp_displacement(image, field, affine=transforms.affines[z],
                                            interpolation=interpolation, num_threads=threads)
                else:
                    out = warp_affine(image, transforms.affines[z], (h, w),
                                      interpolation=interpolation, num_threads=threads)
                times.add("render", t0)
                return out

            def publish() -> None:
                if store is not None:
                    store.commit(fields_out)
                    transforms.fields = store
                    transforms.folding = list(refine.folding)
                    transforms.flagged = sorted(set(transforms.flagged) | set(refine.failed))
                if before_publish is not None:
                    before_publish()

            with open_writer(output, (len(reader), h, w), reader.dtype,
                             **(writer_options or {})) as writer, \
                    ThreadPoolExecutor(max_workers=2) as pool:
                done = writer.completed() if hasattr(writer, "completed") else set()
                todo = [z for z in range(len(reader)) if z not in done]
                for z, aligned in zip(todo, _prefetch(warp, todo, pool, depth=2), strict=True):
                    t0 = time.perf_counter()
                    writer.write(z, aligned)
                    times.add("write", t0)
                    bar.step()
                writer.close(before_publish=publish)
            bar.close()
        return times.seconds

    def align_stack(self, stack: Any, output: str | os.PathLike[str], *,
                    transforms_path: str | os.PathLike[str] | None = None,
                    progress: bool | None = None, overwrite: bool = False) -> AlignResult:
        """Estimate, then render ``stack`` into ``output`` (TIFF or OME-Zarr by suffix).

        The output and the transforms file are published together once both are complete
        (the transforms file just before the output is renamed into place); an exclusive lock
        keeps a second run off the same output. For a file or folder input the finished
        estimation is checkpointed beside the output: rerunning the same call after a kill or
        a failure while rendering skips the estimation and, for Zarr in ``mode="affine"``,
        renders only the slices not yet written. ``overwrite`` replaces existing outputs
        (once the new ones are complete) and discards an unfinished one from another run.
        """
        from .io import as_reader, reader_path
        from .outputs import Checkpoint, output_lock

        t0 = time.perf_counter()
        out = Path(output)
        is_zarr = out.suffix.lower() == ".zarr"
        locked = [out] + ([Path(transforms_path)] if transforms_path is not None else [])
        with output_lock(locked), as_reader(stack) as reader:
            if transforms_path is not None and Path(transforms_path).exists() and not overwrite:
                raise DeepAlignError(f"{transforms_path}: transforms file already exists; pass "
                                     "--overwrite (API: overwrite=True) or choose another name.")
            if out.exists() and not overwrite:
                raise DeepAlignError(f"{out}: output already exists; pass --overwrite (API: "
                                     "overwrite=True) or choose another name.")
            ckpt = Checkpoint.for_run(reader_path(reader), out, reader.shape,
                                      asdict(self.options))
            saved = ckpt.load() if ckpt is not None else None
            if saved is not None and ckpt is not None:
                ts = TransformSet.from_json(saved["transforms"], source=str(ckpt.path))
                result = AlignResult(ts, [int(m) for m in saved["matches"]],
                                     {str(k): float(v) for k, v in saved["timings"].items()})
            else:
                result = self.estimate(reader, progress=progress)
                if ckpt is not None:
                    ckpt.save(result.transforms.to_json(), list(result.matches),
                              dict(result.timings))
            writer_options: dict[str, Any] = {"overwrite": overwrite}
            if is_zarr:
                resume = saved is not None and self.options.mode == "affine"
                writer_options.update(resume=resume, restart=saved is not None)
            fields_path = None
            if self.options.mode == "elastic":
                fields_path = _fields_path(transforms_path if transforms_path is not None
                                           else output)

            def publish() -> None:
                if transforms_path is not None:
                    result.transforms.save(transforms_path)

            stages = self.render(reader, result.transforms, output, progress=progress,
                                 fields_path=fields_path, writer_options=writer_options,
                                 before_publish=publish)
            if ckpt is not None:
                ckpt.remove()
        for stage, seconds in stages.items():
            result.timings[stage] = result.timings.get(stage, 0.0) + seconds
        result.timings["total"] = time.perf_counter() - t0
        return result

    # -- streaming ------------------------------------------------------------------------
    def stream(self, slices: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """Align slices as they arrive; yields each aligned slice as soon as it is solved.

        Memory stays flat: only the last ``neighbours`` prepared slices and the transforms are
        kept. The drift model runs causally (trend over the past ``drift_window`` slices), and
        the frame is that of the first slice (``canvas="reference"``), so results can differ
        slightly from :meth:`align_stack`, which sees the whole stack. Blank slices are
        flagged (see :attr:`flagged`) and rendered with their predecessor's transform.
        """
        opts = self.options
        solver = _Solver(opts)
        self.flagged = solver.flagged
        self.transforms: list[np.ndarray] = []
        window: deque[np.ndarray] = deque(maxlen=opts.drift_window)
        a0_inv: np.ndarray | None = None
        shape: tuple[int, int] | None = None
        dtype = None
        for z, image in enumerate(slices):
            image = np.asarray(image)
            if shape is None:
                shape, dtype = image.shape[:2], image.dtype
            elif image.shape != shape or image.dtype != dtype:
                raise DeepAlignError(f"stream slice {z}: shape {image.shape} {image.dtype} "
                                     f"differs from the first slice's {shape} {dtype}")
            raw = solver.add(z, None if _is_blank(image) else solver.backend.prepare(image))
            window.append(raw)
            hist = np.stack(window)
            a = remove_drift(hist, shape, opts.drift, opts.drift_window, causal=True)[-1]
            if a0_inv is None:
                a0_inv = invert(a)
            a = compose(a, a0_inv)
            self.transforms.append(a)
            yield warp_affine(image, a, shape, num_threads=opts.num_threads)
