"""Physical units of a stack: voxel size and unit from a file's metadata, and unit names.

The voxel size is ``(z, y, x)`` (slice spacing, pixel height, pixel width) in ``unit``. Unit
names differ between formats: ImageJ writes ``micron`` (or ``\u00b5m``), OME-TIFF ``\u00b5m``,
OME-Zarr ``micrometer``; :func:`ome_unit` and :func:`imagej_unit` translate.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .._errors import DeepAlignError
from ._mrc import MRC_SUFFIXES, mrc_voxel_size

__all__ = ["imagej_unit", "ome_unit", "voxel_size_of"]

_TO_SHORT = {"micron": "\u00b5m", "um": "\u00b5m", "micrometer": "\u00b5m", "\u00b5m": "\u00b5m",
             "nanometer": "nm", "nm": "nm", "angstrom": "\u00c5", "millimeter": "mm", "mm": "mm"}
_TO_OME = {"\u00b5m": "micrometer", "nm": "nanometer", "\u00c5": "angstrom", "mm": "millimeter"}
#: The space units of the OME-NGFF axes metadata (the UDUNITS-2 names the spec lists).
NGFF_SPACE_UNITS = (
    "angstrom", "attometer", "centimeter", "decimeter", "exameter", "femtometer", "foot",
    "gigameter", "hectometer", "inch", "kilometer", "megameter", "meter", "micrometer", "mile",
    "millimeter", "nanometer", "parsec", "petameter", "picometer", "terameter", "yard",
    "yoctometer", "yottameter", "zeptometer", "zettameter",
)


def imagej_unit(unit: str) -> str:
    """The unit as ImageJ/Fiji writes it (``micron``, ``nm``, ...)."""
    short = _TO_SHORT.get(unit, unit)
    # ImageJ's description is ASCII: micron, and angstrom spelt out (read back as \u00c5)
    return {"\u00b5m": "micron", "\u00c5": "angstrom"}.get(short, short)


def ome_unit(unit: str) -> str | None:
    """The unit as an OME-NGFF axis unit (``micrometer``, ``nanometer``, ...; the short
    names nm, um, \u00b5m, micron, mm and \u00c5 too), None if NGFF does not know it."""
    known = _TO_OME.get(_TO_SHORT.get(unit, unit))
    return known or (unit if unit in NGFF_SPACE_UNITS else None)


def voxel_size_of(stack: Any) -> tuple[tuple[float, float, float], str] | None:
    """Voxel size ``(z, y, x)`` and unit from the metadata of a stack's file, if recorded.

    Reads ImageJ TIFF metadata (``spacing``, ``unit`` and the X/Y resolution tags), OME-TIFF
    ``PhysicalSize*`` and OME-Zarr ``multiscales`` scales. ``stack`` is a path or a reader
    with a ``path`` attribute (:func:`deepalign_fast.io.open_stack`); anything else, or a
    file without a complete voxel size, gives ``None``.
    """
    path = getattr(stack, "path", stack)
    if not isinstance(path, (str, os.PathLike)):
        return None
    p = Path(path)
    try:
        if p.suffix.lower() in (".tif", ".tiff", ".btf") and p.is_file():
            return _tiff_voxel_size(p)
        if p.is_dir() and ((p / ".zattrs").is_file() or (p / "zarr.json").is_file()):
            return _zarr_voxel_size(p)
        if p.suffix.lower() in MRC_SUFFIXES and p.is_file():
            return mrc_voxel_size(p)
    except (OSError, ValueError, KeyError, TypeError, IndexError, ZeroDivisionError,
            StopIteration, AttributeError, DeepAlignError):
        return None
    return None


def _tiff_voxel_size(p: Path) -> tuple[tuple[float, float, float], str] | None:
    import re

    import tifffile

    with tifffile.TiffFile(p) as tif:
        if tif.is_ome and tif.ome_metadata:
            xml = tif.ome_metadata
            got = [re.search(rf'PhysicalSize{k}="([0-9.eE+-]+)"', xml) for k in "ZYX"]
            ome_unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', xml)
            if got[0] and got[1] and got[2]:
                size = (float(got[0].group(1)), float(got[1].group(1)), float(got[2].group(1)))
                return size, ome_unit.group(1) if ome_unit else "\u00b5m"
        for shaped in tif.shaped_metadata or ():  # this package's non-ImageJ TIFF output
            kept, named = shaped.get("voxel_size"), shaped.get("unit")
            if isinstance(kept, list) and len(kept) == 3 and isinstance(named, str):
                return (float(kept[0]), float(kept[1]), float(kept[2])), \
                    _TO_SHORT.get(named, named)
        ij = tif.imagej_metadata or {}
        page: Any = tif.pages[0]
        tags = page.tags
        spacing = ij.get("spacing")
        if spacing is None or "XResolution" not in tags or "YResolution" not in tags:
            return None
        xr, yr = tags["XResolution"].value, tags["YResolution"].value
        px_x, px_y = xr[1] / xr[0], yr[1] / yr[0]  # resolution is pixels per unit
        unit = str(ij.get("unit", "")) or "unit"
        unit = _TO_SHORT.get(unit, unit)
        return (float(spacing), float(px_y), float(px_x)), unit


def _zarr_voxel_size(p: Path) -> tuple[tuple[float, float, float], str] | None:
    import json

    attrs_file = p / ".zattrs" if (p / ".zattrs").is_file() else p / "zarr.json"
    attrs: Any = json.loads(attrs_file.read_text(encoding="utf-8"))
    attrs = attrs.get("attributes", attrs)
    attrs = attrs.get("ome", attrs)
    ms = attrs["multiscales"][0]
    scale = next(t["scale"] for t in ms["datasets"][0]["coordinateTransformations"]
                 if t.get("type") == "scale")
    if len(scale) < 3:
        return None
    axes = ms.get("axes") or [{}]
    unit = str(axes[-1].get("unit", "unit")) if isinstance(axes[-1], dict) else "unit"
    unit = _TO_SHORT.get(unit, unit)
    z, y, x = (float(v) for v in scale[-3:])
    if (z, y, x) == (1.0, 1.0, 1.0) and unit == "unit":  # the writer's default: unknown
        return None
    return (z, y, x), unit


