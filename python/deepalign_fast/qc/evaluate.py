"""Benchmarks with synthetic ground truth, and tool-agnostic evaluation of aligned stacks.

:func:`make_benchmark` misaligns a clean (already aligned) stack and writes a benchmark folder:

- ``misaligned.tif``: the input an aligner gets;
- ``ground_truth.json``: :class:`~deepalign_fast.qc.synth.GroundTruth`, misaligned -> clean maps;
- with labels: ``misaligned_labels.tif`` and ``clean_labels.tif``.

:func:`evaluate_alignment` scores the output of ANY aligner without its transforms: each aligned
slice is registered to its own misaligned slice (the same section, so SIFT + RANSAC is easy and
accurate), which gives ``estimated[z]`` (aligned -> misaligned coordinates); composed with the
ground truth this is the target registration error after removing the common frame ``G``
(:mod:`deepalign_fast.qc.metrics`). Clean labels mapped into the aligned frame with ``G`` give
Dice/IoU of the aligned labels.

Neighbour NCC/SSIM before and after are compared at equal interpolation: resampling blurs,
and blur alone raises the similarity of neighbouring slices (a half-pixel bilinear shift of an
aligned stack raises its mean neighbour NCC from 0.88 to 0.95). Pair ``z`` after alignment is
``aligned[z]`` against ``aligned[z+1]``; before alignment it is ``aligned[z]`` against
``misaligned[z+1]`` resampled (bilinear) with slice ``z``'s estimated transform, i.e. the
neighbour as it was before alignment, through the same interpolation. Both are scored over the
same pixels (inside both slices' warped frames). The raw input's score is kept as
``mean_before_raw`` for reference only.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import cv2
import numpy as np
import tifffile
from numpy.typing import NDArray

from .._errors import DeepAlignError
from ..intensity import to_uint8
from ..outputs import checkpoint_path_for, create_temp, publish, write_atomic
from ..warp import warp_affine
from .metrics import (
    dice,
    exact_truth_score,
    iou,
    ncc,
    neighbour_similarity,
    normalized_improvement,
    ssim,
    target_registration_error,
)
from .synth import (
    fibsem_artifacts,
    misalign_labels,
    misalign_stack,
    render_affine,
)
from .truth import GroundTruth

__all__ = [
    "Benchmark",
    "equal_interpolation_similarity",
    "estimate_slice_transform",
    "evaluate_alignment",
    "load_options",
    "load_transforms",
    "make_benchmark",
    "misalign_benchmark",
    "read_stack",
    "summarize",
]



# --------------------------------------------------------------------------------------------
# stack and transforms I/O (through io.open_stack and TransformSet.load)
# --------------------------------------------------------------------------------------------
def read_stack(path: str | os.PathLike[str], *, labels: bool = False) -> NDArray[Any]:
    """Read a whole stack ``(z, y, x)`` (any format :func:`deepalign_fast.io.open_stack` takes;
    ``labels``: a label stack, whose integer type of 8-64 bit is kept)."""
    from ..io import open_stack

    with open_stack(path, labels=labels) as reader:
        return np.stack([reader.read(i) for i in range(len(reader))])


def _write_tiff(path: Path, data: NDArray[Any]) -> None:
    """Atomic: an exclusive, unpredictable temp file beside ``path``, then a rename."""
    fd, tmp = create_temp(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.raw.name = str(tmp)  # type: ignore[attr-defined]  # tifffile wants a path
            tifffile.imwrite(fh, data, compression="zlib" if data.dtype != np.float32 else None)
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_transforms(path: str | os.PathLike[str]) -> list[NDArray[np.float64] | None]:
    """Read per-slice 2x3 transforms from JSON.

    A deepalign-fast transforms file is read (and checked) by
    :meth:`~deepalign_fast.transforms.TransformSet.load`. Other tools' results may be a list of
    2x3 nested lists (``null`` for failed slices) or an object with a ``"transforms"`` list
    (as :meth:`GroundTruth.to_json` writes).
    """
    from ..transforms import SCHEMA, TransformSet

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DeepAlignError(f"{path}: cannot read transforms JSON: {exc}") from exc
    if isinstance(data, dict) and data.get("schema") == SCHEMA:
        ts = TransformSet.from_json(data, source=str(path), base=Path(path).parent)
        return list(ts.affines)
    if isinstance(data, dict):  # GroundTruth ("transforms")
        rows = data.get("transforms")
    else:
        rows = data
    if not isinstance(rows, list):
        raise DeepAlignError(f"{path}: expected a list of 2x3 transforms")
    out: list[NDArray[np.float64] | None] = []
    for z, row in enumerate(rows):
        if row is None:
            out.append(None)
            continue
        arr = np.asarray(row, dtype=np.float64)
        if arr.shape == (3, 3):
            arr = arr[:2]
        if arr.shape != (2, 3):
            raise DeepAlignError(f"{path}: transform {z} has shape {arr.shape}, expected (2, 3)")
        out.append(arr)
    return out


def load_options(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The aligner options recorded in a transforms file (``"options"``), or ``None``.

    Files without options (e.g. a benchmark's ``ground_truth.json``) give ``None``.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DeepAlignError(f"{path}: cannot read transforms JSON: {exc}") from exc
    opts = data.get("options") if isinstance(data, dict) else None
    return dict(opts) if isinstance(opts, dict) else None


# --------------------------------------------------------------------------------------------
# make a benchmark
# --------------------------------------------------------------------------------------------
@dataclass
class Benchmark:
    """A misaligned stack and its ground truth, computed in memory
    (:func:`misalign_benchmark`); :meth:`write` puts it into a benchmark folder."""

    misaligned: NDArray[Any]
    truth: GroundTruth
    labels: NDArray[Any] | None = None
    misaligned_labels: NDArray[Any] | None = None

    def write(self, out_dir: str | os.PathLike[str]) -> GroundTruth:
        """Write the benchmark folder (created if needed; each file atomically). The ground
        truth goes first and comes back last: a folder whose writing was stopped holds none,
        never an earlier benchmark's beside the new stack (which ``eval`` scored, silently
        wrong)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            (out / "ground_truth.json").unlink()
        _write_tiff(out / "misaligned.tif", self.misaligned)
        if self.labels is not None and self.misaligned_labels is not None:
            _write_tiff(out / "misaligned_labels.tif", self.misaligned_labels)
            _write_tiff(out / "clean_labels.tif", self.labels)
        write_atomic(out / "ground_truth.json", self.truth.to_json())
        return self.truth


