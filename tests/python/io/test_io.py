from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import tifffile
import zarr
from deepalign_fast import DeepAlignError, datasets
from deepalign_fast.io import (
    FolderStackReader,
    TiffStackReader,
    TiffStackWriter,
    ZarrStackWriter,
    check_distinct,
    open_stack,
    open_writer,
    read_image,
)

DTYPES = [np.uint8, np.uint16, np.float32]


def _stack(rng: np.random.Generator, dtype: type, shape: tuple[int, int, int] = (5, 24, 32)):
    if np.dtype(dtype).kind == "f":
        return rng.normal(size=shape).astype(dtype)
    return rng.integers(0, np.iinfo(dtype).max, size=shape, endpoint=True).astype(dtype)


def _digest(path: Path) -> dict[str, tuple[str, int]]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {
        str(f): (hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_mtime_ns) for f in files
    }


def _write(path: Path, data: np.ndarray, **kw) -> None:
    with open_writer(path, data.shape, data.dtype, **kw) as w:
        for i, s in enumerate(data):
            w.write(i, s)


def _check_roundtrip(path: Path, data: np.ndarray) -> None:
    before = _digest(path)
    with open_stack(path) as r:
        assert r.shape == data.shape
        assert r.dtype == data.dtype
        assert len(r) == data.shape[0]
        for i, s in enumerate(r):
            assert s.flags.c_contiguous and s.dtype == data.dtype
            np.testing.assert_array_equal(s, data[i])
        np.testing.assert_array_equal(r.read(-1), data[-1])
        with pytest.raises(IndexError):
            r.read(data.shape[0])
    assert _digest(path) == before  # reading never modifies the input


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "name,kw",
    [
        ("s.tif", {}),
        ("s.tif", {"compression": "zlib"}),
        ("s.tif", {"bigtiff": True}),
        ("s.ome.zarr", {}),
        ("s.zarr", {"ome": False, "chunks": (1, 16, 16)}),
    ],
)
def test_roundtrip_writers(tmp_path, rng, dtype, name, kw):
    data = _stack(rng, dtype)
    path = tmp_path / name
    _write(path, data, **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temp litter
    _check_roundtrip(path, data)


def test_tiff_imagej_and_memmap(tmp_path, rng):
    data = _stack(rng, np.uint16)
    path = tmp_path / "s.tif"
    _write(path, data, metadata={"spacing": 5.0, "unit": "nm"})
    with tifffile.TiffFile(path) as tif:
        assert tif.is_imagej
        assert tif.imagej_metadata["slices"] == 5
        assert tif.imagej_metadata["spacing"] == 5.0
    with open_stack(path) as r:
        assert isinstance(r, TiffStackReader)
        assert r.memory_mapped
    _write(tmp_path / "c.tif", data, compression="zlib")
    with open_stack(tmp_path / "c.tif") as r:
        assert not r.memory_mapped


def test_tiff_written_by_tifffile_and_hyperstack(tmp_path, rng):
    data = _stack(rng, np.uint8)
    # ImageJ hyperstack with singleton T and C axes: the z axis is found.
    hyper = data[None, :, None]
    tifffile.imwrite(tmp_path / "h.tif", hyper, imagej=True, metadata={"axes": "TZCYX"})
    _check_roundtrip(tmp_path / "h.tif", data)
    # Plain multi-page file without metadata, one page at a time.
    with tifffile.TiffWriter(tmp_path / "p.tif") as tw:
        for s in data:
            tw.write(s, photometric="minisblack", metadata=None)
    _check_roundtrip(tmp_path / "p.tif", data)
    # Two non-singleton axes besides y, x: refused with the axes named.
    two = np.zeros((3, 2, 8, 8), np.uint8)
    tifffile.imwrite(tmp_path / "zc.tif", two, imagej=True, metadata={"axes": "ZCYX"})
    with pytest.raises(DeepAlignError, match="more than one axis.*Z=3, C=2"):
        open_stack(tmp_path / "zc.tif")


@pytest.mark.parametrize("metadata", [{}, None])
def test_tiff_written_page_by_page(tmp_path, rng, metadata):
    """One TiffWriter.write per slice: every page is a slice, in file order (tifffile gives
    each page its own "shaped" series; was: 'holds a single 2-D image')."""
    data = _stack(rng, np.uint16, (6, 20, 24))
    with tifffile.TiffWriter(tmp_path / "p.tif") as tw:
        for s in data:
            tw.write(s, photometric="minisblack", metadata=metadata)
    _check_roundtrip(tmp_path / "p.tif", data)


@pytest.mark.parametrize("metadata", [{}, None])
def test_tiff_page_of_another_size_is_named(tmp_path, rng, metadata):
    """A page of another size: the slice (page), its size and the expected one (was: 'holds
    a single 2-D image', or without metadata a stack silently missing that page)."""
    data = _stack(rng, np.uint8, (6, 30, 40))
    with tifffile.TiffWriter(tmp_path / "m.tif") as tw:
        for z, s in enumerate(data):
            tw.write(s[:10, :10] if z == 3 else s, photometric="minisblack", metadata=metadata)
    with pytest.raises(DeepAlignError, match=r"m\.tif, slice 3 \(page 3\): 10 x 10 pixels, "
                                             r"but the stack's slices are 30 x 40"):
        open_stack(tmp_path / "m.tif")
    with tifffile.TiffWriter(tmp_path / "d.tif") as tw:
        for z, s in enumerate(data):
            tw.write(s.astype(np.uint16) if z == 4 else s, photometric="minisblack",
                     metadata=metadata)
    with pytest.raises(DeepAlignError, match=r"slice 4 \(page 4\): pixel type uint16, but "
                                             r"slice 0 is uint8"):
        open_stack(tmp_path / "d.tif")


@pytest.mark.parametrize("second", ["labels", "preview"])
def test_tiff_stack_plus_another_series_reads_series0(tmp_path, rng, second):
    """A stack written in one call plus a label stack of its size, or a small preview stack:
    series[0] is the stack (was: 20 slices with the labels appended, or the preview refused
    as 'slice 10 (page 10): 4 x 5 pixels')."""
    data = _stack(rng, np.uint8, (10, 20, 24))
    extra = (data > 128).astype(np.uint8) if second == "labels" else data[:2, :4, :5]
    with tifffile.TiffWriter(tmp_path / "s.tif") as tw:
        tw.write(data, photometric="minisblack")
        tw.write(extra, photometric="minisblack")
    with tifffile.TiffFile(tmp_path / "s.tif") as tf:
        assert len(tf.series) == 2
    _check_roundtrip(tmp_path / "s.tif", data)


def test_converted_dtypes(tmp_path, rng):
    i16 = rng.integers(-3000, 3000, size=(3, 8, 9)).astype(np.int16)
    tifffile.imwrite(tmp_path / "i16.tif", i16, photometric="minisblack")
    with open_stack(tmp_path / "i16.tif") as r:
        assert r.dtype == np.float32 and r.file_dtype == np.int16
        np.testing.assert_array_equal(r.read(1), i16[1].astype(np.float32))
    tifffile.imwrite(tmp_path / "u32.tif", np.zeros((3, 8, 9), np.uint32), photometric="minisblack")
    with pytest.raises(DeepAlignError, match="uint32 is not supported.*never labels to float32"):
        open_stack(tmp_path / "u32.tif")


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.uint32, np.int64, np.uint64])
def test_label_stacks_keep_their_integer_type(tmp_path, rng, dtype):
    """``labels=True`` (apply with nearest): any integer type is read as stored, IDs beyond
    float32's 2**24 included; written back by both writers unchanged."""
    info = np.iinfo(dtype)
    lab = rng.integers(info.min, info.max, size=(3, 8, 9), dtype=dtype, endpoint=True)
    tifffile.imwrite(tmp_path / "lab.tif", lab, photometric="minisblack")
    with open_stack(tmp_path / "lab.tif", labels=True) as r:
        assert r.dtype == dtype and r.dtype.char == np.dtype(dtype).char
        got = np.stack([r.read(i) for i in range(3)])
    np.testing.assert_array_equal(got, lab)
    for name in ("w.tif", "w.ome.zarr"):
        with open_writer(tmp_path / name, lab.shape, r.dtype) as w:
            for i, s in enumerate(got):
                w.write(i, s)
        with open_stack(tmp_path / name, labels=True) as back:
            np.testing.assert_array_equal(np.stack([back.read(i) for i in range(3)]), lab)


