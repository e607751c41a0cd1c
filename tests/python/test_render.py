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


# No sample of B's lattice falls on a half pixel, where rounding may go either way.
B = np.array([[0.99131, 0.03173, 1.71319], [-0.02137, 1.00891, -2.29173]])


def _nearest(labels: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Exact nearest sampling: the pixel at floor(x + 0.5), floor(y + 0.5); 0 outside."""
    xi, yi = np.floor(xs + 0.5).astype(np.int64), np.floor(ys + 0.5).astype(np.int64)
    inside = (xi >= 0) & (xi < labels.shape[1]) & (yi >= 0) & (yi < labels.shape[0])
    out = np.zeros(xs.shape, labels.dtype)
    out[inside] = labels[yi[inside], xi[inside]]
    return out


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.uint32, np.int64, np.uint64])
def test_integer_labels_of_any_width_are_copied_exactly(rng: np.random.Generator,
                                                        dtype: type) -> None:
    """Nearest renders of label IDs that float32 cannot hold (uint64 near 2**64, negative
    int64) copy them exactly, with an affine and with a displacement field."""
    info = np.iinfo(dtype)
    labels = rng.integers(info.min, info.max, size=(40, 50), dtype=dtype, endpoint=True)
    yy, xx = np.mgrid[0:36, 0:44].astype(np.float64)
    got = render_slice(labels, SliceMap(B), (36, 44), interpolation="nearest")
    assert got.dtype == labels.dtype
    np.testing.assert_array_equal(
        got, _nearest(labels, B[0, 0] * xx + B[0, 1] * yy + B[0, 2],
                      B[1, 0] * xx + B[1, 1] * yy + B[1, 2]))
    u = (rng.normal(size=(2, 40, 50)) * 2.0).astype(np.float32)
    yy, xx = np.mgrid[0:40, 0:50].astype(np.float64)
    px, py = xx + u[0], yy + u[1]
    got = render_slice(labels, SliceMap(B, displacement=u), (40, 50), interpolation="nearest")
    ref = _nearest(labels, B[0, 0] * px + B[0, 1] * py + B[0, 2],
                   B[1, 0] * px + B[1, 1] * py + B[1, 2])
    # (float32 map arithmetic may round a sample sitting on a half pixel the other way)
    assert np.mean(got == ref) > 0.999
    with pytest.raises(ValueError, match="nearest interpolation only"):
        render_slice(labels, SliceMap(B), (36, 44), interpolation="linear")
