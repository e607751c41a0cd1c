from __future__ import annotations

import numpy as np
import pytest
from deepalign_fast._errors import DeepAlignError
from deepalign_fast.qc.synth import (
    DRIFT_PROFILES,
    GroundTruth,
    compose,
    drift_transforms,
    fibsem_artifacts,
    invert,
    misalign_labels,
    misalign_stack,
    random_transforms,
    reslice,
)
from scipy import ndimage


def _smooth_stack(rng: np.random.Generator, n: int = 4, h: int = 96, w: int = 128) -> np.ndarray:
    noise = rng.normal(size=(n, h, w))
    return np.stack([ndimage.gaussian_filter(s, 3.0) for s in noise]).astype(np.float32) * 50


def _decompose(t: np.ndarray) -> tuple[float, float, float]:
    """rotation (deg), scale, shear of L = R(theta) diag(s, s) [[1, sh], [0, 1]]."""
    lin = t[:, :2]
    theta = np.arctan2(lin[1, 0], lin[0, 0])
    s = np.hypot(lin[0, 0], lin[1, 0])
    c, si = np.cos(-theta), np.sin(-theta)
    u = np.array([[c, -si], [si, c]]) @ lin / s
    return float(np.rad2deg(theta)), float(s), float(u[0, 1])


def test_random_transforms_profiles(rng):
    t = random_transforms(200, (100, 120), rng, profile="sstem")
    assert t.shape == (200, 2, 3) and t.dtype == np.float64
    parts = np.array([_decompose(x) for x in t])
    assert np.abs(parts[:, 0]).max() <= 3.0 and np.abs(parts[:, 0]).max() > 2.5
    assert np.abs(parts[:, 1] - 1).max() <= 0.02 + 1e-12
    assert np.abs(parts[:, 2]).max() <= 0.01 + 1e-12
    # rotation/scale about the centre: the centre moves by the shift only (|shift| <= 20)
    c = np.array([59.5, 49.5])
    moved = np.einsum("nij,j->ni", t[:, :, :2], c) + t[:, :, 2] - c
    assert np.abs(moved).max() <= 20.0 + 1e-9 and np.abs(moved).max() > 15

    j = random_transforms(50, (100, 120), rng, profile="jitter", shift=4)
    assert np.allclose(j[:, :, :2], np.eye(2))
    assert np.abs(j[:, :, 2]).max() <= 4

    f = random_transforms(100, (100, 120), rng, profile="fibsem", drift=40)
    shifts = np.einsum("nij,j->ni", f[:, :, :2], c) + f[:, :, 2] - c
    # drift of 40 px plus jitter of at most 3 px; consecutive slices differ by jitter + slow drift
    assert 37 <= np.abs(shifts).max() <= 43
    assert np.abs(np.diff(shifts, axis=0)).max() < 12
    assert np.abs([_decompose(x)[0] for x in f]).max() <= 0.2 + 1e-9


def test_random_transforms_bad_params(rng):
    with pytest.raises(DeepAlignError, match="unknown parameter"):
        random_transforms(3, (10, 10), rng, profile="jitter", rotation_deg=1)
    with pytest.raises(DeepAlignError, match="unknown profile"):
        random_transforms(3, (10, 10), rng, profile="nope")


def test_misalign_stack_matches_independent_resampling(rng):
    clean = _smooth_stack(rng)
    mis, truth = misalign_stack(clean, rng, profile="sstem")
    n, h, w = mis.shape
    assert (h, w) == truth.shape and truth.clean_shape == clean.shape[1:]
    assert h == clean.shape[1] - 2 * truth.margin and w == clean.shape[2] - 2 * truth.margin
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    for z in range(n):
        t = truth.transforms[z]
        sx = t[0, 0] * xs + t[0, 1] * ys + t[0, 2]
        sy = t[1, 0] * xs + t[1, 1] * ys + t[1, 2]
        # every output pixel samples inside the clean slice: no fill borders
        assert sx.min() >= 0 and sy.min() >= 0
        assert sx.max() <= clean.shape[2] - 1 and sy.max() <= clean.shape[1] - 1
        ref = ndimage.map_coordinates(clean[z].astype(np.float64), [sy, sx], order=1)
        # cv2 interpolates on a 1/32-px lattice; the field is smooth so this is tight
        assert np.abs(mis[z] - ref).max() < 0.05 * np.abs(clean[z]).max()
        assert np.abs(mis[z] - ref).mean() < 0.005 * np.abs(clean[z]).max()


