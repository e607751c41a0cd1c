"""Live acquisition: align slices as the microscope writes them into a folder.

``watch_folder(FOLDER, OUTPUT.ome.zarr)`` polls FOLDER for slice files (``.tif``, ``.tiff``,
``.png``; natural order), takes a file once it is complete (non-empty, size and modification
time unchanged between two polls, and decodable), feeds it to :meth:`Aligner.stream` and
appends every aligned slice to an OME-Zarr (NGFF 0.4, with its pyramid) whose z axis grows.
Memory stays flat. The latency of slice z is the arrival of slice z + ``lookahead``.

Beside the output, ``OUTPUT.watch.json`` is replaced atomically after every slice: the files
taken so far, the slices written, the flagged slices and their residuals (a live QC record).
A watch stops when FOLDER holds the stop file (``STOP`` by default) or after ``idle_timeout``
seconds without a new file (a file still growing counts as new); it then aligns the slices
still waiting for their look-ahead. Files are taken in natural order, so a file that never
becomes readable holds back those after it: at the idle timeout that is an error naming it
(as an unreadable file is once the stop file is there), never a silent stop.

Restart after a kill: rerunning the same call continues. The slices already taken are aligned
again (alignment of slice z depends only on slices up to z + ``lookahead``, so the result is
the same) but not written again; a slice cut off while being written is rewritten.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ._errors import DeepAlignError
from .alignment import Aligner, AlignOptions
from .io import OTHER_IMAGE_SUFFIXES, SLICE_SUFFIXES, halve
from .outputs import (
    STORE_MARK,
    OutputPlan,
    os_error,
    output_lock,
    remove_stale_temps,
    remove_zarr_temps,
    store_being_created,
    store_mark,
    store_problem,
    transforms_path_for,
    write_atomic,
)

__all__ = ["WatchResult", "watch_folder"]


def _natural(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


@dataclass
class WatchResult:
    """What a watch did: files taken (in order), slices written, the transforms file, flagged
    slices (with the reason for each, as ``AlignStream.flag_reasons``)."""

    files: list[str] = field(default_factory=list)
    written: int = 0
    transforms: Path | None = None  # the transforms file, once the watch stopped
    flagged: list[int] = field(default_factory=list)
    flag_reasons: dict[int, str] = field(default_factory=dict)


def _state_path(output: Path) -> Path:
    return output.with_name(output.name + ".watch.json")


def _save_state(path: Path, state: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(state, indent=1), doing="cannot save the watch record")


def _open_output(output: Path, shape: tuple[int, int], dtype: np.dtype, written: int,
                 voxel: tuple[tuple[float, float, float], str] | None = None) -> list[Any]:
    """The growing arrays of the OME-Zarr, level 0 then its pyramid (created, with the voxel
    size ``voxel`` ((z, y, x), NGFF unit) in its metadata, or reopened and cut to
    ``written`` slices; a store of an earlier version without a pyramid keeps none)."""
    import shutil

    import zarr

    from .io import level_dataset, pyramid_shapes

    h, w = shape
    if output.exists() and not written and store_being_created(output):
        # A watch stopped while creating its store, before its mark was in (Zarr writes a
        # group's metadata files in parallel): nothing in it to keep, made again.
        shutil.rmtree(output)
    if output.exists():
        why = store_problem(output)
        if why is not None:
            raise DeepAlignError(f"{output}: (-o) exists and {why}; choose another output")
        remove_zarr_temps(output)  # a killed write's, under this watch's lock
        group = zarr.open_group(str(output), mode="r+")
        if not written and ("0" not in group or "multiscales" not in group.attrs):
            # A watch stopped while creating its store, before any slice: made again (it
            # was left without its array, and a restart failed, or without its OME metadata)
            shutil.rmtree(output)
            return _open_output(output, shape, dtype, written, voxel)
        if "0" not in group:
            raise DeepAlignError(f"{output}: the store has lost its array of slices; choose "
                                 "another output or remove it")
        arr: Any = group["0"]
        if arr.shape[1:] != (h, w) or arr.dtype != dtype:
            raise DeepAlignError(f"{output}: holds {arr.shape[1:]} {arr.dtype} slices, the "
                                 f"folder {(h, w)} {dtype}")
        multiscales: Any = group.attrs.get("multiscales")
        try:
            paths = [str(d["path"]) for d in multiscales[0]["datasets"]]
        except (KeyError, IndexError, TypeError):
            paths = ["0"]
        arrays: list[Any] = [group[p] for p in paths if p in group]
        for a in arrays:
            a.resize((written, *a.shape[1:]))
        return arrays
    group = zarr.create_group(str(output), zarr_format=2, attributes={STORE_MARK: store_mark()})
    nested: Any = {"name": "v2", "separator": "/"}
    arrays = [group.create_array("0", shape=(0, h, w), chunks=(1, h, w), dtype=dtype,
                                 fill_value=0, chunk_key_encoding=nested)]
    scale = [1.0, 1.0, 1.0] if voxel is None else [float(v) for v in voxel[0]]
    datasets: list[dict[str, Any]] = [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}]
    for k, (lh, lw) in enumerate(pyramid_shapes(h, w), start=1):
        arrays.append(group.create_array(str(k), shape=(0, lh, lw), chunks=(1, lh, lw),
                                         dtype=dtype, fill_value=0, chunk_key_encoding=nested))
        datasets.append(level_dataset(k, scale))
    unit = {} if voxel is None else {"unit": voxel[1]}
    group.attrs["multiscales"] = [{
        "version": "0.4", "name": output.name.removesuffix(".zarr").removesuffix(".ome"),
        "axes": [{"name": a, "type": "space", **unit} for a in "zyx"],
        "datasets": datasets}]
    return arrays


def watch_folder(folder: str | os.PathLike[str], output: str | os.PathLike[str], *,
                 options: AlignOptions | None = None, lookahead: int = 8, poll: float = 1.0,
                 idle_timeout: float = 600.0, stop_file: str = "STOP",
                 on_slice: Callable[[int], None] | None = None,
                 voxel_size: tuple[float, float, float] | None = None,
                 unit: str = "nm") -> WatchResult:
    """Align the slices appearing in ``folder`` into ``output`` (OME-Zarr) until stopped.

    Parameters
    ----------
    folder : path
        Where the microscope writes one file per slice.
    output : path
        ``.zarr`` / ``.ome.zarr`` store, grown slice by slice; rerunning the same call after a
        kill continues it (see module docstring). When the watch stops, the transforms of
        every slice are written beside it (``OUTPUT.transforms.json``, as by ``align``), so
        ``apply`` carries labels or other channels through the same alignment.
    options : AlignOptions, optional
        Alignment options (defaults otherwise; ``mode="affine"`` only).
    lookahead : int
        Slices after z that must have arrived before z is aligned (latency vs accuracy).
    poll : float
        Seconds between looks at the folder.
    idle_timeout : float
        Stop after this many seconds without a new complete file.
    stop_file : str
        Stop when a file of this name appears in ``folder``.
    on_slice : callable, optional
        Called with z after slice z is written (progress, tests).
    voxel_size, unit : optional
        The voxel size ``(z, y, x)`` in ``unit`` (an OME-NGFF length unit, or nm, um, ...)
        that the store's metadata and the transforms file record (default: none, pixels).
        A continued watch keeps the first run's.
    """
    src, out = Path(folder), Path(output)
    if not src.is_dir():
        raise DeepAlignError(f"{src}: not a folder to watch")
    if out.suffix.lower() != ".zarr":
        raise DeepAlignError(f"{out}: (-o) watch writes OME-Zarr (.zarr/.ome.zarr)")
    if out.resolve().is_relative_to(src.resolve()):
        raise DeepAlignError(f"{out}: (-o) must not lie inside the watched folder {src}")
    voxel = None
    if voxel_size is not None:
        from .io import ome_unit

        if len(voxel_size) != 3 or not all(np.isfinite(v) and v > 0 for v in voxel_size):
            raise DeepAlignError(f"voxel_size: expected 3 numbers > 0 (z, y, x), got "
                                 f"{voxel_size}")
        name = ome_unit(unit)
        if name is None:
            raise DeepAlignError(f"unit {unit!r}: not a length unit of OME-NGFF; use nm, um, "
                                 "mm, angstrom, or an NGFF name")
        voxel = ((float(voxel_size[0]), float(voxel_size[1]), float(voxel_size[2])), name)
    if options is not None and options.mode != "affine":
        raise DeepAlignError(f"mode {options.mode!r}: a watch renders one affine per slice "
                             "(align the finished stack for a refined mode)")
    state_path, tpath = _state_path(out), transforms_path_for(out)
    # Everything the watch will write is checked now, not when the first slice is aligned
    # (minutes into an acquisition); an earlier watch's store, record and transforms file
    # are continued.
    if not os.path.lexists(out) and os.path.lexists(tpath):
        raise DeepAlignError(f"{tpath}: (transforms file) already exists, and {out} does not: "
                             "it is not this watch's; move it away or watch into another "
                             "output")
    plan = OutputPlan().input(src, "FOLDER")
    plan.output(out, "-o", folder=True, may_exist=True, store=True)
    plan.output(state_path, "watch record", may_exist=True)
    plan.output(tpath, "transforms file", may_exist=True)
    plan.check()
    with plan.prepared(), output_lock([out]):
        remove_stale_temps(state_path)  # of a watch killed while saving its record
        return _watch(src, out, state_path, tpath, options=options, lookahead=lookahead,
                      poll=poll, idle_timeout=idle_timeout, stop_file=stop_file,
                      on_slice=on_slice, voxel=voxel)


def _digest(path: Path) -> str:
    """The SHA-256 of a slice file's bytes (a taken file's identity across a restart)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _watch(src: Path, out: Path, state_path: Path, tpath: Path, *,
           options: AlignOptions | None,
           lookahead: int, poll: float, idle_timeout: float, stop_file: str,
           on_slice: Callable[[int], None] | None,
           voxel: tuple[tuple[float, float, float], str] | None = None) -> WatchResult:
    """:func:`watch_folder` once its outputs are checked and locked."""
    from .io import read_image

    # the options that decide the alignment (not the threads): a restart must align the
    # slices it replays as they were written
    chosen = {k: v for k, v in asdict(options or AlignOptions()).items() if k != "num_threads"}
    chosen = json.loads(json.dumps(chosen))  # (as the record stores them: tuples as lists)
    state: dict[str, Any] = {"folder": str(src.resolve()), "files": [], "written": 0,
                             "flagged": [], "flag_reasons": {}, "lookahead": lookahead,
                             "options": chosen,
                             "voxel_size": None if voxel is None else [list(voxel[0]),
                                                                       voxel[1]]}
    if out.exists():
        try:
            saved = json.loads(state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise DeepAlignError(f"{out}: exists and is not a watch of this tool to continue "
                                 "(no readable .watch.json beside it); choose another "
                                 "output") from None
        if saved.get("folder") != state["folder"] or saved.get("lookahead") != lookahead:
            raise DeepAlignError(f"{out}: continues a watch of another folder or look-ahead; "
                                 "choose another output")
        if os.path.lexists(tpath) and (not tpath.is_file() or _digest(tpath) not in
                                       saved.get("transforms_digests", [])):
            raise DeepAlignError(f"{tpath}: (transforms file) is not the one this watch wrote "
                                 f"(its record {state_path.name} does not know it); move it "
                                 "away and rerun, or watch into another output")
        default = json.loads(json.dumps({k: v for k, v in asdict(AlignOptions()).items()
                                         if k != "num_threads"}))
        if saved.get("voxel_size") != state["voxel_size"]:
            raise DeepAlignError(f"{out}: continues a watch whose store records another "
                                 f"voxel size ({saved.get('voxel_size')}); rerun with that, "
                                 "or watch into another output")
        if saved.get("options", default) != chosen:  # (a record without them: the defaults)
            raise DeepAlignError(f"{out}: continues a watch with other align options (its "
                                 f"record {state_path.name} keeps them); rerun with those, or "
                                 "watch into another output")
        state.update(saved)
    known: list[str] = list(state["files"])
    written = int(state["written"])
    result = WatchResult(files=known, written=written)
    seen_sizes: dict[str, tuple[int, int]] = {}

    first: list[Any] = []  # ((shape, dtype), file name) of the first slice

    stamps: dict[str, list[Any]] = dict(state.get("stamps") or {})

    def stamp(st: os.stat_result) -> list[int]:
        return [int(st.st_size), int(st.st_mtime_ns)]

    def source() -> Iterator[np.ndarray]:
        nonlocal first
        for z, name in enumerate(list(known)):  # a restart: the slices taken before, again
            path = src / name
            if not path.is_file():
                raise DeepAlignError(f"{path}: slice {z} of this watch (taken before) is gone; "
                                     "put it back and rerun, or watch into another output")
            if name in stamps and stamp(path.stat()) != stamps[name][:2] and (
                    len(stamps[name]) < 3 or _digest(path) != stamps[name][2]):
                # (a copy of the same bytes with a new time is the same slice)
                raise DeepAlignError(f"{path}: slice {z} of this watch has changed since it was "
                                     "taken; the slices aligned after it used the old one. Put "
                                     "it back, or watch into another output")
            image = read_image(path)
            first = first or [(image.shape, image.dtype), name]
            yield image
        last_new = time.monotonic()
        while True:
            # The stop file means the acquisition is over: every file present is complete.
            stopping = (src / stop_file).exists()
            listed = [p for p in src.iterdir() if not p.name.startswith(".")]  # as align
            other = sorted(p.name for p in listed if p.suffix.lower() in OTHER_IMAGE_SUFFIXES)
            if other:  # skipped, it would put every later slice one z early (align refuses it)
                raise DeepAlignError(
                    f"{src / other[0]}: an image the watch does not take as a slice (.tif, "
                    ".tiff and .png are); convert it, or move it out of the folder if it is "
                    "not a slice, and rerun the same command")
            fresh = sorted((p for p in listed if p.suffix.lower() in SLICE_SUFFIXES
                            and p.name not in known and p.is_file()),
                           key=lambda p: _natural(p.name))
            took = False
            waiting: tuple[Path, str] | None = None  # the file the watch waits for, and why
            for p in fresh:
                try:
                    st = p.stat()
                except FileNotFoundError:  # removed since the listing: look again
                    break
                sig = (st.st_size, st.st_mtime_ns)
                if not stopping and (st.st_size == 0 or seen_sizes.get(p.name) != sig):
                    if seen_sizes.get(p.name) != sig:
                        last_new = time.monotonic()  # a file arriving or growing: not idle
                    seen_sizes[p.name] = sig
                    waiting = (p, f"{p}: " + ("is empty" if st.st_size == 0 else
                                              "is still changing (being written?)"))
                    break  # not yet stable: keep the natural order, look again
                try:
                    image = read_image(p)
                except DeepAlignError as exc:
                    if stopping:
                        raise
                    waiting = (p, str(exc))
                    break  # still being written, or unreadable: keep the order, look again
                if first and (image.shape, image.dtype) != first[0]:
                    raise DeepAlignError(
                        f"{p}: slice {len(known)} is {image.shape[0]} x {image.shape[1]} "
                        f"{image.dtype}, the first ({first[1]}) {first[0][0][0]} x "
                        f"{first[0][0][1]} {first[0][1]}; the watch stops before it")
                if known and _natural(p.name) < _natural(known[-1]):
                    # taken in natural order: a complete file that sorts before a slice
                    # already taken cannot be inserted (a temporary name renamed before it
                    # is complete never gets here)
                    raise DeepAlignError(
                        f"{p}: arrived after {known[-1]} (slice {len(known) - 1}) but sorts "
                        "before it; the watch cannot insert a slice it has passed. Move it "
                        "away and rerun the same command, or align the folder with `align` "
                        "once the acquisition is complete")
                first = first or [(image.shape, image.dtype), p.name]
                stamps[p.name] = [*stamp(st), _digest(p)]
                known.append(p.name)
                took = True
                last_new = time.monotonic()
                yield image
            if stopping:
                return
            if not took:
                if time.monotonic() - last_new > idle_timeout:
                    if waiting is not None:  # never silently drop it and the files after it
                        p, why = waiting
                        later = len(fresh) - 1 - fresh.index(p)
                        raise DeepAlignError(
                            f"{why.rstrip('.')}; not taken within the idle timeout of "
                            f"{idle_timeout:g} s, so the watch stops before it ({later} later "
                            "file(s) wait); fix or remove it and rerun the same command to "
                            "continue")
                    return
                time.sleep(poll)

    aligner = Aligner(options or AlignOptions())
    arrays: list[Any] | None = None
    stream = aligner.stream(source(), lookahead=lookahead)

    def save_transforms() -> None:
        """The transforms of the slices in the store, beside it. The record lists the
        digests of the file before and after, first, so a kill at any point leaves a file
        the next run knows for this watch's."""
        n = result.written
        if n == 0 or len(stream.transforms) < n:  # (stopped while replaying: kept as is)
            return
        ts = stream.transform_set(n)
        if voxel is not None:
            ts = replace(ts, voxel_size=voxel[0], unit=voxel[1])
        text = json.dumps(ts.to_json(tpath.parent), indent=1)
        new = hashlib.sha256(text.encode("utf-8")).hexdigest()
        state["transforms_digests"] = sorted({*state.get("transforms_digests", []), new})
        _save_state(state_path, state)
        write_atomic(tpath, text, doing="cannot write the transforms file")
        state["transforms_digests"] = [new]
        _save_state(state_path, state)
        result.transforms = tpath

    stopped = True  # (by an error or an interrupt, until the stream runs out)
    try:
        for z, aligned in enumerate(stream):
            if z < written:
                continue  # written before the restart: identical, so kept
            try:
                if arrays is None:
                    # The record first: a store beside it is this watch's from its creation.
                    _save_state(state_path, state)
                    arrays = _open_output(out, aligned.shape, aligned.dtype, written, voxel)
                level = aligned
                for k, arr in enumerate(arrays):  # level 0, then each half of the one above
                    level = level if k == 0 else halve(level, "mean")
                    arr.resize((z + 1, *arr.shape[1:]))
                    arr[z] = level
            except OSError as exc:  # (the full disk named the store; it read "?")
                raise os_error(exc, out, f"writing slice {z} failed") from exc
            result.written = z + 1
            result.flagged = list(stream.flagged)
            result.flag_reasons = dict(stream.flag_reasons)
            state.update(files=known[:], stamps={k: stamps[k] for k in known if k in stamps},
                         written=z + 1, flagged=result.flagged,
                         flag_reasons={str(k): v for k, v in result.flag_reasons.items()})
            _save_state(state_path, state)
            if on_slice is not None:
                on_slice(z)
        stopped = False
    finally:
        if stopped:  # the slices written so far get their transforms too (the error stands)
            with contextlib.suppress(Exception):
                save_transforms()
    # Every slice, those written before a restart included (the stream replays them all).
    result.flagged = list(stream.flagged)
    result.flag_reasons = dict(stream.flag_reasons)
    result.files = known
    save_transforms()
    return result
