"""Streaming, atomic stack writers: TIFF (ImageJ / BigTIFF) and OME-Zarr (resumable)."""

from __future__ import annotations

import abc
import json
import math
import os
import queue
import shutil
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from .._errors import DeepAlignError, InputChanged
from ..outputs import (
    PROGRESS_FILE,
    STORE_MARK,
    create_temp,
    os_error,
    partial_path_for,
    progress_temps,
    publish,
    remove_zarr_temps,
    replace_store,
    store_being_created,
    store_mark,
    store_problem,
)
from ._common import SUPPORTED_DTYPES
from ._units import ome_unit

_BIGTIFF_LIMIT = int(3.9 * 2**30)  # classic TIFF offsets are 32-bit; keep a margin for tags


def _check_layout(path: Path, shape: Any, dtype: Any) -> tuple[tuple[int, int, int], np.dtype]:
    try:
        shp = tuple(int(s) for s in shape)
    except TypeError:
        raise DeepAlignError(f"{path}: shape must be (z, y, x), got {shape!r}") from None
    if len(shp) != 3 or min(shp) < 1:
        raise DeepAlignError(f"{path}: shape must be (z, y, x) with positive sizes, got {shape!r}")
    # native and canonical (zarr knows uint64, not ulonglong; slices come native-endian)
    dt = np.dtype(np.dtype(dtype).newbyteorder("=").str)
    if dt not in SUPPORTED_DTYPES and dt.kind not in "iu":
        raise DeepAlignError(
            f"{path}: cannot write dtype {dt}; use uint8, uint16 or float32, or an integer "
            "type for labels (cast the slices with .astype first)."
        )
    return shp, dt


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class StackWriter(abc.ABC):
    """A stack being written slice by slice; the result appears at ``path`` only when complete.

    Use as a context manager: a normal exit closes (and publishes) the stack, an exception
    inside the block discards the incomplete output (see each writer for what is kept).
    """

    path: Path
    shape: tuple[int, int, int]
    dtype: np.dtype

    def _check_slice(self, i: int, data: np.ndarray) -> np.ndarray:
        arr = np.asarray(data)
        if arr.shape != self.shape[1:]:
            raise DeepAlignError(
                f"{self.path}, slice {i}: slice has shape {arr.shape}, expected "
                f"{self.shape[1:]} (y, x)."
            )
        if arr.dtype != self.dtype:
            raise DeepAlignError(
                f"{self.path}, slice {i}: slice has dtype {arr.dtype}, but the stack is "
                f"{self.dtype}; cast it first (slice.astype(np.{self.dtype.name}))."
            )
        return arr

    @abc.abstractmethod
    def write(self, i: int, data: np.ndarray) -> None:
        """Write 2-D slice ``i`` (shape ``(y, x)``, the writer's dtype exactly)."""

    @abc.abstractmethod
    def close(self, before_publish: Callable[[], None] | None = None) -> None:
        """Finish the stack and move it to ``path``; raises if slices are missing.

        ``before_publish`` is called once the stack is complete on disk, just before it is
        renamed to ``path`` (e.g. to publish a transforms file together with it); if it
        raises, nothing is published.
        """

    @abc.abstractmethod
    def abort(self) -> None:
        """Discard everything written; nothing appears at ``path``. Idempotent."""

    def _exit_on_error(self) -> None:
        self.abort()

    def __enter__(self) -> StackWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self._exit_on_error()


class _Aborted(Exception):
    pass


_ABORT = object()


