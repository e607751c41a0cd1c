"""One-call, in-memory alignment: the pystackreg-style entry points.

========================================  ==============================================
pystackreg                                deepalign-fast
========================================  ==============================================
``sr.register_stack(stack)``              ``estimate_transforms(stack)`` -> ``(n, 2, 3)``
``sr.register_transform_stack(stack)``    ``align(stack)`` -> ``(aligned, transforms)``
``sr.transform_stack(other)``             ``apply_transforms(tf, "other.tif", "out.tif")``
                                          or ``warp_affine(other[z], transforms.affines[z])``
========================================  ==============================================

Inputs are numpy arrays, or lazy array-likes (dask, zarr): those are read one slice at a
time, and a dask input gives back a lazy dask array that renders each slice when computed.
The transforms follow the package convention (output -> input pull maps, see
:mod:`deepalign_fast`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .alignment import Aligner
from .io import as_reader, finish_slice, output_dtype
from .render import render_slice
from .transforms import TransformSet

__all__ = ["align", "estimate_transforms"]


def estimate_transforms(stack: Any, **options: Any) -> np.ndarray:
    """Per-slice transforms of a ``(z, y, x)`` stack, as ``(n, 2, 3)`` pull maps.

    ``options`` are :class:`~deepalign_fast.AlignOptions` fields. Flagged slices get
    transforms interpolated from their neighbours (see ``align`` for the list).
    """
    return Aligner(**options).estimate(stack, progress=False).transforms.affines


def align(stack: Any, **options: Any) -> tuple[Any, TransformSet]:
    """Align a ``(z, y, x)`` stack in memory; returns ``(aligned, transforms)``.

    ``stack`` is an array (int8, int16, float16 and float64 are aligned as float32, as when
    read from a file), a lazy array-like, or a file or folder path (read into memory).

    ``aligned`` is a numpy array, or a lazy dask array when ``stack`` is one (each slice is
    warped when computed); ``transforms.flagged`` lists the slices that could not be aligned.
    Only ``mode="affine"`` renders in memory: elastic and expected-affine refinement write
    their fields beside a file, so use :meth:`Aligner.align_stack` with an output path.
    """
    aligner = Aligner(**options)
    if aligner.options.mode != "affine":
        raise ValueError(f"mode={aligner.options.mode!r} renders through files: use "
                         "Aligner(...).align_stack(stack, output_path)")
    threads = aligner.options.num_threads

    if hasattr(stack, "map_blocks") and hasattr(stack, "rechunk"):  # dask: stay lazy
        import dask.array as da

        ts = aligner.estimate(stack, progress=False).transforms
        h, w = ts.output_shape
        dtype = output_dtype(stack.dtype, "<array>")  # as the reader converts slices

        def render(block: np.ndarray, block_info: dict[Any, Any] | None = None) -> np.ndarray:
            z = block_info[0]["array-location"][0][0] if block_info else 0
            image = finish_slice(block[0], shape=block.shape[1:], dtype=dtype,
                                 where=f"<array>, slice {z}")
            return render_slice(image, ts.slice_map(z), (h, w), num_threads=threads)[None]

        src = stack.rechunk((1, -1, -1))
        out = da.map_blocks(render, src, chunks=((1,) * len(ts), (h,), (w,)),  # type: ignore[no-untyped-call]
                            dtype=dtype)
        return out, ts
    # arrays, array-likes, paths and open readers alike: read (and converted) slice by slice
    with as_reader(stack) as reader:
        ts = aligner.estimate(reader, progress=False).transforms
        h, w = ts.output_shape
        aligned = np.empty((len(ts), h, w), reader.dtype)
        for z in range(len(ts)):
            aligned[z] = render_slice(reader.read(z), ts.slice_map(z), (h, w),
                                      num_threads=threads)
    return aligned, ts
