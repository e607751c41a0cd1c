"""In-memory stacks and the one function the pipeline uses to accept any stack-like input."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import DeepAlignError
from ._common import SUPPORTED_DTYPES, StackReader, finish_slice


class ArrayStackReader(StackReader):
    """A ``(z, y, x)`` numpy array (or memmap) seen through the reader interface."""

    def __init__(self, array: np.ndarray, *, name: str = "<array>") -> None:
        arr = np.asarray(array)
        if arr.ndim != 3:
            raise DeepAlignError(f"{name}: expected a (z, y, x) stack, got an array of shape "
                                 f"{arr.shape}")
        if arr.dtype not in SUPPORTED_DTYPES:
            raise DeepAlignError(f"{name}: dtype {arr.dtype} is not supported; convert to "
                                 "uint8, uint16 or float32 first")
        self._array = arr
        self.path = Path(name)
        self.shape = (int(arr.shape[0]), int(arr.shape[1]), int(arr.shape[2]))
        self.dtype = arr.dtype
        self.file_dtype = arr.dtype
        self._in_memory = True

    def describe(self, i: int) -> str:
        return f"{self.path}, slice {i}"

    def _read(self, i: int) -> np.ndarray:
        return np.ascontiguousarray(self._array[i])

    def read(self, i: int) -> np.ndarray:
        j = self._index(i)
        return finish_slice(self._read(j), shape=self.shape[1:], dtype=self.dtype,
                            where=self.describe(j))


def reader_path(reader: StackReader) -> Path | None:
    """The file behind a reader, or None for in-memory stacks."""
    return None if getattr(reader, "_in_memory", False) else reader.path


@contextlib.contextmanager
def as_reader(stack: Any) -> Iterator[StackReader]:
    """Open ``stack`` (path, ``(z, y, x)`` array, or an open reader) for the duration of a
    ``with`` block. A reader passed in is left open; one opened here is closed."""
    from ._readers import open_stack

    if isinstance(stack, StackReader):
        yield stack
    elif isinstance(stack, (str, os.PathLike)):
        with open_stack(stack) as reader:
            yield reader
    elif isinstance(stack, np.ndarray):
        yield ArrayStackReader(stack)
    else:
        raise TypeError(f"expected a path, a (z, y, x) array or a StackReader, got "
                        f"{type(stack).__name__}")
