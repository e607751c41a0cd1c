"""warp_displacement and the field operations (deepalign_fast.fields) against independent
references: scipy.ndimage.map_coordinates in float64, numpy.gradient, and warps applied in
sequence."""

from __future__ import annotations

import numpy as np
import pytest
from deepalign_fast import (
    compose_affine_displacement,
    compose_displacements,
    jacobian_determinant,
    nonpositive_jacobian_fraction,
    warp_affine,
    warp_displacement,
)
from scipy import ndimage as ndi

DTYPES = [np.uint8, np.uint16, np.float32]
MODES = {"constant": "grid-constant", "replicate": "nearest"}


def _image(rng, dtype, shape=(83, 117)):
    hi = {np.uint8: 255, np.uint16: 65535, np.float32: 1.0}[dtype]
    return (rng.random(shape) * hi).astype(dtype)


def _smooth_field(rng, shape, amp):
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    fx = amp * np.sin(xx / rng.uniform(5, 15) + rng.uniform(0, 6)) * np.cos(yy / 11.0)
    fy = amp * np.cos(yy / rng.uniform(5, 15) + rng.uniform(0, 6)) + rng.uniform(-2, 2)
    return np.stack([fx, fy]).astype(np.float32)


def _coords(u, affine=None):
    h, w = u.shape[1:]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    qx, qy = xx + u[0].astype(np.float64), yy + u[1].astype(np.float64)
    if affine is None:
        return qx, qy
    a = np.asarray(affine, dtype=np.float64)
    return a[0, 0] * qx + a[0, 1] * qy + a[0, 2], a[1, 0] * qx + a[1, 1] * qy + a[1, 2]