# ---------------------------------------------------------------- folders


def test_folder_natural_sort_png_and_tif(tmp_path, rng):
    data = _stack(rng, np.uint8, (12, 16, 20))
    for i, s in enumerate(data):
        cv2.imwrite(str(tmp_path / f"{i}.png"), s)
    (tmp_path / ".hidden.png").write_bytes(b"junk")  # hidden files are ignored
    (tmp_path / "notes.txt").write_text("not a slice")
    with open_stack(tmp_path) as r:
        assert isinstance(r, FolderStackReader)
        assert [f.name for f in r.files][:4] == ["0.png", "1.png", "2.png", "3.png"]
        assert r.files[-1].name == "11.png"
        assert r.describe(10) == str(tmp_path / "10.png")
    _check_roundtrip(tmp_path, data)

    tifs = tmp_path / "tifs"
    tifs.mkdir()
    d16 = _stack(rng, np.uint16, (3, 10, 11))
    for i, s in enumerate(d16):
        tifffile.imwrite(tifs / f"z{i * 5}.tiff", s)
    _check_roundtrip(tifs, d16)


def test_folder_png_16bit_and_grey_rgb(tmp_path, rng):
    d16 = _stack(rng, np.uint16, (2, 10, 12))
    for i, s in enumerate(d16):
        cv2.imwrite(str(tmp_path / f"{i}.png"), s)
    _check_roundtrip(tmp_path, d16)

    rgb = tmp_path / "rgb"
    rgb.mkdir()
    grey = _stack(rng, np.uint8, (2, 10, 12))
    for i, s in enumerate(grey):
        cv2.imwrite(str(rgb / f"{i}.png"), np.dstack([s, s, s]))
    _check_roundtrip(rgb, grey)  # grey saved as RGB reads back as grey
    colour = np.dstack([grey[1], grey[1], 255 - grey[1]])
    cv2.imwrite(str(rgb / "1.png"), colour)
    with open_stack(rgb) as r:
        with pytest.raises(DeepAlignError, match=r"1\.png.*colour"):
            r.read(1)


