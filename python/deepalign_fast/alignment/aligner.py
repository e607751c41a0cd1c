"""Stack alignment: match every slice with several neighbours, solve all transforms at once,
then render every slice once.

Data flow (each stage overlaps the next through small bounded queues, so memory does not grow
with the stack depth)::

    read slice z -> prepare (features / pyramids) -> match with slices z-1, z-2, z-4, ...
      -> pair moments -> one global robust solve (deepalign_fast.alignment.solve) -> render -> write

**Matching.** Slice z is matched with its predecessors at the ranks in ``offsets`` (1, 2, 4,
8 by default; rank 1 is the nearest slice that is not blank). The nearest pair is matched
from scratch (coarse to fine); farther pairs start from the prediction given by the chain of
nearest-pair estimates and are refined at the finest level only (from scratch as well after
a nearest pair with few correspondences: a partly blank, damaged or inverted slice). Each
pair contributes its correspondences, summarised as moments, to the solve; together the
offsets tie every slice to neighbours on both sides.

**Solve.** :func:`deepalign_fast.alignment.solve.solve_stack`: one weighted least-squares
problem over all pairs with a robust (IRLS) pair weighting, a per-slice prior toward a rigid
map, the gauge fixed by the mean of all slices, and an explicit choice for slow motion
(``slow_drift``): by default the input's slow motion is kept, because slow stage drift and
the apparent motion of oblique anatomy cannot be told apart (see the module's docstring).

**Failed slices.** A blank slice, one without trusted matches, or one with too few pairs
that agree with the solve is flagged and reported, and gets a transform interpolated from its
neighbours unless its own estimate is an ordinary move for this stack
(:func:`~deepalign_fast.alignment.solve.place_flagged`); later slices match against the last
good ones, so the run never stops.

See :mod:`deepalign_fast.transforms` for the transform convention.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from .._errors import DeepAlignError
from ..geometry import compose, invert
from ..progress import Progress, StageTimes
from ..refine import Neighbours, Refiner, make_refiner
from ..render import SliceMap, render_slice
from ..transforms import TransformSet, outside_slices
from .matcher import StackMatcher, is_blank
from .options import AlignOptions
from .solve import (
    FLAG_REASONS,
    MOTION_KEYS,
    PRIOR_KEYS,
    STEEP_SHIFT_MAX,
    PairMoments,
    SolveResult,
    excess_slope,
    solve_stack,
)

__all__ = ["AlignResult", "AlignStream", "Aligner", "SideOutput", "measured_record",
           "result_of_checkpoint"]

T = TypeVar("T")
R = TypeVar("R")

#: Seconds between saves of the estimation checkpoint (``Aligner.estimate(checkpoint=...)``).
CHECKPOINT_SECONDS = 5.0


@dataclass
class AlignResult:
    """What :meth:`Aligner.estimate` found, with a summary of the run."""

    transforms: TransformSet
    matches: list[int]
    timings: dict[str, float] = field(default_factory=dict)
    neighbour_score: float | None = None  # StackMatcher.neighbour_score (None: not measured)
    motion: dict[str, float] | None = None  # SolveResult.motion (None: not measured)
    # Whether neighbour_score has the noise discounted (StackMatcher.noise_discounted), not
    # the raw fallback (None: not known).
    noise_discounted: bool | None = None
    outliers: list[int] = field(default_factory=list)  # SolveResult.outliers
    prior_spread: dict[str, float] | None = None  # SolveResult.prior_spread
    # Why each flagged slice was flagged (keys of solve.FLAG_REASONS; SolveResult.flag_reasons
    # and the refinement's failures).
    flag_reasons: dict[int, str] = field(default_factory=dict)
    # Slices whose matching an interrupted run had done and this run reused (its checkpoint):
    # 0 for a run from scratch; all of them where the whole estimation was reused.
    resumed: int = 0
    # expected-affine with masks: the slices whose mask marks damage (None: no masks given)
    damaged: list[int] | None = None

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
            # (a checkpoint of an older version kept no reasons: "unknown")
            "flag_reasons": {str(z): self.flag_reasons.get(z, "unknown") for z in self.flagged},
            "residual_median_px": float(np.median(res)) if res else None,
            "residual_max_px": float(np.max(res)) if res else None,
            "matches_median": float(np.median(self.matches)) if self.matches else 0.0,
            # what a pair needs to be trusted (AlignOptions.min_matches; None: not recorded)
            "matches_needed": self.transforms.options.get("min_matches"),
            "neighbour_correlation": self.neighbour_score,
            "neighbour_noise_discounted": self.noise_discounted,
            "stage_motion": self.motion,
            "outliers": list(self.outliers),
            # slices whose map samples nothing of their input: empty in the output (a strong
            # drift followed on the reference canvas)
            "outside": outside_slices(self.transforms),
            # refined runs: why a slice kept its affine, or was refined in part
            "refine_notes": {str(z): t for z, t in sorted(self.transforms.notes.items())},
            "per_slice_affine_pct": self.prior_spread,
            "time_s": total,
            "resumed_slices": self.resumed,
            "damaged_slices": self.damaged,
            # (a resumed run did part of the work before: no rate of this run's)
            "slices_per_s": n / total if total > 0 and not self.resumed else None,
            "timings_s": dict(self.timings),
            "peak_memory_mb": _peak_memory_mb(),
        }


#: A file made from the result once the output is in place, as part of the run
#: (:meth:`Aligner.align_stack`): its path and the function that writes it.
SideOutput = tuple[str | os.PathLike[str], Callable[[AlignResult], None]]


# --------------------------------------------------------------------------------------------
# Estimation
# --------------------------------------------------------------------------------------------


def _canvas(affines: np.ndarray, in_shape: tuple[int, int], mode: str
            ) -> tuple[np.ndarray, tuple[int, int]]:
    """Output frame: the input's shape ("reference") or the bounding box of all slices."""
    h, w = in_shape
    if mode == "reference":
        return affines, (h, w)
    corners = np.array([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]], np.float64)
    pts = []
    for a in affines:
        inv = invert(a)
        pts.append(corners @ inv[:, :2].T + inv[:, 2])
    allp = np.concatenate(pts)
    lo = np.floor(allp.min(axis=0))
    hi = np.ceil(allp.max(axis=0))
    shift = np.array([[1.0, 0.0, lo[0]], [0.0, 1.0, lo[1]]])
    return np.stack([compose(a, shift) for a in affines]), (int(hi[1] - lo[1] + 1),
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


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _fields_path(path: str | os.PathLike[str]) -> Path:
    """The field store of a transforms file (``*.json``) or of an output's default transforms
    file (names: :mod:`deepalign_fast.outputs`)."""
    from ..outputs import fields_path_for, transforms_path_for

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
    def estimate(self, stack: Any, *, progress: bool | None = None,
                 checkpoint: Any = None) -> AlignResult:
        """Estimate the per-slice transforms of ``stack`` (path, array or stack reader).

        ``checkpoint`` (an :class:`deepalign_fast.outputs.Checkpoint`, as ``align_stack``
        passes) saves the pairwise matches every few seconds and continues from them when
        it finds a state of the same run: a killed estimation restarts where it stopped, with
        the same result as an uninterrupted one.
        """
        from ..io import as_reader

        opts = self.options
        t_start = time.perf_counter()
        with as_reader(stack) as reader:
            n, h, w = reader.shape
            if n < 1:
                raise DeepAlignError(f"{reader.path}: the stack has no slices")
            if h < 1 or w < 1:
                raise DeepAlignError(f"{reader.path}: its slices are {h} x {w} pixels: empty")
            matcher = StackMatcher(opts, shape=(h, w))
            bar = Progress(n, "estimate", progress)
            times = matcher.times

            def load(z: int) -> tuple[int, Any]:
                t0 = time.perf_counter()
                img = reader.read(z)
                t0 = times.add("read", t0)
                state = None if is_blank(img) else matcher.backend.prepare(img)
                times.add("features", t0)
                return z, state

            start = 0
            saved = checkpoint.load_matches() if checkpoint is not None else None
            if saved is not None:
                start = matcher.restore(saved, lambda z: load(z)[1])
                bar.resume_at(start)
            t_prep0 = time.perf_counter()
            last_save = time.perf_counter()
            with ThreadPoolExecutor(max_workers=2) as pool:
                for z, state in _prefetch(load, range(start, n), pool, depth=2):
                    matcher.add(z, state)
                    bar.step()
                    if checkpoint is not None and \
                            time.perf_counter() - last_save > CHECKPOINT_SECONDS:
                        checkpoint.save_matches(matcher.state())
                        last_save = time.perf_counter()
            bar.close()
            t_est = time.perf_counter() - t_prep0
        solved = self._solve(matcher, (n, h, w))
        ts = self._transform_set(solved, (n, h, w))
        timings = {**matcher.times.seconds, "estimate": t_est,
                   "total": time.perf_counter() - t_start}
        return AlignResult(ts, list(matcher.matches), timings, matcher.neighbour_score(),
                           solved.motion, matcher.noise_discounted(), list(solved.outliers),
                           solved.prior_spread, dict(solved.flag_reasons), resumed=start)

    def transform_set(self, matcher: StackMatcher, shape: tuple[int, int, int]
                      ) -> TransformSet:
        """The global solve and the canvas over a finished :class:`StackMatcher`."""
        return self.solve(matcher, shape)[0]

    def solve(self, matcher: StackMatcher, shape: tuple[int, int, int]
              ) -> tuple[TransformSet, SolveResult]:
        """:meth:`transform_set` and the solve's own result (``motion``: what it measured)."""
        solved = self._solve(matcher, shape)
        return self._transform_set(solved, shape), solved

    def _solve(self, matcher: StackMatcher, shape: tuple[int, int, int]) -> SolveResult:
        n, h, w = shape
        opts = self.options
        t0 = time.perf_counter()
        solved = solve_stack(n, matcher.pairs, (h, w), model=opts.model,
                             regularise=opts.regularise, slow_drift=opts.slow_drift,
                             drift_sigma=opts.drift_sigma, blank=matcher.blank,
                             failed=matcher.failed,
                             neighbour_score=matcher.neighbour_score(),
                             spacing=matcher.slice_spacing())
        matcher.times.add("solve", t0)
        return solved

    def _transform_set(self, solved: SolveResult, shape: tuple[int, int, int]) -> TransformSet:
        n, h, w = shape
        opts = self.options
        flagged = solved.flagged  # the matcher's failed slices included (solve_stack(failed=))
        residuals = [None if z in flagged else r for z, r in enumerate(solved.residuals)]
        affines, out_shape = _canvas(solved.affines, (h, w), opts.canvas)
        return TransformSet(affines, (n, h, w), out_shape, flagged, residuals, asdict(opts),
                            flag_reasons=dict(solved.flag_reasons))

    # -- rendering ------------------------------------------------------------------------
    def render(self, stack: Any, transforms: TransformSet, output: str | os.PathLike[str], *,
               interpolation: str = "linear", progress: bool | None = None,
               writer_options: dict[str, Any] | None = None,
               fields_path: str | os.PathLike[str] | None = None,
               before_publish: Callable[[TransformSet], None] | None = None,
               check: Callable[[], None] | None = None
               ) -> tuple[TransformSet, dict[str, float]]:
        """Warp every slice of ``stack`` once and write ``output``.

        Each slice is rendered with its :class:`~deepalign_fast.render.SliceMap` by
        :func:`~deepalign_fast.render.render_slice`: the maps of ``transforms`` (with their
        fields, if any), or, with ``mode="elastic"`` / ``"expected-affine"``, the maps the
        refiner computes here from the affines of ``transforms``; its fields are written to
        ``fields_path`` (default: next to ``output``) and a slice it could not refine keeps
        its affine (flagged if the refinement failed). The output (and the field store)
        appear only when complete; ``before_publish(new_transforms)`` runs just before the
        output is renamed into place (``align_stack`` writes the transforms file there);
        ``check()`` runs before anything is put in place, the field store included (a raise
        stops the render: the input changed).
        ``writer_options={"resume": True}`` continues an unfinished Zarr output, skipping
        its finished slices.

        Returns the transforms of the output (a new :class:`TransformSet`; ``transforms`` is
        not changed) and the seconds spent reading, rendering and writing (summed over
        threads).
        """
        from ..io import (
            as_reader,
            check_distinct,
            is_zarr_output,
            open_writer,
            reader_path,
            voxel_size_of,
        )

        # Labels (nearest, no refinement) keep their integer type, whatever its width.
        labels = interpolation == "nearest" and self.options.mode == "affine"
        with as_reader(stack, labels=labels) as reader:
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
            from ..io import check_slice_size

            check_slice_size(output, (h, w), reader.dtype)
            bar = Progress(len(reader), "render", progress)
            threads = self.options.num_threads
            fields_out = _fields_path(output) if fields_path is None else Path(fields_path)

            times = StageTimes()
            opts = self.options
            new = replace(transforms)
            # a flagged slice is not a neighbour the others are refined toward (each refiner
            # decides whether to refine it)
            flagged = set(transforms.flagged)
            neighbours = Neighbours(
                usable=lambda k: 0 <= k < len(reader) and k not in flagged,
                read=lambda k: (reader.read(k), transforms.affines[k]))

            def warp(z: int) -> np.ndarray:
                t0 = time.perf_counter()
                image = reader.read(z)
                t0 = times.add("read", t0)
                if refine is not None:
                    _, out = refine(z, image, transforms.affines[z], neighbours,
                                    flagged=z in flagged)
                else:
                    out = render_slice(image, transforms.slice_map(z, num_threads=threads),
                                       (h, w), interpolation=interpolation,
                                       num_threads=threads)
                times.add("render", t0)
                return out

            def publish() -> None:
                nonlocal new
                if check is not None:
                    check()
                if store is not None and refine is not None:
                    store.commit(fields_out)
                    new = replace(transforms, fields=store,
                                  folding=list(getattr(refine, "folding", [])),
                                  flagged=sorted(set(transforms.flagged) | set(refine.failed)),
                                  notes=dict(refine.notes),
                                  flag_reasons={**{z: "unrefined" for z in refine.failed},
                                                **transforms.flag_reasons})
                if "voxel_size" in options_w:  # as the output records it
                    vz, vy, vx = (float(v) for v in options_w["voxel_size"])
                    new = replace(new, voxel_size=(vz, vy, vx), unit=options_w.get("unit"))
                if before_publish is not None:
                    before_publish(new)

            options_w = dict(writer_options or {})
            physical = voxel_size_of(reader)
            if physical is not None and "voxel_size" not in options_w:
                # The output keeps the input's voxel size and unit (Fiji, napari, neuroglancer)
                options_w.update(voxel_size=physical[0], unit=physical[1])
            if is_zarr_output(output):  # labels: the pyramid never blends
                options_w.setdefault("downsample",
                                     "nearest" if interpolation == "nearest" else "mean")
            refine, store = make_refiner(
                opts.mode, (h, w), num_slices=len(reader), fields_path=fields_out,
                masks=opts.masks, features=opts.refine_features, provider=opts.provider,
                num_threads=threads,
                max_folding=opts.max_folding, field_stride=opts.field_stride)
            with contextlib.ExitStack() as cleanup:
                if refine is not None:
                    cleanup.callback(refine.close)
                writer = cleanup.enter_context(open_writer(output, (len(reader), h, w),
                                                           reader.dtype, **options_w))
                pool = cleanup.enter_context(ThreadPoolExecutor(max_workers=2))
                # A refined render starts again at slice 0 (each slice's refinement takes
                # over its predecessor's work on their pair, and the field store is new).
                done = writer.completed() if hasattr(writer, "completed") and refine is None \
                    else set()
                todo = [z for z in range(len(reader)) if z not in done]
                for z, aligned in zip(todo, _prefetch(warp, todo, pool, depth=2), strict=True):
                    t0 = time.perf_counter()
                    writer.write(z, aligned)
                    times.add("write", t0)
                    bar.step()
                writer.close(before_publish=publish)
            bar.close()
        return new, times.seconds

    def align_stack(self, stack: Any, output: str | os.PathLike[str], *,
                    transforms_path: str | os.PathLike[str] | None = None,
                    progress: bool | None = None, overwrite: bool = False,
                    voxel_size: tuple[float, float, float] | None = None,
                    unit: str | None = None, compression: str | None = None,
                    side_outputs: Sequence[SideOutput] = ()) -> AlignResult:
        """Estimate, then render ``stack`` into ``output`` (TIFF or OME-Zarr by suffix).

        ``voxel_size`` ``(z, y, x)`` and ``unit`` override the physical size the output
        records (default: the input's, when its file states one). ``compression`` ("zlib",
        "zstd", "none") applies to TIFF output (OME-Zarr chunks are always compressed).

        The output and the transforms file are published together once both are complete
        (the transforms file just before the output is renamed into place); an exclusive lock
        keeps a second run off the same output. ``side_outputs``: files made from the result
        once the output is in place, as part of the run (the CLI's QC report): each
        ``(path, write)`` is written by ``write(result)``, which puts ``path`` in place with
        :func:`deepalign_fast.outputs.publish` (as ``write_atomic`` does).

        For a file or folder input the finished estimation is checkpointed beside the output:
        rerunning the same call after a kill or a failure while rendering skips the estimation
        and, for Zarr in ``mode="affine"``, renders only the slices not yet written. The
        checkpoint also records the outputs this run has put in place, so a rerun after a kill
        while publishing or writing a side output accepts those (without ``overwrite``) and
        writes only the missing ones; the checkpoint is removed once all are in place.
        ``overwrite`` replaces existing outputs (once the new ones are complete) and discards
        an unfinished one from another run.
        """
        from ..io import (
            StackReader,
            as_reader,
            check_unfinished,
            finish_store,
            reader_path,
        )
        from ..outputs import FIELDS_LEFT, Checkpoint, OutputPlan, output_lock, partial_path_for

        t0 = time.perf_counter()
        out = Path(output)
        is_zarr = out.suffix.lower() == ".zarr"
        tpath = Path(transforms_path) if transforms_path is not None else None
        fields_path = None
        if self.options.mode != "affine":  # the refinement's fields, beside the transforms
            fields_path = _fields_path(tpath if tpath is not None else output)
        published = [p for p in (fields_path, tpath, out) if p is not None]  # in this order
        extra = [(Path(path), write) for path, write in side_outputs]
        locked = [out] + ([tpath] if tpath is not None else []) + [p for p, _ in extra]
        # Every path this call writes, checked before any work (as the CLI does): none is or
        # lies inside an input, none collides with another, none exists unless overwritten.
        plan = OutputPlan(overwrite=overwrite, overwrite_flag="overwrite=True", resumes=out)
        source = reader_path(stack) if isinstance(stack, StackReader) else stack
        if isinstance(source, (str, os.PathLike)):
            plan.input(source, "stack")
        plan.input(self.options.masks, "masks")
        plan.output(out, "output", folder=is_zarr, store=is_zarr)
        plan.output(tpath, "transforms_path")
        if fields_path is not None:
            plan.output(fields_path, "field store", folder=True, store=True)
            plan.output(partial_path_for(fields_path), "unfinished field store", folder=True,
                        may_exist=True, store=True)
        elif tpath is not None:
            plan.leftover(_fields_path(tpath), FIELDS_LEFT)
        if is_zarr:
            plan.output(partial_path_for(out), "unfinished output", folder=True,
                        may_exist=True, store=True)
        for path, _ in extra:
            plan.output(path, "side output")
        plan.check()
        stages: dict[str, float] = {}
        _check_models(self.options)
        with plan.prepared(), output_lock(locked), as_reader(stack) as reader:
            plan.check()  # again under the lock: a run that just finished may have published
            damaged = None
            if self.options.mode == "expected-affine" and self.options.masks is not None:
                from ..refine.expected_affine import check_masks

                damaged = check_masks(self.options.masks, reader.shape)  # before any work
            ckpt = Checkpoint.for_run(
                reader_path(reader), out, reader.shape, asdict(self.options),
                {"voxel_size": None if voxel_size is None else [float(v) for v in voxel_size],
                 "unit": unit, "compression": compression}, data=reader.data_paths())
            saved = ckpt.load() if ckpt is not None else None
            resumed: AlignResult | None = None
            if saved is not None and ckpt is not None:
                try:  # a record this run cannot use: start over only when told to
                    resumed = result_of_checkpoint(saved, str(ckpt.path))
                except DeepAlignError as exc:
                    if not overwrite:
                        raise DeepAlignError(
                            f"{exc}; this resume record of an interrupted run is damaged: "
                            "pass --overwrite (API: overwrite=True) to start the run over"
                        ) from exc
                    saved = None
            done = ckpt.committed() if ckpt is not None and saved is not None else set()

            def is_done(p: Path) -> bool:
                return Path(os.path.abspath(p)) in done

            for p, what in ((tpath, "transforms file"), (out, "output"),
                            (fields_path, "field store"), *((p, "output") for p, _ in extra)):
                if p is not None and os.path.lexists(p) and not overwrite and not is_done(p):
                    raise DeepAlignError(f"{p}: {what} already exists; pass --overwrite (API: "
                                         "overwrite=True) or choose another name.")
            if is_done(out) and not all(is_done(p) for p in published):
                if overwrite:  # a fresh run: the interrupted run's outputs are all replaced
                    done = set()
                    if ckpt is not None:  # ... and no longer count as this run's
                        ckpt.forget_outputs()
                else:
                    missing = next(p for p in published if not is_done(p))
                    state = ("has changed since" if os.path.lexists(missing)
                             else "is no longer there")
                    raise DeepAlignError(
                        f"{out}: was put in place by an interrupted run, but {missing} {state}; "
                        "pass --overwrite (API: overwrite=True) to start the run over.")
            # An unfinished Zarr output continues only the run that wrote it: another run's
            # (other input or options) is refused here, before any work, not discarded.
            run = None if ckpt is None else ckpt.digest()
            left = check_unfinished(out, run, overwrite=overwrite) \
                if is_zarr and not is_done(out) else None
            if is_zarr and is_done(out):  # put in place by this run, killed just after
                finish_store(out)
            if ckpt is not None:
                ckpt.outputs = [*published, *(p for p, _ in extra)]
            if resumed is not None and saved is not None and ckpt is not None:
                result = resumed
                result.resumed = len(result.transforms)
                if is_done(out):  # published: the transforms as written
                    _published(result, saved, tpath, ckpt.path)
            else:
                result = self.estimate(reader, progress=progress, checkpoint=ckpt)
                if ckpt is not None:
                    ckpt.save(result.transforms.to_json(), list(result.matches),
                              dict(result.timings),
                              measured=measured_record(result))
            if not is_done(out):
                writer_options: dict[str, Any] = {"overwrite": overwrite}
                if voxel_size is not None:
                    writer_options.update(voxel_size=tuple(float(v) for v in voxel_size),
                                          unit=unit or "pixel")
                if compression is not None:
                    writer_options["compression"] = compression
                if is_zarr:  # this run's unfinished store: continued, or (refined) redone
                    ours = run is not None and left == run
                    writer_options.update(resume=ours and self.options.mode == "affine",
                                          restart=ours, run=run)

                def publish(rendered: TransformSet) -> None:
                    if ckpt is not None and fields_path is not None:  # refined: noted
                        ckpt.rendered(rendered.to_json(ckpt.path.parent))
                    if tpath is not None:
                        rendered.save(tpath)

                with ckpt.recording() if ckpt is not None else contextlib.nullcontext():
                    rendered, stages = self.render(
                        reader, result.transforms, output, progress=progress,
                        fields_path=fields_path, writer_options=writer_options,
                        before_publish=publish,
                        check=None if ckpt is None else ckpt.check_input)
                _unrefined(result, rendered)
            with ckpt.recording() if ckpt is not None else contextlib.nullcontext():
                for path, write in extra:
                    if not is_done(path):
                        write(result)
            if ckpt is not None:
                ckpt.remove()
        for stage, seconds in stages.items():
            result.timings[stage] = result.timings.get(stage, 0.0) + seconds
        result.timings["total"] = time.perf_counter() - t0
        result.damaged = damaged
        return result

    # -- streaming ------------------------------------------------------------------------
    def stream(self, slices: Iterable[np.ndarray], *, lookahead: int = 8) -> AlignStream:
        """Align slices as they arrive: an iterator that yields aligned slice z once
        ``lookahead`` non-blank slices after it have arrived (or the input ended).

        ``lookahead`` is the trade-off between latency and accuracy: slice z is solved with
        the matches of the ``lookahead`` slices after it and of about ``3 * drift_sigma``
        slices before it (a window of the global solve), so with ``lookahead`` >= the largest
        offset every slice is tied to neighbours on both sides. Memory stays flat: the last
        ``max(offsets)`` prepared slices, ``lookahead`` raw slices and the pair moments.
        The returned :class:`AlignStream` lists the flagged slices (``flagged``) and the
        emitted transforms (``transforms``) as it goes. Results differ slightly from
        :meth:`align_stack`, which sees the whole stack: the stream keeps the slow
        translation of a Gaussian trend of ``drift_sigma`` slices, not the whole-stack
        noise model's split (:func:`~deepalign_fast.alignment.solve.solve_stack`,
        ``noise_model``), unless the input ends before the first slice goes out and within
        one window (``lookahead`` of at least the stack's length): then every slice is the
        batch result.
        """
        if isinstance(lookahead, bool) or not isinstance(lookahead, (int, np.integer)) \
                or lookahead < 0:
            raise ValueError(f"lookahead must be a whole number of slices >= 0, got "
                             f"{lookahead!r}")
        return AlignStream(self.options, slices, lookahead)


def _check_models(opts: AlignOptions) -> None:
    """The shipped networks a run's refinement will load are there, before any work (a
    missing flow model was found only after the estimation; a missing encoder made every
    expected-affine slice fall back)."""
    needed = []
    if opts.mode == "elastic":
        from ..refine.flow import default_flow_model_path

        needed.append(default_flow_model_path())
    if opts.mode == "expected-affine" and opts.refine_features == "learned":
        from ..match.learned import default_model_path

        needed.append(default_model_path())
    for path in needed:
        if not path.is_file():
            raise DeepAlignError(f"{path}: the network mode={opts.mode!r} needs is missing "
                                 "from the installation; reinstall deepalign-fast")


def _unrefined(result: AlignResult, rendered: TransformSet) -> None:
    """``result.transforms`` replaced by what the render made of them: the slices flagged
    since (the refinement's failures) are flagged as "unrefined"."""
    before = set(result.transforms.flagged)
    for z in rendered.flagged:
        if z not in before:
            result.flag_reasons[z] = "unrefined"
    result.transforms = rendered


def _published(result: AlignResult, saved: dict[str, Any], tpath: Path | None,
               record: Path) -> None:
    """``result`` (from the checkpoint ``record``) as the output was published: the
    transforms file as written, or without one the transforms the checkpoint noted then
    (absent where nothing was refined; unreadable, or not of this stack: the estimation
    stands)."""
    if tpath is not None:
        _unrefined(result, TransformSet.load(tpath))
        return
    if not isinstance(saved.get("rendered"), dict):
        return
    try:
        noted = TransformSet.from_json(saved["rendered"], source=str(record),
                                       base=record.parent)
    except (DeepAlignError, ValueError, OSError):  # edited or damaged
        return
    estimated = result.transforms
    if (noted.input_shape, noted.output_shape) == (estimated.input_shape,
                                                   estimated.output_shape):
        _unrefined(result, noted)


def measured_record(result: AlignResult) -> dict[str, Any]:
    """What the estimation measured, for a checkpoint (JSON values; read back by
    :func:`result_of_checkpoint`)."""
    return {"neighbour_score": result.neighbour_score, "motion": result.motion,
            "noise_discounted": result.noise_discounted, "outliers": list(result.outliers),
            "prior_spread": result.prior_spread,
            "flag_reasons": {str(z): r for z, r in result.flag_reasons.items()}}


def result_of_checkpoint(saved: dict[str, Any], source: str) -> AlignResult:
    """The estimation a checkpoint kept (:meth:`Checkpoint.load`'s dictionary)."""
    score, motion, discounted, outliers, spread = _measured_of(saved)
    return AlignResult(TransformSet.from_json(saved["transforms"], source=source),
                       [int(m) for m in saved["matches"]],
                       {str(k): float(v) for k, v in saved["timings"].items()}, score, motion,
                       discounted, outliers, spread, _reasons_of(saved))


def _reasons_of(saved: dict[str, Any]) -> dict[int, str]:
    """The flag reasons a checkpoint kept, of its flagged slices (none where missing or
    malformed: the summary says "unknown" for those)."""
    measured = saved.get("measured")
    kept = measured.get("flag_reasons") if isinstance(measured, dict) else None
    transforms = saved.get("transforms")
    flagged = transforms.get("flagged") if isinstance(transforms, dict) else None
    if not isinstance(kept, dict) or not isinstance(flagged, list):
        return {}
    return {int(z): r for z, r in kept.items()
            if isinstance(z, str) and z.isascii() and z.isdigit() and int(z) in flagged
            and isinstance(r, str) and r in FLAG_REASONS}


def _measured_of(saved: dict[str, Any]
                 ) -> tuple[float | None, dict[str, float] | None, bool | None, list[int],
                            dict[str, float] | None]:
    """The neighbour score, stage motion, whether the score had the noise discounted, the
    outlier slices and the measured spread of per-slice scale and shear, as a checkpoint
    kept them (``None`` or no slices for what is missing or malformed: the summary leaves it
    out rather than the resume failing)."""
    measured = saved.get("measured")
    measured = measured if isinstance(measured, dict) else {}
    score, motion = measured.get("neighbour_score"), measured.get("motion")
    flag = measured.get("noise_discounted")
    discounted = flag if isinstance(flag, bool) else None

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)

    odd = measured.get("outliers")
    outliers = ([int(z) for z in odd] if isinstance(odd, list) and all(
        isinstance(z, int) and not isinstance(z, bool) for z in odd) else [])
    def numbers(d: Any, keys: tuple[str, ...]) -> dict[str, float] | None:
        return ({k: float(d[k]) for k in keys}
                if isinstance(d, dict) and all(number(d.get(k)) for k in keys) else None)

    return (float(score) if score is not None and number(score) else None,
            numbers(motion, MOTION_KEYS), discounted, outliers,
            numbers(measured.get("prior_spread"), PRIOR_KEYS))


