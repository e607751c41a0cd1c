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

from dataclasses import dataclass

import cv2
import numpy as np

from .estimate import estimate_transform
from .features import to_uint8
from .geometry import compose, invert
from .warp import warp_affine

__all__ = ["BlockMatcher", "Correspondences", "phase_correlation"]


@dataclass(frozen=True)
class Correspondences:
    """Point pairs: ``src[i]`` in the reference slice matches ``dst[i]`` in the moving slice."""

    src: np.ndarray  # (N, 2) float64, (x, y) in reference-slice pixels
    dst: np.ndarray  # (N, 2) float64, (x, y) in moving-slice pixels
    weights: np.ndarray  # (N,) float64 in (0, 1]

    def __len__(self) -> int:
        return int(self.src.shape[0])

    @staticmethod
    def empty() -> Correspondences:
        z = np.zeros((0, 2), np.float64)
        return Correspondences(z, z.copy(), np.zeros(0, np.float64))


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


def phase_correlation(reference: np.ndarray, moving: np.ndarray) -> tuple[float, float]:
    """Translation ``(dx, dy)`` such that ``moving(p + d) ~ reference(p)``.

    Whole-frame phase correlation with a Hann window and parabolic sub-pixel peak refinement.
    (Implemented here with numpy's FFT because ``cv2.phaseCorrelate`` in OpenCV 5.0 returned
    different shifts for identical inputs on repeated calls.)
    """
    h = min(reference.shape[0], moving.shape[0])
    w = min(reference.shape[1], moving.shape[1])
    win = np.outer(np.hanning(h), np.hanning(w)).astype(np.float32)
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


class BlockMatcher:
    """Coarse-to-fine NCC block matching between two slices (see module docstring).

    Parameters
    ----------
    block : int
        Block (template) size in pixels at every pyramid level.
    step : int
        Grid spacing of block centres at every level.
    search : int
        Search radius (pixels) around the predicted position at every level below the coarsest.
    coarse_size : int
        The pyramid is built down to the first level whose longer side is <= this.
    finest_level : int
        0 = match at full resolution. 1 matches at half resolution (faster; sub-pixel
        refinement keeps ~0.1 px precision there).
    min_score : float
        Blocks whose correlation peak is below this are discarded.
    model : str
        Model fitted at each level to predict the next ("affine", "similarity", "rigid",
        "translation").
    threshold : float
        RANSAC inlier threshold in pixels at each level.
    sigma : float
        Gaussian smoothing (pixels) of the full-resolution slice before matching; EM slices
        are noisy, and NCC on raw shot noise gives weak, unreliable peaks.
    """

    name = "blocks"

    def __init__(self, *, block: int = 64, step: int = 40, search: int = 8,
                 coarse_size: int = 256, finest_level: int = 0, min_score: float = 0.2,
                 model: str = "affine", threshold: float = 2.0, sigma: float = 1.5,
                 num_threads: int = 0) -> None:
        if block < 8 or step < 1 or search < 1:
            raise ValueError("block must be >= 8 and step, search >= 1")
        self.block, self.step, self.search = block, step, search
        self.coarse_size, self.finest_level = coarse_size, finest_level
        self.min_score, self.model, self.threshold = min_score, model, threshold
        self.sigma = sigma
        self.num_threads = num_threads

    # Per-slice work, done once per slice however many neighbours it is matched with.
    def prepare(self, image: np.ndarray) -> list[np.ndarray]:
        level = _normalise(image, self.sigma)
        pyramid = [level]
        while max(level.shape) > self.coarse_size and min(level.shape) >= 2 * self.block:
            level = cv2.pyrDown(level)
            pyramid.append(level)
        return pyramid

    def match(self, reference: list[np.ndarray], moving: list[np.ndarray],
              init: np.ndarray | None = None) -> tuple[np.ndarray | None, Correspondences]:
        """Estimate the reference->moving affine and the finest-level correspondences.

        Returns ``(matrix, correspondences)``; ``matrix`` maps reference-slice coordinates to
        moving-slice coordinates (None when the pair cannot be registered).
        """
        top = min(len(reference), len(moving)) - 1
        finest = min(self.finest_level, top)
        if init is None:
            # Coarse start: whole-frame translation at the top level, then every level down.
            sx, sy = phase_correlation(reference[top], moving[top])
            current = _scale_affine(np.array([[1.0, 0.0, sx], [0.0, 1.0, sy]]), 1.0 / 2**top)
            start = top
        else:
            # A good prediction (e.g. from another neighbour): refine at the finest level only.
            current = np.asarray(init, np.float64)
            start = finest
        corr = Correspondences.empty()
        for lev in range(start, finest - 1, -1):
            factor = float(2**lev)
            m_lev = _scale_affine(current, factor)
            search = self.search * (3 if lev == start and init is None else 1)
            corr_lev = self._match_level(reference[lev], moving[lev], m_lev, search)
            if len(corr_lev) < 6:
                return None, Correspondences.empty()
            fit = estimate_transform(corr_lev.src, corr_lev.dst, self.model,
                                     threshold=self.threshold, seed=lev,
                                     num_threads=self.num_threads)
            if not fit:
                return None, Correspondences.empty()
            keep = fit.inliers
            off = (factor - 1.0) / 2.0
            corr = Correspondences(corr_lev.src[keep] * factor + off,
                                   corr_lev.dst[keep] * factor + off,
                                   corr_lev.weights[keep])
            current = _scale_affine(fit.matrix, 1.0 / factor)
        return current, corr

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
        src, dst, wts = [], [], []
        for y in ys:
            for x in xs:
                tpl = ref[y - half:y + half, x - half:x + half]
                if valid[y - half:y + half:4, x - half:x + half:4].mean() < 0.9:
                    continue
                win = warped[y - half:y + half + 2 * search, x - half:x + half + 2 * search]
                if tpl.std() < 2.0 or win.std() < 2.0:
                    continue  # featureless (blank) block: no information
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