class TiffStackWriter(StackWriter):
    """Write a (z, y, x) stack to a TIFF file page by page, atomically.

    Pages go to a hidden temporary file in the destination folder
    (``.<name>.deepalign-<random>.tmp``, created exclusively, never through a symbolic link);
    ``close`` flushes it to disk and renames it to ``path``, so a reader never sees a half-written
    stack. On an exception inside a ``with`` block (SIGINT/SIGTERM included, with the CLI's
    handlers), or on ``abort()``, the temporary file is deleted. A process that is killed
    outright leaves it behind; the next CLI run on the same output removes it
    (:func:`deepalign_fast.outputs.remove_stale_temps`).

    Output is an ImageJ hyperstack (axes ZYX; opens in Fiji/ImageJ) when uncompressed and below
    the BigTIFF limit, else a BigTIFF / compressed TIFF with tifffile "shaped" metadata. Both read
    back with :func:`open_stack` (uncompressed files memory-mapped).

    Parameters
    ----------
    path : str or os.PathLike
        Destination ``.tif``/``.tiff`` file. Its folder must exist.
    shape : tuple of int
        ``(z, y, x)``.
    dtype : numpy dtype
        uint8, uint16 or float32.
    bigtiff : bool, optional
        Default: BigTIFF when the uncompressed data exceeds about 3.9 GiB.
    compression : str, optional
        A tifffile compression name ("zlib", "zstd", "lzw", ...; "none" or None: uncompressed,
        the default). Uncompressed and zlib output stay ImageJ hyperstacks (Fiji opens both
        natively); other codecs give a plain (shaped) TIFF that Fiji opens with Bio-Formats.
    metadata : dict, optional
        Extra metadata: ImageJ keys (``spacing``, ``unit``, ...) for ImageJ output, otherwise
        JSON-serialisable items stored in the shaped description.
    overwrite : bool
        Replace an existing file at ``path`` (only once the new stack is complete).
    voxel_size : tuple of float, optional
        ``(z, y, x)`` in ``unit``: written as the X/Y resolution tags and, for ImageJ output,
        ImageJ's ``spacing`` and ``unit`` (what Fiji reads as the voxel size).
    unit : str, optional
        Unit of ``voxel_size`` (``"\u00b5m"``, ``"nm"``, ...).

    Notes
    -----
    Encoding and writing run on one background thread fed through a two-slice queue, so
    compression overlaps the caller's work; ``write`` copies the slice, so the caller may reuse
    its buffer. Slices must be written in order 0, 1, 2, ...
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        shape: tuple[int, int, int],
        dtype: Any,
        *,
        bigtiff: bool | None = None,
        compression: str | None = None,
        metadata: dict[str, Any] | None = None,
        overwrite: bool = False,
        voxel_size: tuple[float, float, float] | None = None,
        unit: str | None = None,
    ) -> None:
        import tifffile

        from ._units import imagej_unit

        self.path = Path(path)
        self.shape, self.dtype = _check_layout(self.path, shape, dtype)
        if not self.path.parent.is_dir():
            raise DeepAlignError(f"{self.path}: output folder {self.path.parent} does not exist.")
        if self.path.exists() and not overwrite:
            raise DeepAlignError(
                f"{self.path}: output file already exists; pass --overwrite (API: "
                "overwrite=True) or choose another name."
            )
        nbytes = math.prod(self.shape) * self.dtype.itemsize
        self.bigtiff = nbytes > _BIGTIFF_LIMIT if bigtiff is None else bool(bigtiff)
        if compression == "none":
            compression = None
        if compression == "zstd":
            try:
                import imagecodecs  # noqa: F401  # tifffile's zstd codec
            except ImportError:
                raise DeepAlignError(f"{self.path}: zstd compression needs the imagecodecs "
                                     "package (pip install imagecodecs), or use zlib") from None
        # ImageJ/Fiji read uncompressed and zlib ("ZIP") hyperstacks natively.
        self.imagej = not self.bigtiff and compression in (None, "zlib") and \
            self.dtype in SUPPORTED_DTYPES  # (ImageJ hyperstacks: 8, 16 or 32-bit float)
        md: dict[str, Any] = {"axes": "ZYX", **(metadata or {})}
        resolution = None
        if voxel_size is not None:
            vz, vy, vx = (float(v) for v in voxel_size)
            if not all(math.isfinite(v) and v > 0 for v in (vz, vy, vx)):
                raise DeepAlignError(f"{self.path}: voxel size must be positive, got "
                                     f"{voxel_size!r}")
            resolution = (1.0 / vx, 1.0 / vy)  # pixels per unit, as TIFF and ImageJ read it
            if self.imagej:
                md.update(spacing=vz, unit=imagej_unit(unit or "pixel"))
            else:
                md.update(voxel_size=[vz, vy, vx], unit=unit or "pixel")
        self._next = 0
        self._done = False
        self._error: BaseException | None = None
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=2)
        fd, self._tmp = create_temp(self.path)
        self._fh = os.fdopen(fd, "wb+")
        self._fh.raw.name = str(self._tmp)  # type: ignore[attr-defined]  # tifffile wants a path
        try:
            os.fchmod(fd, 0o666 & ~_umask())
            self._tw = tifffile.TiffWriter(self._fh, bigtiff=self.bigtiff, imagej=self.imagej)
        except Exception as exc:
            self._fh.close()
            self._tmp.unlink(missing_ok=True)
            raise DeepAlignError(f"{self.path}: cannot create the output file: {exc}") from exc
        kwargs = {
            "shape": self.shape,
            "dtype": self.dtype,
            "photometric": "minisblack",
            "compression": compression,
            "metadata": md,
        }
        if resolution is not None:
            kwargs["resolution"] = resolution
            if not self.imagej:  # no unit TIFF knows (ImageJ's own tags say it there): the
                kwargs["resolutionunit"] = 1  # default, inch, read 5 nm pixels as 127 mm
        self._thread = threading.Thread(
            target=self._run, args=(kwargs,), name="deepalign-tiff-writer", daemon=True
        )
        self._thread.start()

    def _pages(self) -> Any:
        for _ in range(self.shape[0]):
            item = self._queue.get()
            if item is _ABORT:
                raise _Aborted
            yield item

    def _run(self, kwargs: dict[str, Any]) -> None:
        try:
            self._tw.write(data=self._pages(), **kwargs)
        except BaseException as exc:  # handed to the caller's thread by write/close
            self._error = exc
        finally:
            try:
                self._tw.close()
                self._fh.flush()
                os.fsync(self._fh.fileno())
            except BaseException as exc:
                self._error = self._error or exc
            finally:
                self._fh.close()

    def _raise_worker_error(self) -> None:
        exc = self._error
        if exc is not None and not isinstance(exc, _Aborted):
            # (the error is read before abort() frees the space the file took)
            error = os_error(exc, self.path, "writing the TIFF failed") \
                if isinstance(exc, OSError) else None
            self.abort()
            if error is not None:
                raise error from exc
            raise DeepAlignError(
                f"{self.path}: writing the TIFF failed ({type(exc).__name__}: {exc})."
            ) from exc

    def _put(self, item: Any) -> bool:
        """Queue an item for the writer thread; False if the thread has ended."""
        while self._thread.is_alive():
            try:
                self._queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def write(self, i: int, data: np.ndarray) -> None:
        """Append slice ``i``; slices must come in order 0, 1, 2, ...

        Raises
        ------
        DeepAlignError
            Out-of-order index, wrong shape or dtype, writer closed, or a write error.
        """
        if self._done:
            raise DeepAlignError(f"{self.path}: writer is closed.")
        self._raise_worker_error()
        if int(i) != self._next:
            raise DeepAlignError(
                f"{self.path}, slice {i}: TIFF slices must be written in order; expected "
                f"slice {self._next}."
            )
        arr = self._check_slice(i, data)
        if not self._put(np.array(arr, order="C", copy=True)):
            self._raise_worker_error()
            raise DeepAlignError(f"{self.path}: the TIFF writer thread stopped unexpectedly.")
        self._next += 1

    def close(self, before_publish: Callable[[], None] | None = None) -> None:
        """Finish the file, flush it to disk and rename it to ``path`` (see
        :meth:`StackWriter.close` for ``before_publish``).

        Raises
        ------
        DeepAlignError
            Fewer slices than ``shape[0]`` were written (the output is discarded), or writing
            failed.
        """
        if self._done:
            return
        if self._next != self.shape[0]:
            n = self._next
            self.abort()
            raise DeepAlignError(
                f"{self.path}: only {n} of {self.shape[0]} slices were written (next missing: "
                f"slice {n}); the incomplete output was discarded."
            )
        self._thread.join()
        self._raise_worker_error()
        try:
            if before_publish is not None:
                before_publish()
            publish(self._tmp, self.path)
        except OSError as exc:
            self.abort()
            raise os_error(exc, self.path, "cannot finish the output file") from exc
        except BaseException:
            self.abort()
            raise
        _fsync_dir(self.path.parent)
        self._done = True

    def abort(self) -> None:
        """Stop writing and delete the temporary file; nothing appears at ``path``."""
        if self._done:
            return
        self._done = True
        self._put(_ABORT)
        self._thread.join()
        try:
            self._tmp.unlink()
        except FileNotFoundError:
            pass


def _ranges(done: set[int]) -> list[list[int]]:
    """Compress slice indices to half-open ``[start, stop)`` runs for the progress file."""
    runs: list[list[int]] = []
    for i in sorted(done):
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return runs


class ZarrStackWriter(StackWriter):
    """Write a (z, y, x) stack to an OME-Zarr (or plain Zarr) store, resumably.

    Data goes to ``<path>.partial``; ``close`` renames it to ``path`` once every slice is in.
    Chunks hold one slice in z, so slices may be written in any order and from several threads.
    After each slice, the finished slice numbers are recorded in
    ``<path>.partial/deepalign_progress.json`` (replaced atomically). If the run stops (an
    exception in the ``with`` block, a crash, a kill), the ``.partial`` store stays: open it
    again with ``resume=True`` and skip the slices in :meth:`completed`. ``abort()`` deletes it.
    (Slices are not fsynced one by one: resume survives a process crash, not a power cut.)

    Parameters
    ----------
    path : str or os.PathLike
        Destination ``.zarr`` / ``.ome.zarr`` directory.
    shape : tuple of int
        ``(z, y, x)``.
    dtype : numpy dtype
        uint8, uint16 or float32.
    chunks : tuple of int
        ``(1, cy, cx)``; the z chunk must be 1. Clipped to the shape.
    ome : bool
        True: OME-Zarr (NGFF 0.4, Zarr v2 format) group: level ``"0"`` and a pyramid of 2x
        levels in y/x (``"1"``, ``"2"``, ...; :meth:`level_shapes`) with their scales, axes
        z/y/x. False: a bare Zarr v3 array with dimension names z/y/x.
    resume : bool
        Continue an existing ``<path>.partial`` store (its shape, dtype, chunks, voxel size,
        unit and ``run`` must match). One stopped while being created, before any slice, is
        made again (:func:`~deepalign_fast.outputs.store_being_created`).
    overwrite : bool
        Replace an existing store at ``path`` (at ``close``), and discard a stale ``.partial``
        store instead of refusing when ``resume`` is False. Only a store this tool wrote is
        ever replaced or discarded (:func:`deepalign_fast.outputs.store_problem`; every store
        written here carries its mark): anything else at ``path`` is refused at once.
    restart : bool
        Discard an existing ``.partial`` store (when ``resume`` is False) without allowing an
        existing ``path`` to be replaced.
    voxel_size : tuple of float, optional
        ``(z, y, x)`` voxel size for the OME scale transform (default 1, 1, 1).
    unit : str, optional
        Unit of ``voxel_size`` (``"micrometer"``, ``"\u00b5m"``, ``"nm"``, ...), written as the
        OME-NGFF axis unit; a unit NGFF does not know is left out.
    downsample : {"mean", "nearest"}
        How the pyramid levels are made: 2x2 means (images) or every second pixel (labels).
    run : str, optional
        What this store is the output of (e.g. a digest of the input and the options),
        kept in the progress record: an unfinished store of another run is never continued,
        so one output never mixes the slices of two runs.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        shape: tuple[int, int, int],
        dtype: Any,
        *,
        chunks: tuple[int, int, int] = (1, 1024, 1024),
        ome: bool = True,
        resume: bool = False,
        overwrite: bool = False,
        restart: bool = False,
        voxel_size: tuple[float, float, float] | None = None,
        unit: str | None = None,
        downsample: str = "mean",
        run: str | None = None,
    ) -> None:
        import zarr

        if downsample not in ("mean", "nearest"):
            raise DeepAlignError(f"downsample must be 'mean' or 'nearest', got {downsample!r}")
        self.downsample = downsample
        self._levels: list[Any] = []
        self.path = Path(path)
        self.shape, self.dtype = _check_layout(self.path, shape, dtype)
        ch = tuple(int(c) for c in chunks)
        if len(ch) != 3 or ch[0] != 1 or min(ch) < 1:
            raise DeepAlignError(
                f"{self.path}: chunks must be (1, cy, cx) (one slice per z chunk), got {chunks!r}"
            )
        self.chunks = (1, min(ch[1], self.shape[1]), min(ch[2], self.shape[2]))
        self.ome = bool(ome)
        self._scale = [1.0, 1.0, 1.0] if voxel_size is None else [float(v) for v in voxel_size]
        if len(self._scale) != 3:
            raise DeepAlignError(f"{self.path}: voxel_size must be (z, y, x), got {voxel_size!r}")
        self._unit = (ome_unit(unit) if unit else None) if self.ome else None
        self._run = run
        self.partial = partial_path_for(self.path)
        self._overwrite = overwrite
        self._lock = threading.Lock()
        self._done = False
        self._completed: set[int] = set()
        if not self.path.parent.is_dir():
            raise DeepAlignError(f"{self.path}: output folder {self.path.parent} does not exist.")
        if os.path.lexists(self.path):
            if not overwrite:
                raise DeepAlignError(
                    f"{self.path}: output already exists; pass --overwrite (API: "
                    "overwrite=True) or choose another name."
                )
            self._check_replaceable()
        if os.path.lexists(self.partial):
            why = store_problem(self.partial, unfinished=True)
            if why is not None:
                raise DeepAlignError(f"{self.partial}: {why}, so it is not an unfinished store "
                                     "of this tool; remove it or choose another name.")
            if store_being_created(self.partial):
                pass  # stopped before any slice: made again below
            elif resume:
                try:
                    reopened = self._reopen(zarr)
                except DeepAlignError:
                    if not overwrite:
                        raise
                    reopened = None  # --overwrite: what cannot be continued is discarded
                if reopened is not None:
                    self._arr = reopened
                    return
            elif not (overwrite or restart):
                raise DeepAlignError(
                    f"{self.partial}: an unfinished output from an earlier run is here; rerun "
                    "the same command (API: resume=True) to continue it, pass --overwrite (API: "
                    "overwrite=True) to discard it, or delete it."
                )
            shutil.rmtree(self.partial)
        try:
            self._arr = self._create(zarr)
            self._save_progress()
        except OSError as exc:
            shutil.rmtree(self.partial, ignore_errors=True)
            raise os_error(exc, self.path, "cannot create the output store") from exc

    def _check_replaceable(self) -> None:
        """Refuse to replace anything at ``path`` but a Zarr store this tool wrote."""
        why = store_problem(self.path)
        if why is not None:
            raise DeepAlignError(
                f"{self.path}: exists and {why}; --overwrite (API: overwrite=True) replaces "
                "only a Zarr store written by deepalign-fast. Remove it yourself or choose "
                "another name.")

    def level_shapes(self) -> list[tuple[int, int, int]]:
        """Shapes of the pyramid levels below level 0 (OME output; :func:`pyramid_shapes`)."""
        if not self.ome:
            return []
        n = self.shape[0]
        return [(n, h, w) for h, w in pyramid_shapes(self.shape[1], self.shape[2])]

    def _layout(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "dtype": self.dtype.name,
            "chunks": list(self.chunks),
            "ome": self.ome,
            "scale": self._scale if self.ome else None,
            "unit": self._unit,
            "run": self._run,
        }

    def _create(self, zarr: Any) -> Any:
        if not self.ome:
            return zarr.create_array(
                str(self.partial),
                shape=self.shape,
                chunks=self.chunks,
                dtype=self.dtype,
                fill_value=0,
                zarr_format=3,
                dimension_names=("z", "y", "x"),
                attributes={STORE_MARK: store_mark()},
            )
        scale = self._scale
        axes: list[dict[str, str]] = []
        for name in "zyx":
            axis = {"name": name, "type": "space"}
            if self._unit:
                axis["unit"] = self._unit
            axes.append(axis)
        # The mark goes into the group's first metadata: a store of ours is recognisable from
        # its creation on (the only stores --overwrite replaces).
        group = zarr.create_group(str(self.partial), zarr_format=2,
                                  attributes={STORE_MARK: store_mark()})
        arr = group.create_array(
            "0",
            shape=self.shape,
            chunks=self.chunks,
            dtype=self.dtype,
            fill_value=0,
            chunk_key_encoding={"name": "v2", "separator": "/"},  # NGFF 0.4 nested chunks
        )
        datasets: list[dict[str, Any]] = [
            {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}]
        for k, shape in enumerate(self.level_shapes(), start=1):
            self._levels.append(group.create_array(
                str(k), shape=shape,
                chunks=(1, min(self.chunks[1], shape[1]), min(self.chunks[2], shape[2])),
                dtype=self.dtype, fill_value=0,
                chunk_key_encoding={"name": "v2", "separator": "/"}))
            datasets.append(level_dataset(k, scale))
        group.attrs["multiscales"] = [
            {
                "version": "0.4",
                "name": self.path.name.removesuffix(".zarr").removesuffix(".ome"),
                "axes": axes,
                "datasets": datasets,
            }
        ]
        return arr

    def _reopen(self, zarr: Any) -> Any:
        """The array of the unfinished store, its finished slices read from the progress
        record."""
        progress = self.partial / PROGRESS_FILE
        try:
            info = json.loads(progress.read_text())
        except (OSError, ValueError) as exc:
            raise DeepAlignError(
                f"{self.partial}: cannot resume: progress record {PROGRESS_FILE} is missing or "
                f"unreadable ({exc}); delete the folder or pass overwrite=True to start again."
            ) from exc
        layout = {k: info.get(k) for k in self._layout()}
        if layout["run"] != self._run:
            raise DeepAlignError(f"{self.partial}: {_OTHER_RUN}")
        if layout != self._layout():
            raise DeepAlignError(
                f"{self.partial}: cannot resume: the unfinished store has layout {layout}, but "
                f"this run asks for {self._layout()}; delete it or pass overwrite=True."
            )
        self._completed = {i for a, b in info.get("completed", []) for i in range(a, b)}
        for stale in progress_temps(self.partial):  # a killed run's, never published
            stale.unlink(missing_ok=True)
        remove_zarr_temps(self.partial)  # ... and Zarr's own
        node = zarr.open_group(str(self.partial), mode="r+") if self.ome else None
        if node is None:
            return zarr.open_array(str(self.partial), mode="r+")
        self._levels = [node[str(k)] for k in range(1, len(self.level_shapes()) + 1)]
        return node["0"]

    def _save_progress(self) -> None:
        info = {**self._layout(), "completed": _ranges(self._completed)}
        tmp = self.partial / f".{PROGRESS_FILE}.tmp-{os.getpid()}-{threading.get_ident()}"
        tmp.write_text(json.dumps(info))
        os.replace(tmp, self.partial / PROGRESS_FILE)

    def completed(self) -> set[int]:
        """Slice indices already written (including those from an earlier, resumed run)."""
        with self._lock:
            return set(self._completed)

    @property
    def array_path(self) -> Path:
        """The Zarr array inside ``<path>.partial`` that slices go to.

        Other processes (e.g. distributed workers) may write whole z-slices straight into it
        (``zarr.open_array(array_path, mode="r+")[i] = slice``; chunk files are written
        atomically by Zarr's local store) and then report them with :meth:`mark_written`.
        """
        return self.partial / "0" if self.ome else self.partial

    def mark_written(self, i: int) -> None:
        """Record slice ``i`` as finished after another process wrote it into
        :attr:`array_path`. Thread-safe; call it only once the slice is fully written."""
        j = int(i)
        if not 0 <= j < self.shape[0]:
            raise DeepAlignError(
                f"{self.path}, slice {i}: index out of range for {self.shape[0]} slices."
            )
        try:
            if self._levels:  # the pyramid of a slice written by another process
                self._write_levels(j, np.asarray(self._arr[j]))
            with self._lock:
                self._completed.add(j)
                self._save_progress()
        except OSError as exc:
            raise os_error(exc, self.path, f"recording slice {j} failed") from exc

    def _write_levels(self, j: int, data: np.ndarray) -> None:
        """Slice ``j`` of every pyramid level, each from the level above (2x2 mean, or every
        second pixel for labels), so no second pass over the stack is needed."""
        level = data
        for arr in self._levels:
            level = halve(level, self.downsample)
            arr[j] = level

    def write(self, i: int, data: np.ndarray) -> None:
        """Write slice ``i`` (any order; rewriting a slice replaces it). Thread-safe.

        Raises
        ------
        DeepAlignError
            Index out of range, wrong shape or dtype, or the writer is closed.
        """
        if self._done:
            raise DeepAlignError(f"{self.path}: writer is closed.")
        j = int(i)
        if not 0 <= j < self.shape[0]:
            raise DeepAlignError(
                f"{self.path}, slice {i}: index out of range for {self.shape[0]} slices."
            )
        arr = self._check_slice(j, data)
        try:
            self._arr[j] = arr
            self._write_levels(j, arr)
            with self._lock:
                self._completed.add(j)
                self._save_progress()
        except OSError as exc:
            raise os_error(exc, self.path, f"writing slice {j} failed") from exc

    def close(self, before_publish: Callable[[], None] | None = None) -> None:
        """Move the finished store to ``path`` (see :meth:`StackWriter.close` for
        ``before_publish``; if it raises, the ``.partial`` store is kept).

        Raises
        ------
        DeepAlignError
            Slices are missing; the ``.partial`` store is kept so the run can resume.
        """
        if self._done:
            return
        missing = self.shape[0] - len(self._completed)
        if missing:
            first = min(set(range(self.shape[0])) - self._completed)
            self._done = True
            raise DeepAlignError(
                f"{self.path}: {missing} of {self.shape[0]} slices were never written (first: "
                f"slice {first}); the unfinished store is kept at {self.partial}; rerun with "
                "resume=True to complete it."
            )
        if before_publish is not None:
            try:
                before_publish()
            except InputChanged:  # written from an input that has changed: no resume point
                self.abort()
                raise
        replace = os.path.lexists(self.path)
        if replace and not self._overwrite:
            raise DeepAlignError(f"{self.path}: appeared while this run wrote "
                                 f"{self.partial.name}; it is kept, and so is the unfinished "
                                 "store (pass --overwrite to replace it).")
        if replace:
            self._check_replaceable()  # still a store of ours (checked at the start, too)
        try:
            # The progress record goes only once the store is in place: killed before, the
            # unfinished store is still a resume point (every slice recorded as finished).
            replace_store(self.partial, self.path)  # (an older store first renamed aside)
        except OSError as exc:
            raise os_error(exc, self.path, "cannot publish the finished store") from exc
        finish_store(self.path)
        _fsync_dir(self.path.parent)
        self._done = True

    def _exit_on_error(self) -> None:
        # Keep the .partial store: it is the resume point.
        self._done = True

    def abort(self) -> None:
        """Delete the ``.partial`` store; nothing appears at ``path``."""
        self._done = True
        shutil.rmtree(self.partial, ignore_errors=True)


