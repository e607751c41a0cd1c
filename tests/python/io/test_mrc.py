"""MRC/IMOD input: memory-mapped, slice-wise, voxel size carried to the outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from deepalign_fast import Aligner, DeepAlignError, align
from deepalign_fast.io import open_stack, voxel_size_of

mrcfile = pytest.importorskip("mrcfile")


def _stack() -> np.ndarray:
    import cv2

    rng = np.random.default_rng(5)
    big = cv2.GaussianBlur((rng.random((120, 150)) * 255).astype(np.float32), (0, 0), 2.0)
    shifts = rng.integers(-3, 4, (6, 2))
    return np.stack([np.roll(big, tuple(s), axis=(0, 1))[10:-10, 10:-10]
                     for s in shifts]).astype(np.uint8)


@pytest.fixture
def mrc_path(tmp_path: Path) -> Path:
    path = tmp_path / "tilt.st"
    with mrcfile.new(str(path)) as mrc:
        mrc.set_data(_stack())
        mrc.voxel_size = (40.0, 20.0, 500.0)  # x, y, z in angstrom
    return path


def test_mrc_reads_like_the_array_and_carries_units(mrc_path: Path, tmp_path: Path) -> None:
    stack = _stack().astype(np.uint16)  # mrcfile stores uint8 as MRC mode 6 (uint16)
    with open_stack(mrc_path) as reader:
        assert reader.shape == stack.shape and reader.dtype == np.uint16
        np.testing.assert_array_equal(reader.read(3), stack[3])
    assert voxel_size_of(mrc_path) == ((50.0, 2.0, 4.0), "nm")
    Aligner().align_stack(mrc_path, tmp_path / "a.tif")
    Aligner().align_stack(mrc_path, tmp_path / "a.ome.zarr")
    for out in (tmp_path / "a.tif", tmp_path / "a.ome.zarr"):
        got = voxel_size_of(out)
        assert got is not None and np.allclose(got[0], (50.0, 2.0, 4.0)) and got[1] == "nm"
    ref, _ = align(stack)
    with open_stack(tmp_path / "a.tif") as r:
        np.testing.assert_array_equal(np.stack([r.read(i) for i in range(len(r))]), ref)
    assert mrc_path.stat().st_size > 0  # input untouched (opened read-only)


def test_bad_mrc_is_one_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.mrc"
    bad.write_bytes(b"not an mrc file" * 10)
    with pytest.raises(DeepAlignError, match="bad.mrc"):
        open_stack(bad)


def test_truncated_mrc_says_what_is_missing(mrc_path: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A truncated file or an unknown mode (were: "the MRC file holds no data", after two raw
    RuntimeWarning lines from mrcfile): one line saying what the header promises."""
    from deepalign_fast.cli import main

    data = mrc_path.read_bytes()
    short = tmp_path / "short.mrc"
    short.write_bytes(data[: len(data) // 2])
    mode = tmp_path / "mode.mrc"
    mode.write_bytes(data[:12] + (99).to_bytes(4, "little") + data[16:])
    for path, words in ((short, f"the file holds {len(data) // 2}"),
                        (mode, "Unrecognised mode '99'")):
        capsys.readouterr()
        assert main(["align", str(path), "-o", str(tmp_path / "o.tif")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err and "truncated or corrupt" in err, err
