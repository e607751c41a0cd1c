"""Dense block matching: many correspondences over the whole frame, coarse to fine.

EM slices are matched best by normalised cross-correlation of blocks on a regular grid
(the approach of TrakEM2's block matching and SOFIMA's flow): it uses every structure in the
frame rather than a few keypoints, so oblique structures that appear to move between slices
average out, and it keeps working on 50-nm serial sections where keypoint detectors find no
repeatable points.

Procedure for a (reference, moving) pair:

1. Both slices become Gaussian pyramids of contrast-normalised float32 images.
2. At the coarsest level, phase correlation gives the initial translation (robust to shifts
   up to half the frame).
3. At each level, the moving slice is warped into the reference frame with the current
   estimate, blocks on a grid of the reference are located in it by NCC
   (``cv2.matchTemplate``, ``TM_CCOEFF_NORMED``) within a small search window, with parabolic
   sub-pixel refinement, and a robust fit (C++ RANSAC) updates the estimate.
4. The finest level's inlier blocks are returned as correspondences in full-resolution
   coordinates, weighted by their correlation peak.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from .. import _core
from ..estimate import estimate_transform
from ..geometry import compose, invert, rotation_angle
from ..intensity import to_uint8
from ..warp import warp_affine
from .base import Correspondences, turned_start

__all__ = ["SPECTRAL_GAIN", "SPECTRAL_GAP", "BlockMatcher", "coarse_shift", "lk_block_sums",
           "phase_correlation", "polar_spectrum", "spectral_rotations", "spectral_turns"]


# Two passes that raised the blocks' median correlation by less than this together have found
# what they can: a pair still converging from a map pixels off at the frame's edges gains
# 0.1-0.26 a pass (FIB-SEM slices 6 % apart in scale; one pass may lose a little while most
# blocks are still out of reach); between 50-nm serial sections, whose content itself
# differs, each pass moves the map by 0.2-0.4 px for ever and gains less than 0.005.
_STILL_GAINING = 0.02
#: A match from scratch whose turn differs from the spectra's by more than this (degrees) is
#: matched again from the spectra's turn (BlockMatcher.match).
SPECTRAL_GAP = 2.0
#: How much better (median block correlation) a match from the spectra's turn must correlate
#: to replace a match from scratch that held: by this much, and by half as much again.
SPECTRAL_GAIN = 0.05


def _moved(points: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """How far two affines place any of ``points`` apart (the largest distance)."""
    d = points @ (a[:, :2] - b[:, :2]).T + (a[:, 2] - b[:, 2])
    return float(np.sqrt((d * d).sum(axis=1).max()))


def _scale_affine(m: np.ndarray, factor: float) -> np.ndarray:
    """The same mapping expressed in a pyramid level whose pixels are ``factor`` times larger.

    With pixel centres at integer coordinates, level coordinates relate to full resolution by
    ``p_full = factor * p_level + (factor - 1) / 2``.
    """
    off = (factor - 1.0) / 2.0
    to_full = np.array([[factor, 0.0, off], [0.0, factor, off]])
    to_level = invert(to_full)
    return compose(to_level, compose(m, to_full))


def _normalise(image: np.ndarray, sigma: float) -> np.ndarray:
    """Contrast-stretched float32 slice, smoothed so that NCC sees structure, not shot noise."""
    f: np.ndarray = to_uint8(image).astype(np.float32)
    if sigma > 0:
        f = cv2.GaussianBlur(f, (0, 0), sigma)
    return f


def _tukey(n: int, alpha: float = 0.3) -> np.ndarray:
    """Tukey (tapered cosine) window: flat in the middle, so a large shift between the two
    slices still leaves their overlap visible (a Hann window hides shifts beyond about a
    quarter of the frame)."""
    if n < 3:
        return np.ones(n)
    x = np.linspace(0.0, 1.0, n)
    w = np.ones(n)
    edge = alpha / 2
    lo, hi = x < edge, x > 1 - edge
    w[lo] = 0.5 * (1 + np.cos(np.pi * (x[lo] / edge - 1)))
    w[hi] = 0.5 * (1 + np.cos(np.pi * ((x[hi] - 1) / edge + 1)))
    return w


def phase_correlation(reference: np.ndarray, moving: np.ndarray, *,
                      window: str = "hann") -> tuple[float, float]:
    """Translation ``(dx, dy)`` such that ``moving(p + d) ~ reference(p)``.

    Whole-frame phase correlation with a Hann (default) or Tukey window and parabolic sub-pixel
    peak refinement. The Hann window is the robust choice; the flat-topped Tukey window still
    sees shifts of nearly half the frame, where the Hann window has tapered the overlap away.
    (Implemented here with numpy's FFT because ``cv2.phaseCorrelate`` in OpenCV 5.0 returned
    different shifts for identical inputs on repeated calls.)
    """
    h = min(reference.shape[0], moving.shape[0])
    w = min(reference.shape[1], moving.shape[1])
    if window not in ("hann", "tukey"):
        raise ValueError(f"window must be 'hann' or 'tukey', got {window!r}")
    taper: Callable[[int], np.ndarray] = np.hanning if window == "hann" else _tukey
    win = np.outer(taper(h), taper(w)).astype(np.float32)
    a = reference[:h, :w].astype(np.float32)
    b = moving[:h, :w].astype(np.float32)
    fa = np.fft.rfft2((a - a.mean()) * win)
    fb = np.fft.rfft2((b - b.mean()) * win)
    cross = np.conj(fa) * fb
    cross /= np.abs(cross) + 1e-12
    r = np.fft.irfft2(cross, s=(h, w))
    py, px = np.unravel_index(int(np.argmax(r)), r.shape)
    # Sub-pixel: parabola through the peak and its (wrapped) neighbours.
    def vertex(m: float, c: float, p: float) -> float:
        den = m - 2.0 * c + p
        return 0.5 * (m - p) / den if den < 0 else 0.0

    dy = vertex(r[(py - 1) % h, px], r[py, px], r[(py + 1) % h, px])
    dx = vertex(r[py, (px - 1) % w], r[py, px], r[py, (px + 1) % w])
    sy = py + dy if py <= h // 2 else py + dy - h
    sx = px + dx if px <= w // 2 else px + dx - w
    return float(sx), float(sy)


def _overlap_ncc(reference: np.ndarray, moving: np.ndarray, dx: float, dy: float) -> float:
    """Correlation of ``reference(p)`` and ``moving(p + d)`` over their overlap (whole px)."""
    h, w = reference.shape
    ix, iy = int(round(dx)), int(round(dy))
    x0, x1 = max(0, -ix), min(w, w - ix)
    y0, y1 = max(0, -iy), min(h, h - iy)
    if x1 - x0 < 8 or y1 - y0 < 8:
        return -1.0
    a = reference[y0:y1, x0:x1].astype(np.float64)
    b = moving[y0 + iy:y1 + iy, x0 + ix:x1 + ix].astype(np.float64)
    a, b = a - a.mean(), b - b.mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else -1.0


def _overlap_score(reference: np.ndarray, moving: np.ndarray, shift: tuple[float, float]
                   ) -> float:
    """How well a whole-frame shift explains the pair: the overlap's correlation (0 if
    negative), discounted by the square root of the overlap's share of the frame (a
    correlation over a small overlap is a noisier, more often spuriously high estimate)."""
    h, w = reference.shape
    frac = max(0.0, w - abs(shift[0])) * max(0.0, h - abs(shift[1])) / (w * h)
    return max(0.0, _overlap_ncc(reference, moving, *shift)) * float(np.sqrt(frac))


#: The least share of the frame an overlap-normalised correlation peak may overlap.
MIN_OVERLAP = 0.5
#: Coarse levels whose short side is below this also search every shift by the overlap's
#: own correlation (:func:`coarse_shift`).
SHORT_SIDE = 128
#: ... and take its best shift as a candidate only where the overlap correlates at least
#: this well (where the true match is weak, a slice turned by degrees, the best of every
#: shift is a pattern's chance likeness).
OVERLAP_TRUST = 0.5


def overlap_correlation_shift(reference: np.ndarray, moving: np.ndarray, *,
                              min_overlap: float = MIN_OVERLAP) -> tuple[float, float]:
    """The whole-pixel translation ``(dx, dy)`` with ``moving(p + d) ~ reference(p)`` whose
    overlap correlates best, among those overlapping at least ``min_overlap`` of the frame.

    The correlation of every shift is normalised over that shift's own overlap (the means
    and variances of the two overlapping parts; Padfield, "Masked object registration in
    the Fourier domain", 2012): the cross sums from one FFT correlation of the zero-padded
    frames, the parts' sums and sums of squares from integral images. Unlike phase
    correlation, nothing is tapered or wrapped: a shift of 30-45 % of the frame's height is
    found as well as a small one.
    """
    from scipy import fft

    h = min(reference.shape[0], moving.shape[0])
    w = min(reference.shape[1], moving.shape[1])
    a = reference[:h, :w].astype(np.float64)
    b = moving[:h, :w].astype(np.float64)
    a, b = a - a.mean(), b - b.mean()  # (better conditioned sums; the result is the same)
    size = (fft.next_fast_len(2 * h - 1, real=True), fft.next_fast_len(2 * w - 1, real=True))
    cross = fft.irfft2(np.conj(fft.rfft2(a, s=size)) * fft.rfft2(b, s=size), s=size)
    dy = np.arange(-(h - 1), h)
    dx = np.arange(-(w - 1), w)
    sab = cross[np.ix_(dy % size[0], dx % size[1])]  # sum_p a(p) b(p + d)

    def overlap_sums(x: np.ndarray, sign: int) -> tuple[np.ndarray, np.ndarray]:
        """Sums of ``x`` and ``x^2`` over the overlap, for every shift (``sign`` -1: the
        reference's part, rows ``max(0, -dy)`` to ``min(h, h - dy)``; +1: the moving one's)."""
        y0, y1 = np.maximum(0, sign * dy), np.minimum(h, h + sign * dy)
        x0, x1 = np.maximum(0, sign * dx), np.minimum(w, w + sign * dx)
        out = []
        for v in (x, x * x):
            ii = np.zeros((h + 1, w + 1))
            ii[1:, 1:] = v.cumsum(0).cumsum(1)
            out.append(ii[np.ix_(y1, x1)] - ii[np.ix_(y0, x1)] - ii[np.ix_(y1, x0)]
                       + ii[np.ix_(y0, x0)])
        return out[0], out[1]

    sa, saa = overlap_sums(a, -1)
    sb, sbb = overlap_sums(b, 1)
    n = np.outer(h - np.abs(dy), w - np.abs(dx)).astype(np.float64)
    ok = n >= max(min_overlap * h * w, 16.0)
    safe = np.where(ok, n, 1.0)
    den = np.sqrt(np.clip(saa - sa * sa / safe, 0.0, None) * np.clip(sbb - sb * sb / safe,
                                                                     0.0, None))
    ok &= den > 1e-9 * max(float((a * a).sum()), 1e-300)
    ncc = np.where(ok, (sab - sa * sb / safe) / np.where(ok, den, 1.0), -np.inf)
    iy, ix = np.unravel_index(int(np.argmax(ncc)), ncc.shape)
    return float(dx[ix]), float(dy[iy])


def _wrap(degrees: float) -> float:
    """``degrees`` wrapped into [-90, 90): a turn read from amplitude spectra is known only up
    to half a turn."""
    return (degrees + 90.0) % 180.0 - 90.0


def _score(corr: Correspondences) -> float:
    """A match's correlation for comparing two matches (-inf where not measured)."""
    return corr.correlation if np.isfinite(corr.correlation) else -np.inf