def test_misalign_margin_checks(rng):
    clean = _smooth_stack(rng, n=2)
    shift = np.array([[[1, 0, 10.0], [0, 1, -4.0]], [[1, 0, -3.0], [0, 1, 2.0]]])
    mis, truth = misalign_stack(clean, shift)
    assert truth.margin == 11  # 10 px needed + 1 px safety
    assert truth.profile == "custom"
    np.testing.assert_allclose(truth.transforms[0, :, 2], [21.0, 7.0])
    np.testing.assert_allclose(mis[0], clean[0, 7:7 + mis.shape[1], 21:21 + mis.shape[2]],
                               atol=1e-4)
    with pytest.raises(DeepAlignError, match="too small"):
        misalign_stack(clean, shift, margin=5)
    huge = np.array([[[1, 0, 500.0], [0, 1, 0.0]]] * 2)
    with pytest.raises(DeepAlignError, match="too large"):
        misalign_stack(clean, huge)


def test_misalign_labels_and_roundtrip(rng):
    clean = _smooth_stack(rng, n=3)
    labels = (clean > 0).astype(np.uint8) * 7
    mis, truth = misalign_stack(clean, 5, profile="sstem")
    assert truth.seed == 5
    mlab = misalign_labels(labels, truth)
    assert mlab.dtype == np.uint8 and set(np.unique(mlab)) <= {0, 7}
    # labels follow the image: where the misaligned image is clearly positive, so is the label
    sure = np.abs(mis) > 5
    assert ((mlab[sure] == 7) == (mis[sure] > 0)).mean() > 0.999
    # GroundTruth JSON round trip
    back = GroundTruth.from_json(truth.to_json())
    np.testing.assert_array_equal(back.transforms, truth.transforms)
    assert (back.shape, back.clean_shape, back.margin, back.profile) == (
        truth.shape, truth.clean_shape, truth.margin, truth.profile)
    with pytest.raises(DeepAlignError):
        misalign_labels(labels[:, :10], truth)


def test_compose_invert(rng):
    a = random_transforms(5, (50, 50), rng)
    ident = compose(a, invert(a))
    np.testing.assert_allclose(ident, np.broadcast_to(np.eye(2, 3), (5, 2, 3)), atol=1e-12)
    p = np.array([3.0, 4.0, 1.0])
    np.testing.assert_allclose(compose(a[0], a[1]) @ p, a[0] @ np.r_[a[1] @ p, 1.0])