_OTHER_RUN = ("an unfinished output of another run (another input, other options, or another "
              "version of deepalign-fast) is here; rerun that run's command to finish it, pass "
              "--overwrite (API: overwrite=True) to discard it, or delete it.")


def check_unfinished(path: str | os.PathLike[str], run: str | None, *,
                     overwrite: bool = False) -> str | None:
    """:func:`unfinished_run` of the output ``path``, refused (before any work) where
    another run wrote it (neither None nor ``run``): it is that run's resume point, which
    only ``overwrite`` discards."""
    left = unfinished_run(path)
    if left is not None and left != run and not overwrite:
        raise DeepAlignError(f"{partial_path_for(path)}: {_OTHER_RUN}")
    return left


def unfinished_run(path: str | os.PathLike[str]) -> str | None:
    """The ``run`` recorded in the unfinished store of the output ``path`` (``NAME.partial``,
    see :class:`ZarrStackWriter`): None where there is none worth keeping (no such folder,
    or one stopped while being created), "" where it records no run (another version, no
    readable progress record)."""
    partial = partial_path_for(path)
    if not os.path.lexists(partial) or store_being_created(partial):
        return None
    try:
        info = json.loads((partial / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return ""
    run = info.get("run") if isinstance(info, dict) else None
    return run if isinstance(run, str) else ""


def finish_store(path: str | os.PathLike[str]) -> None:
    """Remove the progress record (and any temporary file of it) from a finished store of
    :class:`ZarrStackWriter` at ``path``: the writer does so once the store is in place; the
    rerun of a run killed just before calls it on the store that run put there."""
    for stale in [Path(path, PROGRESS_FILE), *progress_temps(path)]:
        try:
            stale.unlink(missing_ok=True)
        except OSError as exc:
            raise os_error(exc, path, "cannot finish the store") from exc


def _is_zarr_path(p: Path) -> bool:
    """``NAME.zarr`` / ``NAME.ome.zarr``, or ``IMAGE.zarr/labels/NAME`` (an NGFF label image)."""
    return p.suffix.lower() == ".zarr" or (
        p.parent.name == "labels" and p.parent.parent.suffix.lower() == ".zarr"
        and p.suffix.lower() not in (".tif", ".tiff", ".btf"))


def pyramid_shapes(h: int, w: int) -> list[tuple[int, int]]:
    """The (y, x) shapes of the OME-Zarr pyramid levels below level 0 of ``h`` x ``w``
    slices: each halves y and x (rounding up) while the longer side stays >= 256 px; z is
    never downsampled (EM slices are thin)."""
    out = []
    while max(h, w) // 2 >= 256:
        h, w = (h + 1) // 2, (w + 1) // 2
        out.append((h, w))
    return out


def level_dataset(k: int, scale: Sequence[float]) -> dict[str, Any]:
    """The NGFF 0.4 ``datasets`` entry of pyramid level ``k`` (path ``"k"``) over a level 0
    of voxel size ``scale`` (z, y, x): a level-k pixel covers 2^k level-0 pixels, its centre
    (2^k - 1) / 2 level-0 pixels from theirs (pixel centres at integer coordinates)."""
    f = float(2**k)
    return {"path": str(k), "coordinateTransformations": [
        {"type": "scale", "scale": [float(scale[0]), scale[1] * f, scale[2] * f]},
        {"type": "translation",
         "translation": [0.0, scale[1] * (f - 1) / 2, scale[2] * (f - 1) / 2]}]}


def halve(image: np.ndarray, how: str) -> np.ndarray:
    """Half-size slice (odd sizes round up): 2x2 block means, rounded for integer types, or
    every second pixel (``how="nearest"``, for labels)."""
    if how == "nearest":
        return np.ascontiguousarray(image[::2, ::2])
    h, w = image.shape
    padded = np.pad(image.astype(np.float32), ((0, h % 2), (0, w % 2)), mode="edge")
    mean = padded.reshape((h + 1) // 2, 2, (w + 1) // 2, 2).mean(axis=(1, 3))
    if image.dtype.kind == "f":
        return mean.astype(image.dtype)
    info = np.iinfo(image.dtype)
    return np.clip(np.rint(mean), info.min, info.max).astype(image.dtype)


def is_zarr_output(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a Zarr output (see :func:`open_writer`)."""
    return _is_zarr_path(Path(path))


def open_writer(
    path: str | os.PathLike[str], shape: tuple[int, int, int], dtype: Any, **kwargs: Any
) -> StackWriter:
    """Create the writer matching ``path``'s suffix.

    ``.tif``/``.tiff``/``.btf`` give a :class:`TiffStackWriter`, ``.zarr``/``.ome.zarr`` a
    :class:`ZarrStackWriter`; ``kwargs`` go to that class.

    Raises
    ------
    DeepAlignError
        Unknown suffix, or invalid shape/dtype/options.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in (".tif", ".tiff", ".btf"):
        return TiffStackWriter(p, shape, dtype, **kwargs)
    if _is_zarr_path(p):
        return ZarrStackWriter(p, shape, dtype, **kwargs)
    raise DeepAlignError(
        f"{p}: cannot tell the output format from suffix {suffix!r}; use .tif/.tiff (TIFF) or "
        ".zarr/.ome.zarr (OME-Zarr)."
    )


def check_distinct(input_path: str | os.PathLike[str], output_path: str | os.PathLike[str]) -> None:
    """Refuse an output that would overwrite or sit inside the input.

    Symlinks are resolved and hard links detected (``os.path.samefile``). An output inside an
    input folder/store (or an output folder containing the input) is refused too, since
    replacing it would change the input.

    Raises
    ------
    DeepAlignError
        The two paths name the same file, or one contains the other.
    """
    inp = Path(input_path).resolve()
    out = Path(output_path).resolve()
    same = inp == out
    if not same and inp.exists() and out.exists():
        same = os.path.samefile(inp, out)
    if same:
        raise DeepAlignError(
            f"{output_path}: output is the input ({input_path}); the aligned stack must go to a "
            "different file (e.g. add '_aligned' to the name)."
        )
    if out.is_relative_to(inp) and inp.is_dir():
        raise DeepAlignError(
            f"{output_path}: output lies inside the input folder {input_path}; write it "
            "elsewhere so the input stays unchanged."
        )
    if inp.is_relative_to(out):
        raise DeepAlignError(
            f"{output_path}: the input {input_path} lies inside this output path; replacing the "
            "output would delete the input. Write it elsewhere."
        )