def make_benchmark(
    clean: str | os.PathLike[str] | NDArray[Any],
    out_dir: str | os.PathLike[str],
    *,
    profile: str = "sstem",
    seed: int = 0,
    labels: str | os.PathLike[str] | NDArray[Any] | None = None,
    artifacts: bool = False,
    reslice: str = "xy",
    **params: float,
) -> GroundTruth:
    """Write a synthetic misalignment benchmark folder (see module docstring).

    Everything is computed (and the inputs checked) before ``out_dir`` is created:
    :func:`misalign_benchmark`, then :meth:`Benchmark.write`.

    Parameters
    ----------
    clean : path or ndarray (z, y, x)
        An already aligned stack (TIFF file or folder of TIFF slices).
    out_dir : path
        Created if needed.
    profile, seed, labels, artifacts, reslice, **params
        See :func:`misalign_benchmark`.

    Returns
    -------
    GroundTruth
    """
    return misalign_benchmark(clean, profile=profile, seed=seed, labels=labels,
                              artifacts=artifacts, reslice=reslice, **params).write(out_dir)


def misalign_benchmark(
    clean: str | os.PathLike[str] | NDArray[Any],
    *,
    profile: str = "sstem",
    seed: int = 0,
    labels: str | os.PathLike[str] | NDArray[Any] | None = None,
    artifacts: bool = False,
    reslice: str = "xy",
    **params: float,
) -> Benchmark:
    """Misalign a clean stack in memory; nothing is written (:meth:`Benchmark.write` does).

    Parameters
    ----------
    clean : path or ndarray (z, y, x)
        An already aligned stack (TIFF file or folder of TIFF slices).
    profile : str
        ``"sstem"``, ``"fibsem"``, ``"jitter"`` (:data:`deepalign_fast.qc.synth.PROFILES`), or
        ``"drift-mild"``, ``"drift-strong"``, ``"drift-sstem"``: random-walk and smooth stage
        drift, jitter and per-slice rotation/scale/shear on every slice
        (:func:`deepalign_fast.qc.synth.drift_transforms`).
    seed : int
        Seed of the transforms (and artifacts).
    labels : path or ndarray, optional
        Label stack of ``clean`` (same shape).
    artifacts : bool
        Add FIB-SEM artifacts to the misaligned slices (after warping, as a microscope would):
        fixed curtaining, per-slice charging, noise at SNR 8
        (:func:`~deepalign_fast.qc.synth.fibsem_artifacts`, strength 1); the stack becomes uint8.
    reslice : {"xy", "xz", "yz"}
        Misalign the stack itself (``"xy"``) or its XZ / YZ reslice: for an isotropic volume
        (FIB-SEM) neighbouring reslice planes are exactly aligned by construction, so the
        ground truth is exact, anatomy included.
    **params : float
        Profile parameter overrides.

    Returns
    -------
    Benchmark
    """
    from .synth import drift_transforms, reslice_stack

    stack = clean if isinstance(clean, np.ndarray) else read_stack(clean)
    lab = None if labels is None else (
        labels if isinstance(labels, np.ndarray) else read_stack(labels, labels=True))
    stack = reslice_stack(stack, reslice)
    lab = None if lab is None else reslice_stack(lab, reslice)
    if lab is not None and lab.shape != stack.shape:
        def name(x: Any, what: str) -> str:
            return f"{what} array" if isinstance(x, np.ndarray) else str(x)

        raise DeepAlignError(
            f"{name(labels, 'labels')}: the label stack has shape {lab.shape} (z, y, x), but the "
            f"stack {name(clean, 'clean')} has {stack.shape}; the labels must be those of "
            "this stack, slice for slice")
    rng = np.random.default_rng(seed)
    try:
        if profile.startswith("drift-"):
            pulls = drift_transforms(len(stack), stack.shape[1:], rng, profile=profile[6:],
                                     **params)
            mis, truth = misalign_stack(stack, pulls)
            truth.profile = profile
        else:
            mis, truth = misalign_stack(
                stack, rng, profile=profile, **params)  # type: ignore[arg-type]
    except DeepAlignError as exc:  # e.g. slices too small for the profile: name the stack
        if isinstance(clean, np.ndarray):
            raise
        raise DeepAlignError(f"{clean}: {exc}") from None
    truth.seed = seed
    if artifacts:
        mis = fibsem_artifacts(mis, seed, snr=8.0, strength=1.0)
    return Benchmark(mis, truth, lab, None if lab is None else misalign_labels(lab, truth))