def _log_spectrum(image: np.ndarray, size: int) -> np.ndarray:
    """The log amplitude spectrum (centred, ``size`` x ``size``) of ``image`` scaled to fit
    ``size`` on its long side, standardised and Hann-windowed (so the frame's edges add no
    cross to the spectrum)."""
    h, w = image.shape
    s = size / max(h, w)
    small = cv2.resize(image.astype(np.float32, copy=False),
                       (max(8, round(w * s)), max(8, round(h * s))), interpolation=cv2.INTER_AREA)
    small = (small - small.mean()) / (small.std() + 1e-6)
    small *= np.outer(np.hanning(small.shape[0]), np.hanning(small.shape[1])).astype(np.float32)
    padded = np.zeros((size, size), np.float32)
    y0, x0 = (size - small.shape[0]) // 2, (size - small.shape[1]) // 2
    padded[y0:y0 + small.shape[0], x0:x0 + small.shape[1]] = small
    return np.log1p(np.fft.fftshift(np.abs(np.fft.fft2(padded)))).astype(np.float32)


_TURN_BINS = 720  # angles of the polar spectra (0.5 degree apart)


def polar_spectrum(image: np.ndarray, size: int = 128) -> np.ndarray | None:
    """What :func:`spectral_rotations` compares of one image: its log amplitude spectrum in
    polar coordinates (rings of 4-70 % of the Nyquist radius, each standardised), Fourier
    transformed along the angle (``complex64``); None for a constant image."""
    if np.ptp(image) == 0:
        return None
    radius = size // 2
    p = cv2.warpPolar(_log_spectrum(image, size), (radius, _TURN_BINS), (size / 2, size / 2),
                      radius, cv2.WARP_POLAR_LINEAR)[:, int(0.04 * radius):int(0.7 * radius)]
    p = (p - p.mean(axis=0)) / (p.std(axis=0) + 1e-6)
    return np.fft.rfft(p, axis=0).astype(np.complex64)