# A stream's window is about 3 * drift_sigma slices long, over which the anatomy alone can be
# steeper than ANATOMY_SLOPE (a whole stack is not): the windows' kept slopes over this many
# emitted slices must show the drift too, or it is the anatomy's.
SLOPE_HISTORY = 256


class AlignStream(Iterator[np.ndarray]):
    """One :meth:`Aligner.stream`: iterate for the aligned slices; ``flagged`` (with
    ``flag_reasons``), ``outliers`` and ``transforms`` (the emitted slices' affines) grow as
    slices come out."""

    def __init__(self, options: AlignOptions, slices: Iterable[np.ndarray],
                 lookahead: int) -> None:
        self._state = _StreamState(options, lookahead)
        self._out = self._run(iter(slices))

    @property
    def flagged(self) -> list[int]:
        return self._state.flagged

    @property
    def flag_reasons(self) -> dict[int, str]:
        """Why each emitted flagged slice was flagged (keys of ``solve.FLAG_REASONS``, as
        :attr:`AlignResult.flag_reasons`)."""
        return self._state.flag_reasons

    @property
    def outliers(self) -> list[int]:
        """Emitted slices off alone (``SolveResult.outliers`` of the window that emitted
        them): corrected by their own estimates, left out of the slow trend."""
        return self._state.outliers

    @property
    def transforms(self) -> list[np.ndarray]:
        return self._state.transforms

    @property
    def drift_corrected(self) -> np.ndarray:
        """How far the output has been shifted (px, x and y, since the first slice) to undo a
        steady stage drift beyond the anatomy's slope: the content drifting toward -x is
        shifted toward +x. At most :data:`~deepalign_fast.alignment.solve.STEEP_SHIFT_MAX` of
        the frame's width and height. Zero where the input ended before the first slice went
        out: the stream was then solved as a whole, as by ``align_stack``, whose correction
        is part of its trend."""
        return self._state.steep_shift.copy()

    def transform_set(self, count: int | None = None) -> TransformSet:
        """The emitted slices' transforms (the first ``count`` of them) as a
        :class:`TransformSet` (``save`` writes the transforms file that ``apply`` and
        :func:`apply_transforms` take): their affines, the flagged slices and why, and the
        options. Affine mode only (a refined stream keeps no fields to re-apply)."""
        st = self._state
        if st.opts.mode != "affine":
            raise DeepAlignError(f"a stream of mode {st.opts.mode!r} keeps no fields to "
                                 "re-apply: only an affine stream gives its transforms")
        if not st.transforms or st.shape is None or count == 0:
            raise DeepAlignError("the stream has emitted no slice yet")
        n = len(st.transforms) if count is None else count
        if not 0 < n <= len(st.transforms):
            raise ValueError(f"count: {count} slices, but the stream has emitted "
                             f"{len(st.transforms)}")
        flagged = sorted(z for z in st.flagged if z < n)
        return TransformSet(np.stack(st.transforms[:n]), (n, *st.shape), st.shape, flagged, [],
                            asdict(st.opts),
                            flag_reasons={z: st.flag_reasons[z] for z in flagged
                                          if z in st.flag_reasons})

    @property
    def notes(self) -> dict[int, str]:
        """Refined modes: why a refinement left an emitted slice with its affine, or refined
        it in part (:attr:`TransformSet.notes`)."""
        return {} if self._state.refine is None else dict(self._state.refine.notes)

    def _run(self, slices: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        try:
            for z, image in enumerate(slices):
                yield from self._state.push(z, np.asarray(image))
            yield from self._state.finish()
        finally:  # run out, closed or dropped: the refiner's files are closed
            if self._state.refine is not None:
                self._state.refine.close()

    def __next__(self) -> np.ndarray:
        return next(self._out)


class _StreamState:
    """The state of one :class:`AlignStream`: the window solve and the pending slices."""

    def __init__(self, options: AlignOptions, lookahead: int) -> None:
        self.opts = options
        self.lookahead = lookahead
        # (min: a drift_sigma of 1e308 is valid but 3 times it is not a finite integer)
        self.back = int(min(np.ceil(3 * self.opts.drift_sigma), 2**62)) + max(self.opts.offsets)
        self.reach = max(self.opts.offsets)  # the farthest pair, in non-blank slices
        self.matcher: StackMatcher | None = None
        self.pending: deque[tuple[int, np.ndarray]] = deque()
        self.shape: tuple[int, int] | None = None
        self.dtype: Any = None
        self.previous: np.ndarray | None = None  # follow: last emitted slice -> output map
        # keep: the steady stage drift corrected so far (output px, x and y; SolveResult.
        # steep_drift summed over the emitted slices), zero at the first; at most
        # STEEP_SHIFT_MAX of the frame's width (x) and height (y), so every slice keeps
        # overlapping the frame (a longer drift is kept beyond that, never rendered off it)
        self.steep_shift = np.zeros(2)
        self.slopes: deque[np.ndarray] = deque(maxlen=SLOPE_HISTORY)  # the windows' kept
        self.refine: Refiner | None = None
        self.last: tuple[int, np.ndarray, np.ndarray] | None = None  # emitted: z, image, affine
        self.flagged: list[int] = []
        self.flag_reasons: dict[int, str] = {}
        self.outliers: list[int] = []
        self.transforms: list[np.ndarray] = []

    def push(self, z: int, image: np.ndarray) -> Iterator[np.ndarray]:
        from ..io import finish_slice, output_dtype

        where = f"stream slice {z}"
        image = np.asarray(image)
        if self.shape is None:
            if image.ndim != 2 or 0 in image.shape:
                raise DeepAlignError(f"{where}: expected a 2-D slice, got shape {image.shape}")
            self.shape, self.dtype = (int(image.shape[0]), int(image.shape[1])), image.dtype
            self.matcher = StackMatcher(self.opts, shape=self.shape)
            o = self.opts
            self.refine, _ = make_refiner(o.mode, self.shape, num_slices=None, fields_path=None,
                                          masks=o.masks, features=o.refine_features,
                                          provider=o.provider,
                                          num_threads=o.num_threads,
                                          max_folding=o.max_folding,
                                          field_stride=o.field_stride)
        elif image.shape != self.shape or image.dtype != self.dtype:
            raise DeepAlignError(f"{where}: shape {image.shape} {image.dtype} "
                                 f"differs from the first slice's {self.shape} {self.dtype}")
        # converted and checked as a slice of a file is (int8/float64 -> float32, finite)
        image = finish_slice(image, shape=self.shape, dtype=output_dtype(image.dtype, where),
                             where=where)
        assert self.matcher is not None
        self.matcher.add(z, None if is_blank(image) else self.matcher.backend.prepare(image))
        self.pending.append((z, image))
        while self.pending and (self._ahead(self.pending[0][0], z) >= self.lookahead
                                or z - self.pending[0][0] >= self.lookahead + self.reach):
            yield self._emit(z + 1)  # (a long run of blank slices does not hold memory)

    def _ahead(self, z0: int, z: int) -> int:
        """Non-blank slices after ``z0`` up to ``z``: a blank slice has no pairs, so slice
        ``z0`` is tied to as many later neighbours as without blanks only once ``lookahead``
        non-blank slices have arrived (counting the blank ones, the farthest pairs of the
        slices before a blank were missing when they went out, and good slices there were
        flagged "disagrees")."""
        assert self.matcher is not None
        return z - z0 - sum(1 for b in self.matcher.blank if z0 < b <= z)

    def finish(self) -> Iterator[np.ndarray]:
        # The input ended before any slice went out and every window starts at slice 0: the
        # stream is the batch solve (its noise model, decided once for every slice, so no
        # seam between slices solved one way and the other).
        whole = not self.transforms and bool(self.pending) and \
            self.pending[-1][0] <= self.back
        while self.pending:
            yield self._emit(self.pending[-1][0] + 1, whole=whole)

    def _steep(self, solved: SolveResult) -> np.ndarray:
        """The steady stage drift (px per slice, x and y) this window's slice is corrected
        by: its kept trend's excess over the anatomy's slope, where the mean of the windows'
        kept slopes over the last :data:`SLOPE_HISTORY` slices exceeds it too (a steep
        stretch of anatomy fills one window, not the history; a drift that stops leaves the
        window first). Zero where the window measured none."""
        if solved.kept_slope is None or solved.slope_limit is None:
            return np.zeros(2)
        self.slopes.append(solved.kept_slope)
        now = excess_slope(solved.kept_slope, solved.slope_limit)
        longer = excess_slope(np.mean(self.slopes, axis=0), solved.slope_limit)
        return now if longer.any() else np.zeros(2)

    def _emit(self, seen: int, *, whole: bool = False) -> np.ndarray:
        assert self.matcher is not None and self.shape is not None
        z, image = self.pending.popleft()
        lo = max(0, z - self.back)
        # Drop pairs that can no longer enter a window.
        self.matcher.pairs = [pm for pm in self.matcher.pairs if min(pm.i, pm.j) >= lo]
        pairs = [PairMoments(pm.i - lo, pm.j - lo, pm.moments, pm.weight, pm.count,
                             pm.correlation)
                 for pm in self.matcher.pairs]
        blank = [b - lo for b in self.matcher.blank if b >= lo]
        failed = [f - lo for f in self.matcher.failed if f >= lo]
        opts = self.opts
        solved = solve_stack(seen - lo, pairs, self.shape, model=opts.model,
                             regularise=opts.regularise, slow_drift=opts.slow_drift,
                             drift_sigma=opts.drift_sigma, blank=blank, failed=failed,
                             neighbour_score=self.matcher.neighbour_score(lo),
                             spacing=self.matcher.slice_spacing(lo), noise_model=whole)
        # follow: each window has its own gauge; carry the previous emitted slice's frame over
        # (this window's output frame -> the stream's), for this slice and the next one
        carry = None
        if opts.slow_drift == "follow" and self.previous is not None and z - 1 - lo >= 0:
            carry = compose(self.previous, solved.affines[z - 1 - lo])

        steep = self._steep(solved)
        cap = STEEP_SHIFT_MAX * np.array([self.shape[1], self.shape[0]], np.float64)
        if self.transforms:
            self.steep_shift = np.clip(self.steep_shift + steep, -cap, cap)  # (x, y)

        def in_stream(k: int) -> np.ndarray:
            a_k = solved.affines[k - lo]
            # the output shifted by the drift corrected up to slice k (also where this window
            # measured none: what earlier windows corrected stays corrected)
            shift = np.clip(self.steep_shift + (k - z) * steep, -cap, cap)
            if shift.any():
                a_k = a_k.copy()
                a_k[:, 2] -= a_k[:, :2] @ shift
            return a_k if carry is None else invert(compose(carry, invert(a_k)))

        a = in_stream(z)
        if opts.slow_drift == "follow":
            self.previous = invert(a)
        if z - lo in solved.flagged:  # the matcher's failed slices included
            self.flagged.append(z)
            self.flag_reasons[z] = solved.flag_reasons[z - lo]
        if z - lo in solved.outliers:
            self.outliers.append(z)
        self.transforms.append(a)
        if self.refine is None:
            return render_slice(image, SliceMap(a), self.shape, num_threads=opts.num_threads)
        # the neighbours: the slice emitted last, and the next one at this window's estimate
        last, self.last = self.last, (z, image, a)
        around: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        if last is not None:
            around[last[0]] = (last[1], last[2])
        if self.pending:
            after, after_image = self.pending[0]
            around[after] = (after_image, in_stream(after))
        # (a slice flagged only because its own refinement failed is still a fine neighbour)
        usable = {k for k in around if k not in self.matcher.blank and (
            k not in self.flagged or self.flag_reasons.get(k) == "unrefined")}
        neighbours = Neighbours(usable=usable.__contains__, read=around.__getitem__)
        out = self.refine(z, image, a, neighbours, flagged=z in self.flagged)[1]
        failed = self.refine.failed
        if failed and failed[-1] == z and z not in self.flag_reasons:  # kept its affine
            self.flagged.append(z)
            self.flag_reasons[z] = "unrefined"
        return out
