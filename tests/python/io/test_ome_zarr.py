"""OME-Zarr output: a multiscale pyramid that validates against the NGFF 0.4 model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from deepalign_fast import Aligner
from deepalign_fast.io import ZarrStackWriter, open_stack


def _stack(h: int = 600, w: int = 530, n: int = 4) -> np.ndarray:
    import cv2

    rng = np.random.default_rng(2)
    big = cv2.GaussianBlur((rng.random((h + 20, w + 20)) * 255).astype(np.float32), (0, 0), 3)
    return np.stack([np.roll(big, (z, -z), axis=(0, 1))[10:-10, 10:-10]
                     for z in range(n)]).astype(np.uint8)


def test_pyramid_levels_and_ngff_metadata(tmp_path: Path) -> None:
    models = pytest.importorskip("ome_zarr_models.v04.image")
    stack = _stack()
    out = tmp_path / "a.ome.zarr"
    Aligner().align_stack(stack, out)
    group = zarr.open_group(str(out), mode="r")
    image = models.Image.from_zarr(group)  # validates the multiscales metadata and arrays
    datasets = image.attributes.multiscales[0].datasets
    assert [d.path for d in datasets] == ["0", "1"]  # 600 -> 300 (>= 256) -> stop
    assert group["1"].shape == (4, 300, 265)
    scale1 = datasets[1].coordinateTransformations[0].scale
    assert list(scale1) == [1.0, 2.0, 2.0]
    level0 = np.asarray(group["0"])
    expected = level0.astype(np.float32).reshape(4, 300, 2, 265, 2).mean(axis=(2, 4))
    assert np.abs(np.asarray(group["1"]).astype(np.float32) - expected).max() <= 0.5
    with open_stack(out) as reader:  # readers take level 0
        assert reader.shape == (4, 600, 530)


def test_label_pyramid_never_blends(tmp_path: Path) -> None:
    labels = (np.arange(4 * 600 * 530).reshape(4, 600, 530) % 7).astype(np.uint8)
    out = tmp_path / "l.ome.zarr"
    with ZarrStackWriter(out, labels.shape, labels.dtype, downsample="nearest") as writer:
        for z, lab in enumerate(labels):
            writer.write(z, lab)
    level1 = np.asarray(zarr.open_group(str(out), mode="r")["1"])
    np.testing.assert_array_equal(level1, labels[:, ::2, ::2])


def test_small_stacks_have_one_level_and_bad_option(tmp_path: Path) -> None:
    out = tmp_path / "s.ome.zarr"
    w = ZarrStackWriter(out, (2, 200, 300), np.uint8)
    assert w.level_shapes() == []
    w.abort()
    with pytest.raises(Exception, match="downsample"):
        ZarrStackWriter(tmp_path / "t.ome.zarr", (2, 8, 8), np.uint8, downsample="max")


def test_apply_labels_into_the_image_group(tmp_path: Path) -> None:
    """`apply ... -o IMAGE.ome.zarr/labels/NAME` writes an NGFF label image that validates
    and is listed in the image's labels group."""
    pytest.importorskip("ome_zarr_models.v04.image")
    import tifffile
    from deepalign_fast.cli import main
    from ome_zarr_models.v04.image import Image
    from ome_zarr_models.v04.image_label import ImageLabel

    stack = _stack(h=300, w=280)
    labels = (stack > 128).astype(np.uint8)
    tifffile.imwrite(tmp_path / "s.tif", stack, photometric="minisblack")
    tifffile.imwrite(tmp_path / "lab.tif", labels, photometric="minisblack")
    image = tmp_path / "a.ome.zarr"
    assert main(["align", str(tmp_path / "s.tif"), "-o", str(image), "--quiet"]) == 0
    out = image / "labels" / "mito"
    assert main(["apply", str(image) + ".transforms.json", str(tmp_path / "lab.tif"),
                 "-o", str(out), "--quiet"]) == 0
    group = zarr.open_group(str(image), mode="r")
    img = Image.from_zarr(group)
    assert img.labels is not None and list(img.labels.attributes.labels) == ["mito"]
    label = ImageLabel.from_zarr(zarr.open_group(str(out), mode="r"))
    assert label.attributes.image_label is not None
    carried = np.asarray(zarr.open_group(str(out), mode="r")["0"])
    assert set(np.unique(carried)) <= {0, 1}  # nearest: never blended
    # a TIFF name there is refused in one line, before anything is written (it crashed)
    before = sorted(p.relative_to(image) for p in image.rglob("*"))
    assert main(["apply", str(image) + ".transforms.json", str(tmp_path / "lab.tif"),
                 "-o", str(image / "labels" / "x.tif"), "--quiet"]) == 2
    assert sorted(p.relative_to(image) for p in image.rglob("*")) == before


