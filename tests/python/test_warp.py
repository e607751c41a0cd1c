"""warp_affine against an exact float64 reference (scipy.ndimage.map_coordinates), with the
error bounds stated per dtype. No test depends on one OpenCV version's rounding."""

from __future__ import annotations

import numpy as np
import pytest
from deepalign_fast import warp_affine
from deepalign_fast.warp import warp_affine_field, warp_displacement
from scipy import ndimage as ndi

DTYPES = [np.uint8, np.uint16, np.float32]
# map_coordinates modes matching our borders: "grid-constant" lets taps outside the image
# contribute cval (cv2.BORDER_CONSTANT semantics); "nearest" clamps (BORDER_REPLICATE).
MODES = {"constant": "grid-constant", "replicate": "nearest"}


def _source_coords(matrix: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    sx = matrix[0, 0] * xx + matrix[0, 1] * yy + matrix[0, 2]
    sy = matrix[1, 0] * xx + matrix[1, 1] * yy + matrix[1, 2]
    return sx, sy


def _reference(image, matrix, shape, *, order, border, fill):
    sx, sy = _source_coords(matrix, shape)
    # map_coordinates takes (row, col) = (y, x)
    return ndi.map_coordinates(
        image.astype(np.float64), [sy, sx], order=order, mode=MODES[border], cval=fill
    )


def _random_image(rng, dtype, shape=(97, 131)):
    hi = {np.uint8: 255, np.uint16: 65535, np.float32: 1.0}[dtype]
    return (rng.random(shape) * hi).astype(dtype)


def _random_affine(rng, kind):
    if kind == "translation":
        return np.array([[1.0, 0.0, rng.uniform(-8, 8)], [0.0, 1.0, rng.uniform(-8, 8)]])
    if kind == "scale":
        return np.array([[rng.uniform(0.7, 1.4), 0.0, rng.uniform(-8, 8)],
                         [0.0, rng.uniform(0.7, 1.4), rng.uniform(-8, 8)]])
    th = rng.uniform(-0.4, 0.4)
    s = rng.uniform(0.8, 1.25)
    sh = rng.uniform(-0.1, 0.1)
    a = s * np.array([[np.cos(th), -np.sin(th) + sh], [np.sin(th), np.cos(th)]])
    return np.hstack([a, rng.uniform(-10, 10, size=(2, 1))])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("border", ["constant", "replicate"])
@pytest.mark.parametrize("kind", ["general", "translation", "scale"])
def test_linear_matches_map_coordinates(rng, num_threads, dtype, border, kind):
    img = _random_image(rng, dtype)
    fill = 0.3 if dtype == np.float32 else 17.0
    for _ in range(3):
        m = _random_affine(rng, kind)
        shape = (89, 140)
        out = warp_affine(img, m, shape, border=border, fill=fill, num_threads=num_threads)
        assert out.dtype == dtype and out.shape == shape
        ref = _reference(img, m, shape, order=1, border=border, fill=fill)
        if dtype == np.float32:
            np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4)
        else:
            rounded = np.clip(np.round(ref), 0, np.iinfo(dtype).max)
            diff = np.abs(out.astype(np.float64) - rounded)
            assert diff.max() <= 1
            # Off by one only where the exact value is close to a rounding tie: uint8 uses
            # 1/2048-pixel weights (value error <= 255/4096 ~ 0.06 LSB), uint16 float32 ones.
            tol = 0.07 if dtype == np.uint8 else 0.01
            near_tie = np.abs(ref - np.floor(ref) - 0.5) < tol
            assert np.all(near_tie[diff > 0])
        # Same output regardless of the thread count.
        np.testing.assert_array_equal(
            out, warp_affine(img, m, shape, border=border, fill=fill, num_threads=1)
        )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("border", ["constant", "replicate"])
