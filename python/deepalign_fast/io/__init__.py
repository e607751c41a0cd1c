"""Stack input and output: lazy readers and streaming, atomic writers.

Readers (:func:`open_stack`) take

- a multi-page TIFF, BigTIFF or ImageJ hyperstack: uncompressed contiguous data is
  memory-mapped read-only, anything else is decoded one page at a time (a file written page
  by page, which tifffile splits into one series per page, is one slice per page);
- an MRC/IMOD stack (``.mrc``, ``.st``, ``.ali``, ``.rec``), memory-mapped, with its voxel
  size (needs the optional ``mrcfile`` package);
- a folder of 2-D ``.tif``/``.tiff``/``.png`` slices, in natural order (``2.png`` before
  ``10.png``); every file's header is checked at open, without decoding pixels;
- a Zarr v2/v3 array or an OME-Zarr group (multiscales level 0, or ``key=``).

Every reader has ``shape`` ``(z, y, x)``, ``dtype``, ``len``, ``read(i)`` (a 2-D C-contiguous
slice), iteration, ``describe(i)`` for messages, ``close()`` and context-manager use. Input files
are only ever opened read-only.

Slices above ``max_slice_pixels()`` (2**31 pixels by default, ``DEEPALIGN_MAX_SLICE_PIXELS``)
are refused at open, before any pixel is read, since each slice is processed whole.

Pixel types: uint8, uint16 and float32 are read as stored. bool (1-bit) becomes uint8 0/255;
int8, int16, float16 and float64 become float32. Other types are refused with a suggested
conversion. Greyscale saved as RGB (three equal channels) is read as grey; real colour or an
alpha channel is refused. ``read(i)`` raises :class:`~deepalign_fast.DeepAlignError` naming the
file and slice for truncated or corrupt data and for NaN/inf in float data.

Writers (:func:`open_writer`) produce a TIFF (ImageJ hyperstack when uncompressed and < 3.9 GiB,
BigTIFF beyond) or an OME-Zarr (NGFF 0.4) store, slice by slice. The output appears at its final
name only when complete: TIFFs are written to a hidden temporary file and renamed; Zarr stores to
``<name>.partial``, which records finished slices and can be resumed after a crash. Both carry
the voxel size and unit given to them (:func:`voxel_size_of` reads them from an input).
"""

from __future__ import annotations

from ._array import ArrayStackReader, as_reader, reader_path
from ._common import (
    MAX_SLICE_PIXELS,
    SUPPORTED_DTYPES,
    StackReader,
    check_slice_size,
    finish_slice,
    max_slice_pixels,
    output_dtype,
)
from ._labels import (
    image_shape,
    label_group_files,
    label_target,
    list_label,
    mark_label,
    prepare_label_group,
)
from ._mrc import MrcStackReader
from ._readers import (
    OTHER_IMAGE_SUFFIXES,
    SLICE_SUFFIXES,
    FolderStackReader,
    TiffStackReader,
    ZarrStackReader,
    open_stack,
    read_image,
)
from ._units import imagej_unit, ome_unit, voxel_size_of
from ._writers import (
    StackWriter,
    TiffStackWriter,
    ZarrStackWriter,
    check_distinct,
    check_unfinished,
    finish_store,
    halve,
    is_zarr_output,
    level_dataset,
    open_writer,
    pyramid_shapes,
    unfinished_run,
)

__all__ = [
    "MAX_SLICE_PIXELS",
    "OTHER_IMAGE_SUFFIXES",
    "SLICE_SUFFIXES",
    "SUPPORTED_DTYPES",
    "check_slice_size",
    "check_unfinished",
    "finish_slice",
    "finish_store",
    "halve",
    "level_dataset",
    "pyramid_shapes",
    "max_slice_pixels",
    "output_dtype",
    "unfinished_run",
    "ArrayStackReader",
    "as_reader",
    "reader_path",
    "FolderStackReader",
    "MrcStackReader",
    "image_shape",
    "label_group_files",
    "label_target",
    "list_label",
    "mark_label",
    "prepare_label_group",
    "StackReader",
    "StackWriter",
    "TiffStackReader",
    "TiffStackWriter",
    "ZarrStackReader",
    "ZarrStackWriter",
    "check_distinct",
    "open_stack",
    "open_writer",
    "is_zarr_output",
    "read_image",
    "imagej_unit",
    "ome_unit",
    "voxel_size_of",
]


def __dir__() -> list[str]:
    return __all__