def _check_rounded(out, ref, dtype):
    if dtype == np.float32:
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4)
        return
    rounded = np.clip(np.round(ref), 0, np.iinfo(dtype).max)
    diff = np.abs(out.astype(np.float64) - rounded)
    assert diff.max() <= 1
    tol = 0.07 if dtype == np.uint8 else 0.01  # see test_warp.py
    near_tie = np.abs(ref - np.floor(ref) - 0.5) < tol
    assert np.all(near_tie[diff > 0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("border", ["constant", "replicate"])
@pytest.mark.parametrize("with_affine", [False, True])
def test_linear_matches_map_coordinates(rng, num_threads, dtype, border, with_affine):
    img = _image(rng, dtype)
    u = _smooth_field(rng, (71, 125), amp=6.0)  # other output shape than the image's
    affine = np.array([[0.97, 0.06, 3.2], [-0.05, 1.03, -2.4]]) if with_affine else None
    fill = 0.3 if dtype == np.float32 else 17.0
    out = warp_displacement(img, u, affine=affine, border=border, fill=fill,
                            num_threads=num_threads)
    assert out.dtype == dtype and out.shape == (71, 125)
    sx, sy = _coords(u, affine)
    ref = ndi.map_coordinates(img.astype(np.float64), [sy, sx], order=1, mode=MODES[border],
                              cval=fill)
    _check_rounded(out, ref, dtype)
    np.testing.assert_array_equal(
        out, warp_displacement(img, u, affine=affine, border=border, fill=fill, num_threads=1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("border", ["constant", "replicate"])
def test_nearest_matches_map_coordinates_and_never_blends(rng, num_threads, dtype, border):
    labels = rng.integers(0, 7, size=(60, 90)).astype(dtype) * 3  # values 0, 3, ..., 18
    u = _smooth_field(rng, (60, 90), amp=5.0)
    # Keep coordinates off exact .5 ties, where map_coordinates rounds half to even.
    sx, sy = _coords(u)
    assert np.abs(sx - np.floor(sx) - 0.5).min() > 1e-6
    out = warp_displacement(labels, u, interpolation="nearest", border=border, fill=100,
                            num_threads=num_threads)
    ref = ndi.map_coordinates(labels.astype(np.float64), [sy, sx], order=0,
                              mode=MODES[border], cval=100)
    np.testing.assert_array_equal(out, ref.astype(dtype))
    assert set(np.unique(out)) <= set(np.unique(labels)) | {100}


def test_zero_field_is_identity_and_integer_field_is_a_shift(rng):
    img = _image(rng, np.uint8)
    zero = np.zeros((2, *img.shape), np.float32)
    np.testing.assert_array_equal(warp_displacement(img, zero), img)
    u = np.zeros_like(zero)
    u[0], u[1] = 3.0, -2.0
    out = warp_displacement(img, u, border="constant", fill=5)
    np.testing.assert_array_equal(out[2:, :-3], img[:-2, 3:])
    assert np.all(out[:2] == 5) and np.all(out[:, -3:] == 5)
    # zero field + affine == warp_affine
    a = np.array([[1.0, 0.0, 2.5], [0.0, 1.0, -1.25]])
    f = img.astype(np.float32)
    np.testing.assert_allclose(warp_displacement(f, zero, affine=a), warp_affine(f, a),
                               atol=1e-6)


def test_compose_affine_equals_one_pass_with_affine(rng):
    img = _image(rng, np.float32, (90, 90))
    u = _smooth_field(rng, (80, 85), amp=4.0)
    a = np.array([[1.02, -0.04, 1.7], [0.03, 0.98, 2.2]])
    v = compose_affine_displacement(a, u)
    sx, sy = _coords(u, a)
    yy, xx = np.mgrid[0:80, 0:85]
    np.testing.assert_allclose(v[0], sx - xx, atol=2e-5)
    np.testing.assert_allclose(v[1], sy - yy, atol=2e-5)
    np.testing.assert_allclose(warp_displacement(img, v),
                               warp_displacement(img, u, affine=a), atol=2e-4)
    # in place
    w = u.copy()
    assert compose_affine_displacement(a, w, out=w) is w
    np.testing.assert_array_equal(w, v)


def test_compose_displacements_matches_reference_and_sequence(rng):
    h, w = 96, 110
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    # Smooth image and fields, so that two interpolations ~= one.
    img = (np.sin(xx / 9.0) * np.cos(yy / 7.0) + 0.5 * np.sin((xx + yy) / 13.0)).astype(np.float32)
    u1 = _smooth_field(rng, (h, w), amp=3.0)
    u2 = _smooth_field(rng, (h, w), amp=3.0)
    v = compose_displacements(u1, u2)
    # Independent reference: v = u2 + u1(p + u2(p)), u1 sampled by map_coordinates.
    qx, qy = xx + u2[0], yy + u2[1]
    ref = np.stack([u2[k] + ndi.map_coordinates(u1[k].astype(np.float64), [qy, qx], order=1,
                                                mode="nearest") for k in range(2)])
    np.testing.assert_allclose(v, ref, atol=1e-4)
    # warp by u1, then by u2  ~=  one warp by v (away from the borders)
    seq = warp_displacement(warp_displacement(img, u1, border="replicate"), u2,
                            border="replicate")
    one = warp_displacement(img, v, border="replicate")
    inner = (slice(10, -10), slice(10, -10))
    assert np.abs(seq[inner] - one[inner]).max() < 0.05
    # constant border: u1 is 0 (identity) outside its grid
    far = np.zeros_like(u2)
    far[0] = 500.0
    vc = compose_displacements(u1, far, border="constant")
    np.testing.assert_array_equal(vc, far)
    assert compose_displacements(u1, u2, out=u2) is u2
    np.testing.assert_array_equal(u2, v)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_jacobian_matches_numpy_exactly(rng, num_threads, dtype):
    u = (rng.normal(size=(2, 37, 53)) * 0.8).astype(dtype)
    u64 = u.astype(np.float64)
    dux_dy, dux_dx = np.gradient(u64[0])
    duy_dy, duy_dx = np.gradient(u64[1])
    ref = (1.0 + dux_dx) * (1.0 + duy_dy) - dux_dy * duy_dx
    det = jacobian_determinant(u, num_threads=num_threads)
    assert det.dtype == dtype and det.shape == (37, 53)
    np.testing.assert_array_equal(det, ref.astype(dtype))
    frac = nonpositive_jacobian_fraction(u, num_threads=num_threads)
    assert 0 < frac < 1
    assert frac == np.count_nonzero(ref <= 0) / ref.size
    mask = rng.random((37, 53)) < 0.3
    assert nonpositive_jacobian_fraction(u, mask=mask) == (
        np.count_nonzero(ref[mask] <= 0) / mask.sum())
    assert nonpositive_jacobian_fraction(u, mask=mask.astype(np.float64) * 2) == (
        nonpositive_jacobian_fraction(u, mask=mask))


def test_jacobian_two_by_two_and_affine_field():
    u = np.zeros((2, 2, 2), np.float32)
    u[0, :, 1] = 1.0  # dux/dx = 1 everywhere (one-sided): det = 2
    np.testing.assert_array_equal(jacobian_determinant(u), np.full((2, 2), 2.0, np.float32))


def _bad_inputs():
    img = np.zeros((8, 9), np.float32)
    u = np.zeros((2, 8, 9), np.float32)
    return img, u


@pytest.mark.parametrize(
    "call",
    [
        lambda img, u: warp_displacement(img.astype(np.float64), u),
        lambda img, u: warp_displacement(img.astype(np.int32), u),
        lambda img, u: warp_displacement(img[None], u),
        lambda img, u: warp_displacement(np.zeros((0, 4), np.float32), u),
        lambda img, u: warp_displacement(img, u.astype(np.float64)),
        lambda img, u: warp_displacement(img, u[:1]),
        lambda img, u: warp_displacement(img, u[0]),
        lambda img, u: warp_displacement(img, np.zeros((2, 0, 3), np.float32)),
        lambda img, u: warp_displacement(img, u, affine=np.eye(2)),
        lambda img, u: warp_displacement(img, u, affine=[[1, 0, np.nan], [0, 1, 0]]),
        lambda img, u: warp_displacement(img, u, affine=[[1, 0, 0], [0, 1, 0], [1, 0, 1]]),
        lambda img, u: warp_displacement(img, u, interpolation="cubic"),
        lambda img, u: warp_displacement(img, u, border="reflect"),
        lambda img, u: warp_displacement(img, u, num_threads=-1),
        lambda img, u: warp_displacement(img, u, num_threads=1.5),
        lambda img, u: warp_displacement(img.astype(np.uint8), u, fill=np.nan),
        lambda img, u: warp_displacement(img, u, out=np.zeros((8, 8), np.float32)),
        lambda img, u: warp_displacement(img, u, out=np.zeros((8, 9), np.uint8)),
        lambda img, u: warp_displacement(img, u, out=np.zeros((9, 8), np.float32).T),
        lambda img, u: warp_displacement(img, u, out=img),
        lambda img, u: warp_displacement(img, u, out=u[0]),
        lambda img, u: compose_affine_displacement(np.eye(3)[:2] * np.nan, u),
        lambda img, u: compose_affine_displacement(np.eye(3)[:2], u.astype(np.float16)),
        lambda img, u: compose_affine_displacement(np.eye(3)[:2], u, out=u[:, :4]),
        lambda img, u: compose_displacements(u, u[:, :4, :4].astype(np.float64)),
        lambda img, u: compose_displacements(u, u, border="wrap"),
        lambda img, u: compose_displacements(u, u.copy(), out=u),
        lambda img, u: jacobian_determinant(u[:, :1]),
        lambda img, u: jacobian_determinant(u.astype(np.int16)),
        lambda img, u: jacobian_determinant(u, out=np.zeros((8, 9), np.float64)),
        lambda img, u: nonpositive_jacobian_fraction(u, mask=np.ones((3, 3), bool)),
        lambda img, u: nonpositive_jacobian_fraction(u, mask=np.zeros((8, 9), bool)),
        lambda img, u: nonpositive_jacobian_fraction(u[None]),
    ],
)
def test_bad_inputs_raise_value_error(call):
    img, u = _bad_inputs()
    with pytest.raises(ValueError):
        call(img, u)


def test_read_only_and_noncontiguous_inputs(rng):
    img = _image(rng, np.float32, (30, 40))
    u = _smooth_field(rng, (30, 40), amp=2.0)
    ref = warp_displacement(img, u)
    img_ro, u_ro = img.copy(), u.copy()
    img_ro.flags.writeable = False
    u_ro.flags.writeable = False
    np.testing.assert_array_equal(warp_displacement(img_ro, u_ro), ref)
    u_nc = np.asfortranarray(u)
    np.testing.assert_array_equal(warp_displacement(img, u_nc), ref)
    out = np.empty((30, 40), np.float32)
    out.flags.writeable = False
    with pytest.raises(ValueError):
        warp_displacement(img, u, out=out)


def test_jacobian_affine_and_folding():
    h, w = 30, 40
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    a = np.array([[1.2, 0.3], [-0.1, 0.8]])
    u = np.stack([(a[0, 0] - 1) * xs + a[0, 1] * ys + 5, a[1, 0] * xs + (a[1, 1] - 1) * ys - 2])
    det = jacobian_determinant(u.astype(np.float32))
    np.testing.assert_allclose(det, np.linalg.det(a), atol=1e-5)
    assert nonpositive_jacobian_fraction(u.astype(np.float32)) == 0.0
    # a fold: x -> x + 6 sin(x / 3) has d/dx = 1 + 2 cos(x/3) < 0 where cos < -1/2
    fold = np.stack([6 * np.sin(xs / 3.0), np.zeros_like(xs)])
    det = jacobian_determinant(fold)
    inner = det[:, 1:-1]
    expect = 1 + 2 * np.cos(xs[:, 1:-1] / 3.0)
    # central differences of a sine: 1 + 6 sin(1/3) cos(x/3) / 1 (exact discrete derivative)
    np.testing.assert_allclose(inner, 1 + 6 * np.sin(1 / 3) * np.cos(xs[:, 1:-1] / 3), atol=1e-9)
    assert (inner < 0).any()
    frac = nonpositive_jacobian_fraction(fold)
    assert 0.2 < frac < 0.45
    assert abs(frac - (expect <= 0).mean()) < 0.1
    assert nonpositive_jacobian_fraction(fold, mask=np.zeros((h, w)) + (xs < 3)) == pytest.approx(
        ((det <= 0) & (xs < 3)).sum() / (xs < 3).sum())


def test_the_affine_part_of_a_field_is_removed_exactly(rng) -> None:  # type: ignore[no-untyped-def]
    """An affine displacement plus a zero-mean bump: what is left is the bump less its own
    (small) affine fit, and a purely affine field leaves nothing (float64 reference)."""
    from deepalign_fast.fields import without_affine_part

    h, w = 64, 80
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    affine = np.stack([0.01 * xx - 0.02 * yy + 3.0, 0.015 * xx + 0.005 * yy - 1.5])
    assert np.abs(without_affine_part(affine.astype(np.float32))).max() < 1e-4
    bump = np.stack([np.sin(xx / 9.0) * np.cos(yy / 7.0), np.cos(xx / 11.0) * np.sin(yy / 5.0)])
    design = np.stack([xx[::4, ::4].ravel(), yy[::4, ::4].ravel(),
                       np.ones(xx[::4, ::4].size)], 1)
    coef, *_ = np.linalg.lstsq(design, bump[:, ::4, ::4].reshape(2, -1).T, rcond=None)
    expected = bump - (coef[0][:, None, None] * xx + coef[1][:, None, None] * yy
                       + coef[2][:, None, None])
    got = without_affine_part((affine + bump).astype(np.float32))
    np.testing.assert_allclose(got, expected, atol=2e-4)


def test_the_common_affine_of_a_per_pixel_affine_field_is_removed() -> None:
    """Nodes that all carry one affine G (a field that only moves the slice rigidly or
    affinely) become the identity; a field's non-affine part stays."""
    from deepalign_fast.fields import without_common_affine

    g = np.array([[1.01, -0.02, 3.0], [0.015, 0.99, -2.0]])
    field = np.broadcast_to(g, (5, 6, 2, 3)).copy()
    np.testing.assert_allclose(without_common_affine(field, 8.0),
                               np.broadcast_to(np.eye(2, 3), field.shape), atol=1e-9)
    bent = field.copy()
    bent[2, 3, :, 2] += (4.0, -3.0)  # one node moved: not affine
    out = without_common_affine(bent, 8.0)
    step = 8.0
    ys, xs = np.mgrid[0:5, 0:6] * step
    p = np.stack([xs, ys, np.ones_like(xs)], -1)
    moved = np.einsum("rcij,rcj->rci", out, p) - p[..., :2]
    assert np.linalg.norm(moved[2, 3]) > 3.5  # the bump stays
    coef, *_ = np.linalg.lstsq(p.reshape(-1, 3), moved.reshape(-1, 2), rcond=None)
    assert np.abs(coef).max() < 1e-9  # and no affine is left in the displacement