def test_folder_header_checked_without_decoding(tmp_path, rng):
    data = _stack(rng, np.uint8, (3, 16, 20))
    for i, s in enumerate(data):
        cv2.imwrite(str(tmp_path / f"{i}.png"), s)
    # Corrupt the pixel data of slice 2 but keep its header: opening still succeeds (only the
    # IHDR is read), and reading that slice names the file.
    f = tmp_path / "2.png"
    raw = bytearray(f.read_bytes())
    raw[40:-12] = bytes(len(raw) - 52)
    f.write_bytes(bytes(raw))
    with open_stack(tmp_path) as r:
        np.testing.assert_array_equal(r.read(0), data[0])
        with pytest.raises(DeepAlignError, match=r"2\.png"):
            r.read(2)


@pytest.mark.parametrize("what", ["shape", "dtype"])
def test_folder_mixed_slices_name_the_file(tmp_path, rng, what):
    data = _stack(rng, np.uint8, (4, 16, 20))
    for i, s in enumerate(data):
        cv2.imwrite(str(tmp_path / f"s{i}.png"), s)
    odd = data[2, :, :18] if what == "shape" else data[2].astype(np.uint16)
    cv2.imwrite(str(tmp_path / "s2.png"), odd)
    expected = r"\(16, 18\)" if what == "shape" else "dtype uint16 instead of uint8"
    with pytest.raises(DeepAlignError, match=rf"s2\.png.*{expected}"):
        open_stack(tmp_path)


def test_folder_with_a_slice_in_another_image_format_is_refused(tmp_path, rng):
    """A JPEG among the slices was left out, every later slice one z early, exit 0."""
    data = _stack(rng, np.uint8, (6, 16, 20))
    for i, s in enumerate(data):
        cv2.imwrite(str(tmp_path / (f"s{i:02d}.jpg" if i == 4 else f"s{i:02d}.tif")), s)
    with pytest.raises(DeepAlignError, match=r"s04\.jpg: an image the folder's slices are not"):
        open_stack(tmp_path)


def test_folder_truncated_png(tmp_path, rng):
    data = _stack(rng, np.uint8, (3, 16, 20))
    for i, s in enumerate(data):
        cv2.imwrite(str(tmp_path / f"{i}.png"), s)
    f = tmp_path / "1.png"
    f.write_bytes(f.read_bytes()[:-30])
    with open_stack(tmp_path) as r:
        with pytest.raises(DeepAlignError, match=r"1\.png.*truncated"):
            r.read(1)


