"""TIFF output compression: zlib stays an ImageJ hyperstack; wrong combinations are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from deepalign_fast.cli import main


def _stack() -> np.ndarray:
    import cv2

    rng = np.random.default_rng(9)
    big = cv2.GaussianBlur((rng.random((110, 130)) * 255).astype(np.float32), (0, 0), 2.0)
    return np.stack([np.roll(big, (z % 2, 0), axis=(0, 1))[8:-8, 8:-8]
                     for z in range(5)]).astype(np.uint8)


@pytest.fixture
def src(tmp_path: Path) -> Path:
    path = tmp_path / "s.tif"
    tifffile.imwrite(path, _stack(), imagej=True, resolution=(100.0, 100.0),
                     metadata={"axes": "ZYX", "spacing": 0.02, "unit": "micron"})
    return path


def test_zlib_output_is_a_compressed_imagej_hyperstack(src: Path, tmp_path: Path) -> None:
    plain, packed = tmp_path / "plain.tif", tmp_path / "zlib.tif"
    assert main(["align", str(src), "-o", str(plain), "--quiet"]) == 0
    assert main(["align", str(src), "-o", str(packed), "--compression", "zlib", "--quiet"]) == 0
    with tifffile.TiffFile(packed) as tif:
        assert tif.is_imagej and tif.pages[0].compression == 8  # ADOBE_DEFLATE ("ZIP")
        assert tif.imagej_metadata["spacing"] == pytest.approx(0.02)
    np.testing.assert_array_equal(tifffile.imread(packed), tifffile.imread(plain))


def test_zstd_and_refusals(src: Path, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("imagecodecs")
    out = tmp_path / "zstd.tif"
    assert main(["align", str(src), "-o", str(out), "--compression", "zstd", "--quiet"]) == 0
    np.testing.assert_array_equal(tifffile.imread(out).shape, (5, 94, 114))
    capsys.readouterr()
    assert main(["align", str(src), "-o", str(tmp_path / "o.ome.zarr"), "--compression",
                 "zlib", "--quiet"]) == 2
    assert "--compression" in capsys.readouterr().err
    assert not (tmp_path / "o.ome.zarr").exists()
