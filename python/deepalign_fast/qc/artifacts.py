"""Synthetic volume-EM imaging artifacts (numpy + OpenCV only).

Used twice, with *different* parameter ranges and seeds: by ``export/train_ssl.py`` to train the
artifact-invariant encoder, and by ``benchmarks/bench_features.py`` to test it. Keeping the
generator in the runtime package lets benchmarks and tests use it without torch.

Every artifact acts on a slice in its own intensity units: the slice's robust range
(0.5th-99.5th percentile) is the unit ``span`` that amplitudes are expressed in, so the same
parameters corrupt a uint8 and a uint16 slice alike. The result is ``float32``, same shape,
not clipped (a real detector would clip; the feature extractors normalise anyway).

Kinds (``ARTIFACT_KINDS``):

``inhomogeneity``  slow multiplicative intensity field (uneven illumination / detector gain)
``charging``       bright/dark Gaussian blobs plus a linear ramp (specimen charging)
``curtaining``     vertical streaks of varying width and intensity that fade along y (FIB milling)
``contrast``       global brightness offset and contrast (gain) drift
``blur``           Gaussian defocus blur
``scanlines``      rows shifted sideways or duplicated from the previous row (scan glitches)
``noise``          Poisson (shot) noise then additive Gaussian noise
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import cv2
import numpy as np

from .._errors import DeepAlignError

__all__ = ["ARTIFACT_KINDS", "ArtifactParams", "apply_artifacts"]

ARTIFACT_KINDS: tuple[str, ...] = (
    "inhomogeneity",
    "charging",
    "curtaining",
    "contrast",
    "blur",
    "scanlines",
    "noise",
)

Range = tuple[float, float]


@dataclass(frozen=True)
class ArtifactParams:
    """Ranges ``(low, high)`` that each artifact's random parameters are drawn from uniformly.

    Amplitudes are fractions of the slice's robust intensity span; sizes are fractions of the
    slice's smaller side unless the name says ``_px``. ``strength`` in :func:`apply_artifacts`
    scales every amplitude (not the sizes).
    """

    inhomogeneity_amplitude: Range = (0.1, 0.35)
    inhomogeneity_scale: Range = (0.25, 0.7)
    charging_blobs: Range = (1, 4)
    charging_radius: Range = (0.04, 0.2)
    charging_amplitude: Range = (0.15, 0.6)
    charging_ramp: Range = (0.0, 0.4)
    curtain_count: Range = (4, 30)
    curtain_width_px: Range = (1.0, 10.0)
    curtain_amplitude: Range = (0.05, 0.3)
    brightness: Range = (-0.2, 0.2)
    contrast: Range = (0.6, 1.5)
    blur_sigma_px: Range = (0.4, 1.6)
    scanline_fraction: Range = (0.002, 0.02)
    scanline_shift_px: Range = (1.0, 8.0)
    poisson_peak: Range = (15.0, 150.0)
    gaussian_sigma: Range = (0.02, 0.12)

    def __post_init__(self) -> None:
        for f in fields(self):
            lo, hi = getattr(self, f.name)
            if not (np.isfinite(lo) and np.isfinite(hi)) or hi < lo:
                raise DeepAlignError(
                    f"ArtifactParams.{f.name} must be a finite (low, high) with low <= high, "
                    f"got {(lo, hi)!r}"
                )
        if self.poisson_peak[0] <= 0:
            raise DeepAlignError("ArtifactParams.poisson_peak must be > 0 (photons at full span)")
        if self.contrast[0] <= 0:
            raise DeepAlignError("ArtifactParams.contrast must be > 0")


def _u(rng: np.random.Generator, r: Range) -> float:
    return float(rng.uniform(r[0], r[1])) if r[1] > r[0] else float(r[0])


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Zero-mean, unit-peak random field with features about ``scale`` x the smaller side."""
    h, w = shape
    side = max(2, min(h, w))
    cells = max(2, int(round(1.0 / max(scale, 1e-3))) + 1)
    gh = max(2, int(round(cells * h / side)))
    gw = max(2, int(round(cells * w / side)))
    coarse = rng.standard_normal((gh, gw)).astype(np.float32)
    field = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    field -= field.mean()
    peak = float(np.abs(field).max())
    return field / peak if peak > 0 else field


def _inhomogeneity(img: np.ndarray, rng: np.random.Generator, p: ArtifactParams, s: float,
               span: float, lo: float) -> np.ndarray:
    field = _smooth_field(rng, img.shape, _u(rng, p.inhomogeneity_scale))
    amp = _u(rng, p.inhomogeneity_amplitude) * s
    return (img - lo) * (1.0 + amp * field) + lo


def _charging(img: np.ndarray, rng: np.random.Generator, p: ArtifactParams, s: float,
               span: float, lo: float) -> np.ndarray:
    h, w = img.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = img.copy()
    n = int(round(_u(rng, p.charging_blobs)))
    for _ in range(n):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        r = _u(rng, p.charging_radius) * min(h, w)
        sign = 1.0 if rng.random() < 0.75 else -1.0  # charging is mostly bright
        amp = sign * _u(rng, p.charging_amplitude) * s * span
        out += amp * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
    theta = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(theta) * (xx / max(w - 1, 1) - 0.5) + np.sin(theta) * (yy / max(h - 1, 1) - 0.5))
    out += _u(rng, p.charging_ramp) * s * span * ramp
    return out