def spectral_turns(reference: np.ndarray | None, moving: np.ndarray | None, count: int = 2
                   ) -> list[float]:
    """:func:`spectral_rotations` of two :func:`polar_spectrum` results (an empty list where
    either is None)."""
    if reference is None or moving is None:
        return []
    xc = np.fft.irfft((reference * np.conj(moving)).sum(axis=1), n=_TURN_BINS)
    half = _TURN_BINS // 2
    xc = xc[:half] + xc[half:]  # the spectra repeat after half a turn
    lo, hi = np.roll(xc, 1), np.roll(xc, -1)
    peaks = np.flatnonzero((xc >= lo) & (xc >= hi))
    peaks = peaks[np.argsort(xc[peaks])[::-1][:count]]
    curve = lo[peaks] - 2.0 * xc[peaks] + hi[peaks]
    step = np.where(curve != 0, 0.5 * (lo[peaks] - hi[peaks]) / np.where(curve != 0, curve, 1),
                    0.0)
    # (the moving spectrum turned by +a lines up: the pull map turns by -a)
    return [_wrap(-(k + d) * 360.0 / _TURN_BINS) for k, d in zip(peaks, step, strict=True)]


def spectral_rotations(reference: np.ndarray, moving: np.ndarray, *, size: int = 128,
                       count: int = 2) -> list[float]:
    """Candidate turns (degrees, strongest first, in [-90, 90)) of the pull map reference ->
    moving, read from the two images' amplitude spectra: the spectrum does not depend on
    where the content is, and turns with it, so the turn is the shift along the angle that
    best lines up the two spectra in polar coordinates (the rotation part of Fourier-Mellin
    registration; Reddy & Chatterji 1996). Each ring of frequencies (4-70 % of the
    Nyquist radius) is standardised, so every scale counts alike; the amplitude spectrum of
    a real image repeats after half a turn, so the turn is known modulo 180 degrees.

    On pairs of neighbouring sections turned by up to 40 degrees and shifted by up to 30 px
    the strongest candidate is within 4 degrees of the truth for 86 % of the isbi pairs
    (the second for most of the rest) and for all drosophila and lucchi pairs
    (benchmarks/RESULTS.md, "Sections turned far apart"). Returns ``count`` local maxima
    of the circular correlation with sub-bin (0.5 degree) precision; an empty list where
    an image is constant."""
    return spectral_turns(polar_spectrum(reference, size), polar_spectrum(moving, size), count)