@pytest.mark.parametrize("bigtiff", [False, True])
def test_folder_multi_page_tiff_cut_short_is_refused(tmp_path, rng, bigtiff):
    # a multi-page TIFF cut after its first page read as one slice (an intact one is refused)
    data = _stack(rng, np.uint8, (3, 16, 20))
    for i, s in enumerate(data):
        tifffile.imwrite(tmp_path / f"s{i}.tif", s, photometric="minisblack", bigtiff=bigtiff)
    whole = tmp_path / "whole.tif"
    tifffile.imwrite(whole, data[:2], photometric="minisblack", bigtiff=bigtiff,
                     metadata=None)
    raw = whole.read_bytes()
    whole.unlink()
    first = tifffile.TiffFile(io.BytesIO(raw)).pages[0]
    end = max(first.dataoffsets[0] + first.databytecounts[0], first.offset + 200)
    (tmp_path / "s1.tif").write_bytes(raw[:end])  # page 1 and the data after it are gone
    with pytest.raises(DeepAlignError, match=r"s1\.tif: truncated TIFF"):
        open_stack(tmp_path)
    # single-page files (next page offset 0) are not affected
    for i, s in enumerate(data):
        tifffile.imwrite(tmp_path / f"s{i}.tif", s, photometric="minisblack", bigtiff=bigtiff)
    with open_stack(tmp_path) as r:
        assert len(r) == 3


# ---------------------------------------------------------------- errors on input


def test_single_image_where_stack_needed(tmp_path, rng):
    img = _stack(rng, np.uint8, (1, 12, 14))[0]
    tifffile.imwrite(tmp_path / "one.tif", img)
    cv2.imwrite(str(tmp_path / "one.png"), img)
    for name in ("one.tif", "one.png"):
        with pytest.raises(DeepAlignError, match="single 2-D image.*API: allow_single=True"):
            open_stack(tmp_path / name)
        with open_stack(tmp_path / name, allow_single=True) as r:
            assert r.shape == (1, 12, 14)
            np.testing.assert_array_equal(r.read(0), img)
        np.testing.assert_array_equal(read_image(tmp_path / name), img)


@pytest.mark.parametrize("n", [3, 4])
def test_short_stack_saved_as_planar_colour_is_explained(tmp_path, rng, n):
    """tifffile.imwrite stores a (3, y, x) or (4, y, x) array as one planar RGB(A) image
    unless told photometric="minisblack": the error says so and how to save it again (was:
    'holds a single 2-D image (one slice)')."""
    # What tifffile.imwrite writes by default (and warns about), said explicitly.
    tifffile.imwrite(tmp_path / "short.tif", _stack(rng, np.uint8, (n, 12, 14)),
                     photometric="rgb", planarconfig="separate")
    with pytest.raises(DeepAlignError, match=rf"short\.tif: holds one colour image stored "
                                             rf"plane by plane \({n} samples per pixel\).*"
                                             "photometric='minisblack'"):
        open_stack(tmp_path / "short.tif")


def test_read_image_refuses_stacks_and_colour(tmp_path, rng):
    multi = _stack(rng, np.uint8, (3, 8, 8))
    tifffile.imwrite(tmp_path / "multi.tif", multi, photometric="minisblack")
    with pytest.raises(DeepAlignError, match=r"multi\.tif: holds 3 slices \(pages\), but a "
                                             "single 2-D image is needed here"):
        read_image(tmp_path / "multi.tif")
    rgba = np.zeros((8, 8, 4), np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), rgba)
    with pytest.raises(DeepAlignError, match="alpha"):
        read_image(tmp_path / "a.png")
    with pytest.raises(DeepAlignError, match="no such image"):
        read_image(tmp_path / "missing.png")


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_truncated_tiff_names_file_and_slice(tmp_path, rng, compression):
    data = _stack(rng, np.uint8, (6, 30, 40))
    path = tmp_path / "cut.tif"
    _write(path, data, compression=compression)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 1500])  # lose the tail: last slice(s) and trailing IFDs
    with open_stack(path) as r:
        assert r.shape == data.shape  # the metadata still promises 6 slices
        np.testing.assert_array_equal(r.read(0), data[0])
        with pytest.raises(DeepAlignError, match=r"cut\.tif, slice 5: (truncated|missing)"):
            r.read(5)