def test_nearest_matches_map_coordinates_and_never_blends(rng, num_threads, dtype, border):
    labels = rng.integers(0, 6, size=(83, 71)).astype(dtype) * 10
    for kind in ("general", "scale"):
        m = _random_affine(rng, kind)
        shape = (90, 77)
        out = warp_affine(labels, m, shape, interpolation="nearest", border=border, fill=255,
                          num_threads=num_threads)
        assert set(np.unique(out).tolist()) <= set(np.unique(labels).tolist()) | {255}
        ref = _reference(labels, m, shape, order=0, border=border, fill=255)
        # Exact away from rounding ties (where the two roundings may legitimately differ).
        sx, sy = _source_coords(m, shape)
        tie = (np.abs(sx - np.floor(sx) - 0.5) < 1e-6) | (np.abs(sy - np.floor(sy) - 0.5) < 1e-6)
        np.testing.assert_array_equal(out[~tie], ref[~tie])


def test_integer_shift_is_exact(rng):
    img = _random_image(rng, np.uint16)
    out = warp_affine(img, [[1, 0, 5], [0, 1, -3]], fill=7)
    np.testing.assert_array_equal(out[3:, :-5], img[:-3, 5:])
    assert np.all(out[:3] == 7) and np.all(out[:, -5:] == 7)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
@pytest.mark.parametrize("kind", ["general", "translation", "scale"])
def test_error_bound_against_exact_bilinear(rng, num_threads, dtype, kind):
    # Accuracy stated against the exact float64 bilinear value (map_coordinates order=1), not
    # against another library's rounding. float32: a few float32 ulps of the image range.
    # uint8: the output rounding (0.5 LSB) plus the 1/2048-pixel weight quantisation (<= 1/4096
    # px per axis times a step of at most 255: 2 x 255/4096 LSB); uint16: the rounding plus
    # float32 weights and sums (the same few ulps of the range as float32 images).
    img = _random_image(rng, dtype, (200, 220))
    if dtype == np.float32:
        img = ndi.gaussian_filter(img, 1.5)
    for _ in range(3):
        m = _random_affine(rng, kind)
        out = warp_affine(img, m, (180, 230), fill=0, num_threads=num_threads)
        exact = _reference(img, m, (180, 230), order=1, border="constant", fill=0)
        err = np.abs(out.astype(np.float64) - exact)
        f32 = 4 * np.finfo(np.float32).eps * float(np.abs(img).max())
        if dtype == np.float32:
            assert err.max() <= f32
        else:
            bound = 0.5 + (2 * 255 / 4096 if dtype == np.uint8 else f32)
            assert err.max() <= bound
            # Unbiased rounding: the mean error is that of rounding a uniform value (0.25 LSB).
            assert err.mean() <= 0.27


def test_defaults_out_and_3x3():
    img = np.arange(20, dtype=np.float32).reshape(4, 5)
    m3 = np.array([[1.0, 0, 0], [0, 1, 0], [0, 0, 1]])
    out = np.empty((4, 5), np.float32)
    res = warp_affine(img, m3, out=out)
    assert res is out
    np.testing.assert_array_equal(out, img)


def test_real_em_slice_matches_reference(lucchi, num_threads):
    image, labels = lucchi
    sl = np.ascontiguousarray(image[0][:300, :300])
    m = np.array([[0.99, -0.03, 4.3], [0.031, 1.01, -2.6]])
    out = warp_affine(sl, m, (280, 290), num_threads=num_threads)
    ref = np.round(_reference(sl, m, (280, 290), order=1, border="constant", fill=0))
    assert np.abs(out.astype(float) - ref).max() <= 1
    lab = np.ascontiguousarray(labels[0][:300, :300])
    out_lab = warp_affine(lab, m, (280, 290), interpolation="nearest", num_threads=num_threads)
    assert set(np.unique(out_lab).tolist()) <= set(np.unique(lab).tolist()) | {0}


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.uint32, np.int32, np.uint64,
                                   np.int64, np.bool_])