def coarse_shift(reference: np.ndarray, moving: np.ndarray) -> tuple[float, float]:
    """The whole-frame translation that starts a pair's match: phase correlation with a Hann
    and with a Tukey window. Where they disagree (a shift beyond about a third of the frame,
    or a weak, ambiguous peak, as between 50-nm sections), the candidate that best explains
    the pair wins (:func:`_overlap_score`), and no shift at all is a candidate too: a weak
    false peak far out must not beat slices that are nearly in place. On a short frame (a
    reslice's short axis: no coarser level, short side below :data:`SHORT_SIDE`) so is the
    shift whose overlap correlates best (:func:`overlap_correlation_shift`): phase
    correlation tapers a small overlap away, and on the 71-px frames of a reslice with 12 px
    of jitter, neighbours 25-40 px apart were lost. It is taken only where its overlap
    correlates at :data:`OVERLAP_TRUST` or more: between slices turned by degrees against
    each other, the best of every shift was a chance likeness. (On the coarse levels of
    large slices, serial sections' weak peaks included, it changed sections' starts and
    flags both ways: left to phase correlation.)"""
    hann = phase_correlation(reference, moving, window="hann")
    tukey = phase_correlation(reference, moving, window="tukey")
    if max(abs(hann[0] - tukey[0]), abs(hann[1] - tukey[1])) <= 2.0:
        return hann
    candidates = [hann, tukey, (0.0, 0.0)]
    if min(reference.shape[0], moving.shape[0], reference.shape[1],
           moving.shape[1]) < SHORT_SIDE:
        best = overlap_correlation_shift(reference, moving)
        if _overlap_ncc(reference, moving, *best) >= OVERLAP_TRUST:
            candidates.append(best)
    scores = [_overlap_score(reference, moving, c) for c in candidates]
    return candidates[int(np.argmax(scores))]


def _subpixel(r: np.ndarray, px: int, py: int) -> tuple[float, float]:
    dx = dy = 0.0
    if 0 < px < r.shape[1] - 1:
        lft, c, rgt = r[py, px - 1], r[py, px], r[py, px + 1]
        den = lft - 2.0 * c + rgt
        if den < 0:
            dx = float(np.clip(0.5 * (lft - rgt) / den, -0.5, 0.5))
    if 0 < py < r.shape[0] - 1:
        up, c, dn = r[py - 1, px], r[py, px], r[py + 1, px]
        den = up - 2.0 * c + dn
        if den < 0:
            dy = float(np.clip(0.5 * (up - dn) / den, -0.5, 0.5))
    return dx, dy


@dataclass(frozen=True)
class PreparedSlice:
    """What :meth:`BlockMatcher.prepare` keeps of a slice for all the pairs it enters.

    ``pyramid[0]`` is the smoothed, contrast-normalised full-resolution slice;
    ``lk_level`` the pyramid level of the Lucas-Kanade refinement, ``norm`` that level
    locally normalised (zero mean, unit contrast over about a block), ``gx``/``gy`` its
    gradients, and ``tensor`` the block sums ``(gx^2, gx gy, gy^2)`` at the block centres
    ``centres`` and ``energy`` the block sums of ``norm^2`` (the parts of the refinement that
    depend on the reference alone).
    """

    pyramid: list[np.ndarray]
    lk_level: int
    norm: np.ndarray
    gx: np.ndarray
    gy: np.ndarray
    centres: np.ndarray  # (N, 2) float64 (x, y) block centres at lk_level
    tensor: np.ndarray  # (N, 3) float64
    energy: np.ndarray  # (N,) float64 block sums of norm^2
    spectrum: np.ndarray | None = None  # polar_spectrum of the top level (None: constant)


def _grid(shape: tuple[int, int], block: int, step: int) -> np.ndarray:
    """Block centres (x, y) covering a frame, centred so the margins are equal."""
    h, w = shape
    half = block // 2
    ys = np.arange(half, h - half + 1, step)
    xs = np.arange(half, w - half + 1, step)
    if ys.size:
        ys += (h - half - ys[-1]) // 2
    if xs.size:
        xs += (w - half - xs[-1]) // 2
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.float64)


def lk_block_sums(ref: np.ndarray, mov: np.ndarray, gx: np.ndarray, gy: np.ndarray,
                  corners: np.ndarray, block: int, num_threads: int = 0) -> np.ndarray:
    """The sums over each block of one Lucas-Kanade pass, in one pass of the C++ core.

    Parameters
    ----------
    ref, mov, gx, gy : ndarray, shape (H, W), float32, C-contiguous
        The reference, the moving slice warped by the current estimate, and the reference's
        gradients.
    corners : ndarray, shape (N, 2)
        Integer top-left pixels ``(x, y)`` of the ``block`` x ``block`` blocks (inside the
        images).
    num_threads : int
        Threads (0 = all cores); the result does not depend on it.

    Returns
    -------
    ndarray, shape (N, 4), float64
        Per block: ``sum gx (ref - mov)``, ``sum gy (ref - mov)``, ``sum ref mov`` and
        ``sum mov mov``, of float32 products (as numpy's) summed in float64 lanes. Five image
        products and four float64 integral images did this before, at 3 times the cost
        (benchmarks/RESULTS.md, "lk_block_sums").
    """
    c = np.asarray(corners, np.int64).reshape(-1, 2)
    return np.asarray(_core.lk_block_sums(ref, mov, gx, gy, np.ascontiguousarray(c[:, 0]),
                                          np.ascontiguousarray(c[:, 1]), int(block),
                                          num_threads))