def test_tiff_reader_is_lazy(tmp_path, rng):
    # Garbage in the compressed data of the last page: opening and reading the first slices
    # must not touch it; only reading that slice fails.
    data = _stack(rng, np.uint8, (4, 64, 64))
    path = tmp_path / "lazy.tif"
    _write(path, data, compression="zlib")
    with tifffile.TiffFile(path) as tif:
        off, count = tif.pages[3].dataoffsets[0], tif.pages[3].databytecounts[0]
    raw = bytearray(path.read_bytes())
    raw[off : off + count] = b"\xff" * count
    path.write_bytes(bytes(raw))
    with open_stack(path) as r:
        for i in range(3):
            np.testing.assert_array_equal(r.read(i), data[i])
        with pytest.raises(DeepAlignError, match=r"lazy\.tif, slice 3"):
            r.read(3)


def test_nan_slice_is_reported(tmp_path, rng):
    data = _stack(rng, np.float32)
    data[3, 2, 2] = np.nan
    data[3, 4, 4] = np.inf
    tifffile.imwrite(tmp_path / "nan.tif", data)
    with open_stack(tmp_path / "nan.tif") as r:
        r.read(2)
        with pytest.raises(DeepAlignError, match=r"nan\.tif, slice 3: .*2 NaN or infinite"):
            r.read(3)


def test_float64_overflow_reported_as_beyond_float32(tmp_path):
    """1e300 is finite: the message says it exceeds float32 (was: 'NaN or infinite')."""
    data = np.ones((3, 4, 4))
    data[1, 0, 0] = 1e300
    data[1, 1, 1] = -2e39
    data[2, 0, 0] = np.inf
    tifffile.imwrite(tmp_path / "f64.tif", data, photometric="minisblack")
    with open_stack(tmp_path / "f64.tif") as r:
        assert r.dtype == np.float32
        assert r.read(0).dtype == np.float32
        with pytest.raises(DeepAlignError, match=r"f64\.tif, slice 1: slice holds 2 value\(s\) "
                                                 r"beyond the float32 range \(up to 1e\+300"):
            r.read(1)
        with pytest.raises(DeepAlignError, match=r"slice 2: .*1 NaN or infinite"):
            r.read(2)


def test_missing_and_unknown_paths(tmp_path):
    with pytest.raises(DeepAlignError, match="no such file"):
        open_stack(tmp_path / "nope.tif")
    (tmp_path / "x.mrcx").write_bytes(b"1234")
    with pytest.raises(DeepAlignError, match="unsupported stack format"):
        open_stack(tmp_path / "x.mrcx")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DeepAlignError, match="no slice images"):
        open_stack(tmp_path / "empty")


# ---------------------------------------------------------------- zarr input


def test_zarr_inputs(tmp_path, rng):
    data = _stack(rng, np.uint16)
    zarr.create_array(tmp_path / "v2.zarr", data=data, zarr_format=2)
    _check_roundtrip(tmp_path / "v2.zarr", data)
    # OME-style 5-D (t, c, z, y, x) with singleton t, c; level chosen from multiscales.
    g = zarr.open_group(tmp_path / "g.zarr", mode="w")
    g.create_array("s0", data=data[None, None])
    g.create_array("s1", data=data[None, None, :, ::2, ::2])
    g.attrs["ome"] = {"multiscales": [{"datasets": [{"path": "s0"}, {"path": "s1"}]}]}
    _check_roundtrip(tmp_path / "g.zarr", data)
    with open_stack(tmp_path / "g.zarr", key="s1") as r:
        assert r.shape == (5, 12, 16)
        assert r.describe(1) == f"{tmp_path / 'g.zarr'}/s1, slice 1"
    zarr.create_array(tmp_path / "2d.zarr", data=data[0])
    with pytest.raises(DeepAlignError, match=r"shape \(24, 32\); a \(z, y, x\) stack"):
        open_stack(tmp_path / "2d.zarr")
    with pytest.raises(DeepAlignError, match="no array 'nope'"):
        open_stack(tmp_path / "g.zarr", key="nope")


def test_ome_zarr_metadata(tmp_path, rng):
    data = _stack(rng, np.uint8)
    path = tmp_path / "out.ome.zarr"
    _write(path, data, voxel_size=(50.0, 4.0, 4.0), unit="nanometer", chunks=(1, 16, 16))
    group = zarr.open_group(path, mode="r")
    (ms,) = group.attrs["multiscales"]
    assert ms["version"] == "0.4"
    assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
    assert all(a["type"] == "space" and a["unit"] == "nanometer" for a in ms["axes"])
    (level,) = ms["datasets"]
    assert level["path"] == "0"
    assert level["coordinateTransformations"] == [{"type": "scale", "scale": [50.0, 4.0, 4.0]}]
    assert group["0"].chunks == (1, 16, 16)
    assert not (path / "deepalign_progress.json").exists()
    np.testing.assert_array_equal(group["0"][:], data)