def test_misalign_real_lucchi(lucchi):
    image, mask = lucchi
    clean, lab = image[:4], mask[:4]
    mis, truth = misalign_stack(clean, 0, profile="fibsem")
    mlab = misalign_labels(lab, truth)
    assert mis.dtype == np.uint8 and mlab.shape == mis.shape
    # undoing the known transform brings the image back onto the clean slice
    z = 2
    back = invert(truth.transforms[z])
    import cv2

    h, w = clean.shape[1:]
    rec = cv2.warpAffine(mis[z], back, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
    valid = cv2.warpAffine(np.ones_like(mis[z]), back, (w, h),
                           flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
                           borderMode=cv2.BORDER_CONSTANT) > 0
    valid = ndimage.binary_erosion(valid, iterations=3)
    diff = np.abs(rec.astype(float) - clean[z].astype(float))[valid]
    assert np.median(diff) < 6


# --------------------------------------------------------------------------------------------
# exact-truth stacks
# --------------------------------------------------------------------------------------------
def test_reslice_planes():
    vol = np.arange(3 * 4 * 5).reshape(3, 4, 5)
    np.testing.assert_array_equal(reslice(vol, "xy"), vol)
    xz = reslice(vol, "xz")
    assert xz.shape == (4, 3, 5) and xz.flags.c_contiguous
    np.testing.assert_array_equal(xz[2], vol[:, 2, :])  # plane y = 2: a (z, x) image
    yz = reslice(vol, "yz")
    assert yz.shape == (5, 3, 4)
    np.testing.assert_array_equal(yz[1], vol[:, :, 1])  # plane x = 1: a (z, y) image
    with pytest.raises(DeepAlignError, match="plane"):
        reslice(vol, "zz")
    with pytest.raises(DeepAlignError, match=r"\(z, y, x\)"):
        reslice(vol[0], "xz")


def test_drift_transforms_components():
    shape = (80, 120)
    c = np.array([59.5, 39.5])

    def draw(**kw: float) -> np.ndarray:
        zero = dict.fromkeys(DRIFT_PROFILES["mild"], 0.0)
        return drift_transforms(300, shape, np.random.default_rng(3), profile="mild",
                                **{**zero, **kw})

    np.testing.assert_allclose(draw(), np.tile(np.eye(2, 3), (300, 1, 1)), atol=1e-12)
    # i.i.d. jitter: translation only, its standard deviation per axis
    jit = draw(jitter=2.0)
    np.testing.assert_allclose(jit[:, :, :2], np.tile(np.eye(2), (300, 1, 1)), atol=1e-12)
    assert 1.7 < jit[:, :, 2].std() < 2.3 and np.abs(np.diff(jit[:, 0, 2])).mean() > 1.5
    # a random walk: small steps, wide excursions, centred
    walk = draw(walk=0.5)[:, :, 2]
    assert abs(np.diff(walk, axis=0).std() - 0.5) < 0.05
    assert np.abs(walk).max() > 3 and np.allclose(walk.mean(axis=0), 0, atol=1e-9)
    # the smooth stage drift reaches its amplitude and is smooth
    smooth = draw(smooth=10.0)[:, :, 2]
    assert abs(np.abs(smooth).max() - 10.0) < 1e-9
    assert np.abs(np.diff(smooth, 2, axis=0)).max() < 0.01
    # rotation / scale / shear about the slice centre: the centre moves by the translation only
    aff = draw(rotation_deg=0.5, scale=0.01, shear=0.01)
    np.testing.assert_allclose(np.einsum("nij,j->ni", aff[:, :, :2], c) + aff[:, :, 2],
                               np.tile(c, (300, 1)), atol=1e-9)
    rot, scale, shear = np.array([_decompose(t) for t in aff]).T
    assert 0.4 < rot.std() < 0.6 and 0.008 < scale.std() < 0.012 and 0.008 < shear.std() < 0.012
    # the first slice is misaligned too, and seeds reproduce
    full = drift_transforms(50, shape, np.random.default_rng(9), profile="strong")
    assert not np.allclose(full[0], np.eye(2, 3))
    np.testing.assert_array_equal(full, drift_transforms(50, shape, np.random.default_rng(9),
                                                         profile="strong"))
    with pytest.raises(DeepAlignError, match="unknown drift profile"):
        drift_transforms(5, shape, np.random.default_rng(0), profile="nope")
    with pytest.raises(DeepAlignError, match="unknown parameter"):
        drift_transforms(5, shape, np.random.default_rng(0), wobble=1.0)
    with pytest.raises(DeepAlignError, match=">= 0"):
        drift_transforms(5, shape, np.random.default_rng(0), jitter=-1.0)


def test_drift_misaligned_stack_has_no_border(rng):
    clean = _smooth_stack(rng, n=12) + 100  # strictly positive: a fill border would be 0
    t = drift_transforms(12, clean.shape[1:], rng, profile="strong")
    mis, truth = misalign_stack(clean, t)
    assert mis.min() > 50 and truth.margin > 0
    # every slice is the clean slice seen through its truth transform
    z = 5
    inner = (slice(truth.margin, -truth.margin),) * 2
    back = cv2_pull(mis[z], invert(truth.transforms[z]), clean.shape[1:])
    assert np.median(np.abs(back - clean[z])[inner]) < 0.5


def cv2_pull(img: np.ndarray, t: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    import cv2

    return np.asarray(cv2.warpAffine(img, t, (shape[1], shape[0]),
                                     flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP))


def test_fibsem_artifacts(rng):
    clean = (_smooth_stack(rng, n=6) + 128).clip(0, 255).astype(np.uint8)
    out = fibsem_artifacts(clean, seed=4, snr=1.5)
    assert out.dtype == np.uint8 and out.shape == clean.shape
    np.testing.assert_array_equal(out, fibsem_artifacts(clean, seed=4, snr=1.5))
    # low SNR: the corruption is larger than the signal's own contrast
    a = out.astype(float)
    resid = a - a.mean(axis=(1, 2), keepdims=True)
    c = clean.astype(float) - clean.mean(axis=(1, 2), keepdims=True)
    gain = (resid * c).sum() / (c * c).sum()
    assert (resid - gain * c).std() > 0.5 * (gain * c).std()
    # curtaining is the same streak pattern on every slice (fixed in the detector frame)
    flat = fibsem_artifacts(np.full((4, 96, 128), 100, np.uint8), seed=4).astype(float)
    cols = flat.mean(axis=1)
    streaks = cols - ndimage.gaussian_filter1d(cols, 8.0, axis=1)  # narrow streaks only
    assert streaks.std() > 0.5
    assert min(np.corrcoef(streaks[0], streaks[z])[0, 1] for z in (1, 2, 3)) > 0.8
    with pytest.raises(DeepAlignError, match="snr"):
        fibsem_artifacts(clean, seed=0, snr=0.0)
