"""bench_modes: its deformation and its local-shift measure."""

from __future__ import annotations

import cv2
import numpy as np


def _texture(shape: tuple[int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    smooth = cv2.GaussianBlur(rng.normal(128, 60, shape), (0, 0), 2.0)
    return np.clip(smooth, 0, 255).astype(np.uint8)


def test_local_shift_reads_a_known_shift_and_centring_forgives_it() -> None:
    from benchmarks.bench_modes import local_shift

    image = _texture((128, 128), 1)
    moved = np.roll(image, 2, axis=1)  # content 2 px to the right
    assert abs(local_shift(image, moved, centred=False) - 2.0) < 0.3
    assert local_shift(image, moved, centred=True) < 0.3
    assert local_shift(image, image, centred=False) < 0.05


def test_deformed_keeps_the_first_slice_and_bends_the_others_by_about_the_peak() -> None:
    from benchmarks.bench_modes import deformed, local_shift

    clean = np.stack([_texture((96, 96), 2)] * 4)
    bent = deformed(clean, seed=0, peak=3.0)
    assert bent.dtype == np.uint8 and bent.shape == clean.shape
    np.testing.assert_array_equal(bent[0], clean[0])
    for z in range(1, 4):
        assert 0.3 < local_shift(clean[z], bent[z], centred=True) < 3.0
    np.testing.assert_array_equal(deformed(clean, seed=0, peak=3.0), bent)  # seeded


def test_cracked_moves_each_side_by_its_affine_and_marks_the_crack() -> None:
    """Each side of the torn slice holds the clean content where its affine (clean -> torn)
    puts it (checked against scipy's bilinear sampling of the clean slice at the inverse
    map); the mask covers the 10-px crack between them, which is dark."""
    from scipy.ndimage import map_coordinates

    from benchmarks.bench_modes import CRACK_SIDES, cracked

    clean = _texture((160, 160), 3)
    torn, mask = cracked(clean)
    h, w = clean.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    line = w / 2 + 0.15 * (ys - h / 2)
    for a, side in zip(CRACK_SIDES, (xs < line - 8, xs > line + 8), strict=True):
        inv = np.linalg.inv(np.vstack([a, [0, 0, 1]]))[:2]
        sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
        sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
        ok = side & (sx > 1) & (sx < w - 2) & (sy > 1) & (sy < h - 2)
        want = map_coordinates(clean.astype(np.float64), [sy, sx], order=1)
        assert ok.sum() > 0.3 * h * w
        assert np.abs(torn[ok] - want[ok]).max() < 1.5
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}
    assert 0.06 < (mask > 0).mean() < 0.08  # 10-11 px of 160 per row
    assert (torn[mask > 0] == 0).all()


def test_pull_positions_are_where_the_map_samples_and_nan_outside() -> None:
    """A shift by (3, -2): every output pixel samples its input 3 px right and 2 px up, and
    the pixels that sample outside the input are NaN."""
    from deepalign_fast.transforms import TransformSet

    from benchmarks.bench_modes import pull_positions

    ts = TransformSet(np.array([[[1.0, 0.0, 3.0], [0.0, 1.0, -2.0]]]), (1, 20, 30), (20, 30))
    got = pull_positions(ts, 0)
    ys, xs = np.mgrid[0:20, 0:30].astype(np.float64)
    inside = (xs + 3 <= 29) & (ys - 2 >= 0)
    np.testing.assert_allclose(got[0][inside], (xs + 3)[inside], atol=1e-4)
    np.testing.assert_allclose(got[1][inside], (ys - 2)[inside], atol=1e-4)
    assert np.isnan(got[:, ~inside]).all()


def test_partial_crack_tears_above_its_tip_only_and_its_pull_map_is_exact() -> None:
    """The torn slice holds the clean content at the pull map's inverse (checked against
    scipy's bilinear sampling of the clean slice where the map says the content went): the
    right side shifted whole above the tip, the left side in place, the tissue below the tip
    unbroken; the mask covers the crack above the tip only."""
    from scipy.ndimage import map_coordinates

    from benchmarks.bench_modes import partial_crack

    clean = _texture((200, 200), 4)
    shift = (8.0, -5.0)
    torn, mask, pull = partial_crack(clean, shift)
    h, w = clean.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    line = w / 2 + 0.15 * (ys - h / 2)
    inner = (xs > 12) & (xs < w - 12) & (ys > 12) & (ys < h - 12)
    far = inner & ((np.abs(xs - line) > 12) | (ys > 0.55 * h + 12))
    # content of clean pixel p lies at pull(p) in the torn slice
    got = map_coordinates(torn.astype(np.float64), [pull[1], pull[0]], order=1)
    assert np.abs(got[far] - clean[far]).mean() < 1.5
    up = inner & (ys < 0.4 * h)  # above the tip across the slanted crack
    left, right = up & (xs < line - 12), up & (xs > line + 12)
    np.testing.assert_allclose(pull[0][right], xs[right] - shift[0], atol=1e-3)
    np.testing.assert_allclose(pull[1][right], ys[right] - shift[1], atol=1e-3)
    np.testing.assert_allclose(pull[:, left], np.stack([xs, ys])[:, left], atol=1e-3)
    below = inner & (ys > 0.6 * h)  # unbroken: neighbouring pulls differ by about a pixel
    step = np.hypot(*np.diff(pull, axis=2))[below[:, 1:]]
    assert step.max() < 1.2
    assert set(np.unique(mask)) == {0, 255} and (torn[mask > 0] == 0).all()
    assert not mask[int(0.6 * h):].any() and mask[: int(0.5 * h)].any(axis=1).all()
