"""Shared pieces of the stack readers: the reader interface, dtype policy and slice checks."""

from __future__ import annotations

import abc
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import numpy as np

from .._errors import DeepAlignError

#: dtypes the aligner works in; ``read`` returns one of these.
SUPPORTED_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))

# File dtypes read with an exact, cheap conversion (see ``output_dtype``).
_CONVERTED = {
    np.dtype(np.bool_): np.dtype(np.uint8),  # 1-bit masks -> 0/255, as OpenCV reads 1-bit PNG
    np.dtype(np.int8): np.dtype(np.float32),
    np.dtype(np.int16): np.dtype(np.float32),
    np.dtype(np.float16): np.dtype(np.float32),
    np.dtype(np.float64): np.dtype(np.float32),
}


#: Default largest slice (pixels) a reader accepts: 2**31, e.g. 46340 x 46340. Each slice is
#: read, warped and written whole, so memory is a few slices; larger declared slices (a
#: corrupt header, or a mosaic that is not one section) are refused before anything is read.
#: Raise it with the environment variable ``DEEPALIGN_MAX_SLICE_PIXELS``.
MAX_SLICE_PIXELS = 2**31


def max_slice_pixels() -> int:
    """The slice-size limit in pixels (``DEEPALIGN_MAX_SLICE_PIXELS``, else the default)."""
    value = os.environ.get("DEEPALIGN_MAX_SLICE_PIXELS", "")
    try:
        return max(1, int(value)) if value else MAX_SLICE_PIXELS
    except ValueError:
        return MAX_SLICE_PIXELS


