"""The in-memory API: align / estimate_transforms on numpy, zarr and (lazily) dask arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from deepalign_fast import Aligner, DeepAlignError, TransformSet, align, estimate_transforms
from deepalign_fast.io import open_stack


def _stack() -> np.ndarray:
    import cv2

    rng = np.random.default_rng(1)
    big = cv2.GaussianBlur((rng.random((140, 160)) * 255).astype(np.float32), (0, 0), 2.0)
    shifts = rng.integers(-3, 4, (8, 2))
    return np.stack([np.roll(big, tuple(s), axis=(0, 1))[10:-10, 10:-10]
                     for s in shifts]).astype(np.uint8)


def test_align_in_memory_equals_the_file_path(tmp_path: Path) -> None:
    stack = _stack()
    aligned, ts = align(stack)
    assert isinstance(aligned, np.ndarray) and aligned.shape == stack.shape
    assert aligned.dtype == stack.dtype and isinstance(ts, TransformSet)
    tifffile.imwrite(tmp_path / "s.tif", stack)
    Aligner().align_stack(tmp_path / "s.tif", tmp_path / "o.tif",
                          transforms_path=tmp_path / "o.json")
    np.testing.assert_array_equal(aligned, tifffile.imread(tmp_path / "o.tif"))
    np.testing.assert_allclose(ts.affines, TransformSet.load(tmp_path / "o.json").affines,
                               atol=1e-12)
    np.testing.assert_allclose(estimate_transforms(stack), ts.affines, atol=1e-12)


def test_dask_input_stays_lazy_and_matches() -> None:
    da = pytest.importorskip("dask.array")
    stack = _stack()
    lazy = da.from_array(stack, chunks=(2, -1, -1))
    aligned, ts = align(lazy)
    assert isinstance(aligned, da.Array)  # nothing rendered yet
    ref, _ = align(stack)
    np.testing.assert_array_equal(aligned.compute(), ref)


def test_zarr_array_input(tmp_path: Path) -> None:
    zarr = pytest.importorskip("zarr")
    stack = _stack()
    z = zarr.open_array(str(tmp_path / "a.zarr"), mode="w", shape=stack.shape,
                        chunks=(1,) + stack.shape[1:], dtype=stack.dtype)
    z[:] = stack
    aligned, _ = align(z)
    ref, _ = align(stack)
    np.testing.assert_array_equal(aligned, ref)
    with open_stack(tmp_path / "a.zarr") as r:
        assert r.shape == stack.shape


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="align_stack"):
        align(_stack(), mode="elastic")
    with pytest.raises(TypeError, match="array"):
        align([[1, 2], [3, 4]])
    with pytest.raises(ValueError, match="offsets"):
        estimate_transforms(_stack(), offsets=(0,))
    with pytest.raises(DeepAlignError, match="128 x 0 pixels: empty"):  # (a numpy error)
        align(np.zeros((8, 128, 0), np.uint8))


def test_other_pixel_types_and_paths_align_as_files_do(tmp_path: Path) -> None:
    """int8, int16, float16 and float64 arrays are aligned as float32, as their files are
    (they were refused), and a path is read into memory (it raised AttributeError)."""
    stack = _stack()
    ref, ts = align(stack.astype(np.float32))
    for dtype in (np.float64, np.int16, np.float16):
        aligned, other = align(stack.astype(dtype))
        assert aligned.dtype == np.float32
        np.testing.assert_array_equal(aligned, ref)
        np.testing.assert_allclose(other.affines, ts.affines, atol=1e-12)
    half = (stack // 2).astype(np.int8)
    np.testing.assert_array_equal(align(half)[0], align(half.astype(np.float32))[0])
    tifffile.imwrite(tmp_path / "s.tif", stack)
    from_file, _ = align(tmp_path / "s.tif")
    np.testing.assert_array_equal(from_file, align(stack)[0])


def test_stream_converts_pixel_types_and_checks_lookahead() -> None:
    stack = _stack()
    ref = list(Aligner().stream(iter(stack.astype(np.float32)), lookahead=2))
    got = list(Aligner().stream(iter(stack.astype(np.float64)), lookahead=2))
    assert got[0].dtype == np.float32
    np.testing.assert_array_equal(np.stack(got), np.stack(ref))
    for bad in (2.5, True, -1, "2"):
        with pytest.raises(ValueError, match="lookahead"):
            Aligner().stream(iter(stack), lookahead=bad)  # type: ignore[arg-type]
