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