# ---------------------------------------------------------------- writer safety


@pytest.mark.parametrize("name", ["out.tif", "out.zarr"])
def test_exception_mid_write_leaves_nothing(tmp_path, rng, name):
    data = _stack(rng, np.uint8)
    path = tmp_path / name
    with pytest.raises(RuntimeError, match="boom"):
        with open_writer(path, data.shape, data.dtype) as w:
            w.write(0, data[0])
            w.write(1, data[1])
            raise RuntimeError("boom")
    assert not path.exists()
    left = sorted(p.name for p in tmp_path.iterdir())
    # TIFF: no temp file remains. Zarr: only the resumable .partial store remains.
    assert left == ([] if name.endswith(".tif") else [f"{name}.partial"])


def test_tiff_abort_and_incomplete_close(tmp_path, rng):
    data = _stack(rng, np.uint8)
    w = TiffStackWriter(tmp_path / "a.tif", data.shape, data.dtype)
    w.write(0, data[0])
    w.abort()
    assert list(tmp_path.iterdir()) == []
    w = TiffStackWriter(tmp_path / "b.tif", data.shape, data.dtype)
    w.write(0, data[0])
    with pytest.raises(DeepAlignError, match="only 1 of 5 slices"):
        w.close()
    assert list(tmp_path.iterdir()) == []


def test_tiff_writer_checks(tmp_path, rng):
    data = _stack(rng, np.uint8)
    path = tmp_path / "w.tif"
    with TiffStackWriter(path, data.shape, data.dtype) as w:
        with pytest.raises(DeepAlignError, match="in order; expected slice 0"):
            w.write(1, data[1])
        with pytest.raises(DeepAlignError, match=r"dtype uint16.*astype"):
            w.write(0, data[0].astype(np.uint16))
        with pytest.raises(DeepAlignError, match=r"shape \(24, 31\)"):
            w.write(0, data[0, :, :31])
        for i, s in enumerate(data):
            w.write(i, s)
    _check_roundtrip(path, data)
    with pytest.raises(DeepAlignError, match="already exists.*overwrite=True"):
        TiffStackWriter(path, data.shape, data.dtype)
    with pytest.raises(DeepAlignError, match="cannot write dtype float64"):
        TiffStackWriter(tmp_path / "x.tif", data.shape, np.float64)
    _write(path, data[::-1].copy(), overwrite=True)
    _check_roundtrip(path, data[::-1])


def test_zarr_resume_keeps_finished_slices(tmp_path, rng):
    data = _stack(rng, np.float32, (6, 20, 24))
    path = tmp_path / "r.zarr"
    with pytest.raises(RuntimeError):
        with ZarrStackWriter(path, data.shape, data.dtype, chunks=(1, 8, 8)) as w:
            for i in (0, 1, 3):
                w.write(i, data[i])
            raise RuntimeError("crash")
    progress = json.loads((tmp_path / "r.zarr.partial" / "deepalign_progress.json").read_text())
    assert progress["completed"] == [[0, 2], [3, 4]]
    with pytest.raises(DeepAlignError, match="unfinished output.*resume=True"):
        ZarrStackWriter(path, data.shape, data.dtype, chunks=(1, 8, 8))
    with pytest.raises(DeepAlignError, match="cannot resume.*layout"):
        ZarrStackWriter(path, data.shape, np.uint8, chunks=(1, 8, 8), resume=True)
    with ZarrStackWriter(path, data.shape, data.dtype, chunks=(1, 8, 8), resume=True) as w:
        assert w.completed() == {0, 1, 3}
        for i in range(6):
            if i not in w.completed():
                w.write(i, data[i])
    assert not (tmp_path / "r.zarr.partial").exists()
    _check_roundtrip(path, data)


