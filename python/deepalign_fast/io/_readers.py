"""Lazy stack readers: multi-page TIFF, folders of slices, Zarr / OME-Zarr."""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import DeepAlignError
from ..outputs import os_error
from ._common import (
    StackReader,
    check_slice_size,
    finish_slice,
    natural_key,
    output_dtype,
    png_header,
    png_is_complete,
)
from ._mrc import MRC_SUFFIXES, MrcStackReader

TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8")
SLICE_SUFFIXES = (".tif", ".tiff", ".png")
# Image files that are no slices here: one in a folder of slices is refused, not skipped.
OTHER_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jp2", ".bmp", ".gif", ".webp", ".dm3", ".dm4", ".mrc",
                 ".tga", ".pgm", ".ppm")
_SPATIAL = ("Y", "X", "S")


def _single_error(path: Path) -> DeepAlignError:
    # The API's way out is in "(API: ...)", which the CLI leaves out of its message.
    return DeepAlignError(
        f"{path}: holds a single 2-D image (one slice), but a stack of several slices is "
        "needed here: one slice has no neighbour to align to. Pass the whole stack (the "
        "multi-page file, the folder of slices or the Zarr store) (API: allow_single=True "
        "opens a one-slice stack; read_image reads a single image)."
    )


def _read_tiff_page(page: Any, filesize: int, where: str) -> np.ndarray:
    """Decode one TIFF page after checking that its data lies inside the file."""
    offsets = page.dataoffsets
    counts = page.databytecounts
    if not offsets or any(c == 0 for c in counts):
        raise DeepAlignError(f"{where}: the page has no pixel data; the file is corrupt.")
    end = max(o + c for o, c in zip(offsets, counts, strict=False))
    if end > filesize:
        raise DeepAlignError(
            f"{where}: truncated: the slice's data ends at byte {end}, but the file has only "
            f"{filesize} bytes. The file was not completely written or copied; re-copy it."
        )
    arr = page.asarray()
    axes = page.axes
    if "S" in axes and axes.index("S") != len(axes) - 1 and arr.ndim == len(axes):
        arr = np.moveaxis(arr, axes.index("S"), -1)  # planar RGB -> (y, x, samples)
    return np.asarray(arr)