# --------------------------------------------------------------------------------------------
# evaluate an aligned stack
# --------------------------------------------------------------------------------------------
_SIFT: Any = None


def estimate_slice_transform(
    moving: NDArray[Any], reference: NDArray[Any], *, min_inliers: int = 12,
    threshold: float = 2.0,
) -> NDArray[np.float64] | None:
    """Affine pull map from ``moving`` coordinates to ``reference`` coordinates (SIFT+RANSAC).

    Meant for two renderings of the SAME section (an aligned slice and its misaligned
    original), where matching is easy. Returns ``None`` with fewer than ``min_inliers``.
    """
    global _SIFT
    if _SIFT is None:
        _SIFT = cv2.SIFT.create()
    k1, d1 = _SIFT.detectAndCompute(to_uint8(moving), None)
    k2, d2 = _SIFT.detectAndCompute(to_uint8(reference), None)
    if d1 is None or d2 is None or len(k1) < 3 or len(k2) < 3:
        return None
    pairs = cv2.BFMatcher(cv2.NORM_L2).knnMatch(d1, d2, k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < 0.75 * p[1].distance]
    if len(good) < min_inliers:
        return None
    src = np.array([k1[m.queryIdx].pt for m in good], np.float64)
    dst = np.array([k2[m.trainIdx].pt for m in good], np.float64)
    # keypoint coordinates in OpenCV already use the pixel-centre origin of our convention
    model, inl = cv2.estimateAffine2D(src, dst, method=cv2.RANSAC,
                                      ransacReprojThreshold=threshold, maxIters=5000,
                                      confidence=0.999, refineIters=20)
    if model is None or inl is None or int(inl.sum()) < min_inliers:
        return None
    keep = inl.ravel().astype(bool)
    # final least-squares fit on the inliers: sub-pixel, all matches weigh equally
    a = np.hstack([src[keep], np.ones((int(keep.sum()), 1))])
    sol, *_ = np.linalg.lstsq(a, dst[keep], rcond=None)
    return np.ascontiguousarray(sol.T)