def test_nearest_warps_of_labels_of_any_integer_type_copy_their_ids(dtype) -> None:
    """Label IDs of any width: each output pixel holds the ID of the very input pixel the
    kernel's nearest warp of a uint16 index image samples there (IDs near the type's limits,
    so a detour through float32 would change them), and ``fill`` outside; the same for the
    displacement and per-pixel affine warps."""
    rng = np.random.default_rng(3)
    index = rng.integers(1, 500, (40, 50)).astype(np.uint16)
    info = np.iinfo(dtype) if dtype is not np.bool_ else None
    table = (rng.integers(0, 2, 500).astype(bool) if info is None else
             np.array(info.max, dtype) - rng.integers(0, 1000, 500).astype(dtype))
    table[0] = 0  # (outside: index 0 -> fill 0)
    labels = table[index]
    m = np.array([[0.97, -0.05, 3.4], [0.06, 1.02, -2.7]])
    want = table[warp_affine(index, m, (44, 47), interpolation="nearest")]
    got = warp_affine(labels, m, (44, 47), interpolation="nearest")
    assert got.dtype == labels.dtype
    np.testing.assert_array_equal(got, want)
    u = rng.normal(0, 2, (2, 44, 47)).astype(np.float32)
    np.testing.assert_array_equal(
        warp_displacement(labels, u, affine=m, interpolation="nearest"),
        table[warp_displacement(index, u, affine=m, interpolation="nearest")])
    field = np.broadcast_to(m, (7, 7, 2, 3)).copy()
    np.testing.assert_array_equal(
        warp_affine_field(labels, field, 8.0, (44, 47), interpolation="nearest"),
        table[warp_affine_field(index, field, 8.0, (44, 47), interpolation="nearest")])
    if info is not None:  # a fill of the type's own range, split into its lanes
        out = np.empty((44, 47), dtype)
        res = warp_affine(labels, m, interpolation="nearest", fill=int(info.min), out=out)
        outside = warp_affine(np.ones_like(index), m, (44, 47), interpolation="nearest") == 0
        assert res is out and outside.any() and (out[outside] == info.min).all()
        np.testing.assert_array_equal(out[~outside], want[~outside])


@pytest.mark.parametrize("dtype", [np.int64, np.uint64])
def test_label_fills_of_64_bit_types_are_exact(dtype) -> None:
    """A fill of a 64-bit type is taken as the integer it is (as a float, 2**53 + 1 became
    2**53 and the type's maximum was refused); a big-endian image and ``out`` are fine."""
    info = np.iinfo(dtype)
    labels = np.arange(1, 17, dtype=np.dtype(dtype).newbyteorder(">")).reshape(4, 4)
    shift = [[1, 0, 2.0], [0, 1, 0]]  # the two rightmost columns sample outside
    for fill in (int(info.max), 2**53 + 1, int(info.min)):
        out = np.empty((4, 4), np.dtype(dtype).newbyteorder(">"))
        got = warp_affine(labels, shift, interpolation="nearest", fill=fill, out=out)
        assert got is out
        assert [int(v) for v in out[:, 2:].ravel()] == [fill] * 8
        np.testing.assert_array_equal(out[:, :2], labels[:, 2:])
    with pytest.raises(ValueError, match="fill"):
        warp_affine(labels, shift, interpolation="nearest", fill=int(info.max) + 1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image": np.zeros((4, 4), np.float64)}, "cast explicitly"),
        ({"image": np.zeros((4, 4), np.int32)}, "nearest interpolation only"),
        ({"image": np.zeros((4, 4), np.int32), "interpolation": "nearest", "fill": 0.5},
         "fill"),
        ({"image": np.zeros((4, 4), np.uint32), "interpolation": "nearest", "fill": -1},
         "fill"),
        ({"image": np.zeros((4, 4), np.int64), "interpolation": "nearest",
          "out": np.zeros((4, 4), np.uint64)}, "out"),
        ({"image": np.zeros((4, 4), np.complex64)}, "unsupported dtype"),
        ({"image": np.zeros((2, 4, 4), np.int32), "interpolation": "nearest"}, "2-D"),
        ({"image": np.zeros((2, 4, 4), np.uint8)}, "2-D"),
        ({"image": np.zeros((0, 4), np.uint8)}, "empty"),
        ({"matrix": np.eye(2)}, r"\(2, 3\) or \(3, 3\)"),
        ({"matrix": [[1, 0, 0], [0, 1, 0], [0, 1, 1]]}, "last row"),
        ({"matrix": [[1, 0, np.nan], [0, 1, 0]]}, "NaN or infinity"),
        ({"output_shape": (0, 4)}, "output_shape"),
        ({"output_shape": (4,)}, "output_shape"),
        ({"interpolation": "cubic"}, "interpolation"),
        ({"border": "wrap"}, "border"),
        ({"num_threads": -1}, "num_threads"),
        ({"fill": float("nan")}, "fill"),
        ({"out": np.zeros((4, 4), np.float32)}, "dtype"),
        ({"out": np.zeros((5, 4), np.uint8), "output_shape": (4, 4)}, "shape"),
        ({"out": np.zeros((4, 8), np.uint8)[:, ::2]}, "C-contiguous"),
    ],
)
def test_bad_inputs_raise(kwargs, match):
    args = {"image": np.zeros((4, 4), np.uint8), "matrix": [[1, 0, 0], [0, 1, 0]]}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        warp_affine(args.pop("image"), args.pop("matrix"), **args)


