"""MRC / IMOD stacks (``.mrc``, ``.st``, ``.ali``, ``.rec``), the SerialEM/IMOD standard.

Read through ``mrcfile`` (an optional dependency: ``pip install mrcfile``), memory-mapped and
permissive, one section at a time; the voxel size (``voxel_size`` in the header, in angstrom)
is carried as nanometres.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import DeepAlignError
from ._common import StackReader, output_dtype

__all__ = ["MRC_SUFFIXES", "MrcStackReader", "mrc_voxel_size"]

MRC_SUFFIXES = (".mrc", ".st", ".ali", ".rec", ".mrcs")


def _short_of(mrc: Any, path: Path) -> str | None:
    """What the header promises against what the file holds, if the header can say."""
    try:
        import mrcfile.utils

        h = mrc.header
        dtype = mrcfile.utils.data_dtype_from_header(h)
        want = 1024 + int(h.nsymbt) + int(h.nx) * int(h.ny) * int(h.nz) * dtype.itemsize
        have = path.stat().st_size
    except Exception:  # an unknown mode, a header beyond repair: the warning says it
        return None
    if have >= want:
        return None
    return (f"the header promises {int(h.nz)} sections of {int(h.ny)} x {int(h.nx)} "
            f"{dtype.name} ({want} bytes with the header), the file holds {have}")


def _open(path: Path) -> Any:
    try:
        import mrcfile
    except ImportError as exc:
        raise DeepAlignError(f"{path}: reading MRC files needs the mrcfile package: "
                             "pip install mrcfile") from exc
    try:
        # permissive: what is wrong is warned, and the data left out (None): the warning is
        # the message (a truncated file, a size the file cannot hold, an unknown mode)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mrc = mrcfile.mmap(str(path), mode="r", permissive=True)
        if mrc.data is None and caught:
            why = _short_of(mrc, path) or str(caught[-1].message)
            mrc.close()
            raise DeepAlignError(f"{path}: not a readable MRC file ({why}); it is probably "
                                 "truncated or corrupt.")
        return mrc
    except DeepAlignError:
        raise
    except Exception as exc:  # mrcfile raises ValueError/OSError/... for bad headers
        if isinstance(exc, OSError) and exc.errno is not None:  # the system's: open_stack
            raise  # names it (permissions, I/O)
        raise DeepAlignError(f"{path}: not a readable MRC file ({type(exc).__name__}: "
                             f"{exc}).") from exc


class MrcStackReader(StackReader):
    """An MRC stack, memory-mapped read-only; ``(z, y, x)`` as stored (sections along z)."""

    def __init__(self, path: str | Path, *, allow_single: bool = False,
                 labels: bool = False) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._mrc = _open(self.path)
        try:
            data = self._mrc.data
            if data is None:
                raise DeepAlignError(f"{self.path}: the MRC file holds no data.")
            if data.ndim == 2:
                if not allow_single:
                    raise DeepAlignError(f"{self.path}: holds a single 2-D image; a stack "
                                         "needs several sections.")
                data = data[None]
            if data.ndim != 3:
                raise DeepAlignError(f"{self.path}: expected a (z, y, x) stack, got shape "
                                     f"{data.shape}")
            self._data = data
            self.shape = (int(data.shape[0]), int(data.shape[1]), int(data.shape[2]))
            self.file_dtype = np.dtype(data.dtype)
            self.dtype = output_dtype(self.file_dtype, str(self.path), labels=labels)
        except BaseException:
            self._mrc.close()
            raise

    def describe(self, i: int) -> str:
        return f"{self.path}, section {i}"

    def _read(self, i: int) -> np.ndarray:
        with self._lock:
            return np.array(self._data[i])

    def close(self) -> None:
        mrc, self._mrc = getattr(self, "_mrc", None), None
        if mrc is not None:
            mrc.close()


def mrc_voxel_size(path: Path) -> tuple[tuple[float, float, float], str] | None:
    """``(z, y, x)`` voxel size in nm from an MRC header, None when it is not recorded."""
    mrc = _open(path)
    try:
        vs = mrc.voxel_size
        size = (float(vs.z), float(vs.y), float(vs.x))
    finally:
        mrc.close()
    if not all(np.isfinite(size)) or min(size) <= 0 or size == (1.0, 1.0, 1.0):
        return None  # 0 or the 1 A default: not recorded
    return (size[0] / 10.0, size[1] / 10.0, size[2] / 10.0), "nm"
