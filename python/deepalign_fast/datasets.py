"""Locate and load the real EM stacks used by the tests, benchmarks and demo.

The stacks are not part of the package. They are found, in order, in the directory named by
the ``DEEPALIGN_DATA`` environment variable, or in a ``shared/data`` directory next to (or
above) the source checkout. Every loader raises :class:`DataUnavailable` when its files are
absent, so tests can skip cleanly.

Bundled with the package is one small sample (see ``sample_stack``) used by the demo.
"""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path

import numpy as np

__all__ = [
    "DataUnavailable",
    "data_dir",
    "load_damaged_pair",
    "load_drosophila",
    "load_isbi2012",
    "load_lucchi",
    "sample_stack_path",
]


class DataUnavailable(FileNotFoundError):
    """The shared EM data (or one of its stacks) is not present on this machine."""


def data_dir() -> Path:
    """Directory holding the shared EM stacks (``DEEPALIGN_DATA`` or ``../shared/data``)."""
    env = os.environ.get("DEEPALIGN_DATA")
    if env:
        path = Path(env)
        if not path.is_dir():
            raise DataUnavailable(f"DEEPALIGN_DATA={env!r} is not a directory")
        return path
    here = Path(__file__).resolve()
    for parent in here.parents:
        for candidate in (parent / "shared" / "data", parent.parent / "shared" / "data"):
            if candidate.is_dir():
                return candidate
    raise DataUnavailable(
        "shared EM data not found: set DEEPALIGN_DATA to the directory holding "
        "lucchi_epfl_fibsem/, isbi2012_sstem/, ... "
    )


def _require(path: Path) -> Path:
    if not path.exists():
        raise DataUnavailable(f"missing data file or folder: {path}")
    return path


def _natural_key(path: Path) -> list[object]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def _read_gray(path: Path) -> np.ndarray:
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise DataUnavailable(f"cannot read image {path}")
    return np.ascontiguousarray(img)


def _read_folder(folder: Path, pattern: str) -> np.ndarray:
    files = sorted(_require(folder).glob(pattern), key=_natural_key)
    if not files:
        raise DataUnavailable(f"no {pattern} files in {folder}")
    return np.stack([_read_gray(f) for f in files])


def load_lucchi(*, labels: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """EPFL/Lucchi FIB-SEM: (165, 384, 512) uint8, already aligned; optional mito mask {0,1}."""
    import tifffile

    root = data_dir() / "lucchi_epfl_fibsem"
    image = tifffile.imread(_require(root / "image.tif"))
    if not labels:
        return image
    return image, tifffile.imread(_require(root / "mito_mask_from_polygons.tif"))


def load_isbi2012(*, labels: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """ISBI 2012 ssTEM: (30, 512, 512) uint8, aligned; labels 255 = cell interior, 0 = membrane."""
    root = data_dir() / "isbi2012_sstem" / "train"
    image = _read_folder(root / "image", "*.png")
    if not labels:
        return image
    return image, _read_folder(root / "label", "*.png")


def load_drosophila(*, labels: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Drosophila VNC ssTEM stack 1: (20, 1024, 1024) uint8, aligned; merged label map."""
    root = data_dir() / "drosophila_vnc_sstem" / "stack1"
    image = _read_folder(root / "raw", "*.tif")
    if not labels:
        return image
    return image, _read_folder(root / "labels", "*.png")


def load_damaged_pair(name: str = "DOLW7") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A damaged-section pair: (reference, damaged moving section, damage mask 0/255)."""
    root = data_dir() / "damaged_sections_ssem"
    return tuple(_read_gray(_require(root / f"{name}_{k}.png")) for k in ("0", "1", "m"))  # type: ignore[return-value]


def sample_stack_path() -> Path:
    """Path of the small real FIB-SEM stack bundled with the package (used by the demo)."""
    ref = resources.files("deepalign_fast") / "data" / "shale_sample.tif"
    return Path(str(ref))
