"""Synthetic misalignment of an already aligned stack, with stored ground truth.

An aligned EM stack (lucchi, isbi2012, drosophila) is turned into a misaligned one by warping
each slice with a known affine and cropping, so an aligner's output can be scored exactly.

Conventions (see the package docstring): points are ``(x, y)`` pixels, origin at the centre of
the top-left pixel; a transform is a pull map. Here ``truth.transforms[z]`` maps pixel
coordinates of MISALIGNED slice ``z`` to coordinates of the CLEAN (original, aligned) slice
``z``, i.e. ``misaligned[z][y, x] = clean[z][truth.transforms[z](x, y)]``.

The misaligned slices are a crop of the warped clean slice, ``margin`` pixels smaller on every
side, chosen so that every output pixel samples inside the clean slice: like a real field of
view, there are no fill borders that an aligner could lock on to. The crop offset is part of
the stored transforms.
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np
from numpy.typing import ArrayLike, NDArray

from .._errors import DeepAlignError
from ..geometry import apply_affine, as_3x3, compose, invert
from .truth import GroundTruth

__all__ = [
    "DRIFT_PROFILES",
    "PROFILES",
    "GroundTruth",
    "compose",
    "drift_transforms",
    "fibsem_artifacts",
    "invert",
    "misalign_labels",
    "misalign_stack",
    "random_transforms",
    "reslice",
    "reslice_stack",
]

#: Default parameters of each misalignment profile (all overridable by keyword).
PROFILES: dict[str, dict[str, float]] = {
    # serial sections: every section placed independently on its grid
    "sstem": {"rotation_deg": 3.0, "shift": 20.0, "scale": 0.02, "shear": 0.01},
    # FIB-SEM: small per-slice jitter plus a slow stage drift over the whole stack
    "fibsem": {"rotation_deg": 0.2, "shift": 3.0, "drift": 30.0, "scale": 0.0, "shear": 0.0},
    # translation jitter only
    "jitter": {"shift": 5.0},
}

_SAFETY_PX = 1  # extra margin so bilinear sampling never touches the border handling


# --------------------------------------------------------------------------------------------
# small affine helpers (2x3 float64 <-> 3x3)
# --------------------------------------------------------------------------------------------
_as3 = as_3x3
_apply = apply_affine


# --------------------------------------------------------------------------------------------
# the warp that renders synthetic misalignments (OpenCV, so the benchmark's stacks do not
# depend on the kernel under test)
# --------------------------------------------------------------------------------------------
def render_affine(
    image: NDArray[Any], transform: NDArray[np.float64], shape: tuple[int, int], *,
    nearest: bool = False, border_value: float = 0.0, replicate: bool = False,
) -> NDArray[Any]:
    """Pull-warp one slice: ``out[y, x] = image[transform(x, y)]``, output ``shape=(h, w)``."""
    flags = (cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR) | cv2.WARP_INVERSE_MAP
    src = image
    if image.dtype in (np.int32, np.int64, np.uint32, np.uint64) or image.dtype == bool:
        if not nearest:
            raise DeepAlignError(f"cannot interpolate {image.dtype} images bilinearly")
        src = image.astype(np.float64)  # labels: exact in float64 up to 2**53
    out = cv2.warpAffine(
        np.ascontiguousarray(src), np.asarray(transform, np.float64),
        (int(shape[1]), int(shape[0])),
        flags=flags, borderMode=cv2.BORDER_REPLICATE if replicate else cv2.BORDER_CONSTANT,
        borderValue=border_value,
    )
    return out.astype(image.dtype) if src is not image else out


# --------------------------------------------------------------------------------------------
# ground truth
# --------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------
# random transforms
# --------------------------------------------------------------------------------------------
def _params(profile: str, overrides: dict[str, float],
            table: dict[str, dict[str, float]] | None = None,
            kind: str = "profile") -> dict[str, float]:
    """A profile's parameters with ``overrides``, checked (``table``: PROFILES by default;
    ``kind`` names it in messages)."""
    table = PROFILES if table is None else table
    if profile not in table:
        raise DeepAlignError(f"unknown {kind} {profile!r}; choose one of {sorted(table)}")
    params = dict(table[profile])
    unknown = set(overrides) - set(params)
    if unknown:
        raise DeepAlignError(
            f"unknown parameter(s) {sorted(unknown)} for {kind} {profile!r}; "
            f"valid: {sorted(params)}"
        )
    params.update({k: float(v) for k, v in overrides.items()})
    for k, v in params.items():
        if not math.isfinite(v) or v < 0:
            name = kind.replace(" profile", "") + " parameter"  # "drift parameter", ...
            raise DeepAlignError(f"{name} {k}={v} must be finite and >= 0")
    return params


def _linear(theta: NDArray[np.float64], scale: NDArray[np.float64],
            shear: NDArray[np.float64]) -> NDArray[np.float64]:
    """Stack of 2x2 matrices ``R(theta) @ diag(scale) @ [[1, shear], [0, 1]]``."""
    c, s = np.cos(theta), np.sin(theta)
    rot = np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)
    sh = np.zeros_like(rot)
    sh[:, 0, 0] = scale
    sh[:, 0, 1] = scale * shear
    sh[:, 1, 1] = scale
    return rot @ sh


def random_transforms(
    n: int,
    shape: tuple[int, int],
    rng: np.random.Generator,
    *,
    profile: str = "sstem",
    **params: float,
) -> NDArray[np.float64]:
    """Draw ``n`` random misalignments of a slice of ``shape``.

    Each transform is a pull map in the frame of a slice of ``shape`` (same size as the clean
    slice, before any crop): it rotates, scales and shears about the slice centre and shifts.

    Parameters
    ----------
    n : int
        Number of slices.
    shape : tuple of int
        ``(h, w)`` of the clean slices.
    rng : numpy.random.Generator
        Random source.
    profile : {"sstem", "fibsem", "jitter"}
        ``"sstem"``: each section independent, rotation uniform in ``±rotation_deg`` (3),
        shift ``±shift`` px per axis (20), isotropic scale ``1 ± scale`` (0.02), shear
        ``±shear`` (0.01). ``"fibsem"``: per-slice jitter ``±shift`` px (3) and ``±rotation_deg``
        (0.2) plus a slow drift: a smoothed random walk per axis scaled so its largest excursion
        is ``drift`` px (30). ``"jitter"``: translation ``±shift`` px (5) only.
    **params : float
        Overrides of the profile parameters (see :data:`PROFILES`).

    Returns
    -------
    ndarray, shape (n, 2, 3), float64
    """
    if n < 1:
        raise DeepAlignError(f"need at least one slice, got n={n}")
    p = _params(profile, params)
    h, w = int(shape[0]), int(shape[1])
    zeros = np.zeros(n)
    shift = rng.uniform(-p["shift"], p["shift"], size=(n, 2))
    theta = np.deg2rad(rng.uniform(-1, 1, n) * p.get("rotation_deg", 0.0))
    scale = 1.0 + rng.uniform(-1, 1, n) * p.get("scale", 0.0)
    shear = rng.uniform(-1, 1, n) * p.get("shear", 0.0)
    if profile == "jitter":
        theta, scale, shear = zeros, zeros + 1.0, zeros
    if profile == "fibsem" and p["drift"] > 0 and n > 1:
        walk = np.cumsum(rng.normal(size=(n, 2)), axis=0)
        k = max(3, (n // 8) | 1)  # low-pass: the stage drifts slowly
        kernel = np.hanning(k + 2)[1:-1]
        kernel /= kernel.sum()
        pad = np.pad(walk, ((k // 2, k // 2), (0, 0)), mode="edge")
        walk = np.stack([np.convolve(pad[:, i], kernel, mode="valid") for i in range(2)], -1)
        walk -= walk.mean(axis=0)
        walk *= p["drift"] / max(np.abs(walk).max(), 1e-12)
        shift = shift + walk
    lin = _linear(theta, scale, shear)
    c = np.array([(w - 1) / 2.0, (h - 1) / 2.0])
    out = np.empty((n, 2, 3))
    out[:, :, :2] = lin
    out[:, :, 2] = c - lin @ c + shift  # about the centre: T(p) = L (p - c) + c + shift
    return out


# --------------------------------------------------------------------------------------------
# misaligning stacks
# --------------------------------------------------------------------------------------------
def _fits(full: NDArray[np.float64], clean_shape: tuple[int, int], margin: int) -> bool:
    h, w = clean_shape
    lo, hi_x, hi_y = float(margin), float(w - 1 - margin), float(h - 1 - margin)
    if hi_x < lo or hi_y < lo:
        return False
    corners = np.array([[lo, lo], [hi_x, lo], [lo, hi_y], [hi_x, hi_y]])
    pts = np.einsum("nij,kj->nki", full[:, :, :2], corners) + full[:, None, :, 2]
    eps = 1e-9
    return bool(
        (pts[..., 0] >= -eps).all() and (pts[..., 0] <= w - 1 + eps).all()
        and (pts[..., 1] >= -eps).all() and (pts[..., 1] <= h - 1 + eps).all()
    )


def _min_margin(full: NDArray[np.float64], clean_shape: tuple[int, int]) -> int | None:
    lo, hi = 0, (min(clean_shape) - 1) // 2
    if not _fits(full, clean_shape, hi):
        return None
    while lo < hi:  # fits() is monotone in the margin: a smaller crop always fits better
        mid = (lo + hi) // 2
        if _fits(full, clean_shape, mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def misalign_stack(
    stack: NDArray[Any],
    rng_or_transforms: np.random.Generator | int | ArrayLike,
    *,
    margin: int | None = None,
    profile: str = "sstem",
    min_size: int = 16,
    **params: float,
) -> tuple[NDArray[Any], GroundTruth]:
    """Misalign an aligned stack with random (or given) affines and crop it.

    Parameters
    ----------
    stack : ndarray, shape (n, h, w)
        The clean (aligned) stack.
    rng_or_transforms : Generator, int or array_like (n, 2, 3)
        A random generator or seed (transforms are drawn with :func:`random_transforms`), or
        explicit pull maps in the frame of the full clean slice (before cropping).
    margin : int, optional
        Crop margin in pixels on every side. By default the smallest margin (+1 px) for which
        every output pixel samples inside its clean slice. A given margin that is too small
        raises.
    profile : str
        Profile for drawn transforms (see :func:`random_transforms`).
    min_size : int
        Smallest acceptable side of the cropped slices.
    **params : float
        Profile parameter overrides.

    Returns
    -------
    misaligned : ndarray, shape (n, h - 2 margin, w - 2 margin), dtype of ``stack``
    truth : GroundTruth
        ``truth.transforms[z]`` maps misaligned coordinates to clean coordinates (including the
        crop offset).

    Raises
    ------
    DeepAlignError
        If the transforms are too large to fit a crop of at least ``min_size`` pixels.
    """
    stack = np.asarray(stack)
    if stack.ndim != 3:
        raise DeepAlignError(f"stack must be (z, y, x), got shape {stack.shape}")
    n, h, w = stack.shape
    seed: int | None = None
    if isinstance(rng_or_transforms, (np.random.Generator, int, np.integer)):
        if not isinstance(rng_or_transforms, np.random.Generator):
            seed = int(rng_or_transforms)
        rng = np.random.default_rng(rng_or_transforms)
        full = random_transforms(n, (h, w), rng, profile=profile, **params)
        used_profile, used_params = profile, _params(profile, params)
    else:
        full = np.asarray(rng_or_transforms, dtype=np.float64)
        if full.shape != (n, 2, 3):
            raise DeepAlignError(f"need ({n}, 2, 3) transforms for {n} slices, got {full.shape}")
        used_profile, used_params = "custom", {}
    needed = _min_margin(full, (h, w))
    if needed is None:
        raise DeepAlignError(
            f"misalignment too large for {h}x{w} slices: no crop keeps every pixel inside the "
            "clean slice; use smaller profile parameters"
        )
    if margin is None:
        margin = needed + _SAFETY_PX
    elif margin < needed:
        raise DeepAlignError(
            f"margin={margin} too small: the transforms need at least {needed} px"
        )
    out_h, out_w = h - 2 * margin, w - 2 * margin
    if min(out_h, out_w) < min_size:
        raise DeepAlignError(
            f"margin {margin} leaves {out_h}x{out_w} slices (< min_size={min_size}); "
            "use smaller profile parameters or larger slices"
        )
    offset = np.array([[1.0, 0.0, margin], [0.0, 1.0, margin]])
    transforms = compose(full, offset)
    out = np.empty((n, out_h, out_w), dtype=stack.dtype)
    for z in range(n):
        out[z] = render_affine(stack[z], transforms[z], (out_h, out_w), replicate=True)
    truth = GroundTruth(
        transforms=transforms, shape=(out_h, out_w), clean_shape=(h, w),
        profile=used_profile, params=used_params, margin=int(margin), seed=seed,
    )
    return out, truth


def misalign_labels(labels: NDArray[Any], truth: GroundTruth) -> NDArray[Any]:
    """Carry a clean label stack into the misaligned frame (nearest-neighbour sampling).

    Parameters
    ----------
    labels : ndarray, shape (n, H, W)
        Labels of the clean stack, ``(H, W) == truth.clean_shape``.
    truth : GroundTruth
        As returned by :func:`misalign_stack`.

    Returns
    -------
    ndarray, shape (n, h, w), dtype of ``labels``
    """
    labels = np.asarray(labels)
    if labels.ndim != 3 or labels.shape[1:] != truth.clean_shape or len(labels) != len(truth):
        raise DeepAlignError(
            f"labels shape {labels.shape} does not match the ground truth "
            f"({len(truth)}, {truth.clean_shape[0]}, {truth.clean_shape[1]})"
        )
    out = np.empty((len(labels),) + truth.shape, dtype=labels.dtype)
    for z in range(len(labels)):
        out[z] = render_affine(labels[z], truth.transforms[z], truth.shape, nearest=True,
                              replicate=True)
    return out


# --------------------------------------------------------------------------------------------
# exact-truth stacks: reslices of an isotropic volume, drift + jitter + per-slice affine errors
# --------------------------------------------------------------------------------------------
#: Parameters of :func:`drift_transforms` per profile (all overridable by keyword). Lengths
#: are in pixels of the slices they are applied to.
DRIFT_PROFILES: dict[str, dict[str, float]] = {
    # FIB-SEM stage: slow wandering, sub-pixel jitter, tiny per-slice scan distortions
    "mild": {"walk": 0.4, "smooth": 8.0, "jitter": 0.7, "rotation_deg": 0.1, "scale": 0.003,
             "shear": 0.003},
    # an unstable stage / charging sample: fast random walk, larger jitter and distortions
    "strong": {"walk": 0.8, "smooth": 12.0, "jitter": 1.5, "rotation_deg": 0.2, "scale": 0.005,
               "shear": 0.005},
    # serial sections: each section placed independently, plus a slow drift of the grid
    "sstem": {"walk": 0.0, "smooth": 4.0, "jitter": 4.0, "rotation_deg": 1.0, "scale": 0.01,
              "shear": 0.01},
}


def reslice(volume: NDArray[Any], plane: str) -> NDArray[Any]:
    """View an isotropic ``(z, y, x)`` volume as a stack of XY, XZ or YZ planes.

    Every plane of an XZ or YZ reslice is made of rows of the same acquired slices, so
    neighbouring planes are exactly aligned by construction (an exact truth for aligners).

    Parameters
    ----------
    volume : ndarray, shape (z, y, x)
    plane : {"xy", "xz", "yz"}
        ``"xy"``: the volume itself; ``"xz"``: one ``(z, x)`` image per ``y``;
        ``"yz"``: one ``(z, y)`` image per ``x``.

    Returns
    -------
    ndarray, C-contiguous copy (``"xz"``: ``(y, z, x)``; ``"yz"``: ``(x, z, y)``)
    """
    vol = np.asarray(volume)
    if vol.ndim != 3:
        raise DeepAlignError(f"reslice needs a (z, y, x) volume, got shape {vol.shape}")
    axes = {"xy": (0, 1, 2), "xz": (1, 0, 2), "yz": (2, 0, 1)}
    if plane not in axes:
        raise DeepAlignError(f"unknown plane {plane!r}; choose one of {sorted(axes)}")
    return np.ascontiguousarray(vol.transpose(axes[plane]))


def reslice_stack(stack: NDArray[Any], plane: str) -> NDArray[Any]:
    """:func:`reslice`, with ``"xy"`` returning ``stack`` itself (no copy)."""
    return stack if plane == "xy" else reslice(stack, plane)


def _smooth_curve(n: int, rng: np.random.Generator, amplitude: float) -> NDArray[np.float64]:
    """Per-axis random polynomial of degree 1-3 over the stack, largest excursion ``amplitude``."""
    u = np.linspace(-1.0, 1.0, n)
    basis = np.stack([u, 1.5 * u * u - 0.5, 2.5 * u ** 3 - 1.5 * u], -1)  # Legendre P1..P3
    curve = basis @ rng.normal(size=(3, 2))
    curve -= curve.mean(axis=0)
    return np.asarray(curve * amplitude / max(float(np.abs(curve).max()), 1e-12))


def drift_transforms(
    n: int,
    shape: tuple[int, int],
    rng: np.random.Generator,
    *,
    profile: str = "mild",
    **params: float,
) -> NDArray[np.float64]:
    """Draw FIB-SEM-like misalignments: drift, jitter and small per-slice affine errors.

    Every slice, the first included, gets a transform (a pull map misaligned -> clean, in the
    frame of the clean slice, about its centre) ``p -> L_z (p - c) + c + t_z`` with

    - ``t_z`` = a Gaussian random walk (step ``walk`` px per axis and slice)
      + a smooth stage drift (per axis a random polynomial of degree <= 3 over the stack,
      largest excursion ``smooth`` px) + i.i.d. Gaussian jitter (``jitter`` px per axis); the
      slow part (walk + smooth drift) is centred to mean zero over the stack;
    - ``L_z = R(theta_z) diag(s_z) [[1, h_z], [0, 1]]`` with i.i.d. Gaussian rotation
      (``rotation_deg``), isotropic scale ``1 + N(0, scale)`` and shear ``N(0, shear)``.

    Parameters
    ----------
    n : int
        Number of slices.
    shape : tuple of int
        ``(h, w)`` of the clean slices.
    rng : numpy.random.Generator
        Random source (the result is a function of its state).
    profile : str
        A key of :data:`DRIFT_PROFILES` (``"mild"``, ``"strong"``, ``"sstem"``).
    **params : float
        Overrides of the profile's parameters (``walk``, ``smooth``, ``jitter``,
        ``rotation_deg``, ``scale``, ``shear``).

    Returns
    -------
    ndarray, shape (n, 2, 3), float64
        Feed to :func:`misalign_stack` to render the misaligned stack.
    """
    if n < 1:
        raise DeepAlignError(f"need at least one slice, got n={n}")
    p = _params(profile, params, DRIFT_PROFILES, "drift profile")
    slow = np.cumsum(rng.normal(scale=p["walk"], size=(n, 2)), axis=0)
    slow = slow + _smooth_curve(n, rng, p["smooth"]) if n > 1 else slow
    slow -= slow.mean(axis=0)
    shift = slow + rng.normal(scale=p["jitter"], size=(n, 2))
    theta = np.deg2rad(rng.normal(scale=p["rotation_deg"], size=n))
    scale = 1.0 + rng.normal(scale=p["scale"], size=n)
    shear = rng.normal(scale=p["shear"], size=n)
    lin = _linear(theta, scale, shear)
    h, w = int(shape[0]), int(shape[1])
    c = np.array([(w - 1) / 2.0, (h - 1) / 2.0])
    out = np.empty((n, 2, 3))
    out[:, :, :2] = lin
    out[:, :, 2] = c - lin @ c + shift
    return out


def fibsem_artifacts(
    stack: NDArray[Any],
    seed: int,
    *,
    snr: float = 1.5,
    strength: float = 1.5,
) -> NDArray[np.uint8]:
    """Strong FIB-SEM artifacts on a (misaligned) stack: curtaining, charging, low SNR.

    Curtaining is the same streak pattern on every slice (the milling streaks stay fixed in the
    detector frame, so they pull an aligner toward "no motion"); charging blobs and ramps are
    drawn per slice (:func:`deepalign_fast.qc.artifacts.apply_artifacts`, amplitudes times
    ``strength``); then Gaussian noise of standard deviation ``std(slice) / snr`` is added. The
    result is mapped to uint8 by the stack's 0.5-99.5 percentile range.

    Parameters
    ----------
    stack : ndarray, shape (n, h, w)
    seed : int
        Seed of every random draw.
    snr : float
        Signal-to-noise ratio: standard deviation of the clean slice over that of the noise.
    strength : float
        Amplitude multiplier of curtaining and charging.

    Returns
    -------
    ndarray, shape (n, h, w), uint8
    """
    from .artifacts import apply_artifacts

    arr = np.asarray(stack)
    if arr.ndim != 3:
        raise DeepAlignError(f"stack must be (z, y, x), got shape {arr.shape}")
    if not (math.isfinite(snr) and snr > 0):
        raise DeepAlignError(f"snr must be a finite number > 0, got {snr}")
    rng = np.random.default_rng(seed)
    curtain_seed = int(rng.integers(2**63))
    out = np.empty(arr.shape, np.float32)
    for z in range(len(arr)):
        img = arr[z].astype(np.float32)
        img = apply_artifacts(img, np.random.default_rng(curtain_seed), strength=strength,
                              kinds=("curtaining",))
        img = apply_artifacts(img, rng, strength=strength, kinds=("charging",))
        sigma = float(arr[z].std()) / snr
        out[z] = img + rng.normal(scale=sigma, size=img.shape).astype(np.float32)
    lo, hi = (float(v) for v in np.percentile(out[:, ::4, ::4], [0.5, 99.5]))
    scaled = (out - lo) * (255.0 / max(hi - lo, 1e-6))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