def test_apply_refuses_labels_that_do_not_cover_the_image(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    """Labels made with the transforms of another stack (another size or slice count) are
    refused before anything is written into the image (they were written and listed: invalid
    NGFF that no viewer overlays); so is a labels path in a store that is no image."""
    import tifffile
    from deepalign_fast.cli import main

    stack = _stack(h=300, w=280)
    tifffile.imwrite(tmp_path / "s.tif", stack, photometric="minisblack")
    small = stack[:, :200, :240]
    tifffile.imwrite(tmp_path / "small.tif", small, photometric="minisblack")
    tifffile.imwrite(tmp_path / "lab.tif", (small > 128).astype(np.uint8),
                     photometric="minisblack")
    image = tmp_path / "a.ome.zarr"
    assert main(["align", str(tmp_path / "s.tif"), "-o", str(image), "--quiet"]) == 0
    other = tmp_path / "small.tif.transforms.json"
    assert main(["align", str(tmp_path / "small.tif"), "-o", str(tmp_path / "o.tif"),
                 "--transforms", str(other), "--quiet"]) == 0
    capsys.readouterr()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(["apply", str(other), str(tmp_path / "lab.tif"),
                 "-o", str(image / "labels" / "mito"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "but the image" in err and len(err.strip().splitlines()) == 1
    assert main(["apply", str(other), str(tmp_path / "lab.tif"),
                 "-o", str(tmp_path / "new.zarr" / "labels" / "mito"), "--quiet"]) == 2
    assert "new.zarr does not exist" in capsys.readouterr().err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_reads_ngff_05_input(tmp_path: Path) -> None:
    """NGFF 0.5 (Zarr v3, metadata under "ome"): level 0 found by its path, units read."""
    from deepalign_fast.io import voxel_size_of

    path = tmp_path / "v05.ome.zarr"
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    arr = group.create_array("s0", shape=(3, 40, 50), chunks=(1, 40, 50), dtype="uint8")
    data = (np.arange(3 * 40 * 50).reshape(3, 40, 50) % 251).astype(np.uint8)
    arr[:] = data
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": [{"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"],
        "datasets": [{"path": "s0", "coordinateTransformations": [
            {"type": "scale", "scale": [30.0, 4.0, 4.0]}]}]}]}
    with open_stack(path) as reader:
        assert reader.shape == (3, 40, 50)
        np.testing.assert_array_equal(reader.read(1), data[1])
    assert voxel_size_of(path) == ((30.0, 4.0, 4.0), "nm")


@pytest.mark.parametrize("stop", ["publish", "list"])
def test_an_apply_into_labels_killed_while_finishing_leaves_it_consistent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Killed just before the label image is put in place: it was published without its
    image-label mark and the labels group without it (the same command then refused). The
    mark now goes in with the store, the same command finishes the run, and a killed write's
    temporary file in the labels group is removed. Killed just before it is listed: the
    same command lists it (the run's record notes the label image as it is put in place)."""
    import json
    import os

    import tifffile
    from deepalign_fast.cli import main

    stack = _stack(h=300, w=280)
    tifffile.imwrite(tmp_path / "s.tif", stack, photometric="minisblack")
    tifffile.imwrite(tmp_path / "lab.tif", (stack > 128).astype(np.uint8),
                     photometric="minisblack")
    image = tmp_path / "a.ome.zarr"
    assert main(["align", str(tmp_path / "s.tif"), "-o", str(image), "--quiet"]) == 0
    out = image / "labels" / "mito"
    argv = ["apply", str(image) + ".transforms.json", str(tmp_path / "lab.tif"), "-o",
            str(out), "--quiet"]
    real = os.replace

    def killed(src: object, dst: object, *a: object, **k: object) -> None:
        if (stop == "publish" and Path(str(dst)) == out) or (
                stop == "list" and Path(str(dst)) == image / "labels" / ".zattrs"
                and out.exists()):
            (image / "labels" / "..zattrs.deepalign-0123456789abcdef.tmp").write_text("{")
            raise KeyboardInterrupt
        real(src, dst, *a, **k)  # type: ignore[arg-type]

    with monkeypatch.context() as m:
        m.setattr(os, "replace", killed)
        assert main(argv) == 130
    if stop == "list":
        assert json.loads((out / ".zattrs").read_text())["image-label"]
    assert main(argv) == 0
    group = json.loads((image / "labels" / ".zattrs").read_text())
    assert group["labels"] == ["mito"]
    assert json.loads((out / ".zattrs").read_text())["image-label"]["source"] == {
        "image": "../../"}
    assert not list((image / "labels").glob(".*tmp")) and not (image / "labels" /
                                                                "mito.partial").exists()


def test_an_apply_killed_once_its_store_is_in_place_is_finished(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed between putting the store in place and removing its progress record: the
    same command refused ("already exists") and the record stayed in the store. It now
    finishes the run; a rerun with other options is refused."""
    import tifffile
    from deepalign_fast.cli import main

    stack = _stack(h=300, w=280)
    tifffile.imwrite(tmp_path / "s.tif", stack, photometric="minisblack")
    assert main(["align", str(tmp_path / "s.tif"), "-o", str(tmp_path / "a.tif"),
                 "--quiet"]) == 0
    out = tmp_path / "m.ome.zarr"
    argv = ["apply", str(tmp_path / "a.transforms.json"), str(tmp_path / "s.tif"), "-o",
            str(out), "--quiet"]
    real = Path.unlink

    def killed(self: Path, *a: object, **k: object) -> None:
        if self == out / "deepalign_progress.json":
            raise KeyboardInterrupt
        real(self, *a, **k)  # type: ignore[arg-type]

    with monkeypatch.context() as m:
        m.setattr(Path, "unlink", killed)
        assert main(argv) == 130
    assert (out / "deepalign_progress.json").exists()
    assert main([*argv, "--interpolation", "linear"]) == 2  # another run: refused
    assert main(argv) == 0
    assert not (out / "deepalign_progress.json").exists()
    assert not list(tmp_path.glob(".*"))


def test_labels_in_an_image_have_its_voxel_size(tmp_path: Path) -> None:
    """A label image covers its image voxel for voxel: it records the image's voxel size and
    unit (it recorded the label stack's: none, scale 1)."""
    import json

    import tifffile
    from deepalign_fast.cli import main

    stack = _stack(h=300, w=280)
    tifffile.imwrite(tmp_path / "s.tif", stack, photometric="minisblack")
    tifffile.imwrite(tmp_path / "lab.tif", (stack > 128).astype(np.uint8),
                     photometric="minisblack")
    image = tmp_path / "a.ome.zarr"
    assert main(["align", str(tmp_path / "s.tif"), "-o", str(image), "--pixel-size", "5,5,10",
                 "--unit", "nm", "--quiet"]) == 0
    out = image / "labels" / "mito"
    assert main(["apply", str(image) + ".transforms.json", str(tmp_path / "lab.tif"),
                 "-o", str(out), "--quiet"]) == 0
    ms = [json.loads((p / ".zattrs").read_text())["multiscales"][0] for p in (image, out)]
    assert ms[1]["axes"] == ms[0]["axes"] and ms[0]["axes"][2]["unit"] == "nanometer"
    assert [d["coordinateTransformations"] for d in ms[1]["datasets"]] == \
        [d["coordinateTransformations"] for d in ms[0]["datasets"]]
