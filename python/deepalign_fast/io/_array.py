"""In-memory stacks and the one function the pipeline uses to accept any stack-like input."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import DeepAlignError
from ._common import StackReader, finish_slice, output_dtype


class ArrayStackReader(StackReader):
    """A ``(z, y, x)`` array seen through the reader interface.

    numpy arrays and memmaps are used as they are. Other array-likes with ``shape``,
    ``dtype`` and slice indexing (dask, zarr, h5py arrays) stay lazy: one slice is
    materialised per :meth:`read` (``.compute()`` for dask).
    """

    def __init__(self, array: Any, *, name: str = "<array>", labels: bool = False) -> None:
        arr = array if _is_lazy(array) else np.asarray(array)
        if arr.ndim != 3:
            raise DeepAlignError(f"{name}: expected a (z, y, x) stack, got an array of shape "
                                 f"{arr.shape}")
        self._array = arr
        self.path = Path(name)
        self.shape = (int(arr.shape[0]), int(arr.shape[1]), int(arr.shape[2]))
        # converted as a file of that type is (int8/int16/float16/float64 -> float32, ...)
        self.dtype = output_dtype(arr.dtype, name, labels=labels)
        self.file_dtype = arr.dtype
        self._in_memory = True

    def describe(self, i: int) -> str:
        return f"{self.path}, slice {i}"

    def _read(self, i: int) -> np.ndarray:
        item = self._array[i]
        if hasattr(item, "compute"):  # dask
            item = item.compute()
        return np.ascontiguousarray(item)

    def read(self, i: int) -> np.ndarray:
        j = self._index(i)
        return finish_slice(self._read(j), shape=self.shape[1:], dtype=self.dtype,
                            where=self.describe(j))


def _is_lazy(array: Any) -> bool:
    """An array-like that is not numpy but has a shape, a dtype and indexing (dask, zarr)."""
    return (not isinstance(array, np.ndarray) and hasattr(array, "shape")
            and hasattr(array, "dtype") and hasattr(array, "__getitem__"))


def reader_path(reader: StackReader) -> Path | None:
    """The file behind a reader, or None for in-memory stacks."""
    return None if getattr(reader, "_in_memory", False) else reader.path


@contextlib.contextmanager
def as_reader(stack: Any, *, labels: bool = False) -> Iterator[StackReader]:
    """Open ``stack`` (path, ``(z, y, x)`` array, or an open reader) for the duration of a
    ``with`` block. A reader passed in is left open; one opened here is closed. ``labels``:
    see :func:`~deepalign_fast.io.open_stack`."""
    from ._readers import open_stack

    if isinstance(stack, StackReader):
        yield stack
    elif isinstance(stack, (str, os.PathLike)):
        with open_stack(stack, labels=labels) as reader:
            yield reader
    elif isinstance(stack, np.ndarray) or _is_lazy(stack):
        yield ArrayStackReader(stack, labels=labels)
    else:
        raise TypeError(f"expected a path, a (z, y, x) array (numpy, dask, zarr) or a "
                        f"StackReader, got {type(stack).__name__}")