@pytest.mark.parametrize("ome", [True, False])
def test_zarr_store_stopped_while_being_created_is_made_again(tmp_path, rng, ome):
    # killed after the store's metadata and before its progress record: no slice can be in
    # it; rerunning the same command (resume) refused it for ever, --overwrite included
    data = _stack(rng, np.uint8)
    path = tmp_path / ("c.ome.zarr" if ome else "c.zarr")
    w = ZarrStackWriter(path, data.shape, data.dtype, ome=ome)
    (w.partial / "deepalign_progress.json").unlink()
    with ZarrStackWriter(path, data.shape, data.dtype, ome=ome, resume=True) as w:
        assert w.completed() == set()
        for i in range(len(data)):
            w.write(i, data[i])
    _check_roundtrip(path, data)
    # a store with slices but no record is not discarded without --overwrite
    w = ZarrStackWriter(tmp_path / "d.zarr", data.shape, data.dtype)
    w.write(0, data[0])
    (w.partial / "deepalign_progress.json").unlink()
    with pytest.raises(DeepAlignError, match="cannot resume.*missing"):
        ZarrStackWriter(tmp_path / "d.zarr", data.shape, data.dtype, resume=True)
    with ZarrStackWriter(tmp_path / "d.zarr", data.shape, data.dtype, resume=True,
                         overwrite=True) as w:
        assert w.completed() == set()
        for i in range(len(data)):
            w.write(i, data[i])
    _check_roundtrip(tmp_path / "d.zarr", data)


def test_zarr_incomplete_close_keeps_partial(tmp_path, rng):
    data = _stack(rng, np.uint8)
    w = ZarrStackWriter(tmp_path / "i.zarr", data.shape, data.dtype)
    w.write(4, data[4])
    with pytest.raises(DeepAlignError, match="4 of 5 slices were never written.*slice 0"):
        w.close()
    assert (tmp_path / "i.zarr.partial").is_dir() and not (tmp_path / "i.zarr").exists()
    w = ZarrStackWriter(tmp_path / "i.zarr", data.shape, data.dtype, resume=True)
    assert w.completed() == {4}
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_open_writer_suffix(tmp_path):
    with pytest.raises(DeepAlignError, match="suffix '.h5'"):
        open_writer(tmp_path / "x.h5", (2, 4, 4), np.uint8)


def test_check_distinct(tmp_path, rng):
    src = tmp_path / "in.tif"
    tifffile.imwrite(src, _stack(rng, np.uint8))
    with pytest.raises(DeepAlignError, match="output is the input"):
        check_distinct(src, tmp_path / "." / "in.tif")
    link = tmp_path / "link.tif"
    link.symlink_to(src)
    with pytest.raises(DeepAlignError, match="output is the input"):
        check_distinct(src, link)
    hard = tmp_path / "hard.tif"
    os.link(src, hard)
    with pytest.raises(DeepAlignError, match="output is the input"):
        check_distinct(hard, src)
    (tmp_path / "slices").mkdir()
    with pytest.raises(DeepAlignError, match="inside the input folder"):
        check_distinct(tmp_path / "slices", tmp_path / "slices" / "out.tif")
    check_distinct(src, tmp_path / "out.tif")  # distinct: no error


# ---------------------------------------------------------------- real EM stacks


def _data_dir() -> Path:
    try:
        return datasets.data_dir()
    except datasets.DataUnavailable as exc:
        pytest.skip(f"shared EM data unavailable: {exc}")


def test_real_lucchi_tiff(lucchi):
    image, _ = lucchi
    path = _data_dir() / "lucchi_epfl_fibsem" / "image.tif"
    with open_stack(path) as r:
        assert r.shape == image.shape == (165, 384, 512)
        assert r.dtype == np.uint8
        for i in (0, 82, 164):
            np.testing.assert_array_equal(r.read(i), image[i])


def test_real_isbi_folder(isbi):
    image, _ = isbi
    folder = _data_dir() / "isbi2012_sstem" / "train" / "image"
    with open_stack(folder) as r:
        assert r.shape == image.shape == (30, 512, 512)
        assert r.files[10].name == "10.png" and r.files[2].name == "2.png"
        for i in (0, 2, 10, 29):
            np.testing.assert_array_equal(r.read(i), image[i])


@pytest.mark.parametrize("name,kw", [("c.tif", {"compression": "zlib"}), ("t.zarr", {})])
def test_parallel_read_and_zarr_write(tmp_path, rng, num_threads, name, kw):
    from concurrent.futures import ThreadPoolExecutor

    data = _stack(rng, np.uint16, (8, 40, 48))
    src = tmp_path / name
    _write(src, data, **kw)
    out = tmp_path / "par.zarr"
    with open_stack(src) as r, ZarrStackWriter(out, r.shape, r.dtype) as w:
        with ThreadPoolExecutor(num_threads) as pool:
            list(pool.map(lambda i: w.write(i, r.read(i)), reversed(range(len(r)))))
    _check_roundtrip(out, data)


