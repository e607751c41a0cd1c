"""Apply the transforms of an earlier alignment to another stack: labels (nearest, their
integer type kept), other channels, or a full-resolution copy of a binned stack. The job of
``deepalign-fast apply``, with the same checks, run record and atomic output as
:meth:`Aligner.align_stack <deepalign_fast.alignment.Aligner.align_stack>`."""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any, Literal

from .._errors import DeepAlignError
from ..transforms import MAX_CANVAS_GROWTH, TransformSet
from .aligner import Aligner

__all__ = ["apply_transforms"]


def apply_transforms(transforms: str | os.PathLike[str], stack: str | os.PathLike[str],
                     output: str | os.PathLike[str], *, scale: float = 1.0,
                     interpolation: Literal["nearest", "linear"] = "nearest",
                     overwrite: bool = False, compression: str | None = None,
                     num_threads: int = 0, progress: bool | None = None) -> TransformSet:
    """Warp ``stack`` (a file or folder of as many slices as the transforms are for) with the
    transforms file ``transforms`` into ``output`` (TIFF or OME-Zarr by suffix; an NGFF label
    image ``IMAGE.ome.zarr/labels/NAME`` must cover its image voxel for voxel, and is listed
    in the image's ``labels`` group).

    ``interpolation="nearest"`` (the default, for labels) keeps integer types of 8 to 64 bit
    exactly; ``"linear"`` is for images. ``scale``: ``stack`` has pixels this many times
    finer than the aligned stack (apply the transforms of a binned stack to the full
    resolution). ``compression`` ("zlib", "zstd", "none") applies to TIFF output.

    Every path is checked before any work, as ``align_stack`` does: ``output`` must not be an
    input or lie inside one, nor exist unless ``overwrite``. The output is written under a
    temporary name and renamed in place when complete; a run killed or failed after that is
    finished by the same call (the run record beside the output), and an input changed
    during the run is refused before anything is put in place.

    Returns the transforms as applied (rescaled by ``scale``), whose ``flagged`` slices the
    alignment could not place.
    """
    from ..io import (
        finish_store,
        image_shape,
        label_group_files,
        label_target,
        list_label,
        mark_label,
        open_stack,
        prepare_label_group,
        voxel_size_of,
    )
    from ..outputs import (
        Checkpoint,
        OutputPlan,
        output_lock,
        partial_path_for,
        remove_stale_temps,
    )

    if not (math.isfinite(scale) and 1 / MAX_CANVAS_GROWTH <= scale <= MAX_CANVAS_GROWTH):
        raise DeepAlignError(f"scale must lie between 1/{MAX_CANVAS_GROWTH} and "
                             f"{MAX_CANVAS_GROWTH}, got {scale:g}")
    if interpolation not in ("nearest", "linear"):
        raise DeepAlignError(f"interpolation must be 'nearest' or 'linear', got "
                             f"{interpolation!r}")
    transforms, stack, output = Path(transforms), Path(stack), Path(output)
    target = label_target(output)  # an NGFF label image: IMAGE.ome.zarr/labels/NAME
    is_zarr = output.suffix.lower() == ".zarr" or target is not None
    if compression is not None and is_zarr:
        raise DeepAlignError("compression applies to TIFF output; OME-Zarr chunks are always "
                             "compressed")
    # (an output a killed run of this call put in place is accepted: the run is finished)
    plan = OutputPlan(overwrite=overwrite, overwrite_flag="--overwrite (API: overwrite=True)",
                      resumes=output)
    plan.input(transforms, "transforms").input(stack, "stack")
    plan.output(output, "output", folder=is_zarr, store=is_zarr)
    if is_zarr:
        plan.output(partial_path_for(output), "unfinished output", folder=True,
                    may_exist=True, store=True)
    plan.check()
    ts = TransformSet.load(transforms)
    if ts.fields is not None:
        plan.input(ts.fields.path, "fields")
        plan.check()
    with open_stack(stack, labels=interpolation == "nearest", allow_single=True) as reader:
        full, data = reader.shape, reader.data_paths()  # (headers only)
    if full[0] != len(ts):  # (a single image too: "no neighbour to align to" is not it)
        raise DeepAlignError(f"{stack}: holds {full[0]} slice(s), but the transforms "
                             f"({transforms}) are for {len(ts)}; apply them to the stack they "
                             "were made for, or one of as many slices")
    if scale != 1.0:
        # A binned stack's side is the full one's divided and rounded either way (255 px
        # binned by 2: 127 or 128): a full-resolution stack within that rounding matches.
        fits = all(abs(full[i] / scale - ts.input_shape[i]) * min(1.0, scale) < 1
                   for i in (1, 2))  # (within a pixel of the coarser of the two)
        ts = ts.rescaled(scale, (len(ts), full[1], full[2]) if fits else None)
    if tuple(full[1:]) != tuple(ts.input_shape[1:]):
        made_for = TransformSet.load(transforms).input_shape[1:]
        times = "" if scale == 1.0 else \
            f" (scaled by {scale:g}: {ts.input_shape[1]} x {ts.input_shape[2]})"
        raise DeepAlignError(
            f"{stack}: slices are {full[1]} x {full[2]} (y, x), but the transforms "
            f"({transforms}) were made for {made_for[0]} x {made_for[1]}{times}; apply them to the "
            "stack they were made for, or give the scale (--scale) between the two (2: the "
            "transforms of a 2x binned copy on the full stack)")
    if target is not None:  # a label image must cover its image voxel for voxel
        shape, made = image_shape(target[0]), (len(ts), *ts.output_shape)
        if shape is not None and tuple(shape[-3:]) != made:
            raise DeepAlignError(
                f"{output}: (output) the labels would be {made[0]} x {made[1]} x {made[2]} "
                f"(slices x height x width) but the image {target[0]} is "
                f"{' x '.join(str(v) for v in shape[-3:])}; apply the transforms of that "
                "image's alignment, or write the labels elsewhere")
    # A label image has its image's voxel size (it covers it voxel for voxel), not the label
    # stack's (often none).
    physical: dict[str, Any] = {}
    if target is not None and (size := voxel_size_of(target[0])) is not None:
        physical = {"voxel_size": size[0], "unit": size[1]}

    # The run's record (as align_stack's): the output is noted as it is put in place, so the
    # same call finishes a run killed after that (the store's bookkeeping, the labels list).
    ckpt = Checkpoint.for_run(stack, output, (len(ts), *ts.output_shape), {
        "command": "apply", "transforms": hashlib.sha256(transforms.read_bytes()).hexdigest(),
        "scale": scale, "interpolation": interpolation}, {
        "compression": compression, **physical}, data=data)
    assert ckpt is not None

    def before_publish(_: Any) -> None:
        """Just before the output is put in place: the input must be as the run found it;
        for a label image, the labels group, and the label image's own mark inside it (so it
        is in place with its mark)."""
        ckpt.check_input()
        if target is not None:
            prepare_label_group(target[0])
            mark_label(partial_path_for(output))

    with plan.prepared(), output_lock(plan.primary()):
        plan.check()  # again under the lock: a run that just finished may have published
        done = ckpt.begin([output], "output", overwrite=overwrite)
        if target is not None:  # (a killed apply's, under this output's lock)
            remove_stale_temps(*label_group_files(target[0]))
        if not overwrite and Path(os.path.abspath(output)) in done:
            if is_zarr:
                finish_store(output)
        else:
            try:
                with ckpt.recording():
                    Aligner(num_threads=num_threads).render(
                        stack, ts, output, interpolation=interpolation, progress=progress,
                        writer_options={
                            "overwrite": overwrite,
                            # an unfinished store of an earlier apply to output: made again
                            # (a warp is cheap, and its transforms may have changed since)
                            **({"restart": True} if is_zarr else {}),
                            **({} if compression is None else {"compression": compression}),
                            **physical},
                        before_publish=before_publish)
            except BaseException:
                # Before the output is in place the record serves nothing (a rerun warps
                # again): it goes, and with it the folders this run made.
                if Path(os.path.abspath(output)) not in ckpt.committed():
                    ckpt.remove()
                raise
        if target is not None:  # listed once the label image is in
            list_label(*target)
        ckpt.remove()
    return ts
