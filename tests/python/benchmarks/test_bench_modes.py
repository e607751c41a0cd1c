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