def check_slice_size(where: object, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Refuse a ``(y, x)`` slice above :func:`max_slice_pixels` with a message, before reading."""
    ny, nx = int(shape[0]), int(shape[1])
    limit = max_slice_pixels()
    if ny * nx > limit:
        gib = ny * nx * max(4, np.dtype(dtype).itemsize) / 2**30
        raise DeepAlignError(
            f"{where}: slices of {ny} x {nx} pixels are above the limit of {limit} pixels per "
            f"slice (each slice is processed whole: about {gib:.0f} GiB per copy). Crop or bin "
            "the stack, or raise DEEPALIGN_MAX_SLICE_PIXELS if the machine has the memory."
        )


def natural_key(name: str) -> list[tuple[int, int | str]]:
    """Sort key that orders embedded numbers by value: ``2.png`` before ``10.png``."""
    # (0, number) / (1, text) pairs keep comparisons between int and str well defined.
    return [(0, int(t)) if t.isdigit() else (1, t.lower()) for t in re.split(r"(\d+)", name) if t]


def output_dtype(file_dtype: np.dtype, where: str, *, labels: bool = False) -> np.dtype:
    """The dtype ``read`` returns for data stored as ``file_dtype``.

    uint8, uint16 and float32 are returned as stored. bool (1-bit) becomes uint8 0/255;
    int8, int16, float16 and float64 become float32 (exact for the integers and float16; float64
    is rounded, and values beyond float32's range are an error saying so). Anything else is
    refused with a suggested conversion. ``labels`` (a stack only warped with nearest
    interpolation, never aligned: `apply` to label stacks): every integer type is returned as
    stored (8-64 bit, signed or not), so label IDs stay exact.
    """
    dt = np.dtype(file_dtype).newbyteorder("=")
    if dt in SUPPORTED_DTYPES:
        return dt
    if labels and dt.kind in "iu":
        return np.dtype(dt.str)  # the canonical type (tifffile may give C's ulonglong)
    if dt in _CONVERTED:
        return _CONVERTED[dt]  # type: ignore[return-value]
    raise DeepAlignError(
        f"{where}: pixel type {dt} is not supported (deepalign-fast reads uint8, uint16 and "
        "float32, and converts bool, int8, int16, float16 and float64; label stacks of any "
        "integer type are taken by `apply` with nearest interpolation and by the benchmark "
        "tools' --labels). Convert the data first, e.g. "
        "to uint16 if the values fit or to float32 (numpy: a.astype(np.float32); Fiji: "
        "Image > Type > 32-bit); never labels to float32, which cannot hold IDs above 2**24."
    )


def to_grey(arr: np.ndarray, where: str) -> np.ndarray:
    """Return a 2-D slice from a decoded one, accepting RGB only when the channels are equal.

    Grey images saved as RGB (three identical channels, as many viewers export them) are read as
    their first channel. Real colour, or an alpha channel, is an error: alignment works on one
    intensity channel and choosing a conversion silently would change the data.
    """
    if arr.ndim == 2:
        return arr
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        if arr.shape[-1] == 4:
            raise DeepAlignError(
                f"{where}: image has 4 channels (colour + alpha); save it as a single-channel "
                "greyscale image (Fiji: Image > Type > 8-bit)."
            )
        c0 = arr[..., 0]
        if np.array_equal(c0, arr[..., 1]) and np.array_equal(c0, arr[..., 2]):
            return c0
        raise DeepAlignError(
            f"{where}: image is in colour (RGB with differing channels); convert it to "
            "single-channel greyscale first (Fiji: Image > Type > 8-bit)."
        )
    raise DeepAlignError(
        f"{where}: expected a 2-D greyscale image, got an array of shape {arr.shape}"
    )


def finish_slice(
    arr: np.ndarray, *, shape: tuple[int, int], dtype: np.dtype, where: str
) -> np.ndarray:
    """Convert a decoded slice to ``dtype``, C-contiguous and native-endian, and check it.

    Checks the 2-D shape against the stack's and, for float data, that every value is finite.
    """
    arr = to_grey(np.asarray(arr), where)
    if arr.shape != shape:
        raise DeepAlignError(
            f"{where}: slice has shape {arr.shape} (y, x), but the stack's slices are {shape}; "
            "the file may be corrupt or replaced after the stack was opened."
        )
    if arr.dtype == np.bool_:
        arr = arr.view(np.uint8) * np.uint8(255)
    source = arr
    if arr.dtype != dtype:
        with np.errstate(over="ignore", invalid="ignore"):  # overflow -> inf, reported below
            arr = arr.astype(dtype)
    arr = np.ascontiguousarray(arr)
    if arr.dtype.char != np.dtype(dtype).char:  # equal, but another C name (ulonglong)
        arr = arr.view(dtype)
    if arr.dtype.kind == "f":
        finite = np.isfinite(arr)
        if not finite.all():
            bad = arr.size - int(np.count_nonzero(finite))
            over = ~finite & np.isfinite(source) if source.dtype != arr.dtype else None
            if over is not None and over.any():  # float64 beyond float32: not NaN or inf
                top = float(np.abs(source[over]).max())
                raise DeepAlignError(
                    f"{where}: slice holds {int(np.count_nonzero(over))} value(s) beyond the "
                    f"float32 range (up to {top:.3g}; float32 ends at "
                    f"{float(np.finfo(np.float32).max):.3g}), which the aligner works in; "
                    "rescale the data first (e.g. to 0-1, or to uint16)."
                )
            raise DeepAlignError(
                f"{where}: slice holds {bad} NaN or infinite value(s); replace them (e.g. "
                "np.nan_to_num) or mask the slice out before aligning."
            )
    return arr


class StackReader(abc.ABC):
    """A lazy, read-only stack of 2-D slices indexed ``(z, y, x)``.

    Opening a reader checks the stack's layout and reads only headers; ``read(i)`` decodes one
    slice. Readers are context managers and should be closed. Reading different slices from
    several threads is safe.

    Attributes
    ----------
    path : pathlib.Path
        The file, folder or store the stack was opened from.
    shape : tuple of int
        ``(z, y, x)``.
    dtype : numpy.dtype
        uint8, uint16 or float32: the dtype ``read`` returns.
    file_dtype : numpy.dtype
        The dtype stored in the file (differs from ``dtype`` only for converted types).
    """

    path: Path
    shape: tuple[int, int, int]
    dtype: np.dtype
    file_dtype: np.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def _index(self, i: int) -> int:
        n = self.shape[0]
        j = int(i)
        if j < 0:
            j += n
        if not 0 <= j < n:
            raise IndexError(f"{self.path.name}: slice index {i} out of range for {n} slices")
        return j

    def read(self, i: int) -> np.ndarray:
        """Read slice ``i`` (negative counts from the end).

        Returns
        -------
        numpy.ndarray
            ``(y, x)`` C-contiguous array of ``self.dtype``.

        Raises
        ------
        IndexError
            ``i`` is out of range.
        DeepAlignError
            The slice is truncated, corrupt, in colour, or (float data) holds NaN/inf; the
            message names the file and the slice.
        """
        j = self._index(i)
        where = self.describe(j)
        try:
            raw = self._read(j)
        except DeepAlignError:
            raise
        except Exception as exc:  # decoder errors come in many types; report them uniformly
            raise DeepAlignError(
                f"{where}: cannot decode the slice ({type(exc).__name__}: {exc}); the file is "
                "probably truncated or corrupt. Re-copy or re-export it."
            ) from exc
        yx = (self.shape[1], self.shape[2])
        return finish_slice(raw, shape=yx, dtype=self.dtype, where=where)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.read(i)

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self.read(i)

    @abc.abstractmethod
    def _read(self, i: int) -> np.ndarray:
        """Decode slice ``i`` (already range-checked) in whatever form the file holds it."""

    @abc.abstractmethod
    def describe(self, i: int) -> str:
        """Where slice ``i`` lives, for messages: ``"stack.tif, slice 17"``, ``"slices/17.png"``."""

    def data_paths(self) -> list[Path]:
        """The files and folders whose content the slices are read from (for the check that
        an input did not change during a run): the file itself; a folder's slice files; a
        Zarr group's array."""
        return [self.path]

    def close(self) -> None:  # noqa: B027 - readers without open files need no override
        """Release open files. Idempotent."""

    def __enter__(self) -> StackReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, shape={self.shape}, dtype={self.dtype})"


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def png_header(path: Path) -> tuple[tuple[int, int], np.dtype, int]:
    """Read ``((height, width), dtype, colour_type)`` from a PNG's IHDR chunk, decoding nothing."""
    with open(path, "rb") as fh:
        head = fh.read(33)
    if len(head) < 33 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise DeepAlignError(f"{path}: not a PNG file (bad signature or IHDR); is it corrupt?")
    width, height, depth, colour = struct.unpack(">IIBB", head[16:26])
    if colour in (4, 6):
        raise DeepAlignError(
            f"{path}: PNG has an alpha channel (colour type {colour}); save it as greyscale."
        )
    if colour not in (0, 2, 3) or depth not in (1, 2, 4, 8, 16):
        raise DeepAlignError(
            f"{path}: invalid PNG header (bit depth {depth}, colour type {colour})."
        )
    return (height, width), np.dtype(np.uint16 if depth == 16 else np.uint8), colour


def png_is_complete(path: Path) -> bool:
    """True when the file ends with an IEND chunk (a cheap truncation check)."""
    with open(path, "rb") as fh:
        fh.seek(0, 2)
        size = fh.tell()
        if size < len(_PNG_IEND):
            return False
        fh.seek(size - len(_PNG_IEND))
        return fh.read() == _PNG_IEND