class TiffStackReader(StackReader):
    """Multi-page TIFF, BigTIFF or ImageJ hyperstack, read lazily one slice at a time.

    Uncompressed contiguous data (what ImageJ and ``tifffile`` write by default) is
    memory-mapped read-only (``memory_mapped`` is True); anything else is decoded page by page.
    A hyperstack may have several axes as long as only one besides y/x (and RGB samples) is
    longer than 1; that axis is the stack's z.

    A file whose ImageJ or tifffile metadata promises more slices than the file holds (a copy or
    write that stopped early) still opens: the slices present read normally and the missing ones
    raise ``DeepAlignError`` naming the slice.
    """

    def __init__(self, path: str | os.PathLike[str], *, allow_single: bool = False,
                 labels: bool = False) -> None:
        import tifffile

        self.path = Path(path)
        self.labels = labels
        self._lock = threading.Lock()
        self._mm: np.ndarray | None = None
        self._fd: int | None = None
        self._block: tuple[int, int, np.dtype, tuple[int, ...]] | None = None
        self._n_mapped = 0
        try:
            self._tif: Any = tifffile.TiffFile(self.path, mode="r")
        except OSError as exc:
            raise _unreadable(exc, self.path) from exc
        except Exception as exc:
            raise DeepAlignError(
                f"{self.path}: not a readable TIFF file ({type(exc).__name__}: {exc})."
            ) from exc
        try:
            self._setup(allow_single)
        except BaseException:
            self.close()
            raise

    def _setup(self, allow_single: bool) -> None:
        tif = self._tif
        self._filesize = self.path.stat().st_size
        if not tif.series or not len(tif.pages):
            raise DeepAlignError(f"{self.path}: the TIFF holds no images (zero pages); is the "
                                 "file complete?")
        if self._setup_pagewise():
            return
        series = tif.series[0]
        axes: str = series.axes
        shape = tuple(int(s) for s in series.shape)
        stack_axes = [(a, n) for a, n in zip(axes, shape, strict=False)
                      if a not in _SPATIAL and n > 1]
        if len(stack_axes) > 1:
            desc = ", ".join(f"{a}={n}" for a, n in stack_axes)
            raise DeepAlignError(
                f"{self.path}: hyperstack has more than one axis besides y and x ({desc}; axes "
                f"{axes}, shape {shape}). Extract a single channel / time point first (Fiji: "
                "Image > Hyperstacks > Reduce Dimensionality)."
            )
        n_series = stack_axes[0][1] if stack_axes else 1
        page0 = series.pages[0] if len(series.pages) else tif.pages.first
        ny, nx = int(page0.imagelength), int(page0.imagewidth)
        self.file_dtype = np.dtype(series.dtype)
        self.dtype = output_dtype(self.file_dtype, str(self.path), labels=self.labels)

        n_expected = self._expected_slices(ny, nx, int(page0.samplesperpixel))
        nz = max(n_series, n_expected or 0)
        if nz == 1 and not allow_single:
            samples = int(page0.samplesperpixel)
            if samples > 1 and page0.planarconfig == 2:
                # tifffile.imwrite stores a (3, y, x) or (4, y, x) array this way unless
                # told photometric="minisblack": often a short stack, not a colour image.
                raise DeepAlignError(
                    f"{self.path}: holds one colour image stored plane by plane ({samples} "
                    f"samples per pixel), not a stack of slices. If these are {samples} "
                    "slices (tifffile.imwrite writes a (3 or 4, y, x) array so), save them "
                    "again with photometric='minisblack'.")
            raise _single_error(self.path)
        self.shape = (nz, ny, nx)
        self._truncated = nz > n_series

        # Memory-map when the pixel data is one uncompressed block: a slice read is then a copy
        # out of the page cache, with no per-page decoding. ImageJ files are contiguous by
        # format, so their block is extended to the promised slice count (as tifffile does for
        # ImageJ files > 4 GiB that carry a single IFD) and cut at the end of the file.
        offset = series.dataoffset
        if offset is None and self._truncated and tif.is_imagej and page0.is_contiguous:
            offset = page0.dataoffsets[0]
        if offset is not None and page0.compression == 1:
            samples = int(page0.samplesperpixel)
            slice_shape = (ny, nx, samples) if samples > 1 else (ny, nx)
            file_dt = np.dtype(tif.byteorder + self.file_dtype.char)
            slice_bytes = math.prod(slice_shape) * file_dt.itemsize
            contig = samples == 1 or page0.planarconfig == 1  # samples interleaved per pixel
            whole_bytes = page0.bitspersample == 8 * file_dt.itemsize  # not 1-bit or 12-bit
            if contig and whole_bytes and self.file_dtype != np.bool_:
                self._n_mapped = min(nz, max(0, (self._filesize - offset) // slice_bytes))
                if self._n_mapped > 0 and hasattr(os, "preadv"):
                    # Positional reads, not a memory map: a file cut short while it is read
                    # (rewritten in place) is then a short read and a message, not SIGBUS.
                    self._block = (offset, slice_bytes, file_dt, slice_shape)
                    self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
                elif self._n_mapped > 0:
                    self._mm = np.memmap(
                        self.path,
                        dtype=file_dt,
                        mode="r",
                        offset=offset,
                        shape=(self._n_mapped, *slice_shape),
                    )
        self._pages = series.pages if not self._truncated else tif.pages

    def _setup_pagewise(self) -> bool:
        """Open a file whose pages tifffile splits into several series as one slice per
        page, in file order; False (nothing set) for any other file.

        ``tifffile.TiffWriter.write`` called once per slice gives each page its own series
        (each with "shaped" metadata of one 2-D image), and pages of another size or dtype
        split a plain file into series too: series[0] alone would be one slice, or the stack
        without the odd page. Files with reduced-resolution pages (thumbnails, pyramids),
        OME and ImageJ files keep their series, and so does a file whose writer-made series
        are not all single 2-D pages (an image stack plus a label stack, or plus a preview):
        series[0] is read as before.
        """
        tif = self._tif
        if len(tif.series) < 2 or tif.is_ome or tif.is_imagej:
            return False

        def single_2d_page(series: Any) -> bool:
            return len(series.pages) == 1 and int(getattr(series.pages[0], "imagedepth", 1)) == 1

        # "generic" series are tifffile's own grouping of a plain file's pages by size and
        # type; any other series is what the writer wrote (one TiffWriter.write per series).
        if not all(str(s.kind).lower() == "generic" for s in tif.series) and not all(
                single_2d_page(s) for s in tif.series):
            return False
        pages = list(tif.pages)
        if sum(len(s.pages) for s in tif.series) != len(pages) or any(
                getattr(p, "is_reduced", False) or getattr(p, "is_subsampled", False)
                for p in pages):
            return False
        first = pages[0]

        def layout(page: Any) -> tuple[int, int, int, np.dtype]:
            return (int(page.imagelength), int(page.imagewidth), int(page.samplesperpixel),
                    np.dtype(page.dtype))

        ny, nx, samples, dtype = layout(first)
        for z, page in enumerate(pages[1:], 1):
            py, px, ps, pdt = layout(page)
            if (py, px, ps) != (ny, nx, samples):
                got = f"{py} x {px} pixels" + (f", {ps} samples" if ps != samples else "")
                want = f"{ny} x {nx}" + (f", {samples} samples" if ps != samples else "")
                raise DeepAlignError(
                    f"{self.describe(z)} (page {z}): {got}, but the stack's slices are "
                    f"{want} (slice 0); all slices of a stack must have one size. Crop or pad "
                    "that page, or remove it."
                )
            if pdt != dtype:
                raise DeepAlignError(
                    f"{self.describe(z)} (page {z}): pixel type {pdt}, but slice 0 is "
                    f"{dtype}; all slices of a stack must have one pixel type. Convert the "
                    "file to one type."
                )
        self.file_dtype = dtype
        self.dtype = output_dtype(dtype, str(self.path), labels=self.labels)
        self.shape = (len(pages), ny, nx)
        self._truncated = False
        self._pages = pages
        return True

    def _expected_slices(self, ny: int, nx: int, samples: int) -> int | None:
        """Slice count promised by ImageJ or tifffile ("shaped") metadata, if any."""
        tif = self._tif
        try:
            if tif.is_imagej and tif.imagej_metadata:
                return int(tif.imagej_metadata.get("images", 0)) or None
            if tif.is_shaped and tif.shaped_metadata:
                shape = [int(s) for s in tif.shaped_metadata[0]["shape"]]
                total = math.prod(shape)
                per_page = ny * nx * samples
                return total // per_page if per_page and total % per_page == 0 else None
        except (KeyError, TypeError, ValueError):
            return None
        return None

    @property
    def memory_mapped(self) -> bool:
        """True when slices are read as one uncompressed block of the file (positional reads,
        or a read-only memory map where the system has no ``preadv``): a copy out of the page
        cache, no per-page decoding."""
        return self._mm is not None or self._fd is not None

    def _read_block(self, i: int, where: str) -> np.ndarray:
        assert self._fd is not None and self._block is not None
        offset, size, dtype, shape = self._block
        out = np.empty(shape, dtype)
        view, done = out.data.cast("B"), 0
        while done < size:
            got = os.preadv(self._fd, [view[done:]], offset + i * size + done)
            if got <= 0:
                raise DeepAlignError(
                    f"{where}: the file ends before this slice's data; it was cut short or "
                    "rewritten while being read (save a stack under a new name, then rename "
                    "it into place).")
            done += got
        return out

    def describe(self, i: int) -> str:
        return f"{self.path}, slice {i}"

    def _read(self, i: int) -> np.ndarray:
        where = self.describe(i)
        if self._mm is not None or self._fd is not None:
            if i < self._n_mapped:
                if self._mm is not None:
                    return np.array(self._mm[i])
                return self._read_block(i, where)
            if self._tif.is_imagej or not self._truncated:
                raise DeepAlignError(
                    f"{where}: truncated: the file ends before this slice's data (only "
                    f"{self._n_mapped} of {self.shape[0]} slices are complete). The file was "
                    "not completely written or copied; re-copy it."
                )
        with self._lock:  # one file handle: tifffile's seek+read must not interleave
            try:
                page = self._pages[i]
            except IndexError:
                page = None
            if page is not None:
                return _read_tiff_page(page, self._filesize, where)
            raise DeepAlignError(
                f"{where}: missing: the file's metadata describes {self.shape[0]} slices, but "
                "fewer pages could be found; the file is truncated or corrupt. Re-copy or "
                "re-export it."
            )

    def close(self) -> None:
        self._mm = None
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            os.close(fd)
        tif = getattr(self, "_tif", None)
        if tif is not None:
            tif.close()


class FolderStackReader(StackReader):
    """A folder of 2-D slices (``.tif``, ``.tiff``, ``.png``), in natural order.

    Names are sorted by natural order (``2.png`` before ``10.png``); hidden files are ignored.
    Every file's header is checked at open (TIFF tags; for PNG the IHDR chunk, no pixels
    decoded): all slices must share one shape and dtype, else ``DeepAlignError`` names the
    first file that differs from the first slice.
    """

    def __init__(self, path: str | os.PathLike[str], *, labels: bool = False) -> None:
        self.path = Path(path)
        files = [
            f
            for f in self.path.iterdir()
            if f.suffix.lower() in SLICE_SUFFIXES and not f.name.startswith(".") and f.is_file()
        ]
        if not files:
            raise DeepAlignError(
                f"{self.path}: folder holds no slice images (.tif, .tiff or .png) and is not a "
                "Zarr store."
            )
        other = sorted((f for f in self.path.iterdir() if f.suffix.lower() in OTHER_IMAGE_SUFFIXES
                        and not f.name.startswith(".")), key=lambda f: natural_key(f.name))
        if other:  # left out, it would shift every later slice by one, silently
            raise DeepAlignError(
                f"{other[0]}: an image the folder's slices are not read from (.tif, .tiff and "
                f".png are; {len(other)} such file(s) here); convert it to one of those, or "
                "move it out of the folder if it is not a slice")
        files.sort(key=lambda f: natural_key(f.name))
        seen: dict[tuple[tuple[int, int | str], ...], Path] = {}
        for f in files:  # (two files of one slice: their order would be a guess)
            a = seen.setdefault(tuple(natural_key(f.stem)), f)
            if a is not f:
                raise DeepAlignError(
                    f"{f}: names the same slice as {a.name} (the numbers in the names order "
                    "the slices); remove or rename one of them")
        self.files = files
        first_shape, first_dtype = _slice_header(files[0])
        for f in files[1:]:
            shape, dtype = _slice_header(f)
            if shape != first_shape or dtype != first_dtype:
                what = []
                if shape != first_shape:
                    what.append(f"shape {shape} (y, x) instead of {first_shape}")
                if dtype != first_dtype:
                    what.append(f"dtype {dtype} instead of {first_dtype}")
                raise DeepAlignError(
                    f"{f}: slice differs from the first slice {files[0].name}: "
                    f"{' and '.join(what)}. All slices of a stack must have one shape and "
                    "dtype; remove the stray file or convert the slices."
                )
        self.file_dtype = first_dtype
        self.dtype = output_dtype(first_dtype, str(files[0]), labels=labels)
        self.shape = (len(files), *first_shape)

    def describe(self, i: int) -> str:
        return str(self.files[i])

    def data_paths(self) -> list[Path]:
        return list(self.files)

    def _read(self, i: int) -> np.ndarray:
        return _read_slice_file(self.files[i])


_IN_FOLDER = "a folder of slices needs one 2-D image per file"
_ONE_IMAGE = "a single 2-D image is needed here"


def _next_page_beyond_end(f: Path) -> bool:
    """Whether the first page of TIFF ``f`` points to a next page past the end of the file
    (a multi-page file cut short reads as one page). From the header and the first IFD."""
    import struct

    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(16)
            order = {b"II": "<", b"MM": ">"}.get(head[:2])
            if order is None or len(head) < 8:
                return False
            big = struct.unpack(order + "H", head[2:4])[0] == 43
            first = struct.unpack(order + ("Q" if big else "I"),
                                  head[8:16] if big else head[4:8])[0]
            fh.seek(first)
            raw = fh.read(8 if big else 2)
            count = struct.unpack(order + ("Q" if big else "H"), raw)[0]
            fh.seek(first + len(raw) + count * (20 if big else 12))
            raw = fh.read(8 if big else 4)
            if len(raw) < (8 if big else 4):
                return False  # (the first page itself is cut short: tifffile judges that)
            nxt = struct.unpack(order + ("Q" if big else "I"), raw)[0]
    except (OSError, struct.error):
        return False
    return bool(nxt) and nxt >= size


def _slice_header(f: Path, *, one_image: str = _IN_FOLDER) -> tuple[tuple[int, int], np.dtype]:
    """(height, width) and dtype of a slice file from its header alone; ``one_image`` says
    why a multi-page file is refused."""
    if f.suffix.lower() == ".png":
        shape, dtype, _ = png_header(f)
        return shape, dtype
    import tifffile

    try:
        with tifffile.TiffFile(f) as tif:
            page = tif.pages.first
            n_pages = len(tif.pages)  # parses IFDs only; cheap for the usual single page
            shape = (int(page.imagelength), int(page.imagewidth))
            dtype = np.dtype(page.dtype)
    except DeepAlignError:
        raise
    except OSError as exc:
        raise _unreadable(exc, f) from exc
    except Exception as exc:
        raise DeepAlignError(f"{f}: not a readable TIFF ({type(exc).__name__}: {exc}).") from exc
    if n_pages == 1 and _next_page_beyond_end(f):
        raise DeepAlignError(f"{f}: truncated TIFF (its second page lies beyond the end of the "
                             "file: a multi-page file cut short?); re-copy or re-export it.")
    if n_pages > 1:
        raise DeepAlignError(
            f"{f}: holds {n_pages} slices (pages), but {one_image}. " + (
                "Open the multi-page file itself as the stack." if one_image == _IN_FOLDER else
                "Pass a single slice (e.g. Fiji: Image > Duplicate; tifffile.imread(path, "
                "key=0))."
            )
        )
    return shape, dtype


def _read_slice_file(f: Path) -> np.ndarray:
    """Decode a single-image PNG or TIFF file (no final checks)."""
    if f.suffix.lower() == ".png":
        import cv2

        if not png_is_complete(f):
            raise DeepAlignError(
                f"{f}: truncated PNG (no IEND chunk at the end); re-copy or re-export it."
            )
        img = cv2.imread(str(f), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise DeepAlignError(f"{f}: cannot decode the PNG; the file is corrupt.")
        if img.ndim == 3 and img.shape[-1] == 3:
            img = img[..., ::-1]  # OpenCV gives BGR
        return img
    import tifffile

    size = f.stat().st_size
    with tifffile.TiffFile(f) as tif:
        return _read_tiff_page(tif.pages.first, size, str(f))


class ZarrStackReader(StackReader):
    """A 3-D Zarr (v2 or v3) array, or an OME-Zarr group (multiscales level 0, or ``key``).

    Leading axes of length 1 (OME-Zarr ``t``/``c``) are dropped; the remaining array must be
    ``(z, y, x)``.
    """

    def __init__(self, path: str | os.PathLike[str], *, key: str | None = None,
                 labels: bool = False) -> None:
        import zarr

        self.path = Path(path)
        try:
            node: Any = zarr.open(store=str(self.path), mode="r")
        except Exception as exc:
            raise DeepAlignError(
                f"{self.path}: cannot open as Zarr ({type(exc).__name__}: {exc})."
            ) from exc
        self._name = ""
        if isinstance(node, zarr.Group):
            if key is None:
                key = _multiscales_level0(node, self.path)
            try:
                node = node[key]
            except KeyError:
                raise DeepAlignError(
                    f"{self.path}: Zarr group has no array {key!r}; members: "
                    f"{sorted(node.keys())}. Pass key= naming the array to read."
                ) from None
            self._name = key
            if not isinstance(node, zarr.Array):
                raise DeepAlignError(f"{self.path}/{key}: is a group, not an array; pass key=.")
        elif key is not None:
            raise DeepAlignError(f"{self.path}: is a Zarr array, not a group; drop key={key!r}.")
        shape = tuple(int(s) for s in node.shape)
        lead = 0
        while len(shape) - lead > 3 and shape[lead] == 1:
            lead += 1
        if len(shape) - lead != 3:
            raise DeepAlignError(
                f"{self.describe_array()}: Zarr array has shape {shape}; a (z, y, x) stack is "
                "needed (leading axes of length 1 are allowed). Select a channel / time point "
                "or a 3-D array with key=."
            )
        self._arr = node
        self._lead = (0,) * lead
        self.shape = shape[lead:]  # type: ignore[assignment]
        self.file_dtype = np.dtype(node.dtype)
        self.dtype = output_dtype(self.file_dtype, self.describe_array(), labels=labels)

    def describe_array(self) -> str:
        return f"{self.path}/{self._name}" if self._name else str(self.path)

    def data_paths(self) -> list[Path]:
        return [self.path / self._name] if self._name else [self.path]

    def describe(self, i: int) -> str:
        return f"{self.describe_array()}, slice {i}"

    def _read(self, i: int) -> np.ndarray:
        return np.asarray(self._arr[(*self._lead, i)])


def _multiscales_level0(group: Any, path: Path) -> str:
    attrs = dict(group.attrs)
    ms = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")  # NGFF 0.4 / 0.5
    if ms:
        try:
            return str(ms[0]["datasets"][0]["path"])
        except (KeyError, IndexError, TypeError):
            raise DeepAlignError(
                f"{path}: OME-Zarr 'multiscales' metadata has no datasets[0].path; pass key=."
            ) from None
    arrays = sorted(name for name, _ in group.arrays())
    if len(arrays) == 1:
        return arrays[0]
    raise DeepAlignError(
        f"{path}: Zarr group without OME 'multiscales' metadata holds arrays {arrays}; pass "
        "key= naming the one to read."
    )


class _SingleImageReader(StackReader):
    """A one-slice stack over a single 2-D PNG/TIFF (only with ``allow_single=True``)."""

    def __init__(self, path: Path, *, labels: bool = False) -> None:
        self.path = path
        if path.suffix.lower() == ".png":
            shape, file_dtype, _ = png_header(path)
        else:
            shape, file_dtype = _slice_header(path)
        self.file_dtype = file_dtype
        self.dtype = output_dtype(file_dtype, str(path), labels=labels)
        self.shape = (1, *shape)

    def describe(self, i: int) -> str:
        return str(self.path)

    def _read(self, i: int) -> np.ndarray:
        return _read_slice_file(self.path)


def _unreadable(exc: OSError, path: Path) -> DeepAlignError:
    """One-line error for an input the system will not read (:func:`os_error`): an
    environment failure (permissions, an I/O error; CLI exit status 1), or bad input when it
    is gone or of the wrong kind (2)."""
    return os_error(exc, path, "cannot read the stack", reading=True)


def _is_zarr_dir(p: Path) -> bool:
    try:
        return any((p / m).is_file() for m in ("zarr.json", ".zarray", ".zgroup"))
    except OSError as exc:  # a folder that cannot be searched: name it, not the probe
        raise _unreadable(exc, p) from exc


def open_stack(
    path: str | os.PathLike[str], *, key: str | None = None, allow_single: bool = False,
    labels: bool = False,
) -> StackReader:
    """Open an image stack for lazy, slice-by-slice reading.

    Parameters
    ----------
    path : str or os.PathLike
        A multi-page TIFF / BigTIFF / ImageJ hyperstack (``.tif``, ``.tiff``, ``.btf``), a folder
        of 2-D ``.tif``/``.tiff``/``.png`` slices (natural order), an MRC/IMOD stack (``.mrc``,
        ``.st``, ``.ali``, ``.rec``; needs ``mrcfile``), or a Zarr v2/v3 array or
        OME-Zarr group (a directory with ``zarr.json``, ``.zarray`` or ``.zgroup``).
    key : str, optional
        Zarr only: the array inside a group. Default: the OME-Zarr multiscales level 0.
    allow_single : bool
        Accept a single 2-D image as a one-slice stack instead of raising.
    labels : bool
        A label stack, only ever warped with nearest interpolation: integer pixel types of
        8-64 bit are read as stored (:func:`output_dtype`), not converted or refused.

    Returns
    -------
    StackReader
        ``shape`` is ``(z, y, x)``; ``read(i)`` returns a 2-D uint8, uint16 or float32 slice.
        Nothing is written to ``path``.

    Raises
    ------
    DeepAlignError
        The path is missing or not a supported stack, slices disagree in shape/dtype, the pixel
        type is unsupported, a single 2-D image was given without ``allow_single``, or one
        slice is larger than :func:`max_slice_pixels` (a slice is read whole).
    """
    try:
        reader = _open_stack(Path(path), key, allow_single, labels)
    except OSError as exc:  # a folder that cannot be listed, a file that cannot be read
        raise _unreadable(exc, Path(exc.filename) if exc.filename else Path(path)) from exc
    try:
        check_slice_size(reader.path, reader.shape[1:], reader.file_dtype)
    except BaseException:
        reader.close()
        raise
    return reader


def _several(reader: StackReader, allow_single: bool) -> StackReader:
    """``reader``, refused (closed) when it holds one slice and ``allow_single`` is not set:
    a store or file of one section, as a single 2-D image is."""
    if len(reader) == 1 and not allow_single:
        reader.close()
        raise _single_error(reader.path)
    return reader


def _open_stack(p: Path, key: str | None, allow_single: bool, labels: bool = False
                ) -> StackReader:
    if not p.exists():
        raise DeepAlignError(f"{p}: no such file or folder.")
    if p.is_dir():
        if _is_zarr_dir(p):
            return _several(ZarrStackReader(p, key=key, labels=labels), allow_single)
        if key is not None:
            raise DeepAlignError(f"{p}: key= applies to Zarr stores only; this is a folder.")
        reader = FolderStackReader(p, labels=labels)
        if len(reader) == 1 and not allow_single:
            raise DeepAlignError(
                f"{p}: folder holds a single slice ({reader.files[0].name}); a stack needs "
                "several: one slice has no neighbour to align to. Add the other slices to the "
                "folder (API: allow_single=True opens a one-slice stack)."
            )
        return reader
    if key is not None:
        raise DeepAlignError(f"{p}: key= applies to Zarr stores only.")
    suffix = p.suffix.lower()
    if suffix in TIFF_SUFFIXES:
        return TiffStackReader(p, allow_single=allow_single, labels=labels)
    if suffix in MRC_SUFFIXES:
        return _several(MrcStackReader(p, allow_single=allow_single, labels=labels),
                        allow_single)
    if suffix == ".png":
        if not allow_single:
            raise _single_error(p)
        return _SingleImageReader(p, labels=labels)
    raise DeepAlignError(
        f"{p}: unsupported stack format {suffix!r}; use a multi-page TIFF, an MRC stack "
        "(.mrc/.st/.ali/.rec), a folder of .tif/.png slices, or a Zarr / OME-Zarr store."
    )


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a single 2-D image (PNG or single-page TIFF), as used by the pair commands.

    Parameters
    ----------
    path : str or os.PathLike
        A ``.png``, ``.tif`` or ``.tiff`` file holding one 2-D greyscale image.

    Returns
    -------
    numpy.ndarray
        ``(y, x)`` C-contiguous uint8, uint16 or float32 array (same conversions as
        :func:`open_stack`).

    Raises
    ------
    DeepAlignError
        Missing, truncated or corrupt file, a multi-page TIFF, colour, an unsupported pixel
        type, or NaN/inf values.
    """
    p = Path(path)
    if not p.is_file():
        raise DeepAlignError(f"{p}: no such image file.")
    if p.suffix.lower() not in SLICE_SUFFIXES:
        raise DeepAlignError(f"{p}: unsupported image format; use .png, .tif or .tiff.")
    shape, file_dtype = _slice_header(p, one_image=_ONE_IMAGE)
    dtype = output_dtype(file_dtype, str(p))
    try:
        raw = _read_slice_file(p)
    except DeepAlignError:
        raise
    except Exception as exc:
        raise DeepAlignError(
            f"{p}: cannot decode the image ({type(exc).__name__}: {exc}); it is probably "
            "truncated or corrupt."
        ) from exc
    return finish_slice(raw, shape=shape, dtype=dtype, where=str(p))