def _label_list(lab: NDArray[Any]) -> list[int] | None:
    values = np.unique(lab)
    nonzero = [int(v) for v in values if v != 0]
    return None if len(nonzero) <= 1 else nonzero


def evaluate_alignment(
    aligned: str | os.PathLike[str] | NDArray[Any],
    benchmark_dir: str | os.PathLike[str],
    *,
    aligned_labels: str | os.PathLike[str] | NDArray[Any] | None = None,
    grid: int = 16,
    progress: bool | None = False,
) -> dict[str, Any]:
    """Score an aligned stack against a benchmark folder written by :func:`make_benchmark`.

    Parameters
    ----------
    aligned : path or ndarray (z, y, x)
        The aligner's output, one slice per misaligned slice (any frame size).
    benchmark_dir : path
        Folder with ``misaligned.tif`` and ``ground_truth.json`` (and ``clean_labels.tif`` for
        label scores).
    aligned_labels : path or ndarray, optional
        The benchmark's ``misaligned_labels.tif`` carried through the same alignment.
    grid : int
        TRE lattice size per axis.
    progress : bool or None
        Show progress on stderr (None: when it is a terminal).

    Returns
    -------
    dict
        ``tre`` (:meth:`TREResult.to_dict`), ``estimated`` (per-slice aligned -> misaligned
        2x3 or ``None``), ``neighbour_ncc``/``neighbour_ssim`` (before/after lists and means),
        ``n_ncc``/``n_ssim`` (normalised improvements of the means), and with labels ``dice``
        and ``iou`` (mean over slices, after and before alignment).
    """
    bdir = Path(benchmark_dir)
    gt_path = bdir / "ground_truth.json"
    if os.path.lexists(checkpoint_path_for(bdir / "misaligned.tif")):
        raise DeepAlignError(f"{bdir}: a make-benchmark run into this folder was stopped "
                             "before it finished, so its files may belong to two "
                             "benchmarks; rerun that make-benchmark command to finish it")
    try:
        truth = GroundTruth.from_json(gt_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        what = "no ground_truth.json there" if bdir.is_dir() else "no such folder"
        raise DeepAlignError(f"{bdir}: {what}; give a folder written by make-benchmark"
                             ) from None
    except OSError as exc:
        raise DeepAlignError(f"{gt_path}: cannot read ground truth: "
                             f"{exc.strerror or exc}") from exc
    except (UnicodeDecodeError, DeepAlignError) as exc:
        why = str(exc) if isinstance(exc, DeepAlignError) else "not a ground-truth JSON (binary)"
        raise DeepAlignError(f"{gt_path}: {why}; the folder must be one written by "
                             "make-benchmark") from exc
    mis = read_stack(bdir / "misaligned.tif")
    al = aligned if isinstance(aligned, np.ndarray) else read_stack(aligned)
    if len(mis) != len(truth):
        raise DeepAlignError(f"{gt_path}: holds {len(truth)} transforms but "
                             f"{bdir / 'misaligned.tif'} has {len(mis)} slices; the folder "
                             "must be one written by make-benchmark")
    if len(al) != len(truth):
        raise DeepAlignError(
            f"aligned stack has {len(al)} slices, benchmark {bdir} has {len(truth)}"
        )
    out_shape = (int(al.shape[1]), int(al.shape[2]))
    from ..progress import Progress

    est = []
    with Progress(len(al), "eval: registering slices", progress) as bar:
        for z in range(len(al)):
            est.append(estimate_slice_transform(al[z], mis[z]))
            bar.step()
    if all(e is None for e in est):
        raise DeepAlignError(f"no aligned slice could be matched to {bdir / 'misaligned.tif'}")
    tre = target_registration_error(est, truth, out_shape, grid=grid)
    result: dict[str, Any] = {
        "n_slices": len(al),
        "aligned_shape": list(al.shape),
        "tre": tre.to_dict(),
        "estimated": [None if e is None else e.tolist() for e in est],
    }
    if all(e is not None for e in est):
        # The jitter error: TRE after forgiving only the slow residual translation, the
        # part no image-based aligner can observe (metrics.exact_truth_score).
        score = exact_truth_score(np.stack([np.asarray(e) for e in est]), truth.transforms,
                                  out_shape, grid=grid)
        result["jitter"] = {"median": score.jitter_median, "p95": score.jitter_p95}
        # Of that, what the slices' rotation, scale and shear leave (not forgiven when slow).
        result["linear"] = {"median": score.linear_median, "p95": score.linear_p95}
    # compare aligned neighbours only where both hold data: the fill border an aligner adds
    # would otherwise count as perfectly similar
    ones = np.ones(truth.shape, np.uint8)
    masks = [None if e is None else render_affine(ones, e, out_shape, nearest=True) > 0
             for e in est]
    for name in ("ncc", "ssim"):
        before, after = equal_interpolation_similarity(al, mis, est, masks, name)
        raw = neighbour_similarity(mis, name)
        mb, ma = _nanmean(before), _nanmean(after)
        result[f"neighbour_{name}"] = {"before": before.tolist(), "after": after.tolist(),
                                       "mean_before": mb, "mean_after": ma,
                                       "mean_before_raw": _nanmean(raw)}
        result[f"n_{name}"] = normalized_improvement(ma, mb)
    if aligned_labels is not None:
        alab = aligned_labels if isinstance(aligned_labels, np.ndarray) else read_stack(
            aligned_labels, labels=True)
        if alab.shape != al.shape:
            where = "the aligned labels" if isinstance(aligned_labels, np.ndarray) else \
                str(aligned_labels)
            raise DeepAlignError(f"{where}: {alab.shape} (z, y, x), but the aligned stack is "
                                 f"{al.shape}; give the labels aligned with the same transforms")
        clab = read_stack(bdir / "clean_labels.tif", labels=True)
        mlab = read_stack(bdir / "misaligned_labels.tif", labels=True)
        result.update(_label_scores(alab, clab, mlab, truth, tre.gauge))
    return result


def _nanmean(v: NDArray[np.float64]) -> float:
    return float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")


def equal_interpolation_similarity(
    aligned: NDArray[Any], misaligned: NDArray[Any],
    estimated: list[NDArray[np.float64] | None], masks: list[NDArray[np.bool_] | None],
    metric: str = "ncc",
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Neighbour similarity before and after alignment at equal interpolation.

    Parameters
    ----------
    aligned, misaligned : ndarray (z, y, x)
        The aligner's output and its input (one slice per slice).
    estimated : list of (2, 3) ndarray or None
        Pull maps from aligned to misaligned pixel coordinates (``None``: unmatched slice).
    masks : list of (y, x) bool ndarray or None
        Aligned pixels whose source lies inside the misaligned slice.
    metric : {"ncc", "ssim"}

    Returns
    -------
    before, after : ndarray (z - 1,)
        Pair ``z``: ``aligned[z]`` against ``misaligned[z+1]`` warped with ``estimated[z]``
        (before), and against ``aligned[z+1]`` (after), over the pixels valid in both slices;
        NaN where a transform is missing or fewer than 64 pixels overlap.
    """
    n = len(aligned)
    before = np.full(max(n - 1, 0), np.nan)
    after = np.full(max(n - 1, 0), np.nan)
    shape = (int(aligned.shape[1]), int(aligned.shape[2]))
    if np.issubdtype(aligned.dtype, np.integer):
        info = np.iinfo(aligned.dtype)
        data_range = float(info.max) - float(min(info.min, 0))
    else:
        data_range = float(np.nanmax(aligned) - np.nanmin(aligned)) or 1.0
    for z in range(n - 1):
        e, ma, mb = estimated[z], masks[z], masks[z + 1]
        if e is None or ma is None or mb is None:
            continue
        mask = ma & mb
        if int(mask.sum()) < 64:
            continue
        src = misaligned[z + 1]
        if src.dtype not in (np.uint8, np.uint16, np.float32):
            src = src.astype(np.float32)
        moved = warp_affine(src, e, shape)
        if metric == "ncc":
            before[z] = ncc(aligned[z], moved, mask)
            after[z] = ncc(aligned[z], aligned[z + 1], mask)
        elif metric == "ssim":
            before[z] = cast(float, ssim(aligned[z], moved, data_range=data_range, mask=mask))
            after[z] = cast(float, ssim(aligned[z], aligned[z + 1], data_range=data_range,
                                        mask=mask))
        else:
            raise DeepAlignError(f"unknown metric {metric!r}; use 'ncc' or 'ssim'")
    return before, after


def _label_scores(alab: NDArray[Any], clab: NDArray[Any], mlab: NDArray[Any],
                  truth: GroundTruth, gauge: NDArray[np.float64]) -> dict[str, Any]:
    labels = _label_list(clab)
    ones_clean = np.ones(truth.clean_shape, np.uint8)
    m = float(truth.margin)
    crop = np.array([[1.0, 0.0, m], [0.0, 1.0, m]])  # misaligned frame seen as a crop
    scores: dict[str, list[float]] = {"dice": [], "iou": [], "dice_before": [],
                                      "iou_before": []}
    for z in range(len(alab)):
        for key, lab, g in (("", alab[z], gauge), ("_before", mlab[z], crop)):
            shape = (int(lab.shape[0]), int(lab.shape[1]))
            ref = render_affine(clab[z], g, shape, nearest=True)
            # only pixels whose G-image lies inside the clean frame have a reference label
            valid = render_affine(ones_clean, g, shape, nearest=True) > 0
            scores["dice" + key].append(cast(float, dice(lab[valid], ref[valid], labels=labels)))
            scores["iou" + key].append(cast(float, iou(lab[valid], ref[valid], labels=labels)))
    return {
        "labels": "binary" if labels is None else f"{len(labels)} labels",
        **{k: float(np.mean(v)) for k, v in scores.items()},
        "dice_per_slice": scores["dice"],
    }


def summarize(result: dict[str, Any]) -> str:
    """Human-readable summary of :func:`evaluate_alignment`'s result."""
    t = result["tre"]
    lines = [
        f"slices: {result['n_slices']}  failed: {t['failed'] or 'none'}",
        f"TRE (px, common frame removed): median {t['median']:.3f}  mean {t['mean']:.3f}  "
        f"p95 {t['p95']:.3f}  max {t['max']:.3f}",
    ]
    if "jitter" in result:
        j = result["jitter"]
        lines.append(f"jitter error (px, slow drift forgiven): median {j['median']:.3f}  "
                     f"p95 {j['p95']:.3f}")
    if "linear" in result:
        lin = result["linear"]
        lines.append(f"of which rotation/scale/shear (px, about the frame centre): median "
                     f"{lin['median']:.3f}  p95 {lin['p95']:.3f}")
    for name in ("ncc", "ssim"):
        s = result[f"neighbour_{name}"]
        lines.append(f"neighbour {name.upper()} (equal interpolation): before "
                     f"{s['mean_before']:.4f}  after {s['mean_after']:.4f}  N_{name.upper()} "
                     f"{result[f'n_{name}']:.4f}  (raw input {s['mean_before_raw']:.4f})")
    if "dice" in result:
        lines.append(f"labels ({result['labels']}): Dice {result['dice']:.4f} (before "
                     f"{result['dice_before']:.4f})  IoU {result['iou']:.4f} (before "
                     f"{result['iou_before']:.4f})")
    return "\n".join(lines)