def _box_sums(image: np.ndarray, y0: np.ndarray, x0: np.ndarray, bh: int, bw: int,
              power: int = 1) -> np.ndarray:
    """Sums of ``image ** power`` (float64) over the ``bh`` x ``bw`` boxes with top-left
    pixels ``(x0, y0)``."""
    ii = cv2.integral(image if power == 1 else np.asarray(image, np.float64) ** power,
                      sdepth=cv2.CV_64F)
    return np.asarray(ii[y0 + bh, x0 + bw] - ii[y0, x0 + bw] - ii[y0 + bh, x0] + ii[y0, x0])


def _box_mean(image: np.ndarray, y0: np.ndarray, x0: np.ndarray, bh: int, bw: int
              ) -> np.ndarray:
    """Means of ``image`` over the boxes (see :func:`_box_sums`)."""
    return _box_sums(image, y0, x0, bh, bw) / (bh * bw)


def _sampled_box_mean(image: np.ndarray, y0: np.ndarray, x0: np.ndarray, side: int,
                      every: int) -> np.ndarray:
    """Means of every ``every``-th row and column of ``image`` over the ``side`` x ``side``
    boxes with top-left pixels ``(x0, y0)``: ``image[y:y + side:every, x:x + side:every]``
    per box, from one integral image per phase of the grid the boxes start on."""
    n = -(-side // every)  # samples per axis
    out = np.empty(len(y0))
    phases = np.stack([y0 % every, x0 % every], axis=1)
    for py, px in np.unique(phases, axis=0):
        sel = (phases[:, 0] == py) & (phases[:, 1] == px)
        sub = image[py::every, px::every]
        out[sel] = _box_mean(sub, y0[sel] // every, x0[sel] // every, n, n)
    return out


def _box_std(image: np.ndarray, y0: np.ndarray, x0: np.ndarray, bh: int, bw: int
             ) -> np.ndarray:
    """Standard deviations of ``image`` over the boxes (see :func:`_box_sums`)."""
    mean = _box_mean(image, y0, x0, bh, bw)
    var = _box_sums(image, y0, x0, bh, bw, 2) / (bh * bw) - mean * mean
    return np.sqrt(np.maximum(var, 0.0))


def _local_normalise(level: np.ndarray, block: int) -> np.ndarray:
    """Zero local mean, unit local contrast (box windows of half a block): slow brightness
    and contrast changes between slices (charging, drift) drop out."""
    k = max(5, block // 2) | 1
    mean = cv2.blur(level, (k, k), borderType=cv2.BORDER_REFLECT)
    d = level - mean
    var = cv2.blur(d * d, (k, k), borderType=cv2.BORDER_REFLECT)
    out: np.ndarray = d / np.sqrt(var + 1e-2 * float(var.mean()) + 1e-6)
    return out.astype(np.float32)


class BlockMatcher:
    """Coarse-to-fine block matching between two slices (see module docstring).

    Parameters
    ----------
    block : int
        Block (template) size in pixels at every pyramid level.
    step : int
        Grid spacing of block centres at every level.
    search : int
        Search radius (pixels) around the predicted position at the NCC levels below the
        coarsest.
    coarse_size : int
        The pyramid is built down to the first level whose longer side is <= this.
    finest_level : int or None
        Level of the final (Lucas-Kanade) refinement: 0 = full resolution. None (default)
        picks the first level whose longer side is <= ``lk_size``: large slices are refined
        at half or quarter resolution, where the sub-pixel precision is still a few
        hundredths of that level's pixel.
    lk_size : int
        See ``finest_level``.
    lk_block, lk_step : int
        Block size and grid spacing of the Lucas-Kanade refinement (smaller, denser blocks
        than the correlation levels: the refinement needs no search window, and more
        independent blocks average the content's own apparent motion better).
    lk_iterations : int
        Lucas-Kanade passes at the finest level, each re-warping the moving slice with the
        latest estimate (so the remaining per-block shifts, and the linearisation error,
        shrink toward zero). 0 = correlation with a search window at the finest level too:
        slower, but it finds blocks that move several pixels away from the fitted affine
        (what the expected-affine method needs on either side of a fold).
    lk_max_iterations : int
        After the correlation levels (a match from scratch), more passes, up to this many,
        while the last one still moved the frame's corners by ``lk_tolerance`` px or more
        (full resolution) and the blocks' median correlation still rises: where two
        slices' scale or shear differ by several percent, the correlation levels leave the
        frame's edges pixels off, beyond one pass's reach, and each pass follows only part
        of the way. A match from a prediction keeps ``lk_iterations`` passes.
    min_score : float
        Blocks whose correlation is below this are discarded.
    model : str
        Model fitted at each level to predict the next ("affine", "similarity", "rigid",
        "translation").
    threshold : float
        RANSAC inlier threshold in pixels at each level.
    sigma : float
        Gaussian smoothing (pixels) of the full-resolution slice before matching; EM slices
        are noisy, and correlation on raw shot noise gives weak, unreliable peaks.
    """

    name = "blocks"

    def __init__(self, *, block: int = 64, step: int = 40, search: int = 8,
                 coarse_size: int = 256, finest_level: int | None = None,
                 lk_size: int = 1100, lk_block: int = 32, lk_step: int = 16,
                 lk_iterations: int = 3, lk_max_iterations: int = 12,
                 lk_tolerance: float = 0.02, min_score: float = 0.2, model: str = "affine",
                 threshold: float = 2.0, sigma: float = 1.5, num_threads: int = 0) -> None:
        if block < 8 or step < 1 or search < 1:
            raise ValueError("block must be >= 8 and step, search >= 1")
        if lk_iterations < 0 or lk_block < 8 or lk_step < 1:
            raise ValueError("lk_iterations must be >= 0, lk_block >= 8 and lk_step >= 1")
        if lk_max_iterations < lk_iterations or not lk_tolerance > 0:
            raise ValueError("lk_max_iterations must be >= lk_iterations and lk_tolerance > 0")
        if finest_level is not None and finest_level < 0:
            raise ValueError("finest_level must be >= 0")
        self.block, self.step, self.search = block, step, search
        self.coarse_size, self.finest_level = coarse_size, finest_level
        self.lk_size, self.lk_iterations = lk_size, lk_iterations
        self.lk_max_iterations, self.lk_tolerance = lk_max_iterations, lk_tolerance
        self.lk_block, self.lk_step = lk_block, lk_step
        self.min_score, self.model, self.threshold = min_score, model, threshold
        self.sigma = sigma
        self.num_threads = num_threads

    def _lk_block(self, shape: tuple[int, int]) -> tuple[int, int]:
        h, w = shape
        block = max(8, min(self.lk_block, min(h, w) // 3)) // 2 * 2  # even: centred boxes
        step = max(4, min(self.lk_step, min(h, w) // 8))
        return block, step

    # Per-slice work, done once per slice however many neighbours it is matched with.
    def prepare(self, image: np.ndarray) -> PreparedSlice:
        if self.finest_level is None:
            lk, side = 0, max(image.shape)
            while side > self.lk_size and min(image.shape) >> (lk + 1) >= 2 * self.block:
                lk, side = lk + 1, (side + 1) // 2
        else:
            lk = self.finest_level
        # Full-resolution smoothing only where the refinement runs at full resolution; the
        # pyramid's own filter smooths the coarser levels.
        level = _normalise(image, self.sigma if lk == 0 else 0.0)
        pyramid = [level]
        while max(level.shape) > self.coarse_size and min(level.shape) >= 2 * self.block:
            level = cv2.pyrDown(level)
            pyramid.append(level)
        lk = min(lk, len(pyramid) - 1)
        block, step = self._lk_block(pyramid[lk].shape)
        norm = _local_normalise(pyramid[lk], block)
        gx = cv2.Sobel(norm, cv2.CV_32F, 1, 0, ksize=3, scale=1 / 8)
        gy = cv2.Sobel(norm, cv2.CV_32F, 0, 1, ksize=3, scale=1 / 8)
        centres = _grid(norm.shape, block, step)
        x0, y0 = (centres.astype(np.intp) - block // 2).T  # the blocks' top-left pixels
        tensor = np.stack([_box_sums(p, y0, x0, block, block) for p in (gx * gx, gx * gy,
                                                                        gy * gy)], axis=1)
        energy = _box_sums(norm * norm, y0, x0, block, block)
        return PreparedSlice(pyramid, lk, norm, gx, gy, centres, tensor, energy,
                             polar_spectrum(pyramid[-1]))

    def match(self, reference: PreparedSlice, moving: PreparedSlice,
              init: np.ndarray | None = None) -> tuple[np.ndarray | None, Correspondences]:
        """Estimate the reference->moving affine and the finest-level correspondences.

        ``init`` predicts the affine: the match starts from it and skips the coarse search.
        An ``init`` whose translation is NaN predicts only the linear part (a start turned
        by some angle): the whole-frame translation is searched from scratch with the
        moving slice seen through that linear part, and every level is matched, as from no
        prediction at all.

        A match from scratch (no ``init``) is checked against the turn the two slices'
        amplitude spectra show (:func:`spectral_rotations` of the top pyramid levels). The coarse
        search looks for a translation only, and serial sections turned by 15-25 degrees
        against each other were matched at false turns that still held (benchmarks/
        RESULTS.md, "Sections turned far apart"). Where the strongest candidate differs from
        the turn found by more than :data:`SPECTRAL_GAP` degrees, the pair is matched again
        from that turn (then from the second candidate), and a match from such a start
        replaces the first where it correlates better by :data:`SPECTRAL_GAIN` and by half
        (isbi sections 15-20 degrees apart: 0.06-0.17 against 0.00-0.05 at the false turn).
        A pair that found nothing counts as correlating at 0: between a slice damaged to a
        strip and its neighbour, the spectra's turn gave a false match (0.004) that held
        where any match was taken.

        Returns ``(matrix, correspondences)``; ``matrix`` maps reference-slice coordinates to
        moving-slice coordinates (None when the pair cannot be registered).
        """
        m, corr = self._match(reference, moving, init)
        if init is not None:
            return m, corr
        for degrees in spectral_turns(reference.spectrum, moving.spectrum):
            if m is not None and \
                    abs(_wrap(degrees - float(np.degrees(rotation_angle(m))))) <= SPECTRAL_GAP:
                break  # the spectra agree with the match (or with a turned one kept)
            m2, corr2 = self._match(reference, moving, turned_start(degrees))
            first = _score(corr) if m is not None else 0.0  # a failed match: no likeness
            if m2 is not None and _score(corr2) > max(first + SPECTRAL_GAIN, 1.5 * first):
                m, corr = m2, corr2
        return m, corr

    def _match(self, reference: PreparedSlice, moving: PreparedSlice,
               init: np.ndarray | None) -> tuple[np.ndarray | None, Correspondences]:
        """:meth:`match` without the spectral check."""
        ref_p, mov_p = reference.pyramid, moving.pyramid
        top = min(len(ref_p), len(mov_p)) - 1
        finest = min(reference.lk_level, top)
        start = np.eye(2, 3) if init is None else np.asarray(init, np.float64)
        if not np.all(np.isfinite(start[:, :2])):
            raise ValueError("init's linear part must be finite (only its translation may "
                             "be NaN)")
        scratch = init is None or not np.all(np.isfinite(start[:, 2]))
        if scratch:
            # Coarse start: whole-frame translation at the top level, then every level down.
            linear = start[:, :2]
            current = _scale_affine(self._coarse_start(ref_p[top], mov_p[top], linear),
                                    1.0 / 2**top)
            levels = list(range(top, finest - (self.lk_iterations == 0), -1))
        else:
            # A prediction (e.g. from other pairs): straight to the refinement; if that fails
            # (the prediction was off by more than its basin), one correlation pass just
            # above the finest level first.
            current = start
            if self.lk_iterations == 0:
                levels = [finest]
            else:
                m, corr = self._refine(reference, moving, current, finest, self.lk_iterations)
                if m is not None or finest + 1 > top:
                    return m, corr
                levels = [finest + 1]
        corr = Correspondences.empty()
        for lev in levels:
            factor = float(2**lev)
            m_lev = _scale_affine(current, factor)
            search = self.search * (3 if lev == top and scratch else 1)
            corr_lev = self._match_level(ref_p[lev], mov_p[lev], m_lev, search)
            fit = self._fit(corr_lev, lev)
            if fit is None:
                return None, Correspondences.empty()
            current = _scale_affine(fit[0], 1.0 / factor)
            off = (factor - 1.0) / 2.0
            keep = fit[1]
            corr = Correspondences(corr_lev.src[keep] * factor + off,
                                   corr_lev.dst[keep] * factor + off, corr_lev.weights[keep])
        if self.lk_iterations == 0:
            return current, corr
        return self._refine(reference, moving, current, finest, self.lk_max_iterations)

    def _coarse_start(self, ref: np.ndarray, mov: np.ndarray, linear: np.ndarray
                      ) -> np.ndarray:
        """The start of a match from scratch at the top level: ``linear`` (2, 2) about the
        level's centre, then the whole-frame translation (:func:`coarse_shift`) between the
        reference and the moving level seen through ``linear``."""
        if np.array_equal(linear, np.eye(2)):
            sx, sy = coarse_shift(ref, mov)
            return np.array([[1.0, 0.0, sx], [0.0, 1.0, sy]])
        h, w = ref.shape
        centre = np.array([(w - 1) / 2.0, (h - 1) / 2.0])
        turn = np.hstack([linear, (centre - linear @ centre)[:, None]])
        seen = warp_affine(mov, turn, (h, w), num_threads=self.num_threads)
        sx, sy = coarse_shift(ref, seen)  # seen(p + s) = ref(p): mov(turn(p + s)) = ref(p)
        return compose(turn, np.array([[1.0, 0.0, sx], [0.0, 1.0, sy]]))

    def _fit(self, corr: Correspondences, seed: int
             ) -> tuple[np.ndarray, np.ndarray] | None:
        if len(corr) < 6:
            return None
        fit = estimate_transform(corr.src, corr.dst, self.model, threshold=self.threshold,
                                 seed=seed, num_threads=self.num_threads)
        if not fit:
            return None
        return fit.matrix, fit.inliers

    def _refine(self, reference: PreparedSlice, moving: PreparedSlice, current: np.ndarray,
                lev: int, most: int) -> tuple[np.ndarray | None, Correspondences]:
        """Block-wise inverse-compositional Lucas-Kanade at level ``lev``.

        Each block's translation relative to the current affine is one Gauss-Newton step on
        the locally normalised images, using the reference's gradients (precomputed in
        :meth:`prepare`); the affine is refitted robustly and the moving slice re-warped,
        ``lk_iterations`` times, and more, up to ``most``, while the last pass still moved the
        frame by ``lk_tolerance`` px or more and the last two raised the blocks' median
        correlation by :data:`_STILL_GAINING` or more: ``lk_max_iterations`` after the
        correlation levels, whose map can be pixels off at the frame's edges;
        ``lk_iterations`` from a prediction, which starts inside the refinement's reach
        (farther pairs: the chain of converged nearest pairs; more passes there followed the
        content's own apparent motion further and made the YZ exact-truth stacks worse).
        This uses every pixel of every block, has no bias toward whole pixels, and costs a
        few image passes per iteration.
        """
        factor = float(2**lev)
        off = (factor - 1.0) / 2.0
        if moving.lk_level != reference.lk_level:
            return None, Correspondences.empty()
        ref, mov = reference.norm, moving.norm
        h, w = ref.shape
        block, _ = self._lk_block(ref.shape)
        centres = reference.centres
        hxx, hxy, hyy = reference.tensor.T
        det = hxx * hyy - hxy * hxy
        textured = det > 1e-6 * (hxx + hyy + 1e-12) ** 2
        corr = Correspondences.empty()
        m_lev = _scale_affine(current, factor)
        half = block / 2.0
        corner = centres.astype(np.intp) - block // 2  # the blocks' top-left pixels
        box = np.array([[-half, -half], [half, -half], [-half, half], [half, half]])
        frame = np.array([[0.0, 0.0], [w - 1.0, 0.0], [0.0, h - 1.0], [w - 1.0, h - 1.0]])
        before = m_lev
        scores: list[float] = []  # the blocks' median correlation at each pass
        for it in range(most):
            gained = scores[-1] - scores[-3] if len(scores) >= 3 else np.inf
            if it >= self.lk_iterations and (
                    gained < _STILL_GAINING
                    or _moved(frame, before, m_lev) * factor < self.lk_tolerance):
                break
            before = m_lev
            warped = warp_affine(mov, m_lev, (h, w), border="replicate",
                                 num_threads=self.num_threads)
            # Blocks whose moving counterpart lies inside the moving slice.
            corners = (centres[:, None, :] + box[None]) @ m_lev[:, :2].T + m_lev[:, 2]
            inside = np.all((corners[..., 0] >= 0) & (corners[..., 0] <= mov.shape[1] - 1)
                            & (corners[..., 1] >= 0) & (corners[..., 1] <= mov.shape[0] - 1),
                            axis=1)
            bx, by, rw, ww = lk_block_sums(ref, warped, reference.gx, reference.gy, corner,
                                           block, self.num_threads).T
            score = rw / np.sqrt(np.maximum(reference.energy * ww, 1e-12))
            with np.errstate(divide="ignore", invalid="ignore"):
                dx = (hyy * bx - hxy * by) / det
                dy = (hxx * by - hxy * bx) / det
            ok = textured & inside & (score >= self.min_score) & np.isfinite(dx) & \
                np.isfinite(dy) & (np.abs(dx) < half / 2) & (np.abs(dy) < half / 2)
            if ok.sum() < 6:
                return None, Correspondences.empty()
            src = centres[ok]
            # The block at c in the reference is at c + d in the warped moving slice.
            dst = (src + np.stack([dx[ok], dy[ok]], axis=1)) @ m_lev[:, :2].T + m_lev[:, 2]
            level_corr = Correspondences(src, dst, np.clip(score[ok], 1e-3, 1.0))
            fit = self._fit(level_corr, lev + 17 * it)
            if fit is None:
                return None, Correspondences.empty()
            m_lev, keep = fit
            measured = textured & inside & np.isfinite(score)
            scores.append(float(np.median(score[measured])))
            corr = Correspondences(level_corr.src[keep] * factor + off,
                                   level_corr.dst[keep] * factor + off,
                                   level_corr.weights[keep], scores[-1])
        return _scale_affine(m_lev, 1.0 / factor), corr

    def _match_level(self, ref: np.ndarray, mov: np.ndarray, m: np.ndarray,
                     search: int) -> Correspondences:
        """Blocks of ``ref`` found in ``mov`` warped into the reference frame by ``m``."""
        h, w = ref.shape
        warped = warp_affine(mov, m, (h, w), border="replicate", num_threads=self.num_threads)
        valid = warp_affine(np.ones(mov.shape, np.uint8), m, (h, w), interpolation="nearest",
                            num_threads=self.num_threads)
        # Small (coarse) levels get smaller blocks on a denser grid, so that every level has
        # enough blocks (>= ~6 x 6) to fit a transform.
        block = max(16, min(self.block, min(h, w) // 3))
        step = max(4, min(self.step, min(h, w) // 8))
        half = block // 2
        # Blocks cover the whole reference frame; the warped moving slice is padded so that
        # every search window exists. A block is used only where the moving slice has data
        # under most of the template at its predicted position.
        warped = cv2.copyMakeBorder(warped, search, search, search, search, cv2.BORDER_REPLICATE)
        ys = np.arange(half, h - half + 1, step)
        xs = np.arange(half, w - half + 1, step)
        ys += (h - half - ys[-1]) // 2 if ys.size else 0
        xs += (w - half - xs[-1]) // 2 if xs.size else 0
        gy, gx = (g.ravel() for g in np.meshgrid(ys, xs, indexing="ij"))
        # Which blocks can be matched, all at once from integral images: data under most of
        # the template at its predicted position, and neither template nor search window
        # featureless (blank: no information).
        side, y0, x0 = 2 * half, gy - half, gx - half  # the template (block, made even)
        has_data = _sampled_box_mean(valid, y0, x0, side, 4) >= 0.9
        textured = (_box_std(ref, y0, x0, side, side) >= 2.0) & (
            _box_std(warped, y0, x0, side + 2 * search, side + 2 * search) >= 2.0)
        src, dst, wts = [], [], []
        for y, x in zip(gy[has_data & textured], gx[has_data & textured], strict=True):
            tpl = ref[y - half:y + half, x - half:x + half]
            win = warped[y - half:y + half + 2 * search, x - half:x + half + 2 * search]
            r = cv2.matchTemplate(win, tpl, cv2.TM_CCOEFF_NORMED)
            _, peak, _, (px, py) = cv2.minMaxLoc(r)
            if peak < self.min_score or px in (0, r.shape[1] - 1) or py in (0, r.shape[0] - 1):
                continue  # weak, or on the search border (true peak may lie outside)
            dx, dy = _subpixel(r, px, py)
            src.append((x, y))
            dst.append((x + px + dx - search, y + py + dy - search))
            wts.append(peak)
        if not src:
            return Correspondences.empty()
        src_a = np.asarray(src, np.float64)
        warped_pts = np.asarray(dst, np.float64)
        # Points found in the warped image -> moving-image coordinates through m.
        dst_a = warped_pts @ m[:, :2].T + m[:, 2]
        return Correspondences(src_a, dst_a, np.asarray(wts, np.float64))