@pytest.mark.parametrize("kind", ["tiff", "folder", "mrc"])
@pytest.mark.parametrize(("errno_", "exit_status"), [(13, 1), (5, 1), (2, 2)])
def test_an_unreadable_stack_is_the_environment_not_the_input(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        errno_: int, exit_status: int, kind: str) -> None:
    """A TIFF (or a folder's slice) the system will not let us read (permission denied, an
    I/O error) is an environment failure (CLI exit status 1), named in one line; a file gone
    between the check and the read is bad input (2). (Root reads anything, so the refusal
    is simulated.)"""
    from deepalign_fast._errors import EnvironmentFailure
    from deepalign_fast.cli import main

    data = np.zeros((6, 16, 16), np.uint8)
    if kind == "tiff":
        src = tmp_path / "s.tif"
        tifffile.imwrite(src, data)
    elif kind == "mrc":
        mrcfile = pytest.importorskip("mrcfile")
        src = tmp_path / "s.mrc"
        mrcfile.new(str(src), data=data).close()
    else:
        src = tmp_path / "slices"
        src.mkdir()
        for z, image in enumerate(data):
            tifffile.imwrite(src / f"z{z}.tif", image)

    def refuse(path: Any, *args: Any, **kwargs: Any) -> Any:
        raise OSError(errno_, os.strerror(errno_), str(path))

    if kind == "mrc":
        monkeypatch.setattr(pytest.importorskip("mrcfile"), "mmap", refuse)
    else:
        monkeypatch.setattr(tifffile, "TiffFile", refuse)
    named = src / "z0.tif" if kind == "folder" else src  # the file that could not be read
    with pytest.raises(DeepAlignError, match=re.escape(f"{named}: cannot read the stack")
                       ) as info:
        open_stack(src)
    assert isinstance(info.value, EnvironmentFailure) is (exit_status == 1)
    capsys.readouterr()
    assert main(["align", str(src), "-o", str(tmp_path / "o.tif"), "--quiet"]) == exit_status
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(named) in err


def test_one_section_stores_and_duplicate_slice_names(tmp_path):
    """A one-section Zarr or MRC stack is refused as a one-page TIFF is (was: "aligned 1
    slices"); two files naming one slice (s1.tif and s01.tif, s3.tif and s3.png) are
    refused, naming both (were: both taken, in an order that was a guess)."""
    zarr.save_array(str(tmp_path / "one.zarr"), np.zeros((1, 16, 16), np.uint8))
    with pytest.raises(DeepAlignError, match="one.zarr: holds a single 2-D image"):
        open_stack(tmp_path / "one.zarr")
    with open_stack(tmp_path / "one.zarr", allow_single=True) as r:
        assert len(r) == 1
    for names, later, earlier in ((("s1.tif", "s01.tif", "s2.tif"), "s1.tif", "s01.tif"),
                                  (("s3.tif", "s3.png", "s4.tif"), "s3.tif", "s3.png")):
        folder = tmp_path / names[1].replace(".", "_")
        folder.mkdir()
        for name in names:
            cv2.imwrite(str(folder / name), np.zeros((8, 8), np.uint8))
        with pytest.raises(DeepAlignError, match="names the same slice as") as err:
            open_stack(folder)
        assert later in str(err.value) and earlier in str(err.value)


def test_a_tiff_cut_short_while_read_is_one_error(tmp_path, rng):
    """A stack rewritten in place (truncated) while a run reads it: the next slice read is a
    message naming the file and slice (was: SIGBUS under the memory map, the process gone
    with a fatal-error dump)."""
    data = rng.integers(0, 255, size=(6, 32, 40), dtype=np.uint8)
    path = tmp_path / "s.tif"
    tifffile.imwrite(path, data, photometric="minisblack")
    with open_stack(path) as r:
        assert r.memory_mapped
        np.testing.assert_array_equal(r.read(1), data[1])
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 3 * 32 * 40)
        np.testing.assert_array_equal(r.read(2), data[2])  # still whole
        with pytest.raises(DeepAlignError, match=r"s.tif, slice 4: the file ends before this "
                                                 r"slice's data; it was cut short"):
            r.read(4)