def _curtaining(img: np.ndarray, rng: np.random.Generator, p: ArtifactParams, s: float,
               span: float, lo: float) -> np.ndarray:
    h, w = img.shape
    x = np.arange(w, dtype=np.float32)
    profile = np.zeros(w, np.float32)
    for _ in range(int(round(_u(rng, p.curtain_count)))):
        cx = rng.uniform(0, w)
        width = _u(rng, p.curtain_width_px)
        amp = rng.choice([-1.0, 1.0]) * _u(rng, p.curtain_amplitude)
        profile += amp * np.exp(-0.5 * ((x - cx) / (0.5 * width)) ** 2)
    # Curtains start at the milled top edge and fade (at a random rate) towards the bottom.
    y = np.linspace(0.0, 1.0, h, dtype=np.float32)
    envelope = np.exp(-y * rng.uniform(0.0, 2.5)).astype(np.float32)
    if rng.random() < 0.5:
        envelope = envelope[::-1]
    return img + s * span * envelope[:, None] * profile[None, :]


def _contrast(img: np.ndarray, rng: np.random.Generator, p: ArtifactParams, s: float,
               span: float, lo: float) -> np.ndarray:
    gain = 1.0 + (_u(rng, p.contrast) - 1.0) * s
    offset = _u(rng, p.brightness) * s * span
    mean = float(img.mean())
    return (img - mean) * gain + mean + offset


def _blur(img: np.ndarray, rng: np.random.Generator, p: ArtifactParams, s: float,
               span: float, lo: float) -> np.ndarray:
    sigma = max(0.05, _u(rng, p.blur_sigma_px) * min(1.0, s))
    return cv2.GaussianBlur(img, (0, 0), sigmaX=sigma, sigmaY=sigma,
                            borderType=cv2.BORDER_REFLECT)


def _scanlines(img: np.ndarray, rng: np.random.Generator, p: ArtifactParams, s: float,
               span: float, lo: float) -> np.ndarray:
    h, w = img.shape
    out = img.copy()
    n = max(1, int(round(_u(rng, p.scanline_fraction) * min(1.0, s) * h)))
    rows = rng.choice(h, size=min(n, h), replace=False)
    for r in np.sort(rows):
        run = int(rng.integers(1, 4))  # glitches often span a few consecutive lines
        sl = slice(int(r), min(h, int(r) + run))
        if rng.random() < 0.5 and r > 0:
            out[sl] = out[int(r) - 1]  # duplicated line (scan stalled)
        else:
            shift = int(round(_u(rng, p.scanline_shift_px))) * int(rng.choice([-1, 1]))
            out[sl] = np.roll(out[sl], shift, axis=1)
    return out


def _noise(img: np.ndarray, rng: np.random.Generator, p: ArtifactParams, s: float,
               span: float, lo: float) -> np.ndarray:
    peak = _u(rng, p.poisson_peak) / max(s, 1e-3)  # stronger = fewer photons
    norm = np.clip((img - lo) / span, 0.0, None)
    shot = rng.poisson(norm * peak).astype(np.float32) / peak
    sigma = _u(rng, p.gaussian_sigma) * s
    noisy = shot + rng.standard_normal(img.shape).astype(np.float32) * sigma
    return noisy * span + lo


_APPLY = {
    "inhomogeneity": _inhomogeneity,
    "charging": _charging,
    "curtaining": _curtaining,
    "contrast": _contrast,
    "blur": _blur,
    "scanlines": _scanlines,
    "noise": _noise,
}


def apply_artifacts(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    strength: float = 1.0,
    kinds: Sequence[str] = ARTIFACT_KINDS,
    params: ArtifactParams | None = None,
) -> np.ndarray:
    """Corrupt one slice with synthetic EM artifacts.

    Parameters
    ----------
    image : ndarray, shape (H, W)
        The clean slice, any real dtype.
    rng : numpy.random.Generator
        Source of all randomness: the same generator state gives the same output.
    strength : float
        Multiplies every amplitude (0 = no change for amplitude-driven kinds).
    kinds : sequence of str
        Which artifacts to apply, a subset of :data:`ARTIFACT_KINDS`. They are applied in the
        physical order of :data:`ARTIFACT_KINDS` (specimen and illumination effects first,
        detector noise last) whatever order is given.
    params : ArtifactParams, optional
        Parameter ranges; default ``ArtifactParams()`` (the training ranges).

    Returns
    -------
    ndarray, shape (H, W), float32
        The corrupted slice in the input's intensity units.
    """
    img = np.asarray(image)
    if img.ndim != 2 or img.shape[0] < 2 or img.shape[1] < 2:
        raise DeepAlignError(f"apply_artifacts needs a 2-D slice of at least 2x2, got {img.shape}")
    if not (np.issubdtype(img.dtype, np.integer) or np.issubdtype(img.dtype, np.floating)):
        raise DeepAlignError(f"apply_artifacts needs a real-valued slice, got dtype {img.dtype}")
    if not isinstance(rng, np.random.Generator):
        raise DeepAlignError("rng must be a numpy.random.Generator (np.random.default_rng(seed))")
    if not np.isfinite(strength) or strength < 0:
        raise DeepAlignError(f"strength must be a finite number >= 0, got {strength}")
    unknown = sorted(set(kinds) - set(ARTIFACT_KINDS))
    if unknown:
        raise DeepAlignError(f"unknown artifact kinds {unknown}; choose from {ARTIFACT_KINDS}")
    p = params if params is not None else ArtifactParams()
    out = img.astype(np.float32, copy=True)
    sample = out[:: max(1, out.shape[0] // 256), :: max(1, out.shape[1] // 256)]
    lo, hi = (float(v) for v in np.percentile(sample, [0.5, 99.5]))
    span = hi - lo if hi > lo else 1.0
    wanted = set(kinds)
    for kind in ARTIFACT_KINDS:
        if kind in wanted:
            out = _APPLY[kind](out, rng, p, float(strength), span, lo).astype(np.float32,
                                                                                copy=False)
    return np.ascontiguousarray(out, dtype=np.float32)