def test_read_only_and_overlapping_out_raise():
    img = np.zeros((4, 4), np.uint8)
    ro = np.zeros((4, 4), np.uint8)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        warp_affine(img, [[1, 0, 0], [0, 1, 0]], out=ro)
    with pytest.raises(ValueError, match="overlap"):
        warp_affine(img, [[1, 0, 0], [0, 1, 0]], out=img)


def test_core_binding_checks_arrays():
    from deepalign_fast import _core

    m = np.array([[1.0, 0, 0], [0, 1, 0]])
    src = np.zeros((4, 4), np.uint8)
    lin, const = _core.Interpolation.linear, _core.Border.constant
    with pytest.raises(ValueError, match="dst: expected dtype uint8"):
        _core.warp_affine(src, np.zeros((4, 4), np.float32), m, lin, const, 0.0, 1)
    with pytest.raises(ValueError, match="dst: array is not C-contiguous"):
        _core.warp_affine(src, np.zeros((4, 4), np.uint8).T, m, lin, const, 0.0, 1)
    with pytest.raises(ValueError, match="src: expected dtype uint8, uint16 or float32"):
        _core.warp_affine(np.zeros((4, 4), np.int8), np.zeros((4, 4), np.int8), m, lin, const,
                          0.0, 1)
    with pytest.raises(ValueError, match="matrix: expected dtype float64"):
        _core.warp_affine(src, np.zeros((4, 4), np.uint8), m.astype(np.float32), lin, const,
                          0.0, 1)
    # Enums, or their names; never magic integers.
    out = np.zeros((4, 4), np.uint8)
    _core.warp_affine(src, out, m, "nearest", "replicate", 0.0, 1)
    with pytest.raises(ValueError, match="interpolation: expected 'nearest' or 'linear'"):
        _core.Interpolation("cubic")
    for interp in ("cubic", 1):  # an unknown name or a bare integer is no interpolation
        with pytest.raises(TypeError):
            _core.warp_affine(src, out, m, interp, const, 0.0, 1)
    with pytest.raises(ValueError, match="interpolation"):
        warp_affine(src, m, interpolation="cubic")
    assert np.array_equal(warp_affine(src, m, interpolation=_core.Interpolation.nearest), src)
