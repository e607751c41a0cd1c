"""Physical units survive alignment: voxel size and unit from the input to every output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from deepalign_fast import Aligner
from deepalign_fast.io import imagej_unit, ome_unit, voxel_size_of


def _stack() -> np.ndarray:
    import cv2

    rng = np.random.default_rng(0)
    big = cv2.GaussianBlur((rng.random((120, 140)) * 255).astype(np.float32), (0, 0), 2.0)
    return np.stack([np.roll(big, (z % 3, 0), axis=(0, 1))[8:-8, 8:-8]
                     for z in range(5)]).astype(np.uint8)


@pytest.fixture
def imagej_input(tmp_path: Path) -> Path:
    path = tmp_path / "in.tif"
    tifffile.imwrite(path, _stack(), imagej=True, resolution=(1 / 0.005, 1 / 0.004),
                     metadata={"spacing": 0.01, "unit": "micron", "axes": "ZYX"})
    return path


def test_imagej_tiff_to_tiff_and_ome_zarr_and_back(imagej_input: Path, tmp_path: Path) -> None:
    expected = ((0.01, 0.004, 0.005), "\u00b5m")
    assert voxel_size_of(imagej_input) == expected
    Aligner().align_stack(imagej_input, tmp_path / "out.tif")
    got = voxel_size_of(tmp_path / "out.tif")
    assert got is not None and np.allclose(got[0], expected[0]) and got[1] == expected[1]
    with tifffile.TiffFile(tmp_path / "out.tif") as tif:  # what Fiji reads
        assert tif.imagej_metadata["unit"] == "micron"
        assert tif.imagej_metadata["spacing"] == pytest.approx(0.01)
    Aligner().align_stack(imagej_input, tmp_path / "out.ome.zarr")
    got = voxel_size_of(tmp_path / "out.ome.zarr")
    assert got is not None and np.allclose(got[0], expected[0]) and got[1] == expected[1]
    Aligner().align_stack(tmp_path / "out.ome.zarr", tmp_path / "again.ome.zarr")
    got = voxel_size_of(tmp_path / "again.ome.zarr")  # OME-Zarr -> OME-Zarr
    assert got is not None and np.allclose(got[0], expected[0]) and got[1] == expected[1]
    Aligner().align_stack(tmp_path / "out.ome.zarr", tmp_path / "back.tif")
    got = voxel_size_of(tmp_path / "back.tif")
    assert got is not None and np.allclose(got[0], expected[0]) and got[1] == expected[1]


def test_no_metadata_gives_no_invented_units(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "plain.tif", _stack())
    assert voxel_size_of(tmp_path / "plain.tif") is None
    Aligner().align_stack(tmp_path / "plain.tif", tmp_path / "out.ome.zarr")
    assert voxel_size_of(tmp_path / "out.ome.zarr") is None


def test_unit_names() -> None:
    assert imagej_unit("\u00b5m") == "micron" and imagej_unit("nanometer") == "nm"
    assert ome_unit("micron") == "micrometer" and ome_unit("nm") == "nanometer"
    assert ome_unit("furlong") is None
    assert ome_unit("meter") == "meter" and ome_unit("angstrom") == "angstrom"  # NGFF names


def test_pixel_size_override_from_the_cli(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from deepalign_fast.cli import main

    tifffile.imwrite(tmp_path / "plain.tif", _stack())
    assert main(["align", str(tmp_path / "plain.tif"), "-o", str(tmp_path / "o.ome.zarr"),
                 "--pixel-size", "4,4,30", "--unit", "nm", "--quiet"]) == 0
    assert voxel_size_of(tmp_path / "o.ome.zarr") == ((30.0, 4.0, 4.0), "nm")
    assert main(["align", str(tmp_path / "plain.tif"), "-o", str(tmp_path / "o2.tif"),
                 "--pixel-size", "5", "--quiet"]) == 0
    got = voxel_size_of(tmp_path / "o2.tif")
    assert got is not None and np.allclose(got[0], (5.0, 5.0, 5.0)) and got[1] == "nm"
    capsys.readouterr()
    # compressed (not ImageJ) TIFF and angstrom (not ASCII in ImageJ's description): the size
    # is read back, and the resolution tags carry no unit (the default, inch, read 5 nm as
    # 127 mm; angstrom failed after the whole estimation)
    for unit, comp in (("nm", "zstd"), ("angstrom", "none"), ("angstrom", "zstd")):
        out = tmp_path / f"o_{unit}_{comp}.tif"
        assert main(["align", str(tmp_path / "plain.tif"), "-o", str(out), "--pixel-size",
                     "5,5,30", "--unit", unit, "--compression", comp, "--quiet"]) == 0
        got = voxel_size_of(out)
        assert got is not None and np.allclose(got[0], (30.0, 5.0, 5.0)), (unit, comp, got)
        assert got[1] == {"nm": "nm", "angstrom": "\u00c5"}[unit]
        with tifffile.TiffFile(out) as tif:
            assert tif.pages[0].tags["ResolutionUnit"].value == 1
    capsys.readouterr()
    for bad in (["--pixel-size", "-1"], ["--pixel-size", "a,b"], ["--unit", "nm"],
                ["--pixel-size", "1e-30"]):
        assert main(["align", str(tmp_path / "plain.tif"), "-o", str(tmp_path / "x.tif"),
                     *bad, "--quiet"]) == 2
        assert "--pixel-size" in capsys.readouterr().err
    assert not (tmp_path / "x.tif").exists()
