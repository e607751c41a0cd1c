"""One render path: every kind of slice map against the kernels and an exact reference."""

from __future__ import annotations

import numpy as np
import pytest
from deepalign_fast.render import SliceMap, compose_affine_field, render_slice
from deepalign_fast.warp import warp_affine, warp_displacement
from scipy import ndimage as ndi


def _image(rng: np.random.Generator, shape: tuple[int, int] = (40, 50)) -> np.ndarray:
    return ndi.gaussian_filter(rng.random(shape), 2.0).astype(np.float32)


def _exact(image: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """float64 bilinear sampling at (x, y), 0 outside."""
    return ndi.map_coordinates(image.astype(np.float64), [ys, xs], order=1, mode="constant",
                               cval=0.0)


A = np.array([[0.99, 0.03, 1.7], [-0.02, 1.01, -2.3]])


def test_affine_map_is_warp_affine(rng: np.random.Generator) -> None:
    img = _image(rng)
    out = render_slice(img, SliceMap(A), (36, 44))
    np.testing.assert_array_equal(out, warp_affine(img, A, (36, 44)))
    assert SliceMap(A).kind == "affine"


def test_displacement_map_is_affine_after_field(rng: np.random.Generator) -> None:
    img = _image(rng)
    u = (rng.normal(size=(2, 40, 50)) * 0.5).astype(np.float32)
    m = SliceMap(A, displacement=u)
    assert m.kind == "displacement"
    np.testing.assert_array_equal(render_slice(img, m, (40, 50)),
                                  warp_displacement(img, u, affine=A))


def test_affine_field_map_against_exact_reference(rng: np.random.Generator) -> None:
    """p -> A F(p) p with F bilinear between grid nodes, sampled exactly in float64."""
    img = _image(rng, (60, 70))
    h, w, step = 48, 56, 8
    rows, cols = -(-(h - 1) // step) + 1, -(-(w - 1) // step) + 1
    field = np.broadcast_to(np.eye(2, 3), (rows, cols, 2, 3)).copy()
    field[..., 0, 2] = np.linspace(-2, 2, cols)[None, :]  # translation varying along x
    field[..., 1, 1] = 1 + 0.01 * np.linspace(0, 1, rows)[:, None]
    m = SliceMap(A, affine_field=field, field_step=step)
    assert m.kind == "affine-field"
    got = render_slice(img, m, (h, w))
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    comp = compose_affine_field(A, field).reshape(rows, cols, 6)
    p = [ndi.map_coordinates(comp[..., c], [ys / step, xs / step], order=1) for c in range(6)]
    sx = p[0] * xs + p[1] * ys + p[2]
    sy = p[3] * xs + p[4] * ys + p[5]
    inside = (sx >= 0) & (sx <= 69) & (sy >= 0) & (sy <= 59)
    np.testing.assert_allclose(got[inside], _exact(img, sx, sy)[inside], atol=1e-4)


def test_constant_affine_field_equals_the_composed_affine(rng: np.random.Generator) -> None:
    img = _image(rng)
    b = np.array([[1.0, 0.02, -1.5], [0.01, 0.98, 0.75]])
    field = np.broadcast_to(b, (6, 8, 2, 3)).copy()
    got = render_slice(img, SliceMap(A, affine_field=field, field_step=8), (40, 50))
    ab = np.vstack([A, [0, 0, 1]]) @ np.vstack([b, [0, 0, 1]])
    np.testing.assert_allclose(got, warp_affine(img, ab[:2], (40, 50)), atol=1e-4)


def test_bad_maps() -> None:
    with pytest.raises(ValueError, match="affine"):
        SliceMap(np.eye(3)[:1])
    with pytest.raises(ValueError, match="not both"):
        SliceMap(A, displacement=np.zeros((2, 4, 4), np.float32),
                 affine_field=np.zeros((1, 1, 2, 3)), field_step=4)
    with pytest.raises(ValueError, match="field_step"):
        SliceMap(A, affine_field=np.zeros((1, 1, 2, 3)))
    with pytest.raises(ValueError, match="displacement"):
        render_slice(np.zeros((8, 8), np.float32),
                     SliceMap(A, displacement=np.zeros((2, 4, 4), np.float32)), (8, 8))
