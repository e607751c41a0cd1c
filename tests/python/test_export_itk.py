"""Transforms taken elsewhere: ITK transform files that ITK itself re-applies exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from deepalign_fast import TransformSet, warp_affine
from deepalign_fast.cli import main


def _transforms(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    aff = np.tile(np.eye(2, 3), (3, 1, 1))
    aff[:, :, :2] += rng.normal(0, 0.01, (3, 2, 2))
    aff[:, :, 2] = rng.normal(0, 4, (3, 2))
    path = tmp_path / "t.transforms.json"
    TransformSet(aff, (3, 64, 80), (64, 80), [], [0.1, 0.1, 0.1], {}).save(path)
    return path


def test_itk_files_round_trip_through_itk(tmp_path: Path) -> None:
    import warnings

    # itk's lazy loading emits DeprecationWarnings that, raised as errors inside its import
    # machinery, crash the interpreter: let them pass quietly around every itk call.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        itk = pytest.importorskip("itk")
        _round_trip(itk, tmp_path)


def _round_trip(itk, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tpath = _transforms(tmp_path)
    ts = TransformSet.load(tpath)
    rng = np.random.default_rng(1)
    image = rng.random((64, 80)).astype(np.float32)
    # Pixel units, and images with a physical pixel size: ITK works in physical units, and
    # the files written for that spacing map physical points as ours maps pixels.
    for size in (1.0, 5.0):
        out = tmp_path / f"itk{size:g}"
        assert main(["export-transforms", str(tpath), "-o", str(out),
                     "--pixel-size", str(size)]) == 0
        files = sorted(out.glob("slice_*.tfm"))
        assert [f.name for f in files] == ["slice_0000.tfm", "slice_0001.tfm",
                                           "slice_0002.tfm"]
        for a, f in zip(ts.affines, files, strict=True):
            t = itk.transformread(str(f))[0]
            for p in [(0.0, 0.0), (79.0, 63.0), (12.5, 40.25)]:  # points: exact
                q = t.TransformPoint((size * p[0], size * p[1]))
                np.testing.assert_allclose(q, size * (a[:, :2] @ p + a[:, 2]), atol=1e-9)
            # ITK's resampling with that transform equals ours (bilinear, same pixel grid)
            img = itk.image_from_array(image)
            img.SetSpacing([size, size])
            res = itk.resample_image_filter(
                img, transform=itk.AffineTransform[itk.D, 2].cast(t), size=[80, 64],
                output_origin=[0.0, 0.0], output_spacing=[size, size], default_pixel_value=0.0)
            ours = warp_affine(image, a, (64, 80))
            # compare where every bilinear tap is inside the image (ITK and this package
            # treat the half-pixel rim differently)
            ys, xs = np.mgrid[0:64, 0:80]
            src = np.stack([xs, ys], -1) @ a[:, :2].T + a[:, 2]
            inside = ((src[..., 0] >= 0) & (src[..., 0] <= 78) & (src[..., 1] >= 0)
                      & (src[..., 1] <= 62))
            assert inside.sum() > 2000
            assert np.abs(itk.array_from_image(res) - ours)[inside].max() < 1e-3


def test_export_refuses_existing_files(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Files of another export are refused without --overwrite; files that already hold
    exactly what this export writes (the same command again) are left as they are."""
    tpath = _transforms(tmp_path)
    out = tmp_path / "itk"
    assert main(["export-transforms", str(tpath), "-o", str(out)]) == 0
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(["export-transforms", str(tpath), "-o", str(out)]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    capsys.readouterr()
    assert main(["export-transforms", str(tpath), "-o", str(out), "--pixel-size", "5"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export-transforms", str(tpath), "-o", str(out), "--pixel-size", "5",
                 "--overwrite"]) == 0
    assert "translations in pixels" not in capsys.readouterr().out  # (said with the default)
    assert main(["export-transforms", str(tpath), "-o", str(tmp_path / "px")]) == 0
    assert "note: translations in pixels" in capsys.readouterr().out


def test_a_killed_export_is_finished_by_the_same_command(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Killed after some slice files (its temporary file left): the same command again
    finishes it (it refused: "already exists") and removes the temporary file. A killed
    --overwrite export leaves none of the earlier export's files, only some of its own: the
    same command finishes it."""
    from deepalign_fast import outputs

    tpath = _transforms(tmp_path)
    out = tmp_path / "itk"
    real = outputs.write_atomic
    calls: list[Path] = []

    def killed_at_the_third(path: Path, *args: object, **kwargs: object) -> None:
        calls.append(path)
        if len(calls) == 3:
            (path.parent / f".{path.name}.deepalign-0123456789abcdef.tmp").write_text("#")
            raise KeyboardInterrupt
        real(path, *args, **kwargs)  # type: ignore[arg-type]

    def export(*extra: str) -> int:
        return main(["export-transforms", str(tpath), "-o", str(out), *extra])

    def killed(*extra: str) -> None:
        calls.clear()
        with monkeypatch.context() as m:
            m.setattr(outputs, "write_atomic", killed_at_the_third)
            assert export(*extra) == 130

    killed()
    assert len(list(out.glob("slice_*.tfm"))) == 2
    assert export() == 0
    ref = {p.name: p.read_text() for p in out.glob("slice_*.tfm")}
    assert len(ref) == 3 and not list(out.glob(".*"))
    killed("--pixel-size", "5", "--overwrite")
    # the files it replaces went first: two new ones, none of the earlier export (it left
    # the earlier slice 2 beside the new 0 and 1, a mix only hidden files told apart)
    left = {p.name: p.read_text() for p in out.glob("slice_*.tfm")}
    assert sorted(left) == ["slice_0000.tfm", "slice_0001.tfm"]
    assert all(left[k] != ref[k] for k in left)
    assert export("--pixel-size", "5") == 0  # so the same command finishes it
    new = {p.name: p.read_text() for p in out.glob("slice_*.tfm")}
    assert new.keys() == ref.keys() and all(new[k] != ref[k] for k in ref)
    assert not list(out.glob(".*"))


def test_export_refuses_an_earlier_exports_extra_slices(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    """An export of fewer slices into the folder of an earlier one would leave that one's
    last slice files beside it, taken for this export's by a glob: refused, nothing written."""
    out = tmp_path / "itk"
    assert main(["export-transforms", str(_transforms(tmp_path)), "-o", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    two = tmp_path / "two.transforms.json"
    aff = np.tile(np.eye(2, 3), (2, 1, 1))
    TransformSet(aff, (2, 64, 80), (64, 80), [], [0.1, 0.1], {}).save(two)
    capsys.readouterr()
    assert main(["export-transforms", str(two), "-o", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "slice_0002.tfm" in err and len(err.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_export_refuses_a_bad_pixel_size(tmp_path: Path, value: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "itk"
    assert main(["export-transforms", str(_transforms(tmp_path)), "-o", str(out),
                 "--pixel-size", value]) == 2
    assert "--pixel-size" in capsys.readouterr().err and not out.exists()


def test_the_transforms_file_records_the_pixel_size_export_names(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An input whose file states 5-nm pixels: the transforms file records the voxel size
    the output got (and a 2x finer copy's is half), export-transforms names it where it
    writes pixel units; a malformed voxel size is refused."""
    import json

    import tifffile
    from deepalign_fast import DeepAlignError

    rng = np.random.default_rng(3)
    base = rng.integers(0, 255, (80, 96)).astype(np.uint8)
    stack = np.stack([np.roll(base, (z % 3, z % 2), axis=(0, 1)) for z in range(6)])
    tifffile.imwrite(tmp_path / "s.tif", stack, imagej=True, resolution=(1 / 5, 1 / 5),
                     metadata={"spacing": 5, "unit": "nm"})
    assert main(["align", str(tmp_path / "s.tif"), "-o", str(tmp_path / "a.tif"),
                 "--quiet"]) == 0
    tpath = tmp_path / "a.transforms.json"
    ts = TransformSet.load(tpath)
    assert ts.voxel_size == (5.0, 5.0, 5.0) and ts.unit == "nm"
    assert ts.rescaled(2.0).voxel_size == (5.0, 2.5, 2.5)
    capsys.readouterr()
    assert main(["export-transforms", str(tpath), "-o", str(tmp_path / "itk")]) == 0
    assert "pixels are 5 nm, so for images spaced in nm that is --pixel-size 5" in \
        capsys.readouterr().out
    data = json.loads(tpath.read_text())
    data["voxel_size"] = [5, 0, 5]
    tpath.write_text(json.dumps(data))
    with pytest.raises(DeepAlignError, match="'voxel_size' must be 3 numbers > 0"):
        TransformSet.load(tpath)
