"""Distributed alignment on a Dask cluster: per-slice work on workers, the solve on the client.

Data flow (the input is never shipped through the scheduler: every worker opens it by path)::

    client                                     workers
    ------                                     -------
    work folder <output>.work (manifest)       prepare(z)          -> prepared slice (stays on
                                                                      the workers)
    solve slice by slice, in order  <-------   match(z', z, init)  -> affine + correspondences
      (the same StackMatcher as Aligner)                          (cached in the work folder)
    global solve, canvas, transforms file
    <output>.partial (ZarrStackWriter)         render(z)           -> warps slice z and writes
    mark_written(z) as each render returns                            its chunks into the store
    publish <output>, delete the work folder

**Same result as one machine.** The workers run the same back-end (``prepare``, ``match``) and
the client runs the same matcher (:class:`~deepalign_fast.alignment.StackMatcher` for the
pairwise part, :func:`~deepalign_fast.alignment.solve.solve_stack` for the global solve and
the canvas of :meth:`Aligner.transform_set`), on the same float64 inputs, so the transforms
are the single-machine ones bit for bit (the tests allow 1e-9 px) and so is the output.

**What runs in parallel.** Preparing slices and matching each slice with its predecessor
(``init=None``) do not depend on the solve; they are submitted up to a window of slices ahead
of it and run on all workers. Matches with farther neighbours (``offsets`` beyond 1) start from
a prediction built from already solved transforms, exactly as in :meth:`Aligner.estimate`, so
the client submits them in slice order as the solve reaches each slice, at high priority. That
chain of finest-level matches is the part that does not speed up with more workers.

**Faults.** Tasks are pure functions of their arguments; when a worker dies, Dask recomputes
what it held (its prepared slices) and reruns its unfinished tasks elsewhere. Output slices are
written by the render tasks straight into ``<output>.partial``: Zarr's local store writes each
chunk file atomically (temporary file + rename), and a slice is recorded as finished (in the
store's progress file, by the client) only after its task has returned, so a slice interrupted
halfway is simply rewritten.

**Resume.** Every pairwise match is saved by the worker that computed it as a small ``.npz``
in ``<output>.work/pairs`` (named by the slice pair and a hash of its initial estimate), and the
blank-slice test per slice in ``<output>.work/slices``. Rerunning the same command after an
interruption recomputes the solve from these files (milliseconds), renders only the slices the
store does not record as finished, and publishes the output. The manifest
(``<output>.work/manifest.json``) holds the input and options; a rerun with different ones is
refused rather than mixing results. After a successful run the files the tool wrote there are
deleted, and the folder itself if the tool created it (it carries a marker file; an existing
folder without the marker is refused unless empty, and never deleted).

The input may be a TIFF, a folder of slices or a (OME-)Zarr; the output must be (OME-)Zarr.
On a multi-machine cluster, the input, the output and the work folder must be on a file system
that every worker and the client see under the same path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import DeepAlignError, EnvironmentFailure
from ..match import Correspondences
from ..outputs import partial_path_for, work_dir_for
from ..progress import Progress
from ..transforms import TransformSet
from .aligner import Aligner, AlignResult, SideOutput, measured_record, result_of_checkpoint
from .matcher import StackMatcher, backend_for, is_blank
from .options import AlignOptions

__all__ = ["CONNECT_TIMEOUT_S", "LOOPBACK_ANY_PORT", "DistributedResult", "align_distributed",
           "check_scheduler",
           "connect"]

MANIFEST_VERSION = 1
#: Seconds :func:`connect` waits for a scheduler to answer (by default).
CONNECT_TIMEOUT_S = 60.0
# Where a local cluster's dashboard listens: loopback, a free port.
LOOPBACK_ANY_PORT = "127.0.0.1:0"
_TASKS = ("prepare", "match", "match_cached", "render", "render_skipped")

# --------------------------------------------------------------------------------------------
# Worker side: module-level functions (pickled by reference), per-process caches
# --------------------------------------------------------------------------------------------

_READERS: dict[str, Any] = {}
_BACKENDS: dict[str, Any] = {}
_ARRAYS: dict[str, Any] = {}


def _reader(path: str) -> Any:
    reader = _READERS.get(path)
    if reader is None:
        from ..io import open_stack

        if len(_READERS) >= 4:  # a worker serves few runs; keep the file handles bounded
            _READERS.pop(next(iter(_READERS))).close()
        reader = _READERS[path] = open_stack(path)
    return reader


def _backend(opts: dict[str, Any]) -> Any:
    key = json.dumps(opts, sort_keys=True)
    backend = _BACKENDS.get(key)
    if backend is None:
        backend = _BACKENDS[key] = backend_for(AlignOptions(**opts))
    return backend


def prepare_task(path: str, opts: dict[str, Any], z: int) -> Any:
    """Read slice z and prepare it for matching; None for a blank slice."""
    image = _reader(path).read(z)
    return None if is_blank(image) else _backend(opts).prepare(image)


def _is_none(state: Any) -> bool:
    return state is None


def match_task(opts: dict[str, Any], ref: Any, mov: Any, init: np.ndarray | None,
                cache: str) -> tuple[np.ndarray | None, Correspondences]:
    """Match a prepared pair (the back-end's ``match``) and save the result to ``cache``."""
    if ref is None or mov is None:  # a speculative pair with a blank slice: never used
        m, corr = None, Correspondences.empty()
    else:
        m, corr = _backend(opts).match(ref, mov, init)
    _save_pair(Path(cache), init, m, corr)
    return m, corr


def render_task(path: str, z: int, affine: np.ndarray, shape: tuple[int, int],
                 array_path: str, interpolation: str, num_threads: int) -> int:
    """Warp slice z into the output frame and write it into the Zarr array (whole chunks)."""
    import zarr

    from ..render import SliceMap, render_slice

    image = _reader(path).read(z)
    out = render_slice(image, SliceMap(affine), shape, interpolation=interpolation,
                       num_threads=num_threads)
    arr = _ARRAYS.get(array_path)
    if arr is None:
        arr = _ARRAYS[array_path] = zarr.open_array(array_path, mode="r+")
    arr[z] = out
    return z


def noop_task(x: Any) -> Any:
    """An empty task (benchmarks measure the round trip with it)."""
    return x


# --------------------------------------------------------------------------------------------
# Work folder: manifest, pair cache, blank-slice cache
# --------------------------------------------------------------------------------------------


def _init_tag(init: np.ndarray | None) -> str:
    if init is None:
        return "c"  # coarse start
    return hashlib.sha1(np.ascontiguousarray(init, np.float64).tobytes()).hexdigest()[:16]


def _atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def _save_pair(path: Path, init: np.ndarray | None, m: np.ndarray | None,
               corr: Correspondences) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, init=np.zeros((0,)) if init is None else np.asarray(init, np.float64),
                     matrix=np.zeros((0,)) if m is None else np.asarray(m, np.float64),
                     src=corr.src, dst=corr.dst, weights=corr.weights,
                     correlation=np.float64(corr.correlation))

    _atomic_write(path, write)


def _load_pair(path: Path, init: np.ndarray | None
               ) -> tuple[np.ndarray | None, Correspondences] | None:
    """A cached match, or None when absent, unreadable, made from another ``init`` or by an
    older version (no ``correlation``)."""
    try:
        with np.load(path) as f:
            cached_init = f["init"]
            same = (cached_init.size == 0 if init is None
                    else cached_init.shape == np.shape(init)
                    and np.array_equal(cached_init, init, equal_nan=True))
            if not same:
                return None
            m = None if f["matrix"].size == 0 else f["matrix"].copy()
            if "correlation" not in f:
                return None  # written before pairs carried their correlation: match again
            return m, Correspondences(f["src"].copy(), f["dst"].copy(), f["weights"].copy(),
                                      float(f["correlation"]))
    except (OSError, ValueError, KeyError):
        return None


WORK_MARKER = ".deepalign-work"


class _WorkDir:
    """``<output>.work``: manifest, ``pairs/`` (one .npz per match), ``slices/`` (blank flags).

    :meth:`check` checks it and :meth:`create` creates it. The folder carries a marker file
    (:data:`WORK_MARKER`) naming this tool. :meth:`remove`
    deletes only the files this tool writes there, and the folder itself only when the tool
    created it; an existing folder without the marker is refused unless it is empty, so a
    ``--work-dir`` pointing at user data is never used, let alone deleted.
    """

    def __init__(self, root: Path, *, default: bool = False) -> None:
        self.root = root
        self.default = default  # <output>.work, named after the output (not by the user)
        self.pairs = root / "pairs"
        self.slices = root / "slices"
        self.marker = root / WORK_MARKER
        self.token = ""
        self._manifest = ""

    def check(self, manifest: dict[str, Any], output: Path) -> None:
        """Check that the folder can serve this run (class docstring); creates nothing."""
        root = self.root
        text = self._manifest = json.dumps(manifest, sort_keys=True, indent=1)
        self.token = hashlib.sha1(text.encode()).hexdigest()[:12]
        mfile = root / "manifest.json"
        partial = partial_path_for(output)
        if root.is_symlink() or (root.exists() and not root.is_dir()):
            raise DeepAlignError(f"{root}: the work folder is a file or a symbolic link; give "
                                 "--work-dir a new folder name (it is created).")
        created = not root.exists()
        if not created and not self.marker.is_file():
            # (the temporary file of the marker or manifest: a run killed while making them)
            if any(not self._own_temp(e.name) for e in root.iterdir()):
                raise DeepAlignError(
                    f"{root}: this folder exists and was not created by deepalign-fast (no "
                    f"{WORK_MARKER} marker); give --work-dir a new folder name (it is created "
                    "and removed after success) so nothing of yours is touched.")
        if mfile.exists():
            try:
                old = json.loads(mfile.read_text())
            except ValueError:
                old = None
            if old != json.loads(text):
                raise DeepAlignError(
                    f"{root}: this work folder belongs to a run with another input or other "
                    "options; delete it (and any "
                    f"{partial.name}) to start again, or rerun with the same ones to resume.")
        elif partial.exists():
            raise DeepAlignError(
                f"{partial}: an unfinished output without its work folder {root.name} is here; "
                "delete it to start again.")

    @staticmethod
    def _own_temp(name: str) -> bool:
        """Whether ``name`` at the folder's top is the temporary file of its marker or
        manifest (:func:`_atomic_write`)."""
        return re.fullmatch(rf"\.({re.escape(WORK_MARKER)}|manifest\.json)\.tmp-\d+",
                            name) is not None

    def _remove_own_temps(self) -> None:
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.root):
                if self._own_temp(entry.name) and entry.is_file(follow_symlinks=False):
                    os.unlink(entry.path)

    def create(self) -> None:
        """Create the folder (after :meth:`check`), its marker and manifest if needed."""
        root, text = self.root, self._manifest
        mfile = root / "manifest.json"
        # The default folder holding only a killed run's temporary files is that run's.
        created = not root.exists() or (self.default and not any(
            not self._own_temp(e.name) for e in root.iterdir()))
        root.mkdir(parents=True, exist_ok=True)
        self._remove_own_temps()  # a killed run's
        if not self.marker.exists():
            _atomic_write(self.marker, lambda tmp: tmp.write_text(
                json.dumps({"tool": "deepalign-fast", "created_folder": created}) + "\n"))
        self.pairs.mkdir(exist_ok=True)
        self.slices.mkdir(exist_ok=True)
        if not mfile.exists():
            _atomic_write(mfile, lambda tmp: tmp.write_text(text))

    def pair_file(self, z_ref: int, z_mov: int, init: np.ndarray | None) -> Path:
        return self.pairs / f"{z_ref:06d}_{z_mov:06d}_{_init_tag(init)}.npz"

    def blank(self, z: int) -> bool | None:
        try:
            return (self.slices / f"{z:06d}").read_text().strip() == "1"
        except OSError:
            return None

    def set_blank(self, z: int, value: bool) -> None:
        _atomic_write(self.slices / f"{z:06d}", lambda tmp: tmp.write_text("1" if value else "0"))

    def remove(self) -> None:
        """Delete the files this tool wrote here; the folder too if this tool created it.

        Only a folder holding the marker is touched, and only names this tool writes are
        removed (anything else, and the folders holding it, stay).
        """
        try:
            info = json.loads(self.marker.read_text())
        except (OSError, ValueError):
            # Not (or no longer) ours: left alone; but the default folder, empty, is what a
            # run killed between removing its marker and the folder left.
            if self.default and not self.root.is_symlink():
                with contextlib.suppress(OSError):
                    self.root.rmdir()  # only when empty
            return
        own = re.compile(r"(\d{6}_\d{6}_[0-9a-fc]+\.npz|\d{6}|\..+\.tmp-\d+)")
        for sub in (self.pairs, self.slices):
            if sub.is_symlink() or not sub.is_dir():
                continue
            for entry in os.scandir(sub):
                if own.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                    os.unlink(entry.path)
            with contextlib.suppress(OSError):
                sub.rmdir()  # only when empty
        for name in ("manifest.json", WORK_MARKER):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.root / name)
        self._remove_own_temps()
        if info.get("created_folder"):
            with contextlib.suppress(OSError):
                self.root.rmdir()  # only when empty


# --------------------------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------------------------


_ADDRESS = re.compile(r"(tcp|tls|ws|wss|ucx)://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(:(\d+))?")


def check_scheduler(scheduler: Any) -> None:
    """Check the syntax of a scheduler address (see :func:`connect`) without connecting.

    Raises
    ------
    DeepAlignError
        Not ``PROTOCOL://HOST[:PORT]`` (tcp, tls, ws, wss, ucx; port 1-65535) or ``local:N``
        with N >= 1; the message names the address.
    """
    if not isinstance(scheduler, str):
        return  # a Client, used as is
    spec = scheduler
    if spec.startswith("local:"):
        n = spec.split(":", 1)[1]
        if n.isdigit() and int(n) >= 1:
            return
        raise DeepAlignError(f"--scheduler (API: scheduler=) {spec!r}: 'local:N' needs a "
                             "number of worker processes N >= 1, e.g. local:4")
    m = _ADDRESS.fullmatch(spec)
    if m is None or (m.group(4) is not None and not 1 <= int(m.group(4)) <= 65535):
        raise DeepAlignError(f"--scheduler (API: scheduler=) {spec!r}: expected the address "
                             "of a running Dask scheduler, tcp://HOST:PORT (e.g. "
                             "tcp://10.0.0.5:8786), or local:N for N worker processes on this "
                             "machine")


def _not_a_task_failure(record: logging.LogRecord) -> bool:
    """False for the worker's log of a failed task: the failure reaches the client, which
    reports it in one line (a bad slice: the file, the slice and the problem)."""
    return not str(record.msg).startswith("Compute Failed")


def dask_setup(worker: Any) -> None:
    """Run in each worker process of a ``local:N`` cluster (its ``preload``): the worker
    ignores SIGINT. Ctrl-C at a terminal reaches every process of the group; this process
    alone stops, and shuts the cluster down, so the workers print no tracebacks of their
    own. Nor do they log a task that failed on bad input (with its traceback), or what
    tifffile finds wrong in a file: the command reports either in one line."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.getLogger("distributed.worker").addFilter(_not_a_task_failure)
    logging.getLogger("tifffile").setLevel(logging.CRITICAL)


def _preloads() -> list[str]:
    """The worker preloads of a ``local:N`` cluster: this module's :func:`dask_setup` after
    any the user configured (``distributed.worker.preload``, which an explicit list
    replaces)."""
    import dask

    configured = dask.config.get("distributed.worker.preload", default=None) or []
    if isinstance(configured, str):
        configured = [configured]
    return [*configured, __name__]


@contextlib.contextmanager
def connect(scheduler: Any, *, timeout_s: float | None = None) -> Iterator[Any]:
    """A ``dask.distributed.Client`` for ``scheduler``, closed on exit if opened here.

    Parameters
    ----------
    scheduler : str or distributed.Client
        ``"tcp://HOST:PORT"`` (an existing scheduler, e.g. started by dask-jobqueue or
        dask-kubernetes), ``"local:N"`` (a ``LocalCluster`` of N single-threaded worker
        processes on 127.0.0.1, shut down on exit), or a client, which is used as is and
        left open.
    timeout_s : float, optional
        Seconds to wait for the scheduler to answer (default :data:`CONNECT_TIMEOUT_S`).

    Raises
    ------
    DeepAlignError
        A malformed address (:func:`check_scheduler`).
    EnvironmentFailure
        No scheduler answered at the address in time; the message names it.
    """
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise DeepAlignError(
            "distributed runs need Dask: pip install 'deepalign-fast[distributed]' "
            "(or pip install 'dask[distributed]')") from exc
    if isinstance(scheduler, Client):
        yield scheduler
        return
    timeout = CONNECT_TIMEOUT_S if timeout_s is None else timeout_s
    spec = str(scheduler)
    check_scheduler(spec)
    if spec.startswith("local:"):
        # The dashboards on free loopback ports: None means the defaults, with dask 2024.1
        # 0.0.0.0:8787 for the scheduler's (a warning where 8787 is taken) and every
        # interface for each worker's, reachable from the network.
        logger = logging.getLogger("distributed")
        level = logger.level
        try:
            with contextlib.ExitStack() as running:
                try:
                    cluster = running.enter_context(LocalCluster(  # type: ignore[no-untyped-call]
                        n_workers=int(spec.split(":", 1)[1]), threads_per_worker=1,
                        processes=True, host="127.0.0.1", dashboard_address=LOOPBACK_ANY_PORT,
                        worker_dashboard_address=LOOPBACK_ANY_PORT, preload=_preloads()))
                    yield running.enter_context(
                        Client(cluster, timeout=timeout))  # type: ignore[no-untyped-call]
                except BaseException:
                    # Stopped (an error, Ctrl-C, SIGTERM): the cluster's shutdown warnings
                    # (tasks lost with the workers) say nothing to the user; the error does.
                    logger.setLevel(logging.CRITICAL)
                    raise
        finally:
            logger.setLevel(level)
        return
    try:
        client = Client(spec, timeout=timeout)  # type: ignore[no-untyped-call]
    except (OSError, TimeoutError) as exc:
        raise EnvironmentFailure(
            f"--scheduler (API: scheduler=) {spec}: no Dask scheduler answered within "
            f"{timeout:g} s ({type(exc).__name__}: {' '.join(str(exc).split())}); start the "
            "scheduler or check the address") from None
    with client:
        yield client


@dataclass
class DistributedResult(AlignResult):
    """:class:`AlignResult` plus what the cluster did (``tasks``: counts per kind)."""

    tasks: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "tasks": dict(self.tasks)}


def align_distributed(stack: str | os.PathLike[str], output: str | os.PathLike[str], *,
                      scheduler: Any, options: AlignOptions | None = None,
                      transforms_path: str | os.PathLike[str] | None = None,
                      work_dir: str | os.PathLike[str] | None = None,
                      keep_work: bool = False, overwrite: bool = False,
                      window: int | None = None,
                      progress: bool | None = None,
                      on_progress: Callable[[str, int], None] | None = None,
                      side_outputs: Sequence[SideOutput] = (),
                      voxel_size: tuple[float, float, float] | None = None,
                      unit: str | None = None,
                      ) -> DistributedResult:
    """Align ``stack`` into the OME-Zarr ``output`` on a Dask cluster (see module docstring).

    Parameters
    ----------
    stack : str or os.PathLike
        Input path (TIFF, folder of slices, (OME-)Zarr) that every worker can open.
    output : str or os.PathLike
        ``.zarr`` / ``.ome.zarr`` output; written to ``<output>.partial`` by the workers and
        renamed when complete.
    scheduler : str or distributed.Client
        See :func:`connect`: ``"tcp://HOST:PORT"``, ``"local:N"`` or a client.
    options : AlignOptions, optional
        Alignment options; ``num_threads`` is the C++ thread count of each task (set it to the
        threads per worker; 0 = all cores of the worker's machine).
    transforms_path : str or os.PathLike, optional
        Where to save the transforms file.
    work_dir : str or os.PathLike, optional
        Pair cache and resume state (default ``<output>.work``): a new or empty folder, or
        one this tool created earlier (it carries a marker file). After success its files are
        deleted, and the folder if the tool created it, unless ``keep_work``.
    overwrite : bool
        Replace an existing ``output`` and transforms file once the new ones are complete.
    window : int, optional
        How many slices ahead of the solve to prepare and match (default 4 per worker, at
        least 8). Bounds the prepared slices held in worker memory.
    progress : bool, optional
        Progress line on stderr (default: when stderr is a terminal).
    on_progress : callable, optional
        Called on the client as ``on_progress(stage, z)`` after slice ``z`` is solved
        (``"solve"``) or rendered (``"render"``); an exception it raises stops the run, which
        can then be resumed.
    voxel_size, unit : optional
        The physical size the output records, as in :meth:`Aligner.align_stack` (default:
        the input's, when its file states one).
    side_outputs : sequence of (path, callable)
        Files made from the result once the output is in place, as in
        :meth:`Aligner.align_stack` (the CLI's QC report); a rerun after a kill while they
        were written finishes them without connecting to the cluster again.

    Returns
    -------
    DistributedResult
        Transforms, matches per slice, timings and task counts (``prepare``, ``match``,
        ``match_cached``, ``render``, ``render_skipped``).

    Raises
    ------
    ValueError
        ``options.mode`` is not "affine" (refinements run on one machine).
    DeepAlignError
        Output not Zarr, output exists, input unreadable, or a work folder from another run.
    """
    from ..io import (
        ZarrStackWriter,
        check_distinct,
        check_unfinished,
        finish_store,
        open_stack,
        voxel_size_of,
    )
    from ..outputs import Checkpoint, OutputPlan

    t_start = time.perf_counter()
    opts = options or AlignOptions()
    if opts.mode != "affine":
        # The refinements run on one machine (in z order, each reusing its predecessor's work
        # on their pair); refuse rather than render affines only.
        raise ValueError(f"distributed runs render one affine per slice; mode={opts.mode!r} "
                         "runs on one machine (Aligner.align_stack, or align without "
                         "--scheduler)")
    check_scheduler(scheduler)  # before anything is opened or created
    if not isinstance(stack, (str, os.PathLike)):
        raise TypeError("distributed runs need the input as a path that every worker can open, "
                        f"got {type(stack).__name__}")
    src = Path(stack).resolve()
    out = Path(output).absolute()
    if out.suffix.lower() != ".zarr":
        raise DeepAlignError(f"{output}: distributed runs write (OME-)Zarr (.zarr/.ome.zarr), "
                             "which workers can fill slice by slice; convert afterwards if "
                             "you need a TIFF.")
    check_distinct(src, out)
    if not out.parent.is_dir():
        raise DeepAlignError(f"{output}: output folder {out.parent} does not exist.")
    with open_stack(src) as reader:
        n, h, w = reader.shape
        dtype = reader.dtype
        data = reader.data_paths()
        physical: tuple[tuple[float, float, float], str] | None = (
            ((float(voxel_size[0]), float(voxel_size[1]), float(voxel_size[2])),
             unit or "pixel") if voxel_size is not None else voxel_size_of(reader))
    if n < 1:
        raise DeepAlignError(f"{src}: the stack has no slices")
    opts_d = asdict(opts)
    # The run's record (as Aligner.align_stack keeps it): the outputs already put in place by
    # an interrupted run of the same command are finished, not refused.
    tpath = Path(transforms_path) if transforms_path is not None else None
    extra = [(Path(p), write) for p, write in side_outputs]
    # Every path this call writes, before any work (as Aligner.align_stack and the CLI).
    plan = OutputPlan(overwrite=overwrite, overwrite_flag="overwrite=True", resumes=out)
    plan.input(src, "stack").output(out, "output", folder=True, store=True)
    plan.output(tpath, "transforms_path")
    for side, _ in extra:
        plan.output(side, "side output")
    plan.check()
    ckpt = Checkpoint.for_run(src, out, (n, h, w), opts_d, {
        "voxel_size": None if voxel_size is None else [float(v) for v in voxel_size],
        "unit": unit}, data=data)
    assert ckpt is not None  # a path input
    ckpt.outputs = [*(p for p in (tpath, out) if p is not None), *(p for p, _ in extra)]
    saved = ckpt.load()
    committed = ckpt.committed() if saved is not None else set()

    def is_done(p: Path) -> bool:
        return Path(os.path.abspath(p)) in committed

    for p, what in ((out, "output"), (tpath, "transforms file"),
                    *((p, "output") for p, _ in extra)):
        if p is not None and os.path.lexists(p) and not overwrite and not is_done(p):
            raise DeepAlignError(f"{p}: {what} already exists; pass --overwrite (API: "
                                 "overwrite=True) or choose another name.")
    if not is_done(out):  # another run's unfinished store: its own
        check_unfinished(out, ckpt.digest(), overwrite=overwrite)
    if is_done(out):  # put in place by this run, killed just after
        finish_store(out)
    manifest = {"version": MANIFEST_VERSION, "input": str(src), "shape": [n, h, w],
                "dtype": np.dtype(dtype).name, "options": opts_d}
    work_root = Path(work_dir).absolute() if work_dir else work_dir_for(out)
    work = _WorkDir(work_root, default=not work_dir)
    if saved is not None and is_done(out) and (tpath is None or is_done(tpath)):
        # Published before the kill: finish the side outputs, no cluster needed.
        base = result_of_checkpoint(saved, str(ckpt.path))
        if tpath is not None:
            base.transforms = TransformSet.load(tpath)
        result = DistributedResult(base.transforms, base.matches, base.timings,
                                   base.neighbour_score, base.motion, base.noise_discounted,
                                   base.outliers, base.prior_spread, base.flag_reasons,
                                   tasks=dict.fromkeys(_TASKS, 0))
        if not keep_work:
            work.remove()
        with ckpt.recording():
            for p, write in extra:
                if not is_done(p):
                    write(result)
        ckpt.remove()
        return result
    # The work folder must not be, hold or sit inside the input or the output.
    OutputPlan(overwrite=True).input(src, "INPUT").output(out, "-o", folder=True).output(
        work_root, "--work-dir", folder=True, may_exist=True).check()
    work.check(manifest, out)
    # Task keys are unique per run: after an interrupted run the scheduler may still be
    # cancelling that run's futures, and a rerun reusing their keys would be cancelled too.
    tok = f"{work.token}-{uuid.uuid4().hex[:8]}"
    counts = dict.fromkeys(_TASKS, 0)
    aligner = Aligner(opts)
    path = str(src)

    with connect(scheduler) as client:  # connected before anything is created
        from distributed import as_completed

        work.create()

        n_workers = max(1, len(client.scheduler_info().get("workers", {})))
        ahead = window if window is not None else max(8, 4 * n_workers)
        states: dict[int, Any] = {}  # z -> future of the prepared slice
        blank_futs: dict[int, Any] = {}
        pair_futs: dict[tuple[int, int, str], Any] = {}
        blank: dict[int, bool] = {}

        def state_of(z: int) -> Any:
            fut = states.get(z)
            if fut is None:
                fut = states[z] = client.submit(prepare_task, path, opts_d, z,
                                                key=f"da-prepare-{tok}-{z}")
                counts["prepare"] += 1
            return fut

        def submit_match(zr: int, zm: int, init: np.ndarray | None, priority: int) -> Any:
            counts["match"] += 1
            return client.submit(match_task, opts_d, state_of(zr), state_of(zm), init,
                                 str(work.pair_file(zr, zm, init)), priority=priority,
                                 key=f"da-match-{tok}-{zr}-{zm}-{_init_tag(init)}")

        spec_next = 0

        def speculate(upto: int) -> None:
            """Blank tests and nearest-neighbour matches of slices < upto, unless cached."""
            nonlocal spec_next
            for z in range(spec_next, min(n, upto)):
                known = work.blank(z)
                if known is None:
                    blank_futs[z] = client.submit(_is_none, state_of(z),
                                                  key=f"da-blank-{tok}-{z}")
                else:
                    blank[z] = known
                if z >= 1 and not work.pair_file(z - 1, z, None).exists():
                    pair_futs[(z - 1, z, "c")] = submit_match(z - 1, z, None, 0)
            spec_next = max(spec_next, min(n, upto))

        def match(zr: int, _sr: Any, zm: int, _sm: Any, init: np.ndarray | None
                  ) -> tuple[np.ndarray | None, Correspondences]:
            fut = pair_futs.pop((zr, zm, _init_tag(init)), None)
            if fut is None:
                hit = _load_pair(work.pair_file(zr, zm, init), init)
                if hit is not None:
                    counts["match_cached"] += 1
                    return hit
                # The client waits for this one: run it before the speculative work.
                fut = submit_match(zr, zm, init, 100)
            result: tuple[np.ndarray | None, Correspondences] = fut.result()
            fut.release()
            return result

        solver = StackMatcher(opts, match=match, shape=(h, w))
        bar = Progress(n, "estimate (dask)", progress)
        t0 = time.perf_counter()
        try:
            for z in range(n):
                speculate(z + ahead)
                if z not in blank:
                    fut = blank_futs.pop(z)
                    blank[z] = bool(fut.result())
                    fut.release()
                    work.set_blank(z, blank[z])
                solver.add(z, None if blank[z] else z)
                # Prepared slices still needed: the solver's neighbours and those ahead.
                keep = {zk for zk, _, _ in solver.history}
                for zs in [zs for zs in states if zs <= z and zs not in keep]:
                    states.pop(zs).release()
                bar.step()
                if on_progress is not None:
                    on_progress("solve", z)
        finally:
            bar.close()
            for fut in [*states.values(), *blank_futs.values(), *pair_futs.values()]:
                fut.cancel()
            states.clear()
            blank_futs.clear()
            pair_futs.clear()
        t_est = time.perf_counter() - t0
        ts, solved = aligner.solve(solver, (n, h, w))
        # The record of this run, before anything is put in place (see above).
        ckpt.save(ts.to_json(), list(solver.matches),
                  {**solver.times.seconds, "estimate": t_est},
                  measured=measured_record(AlignResult(
                      ts, [], {}, solver.neighbour_score(), solved.motion,
                      solver.noise_discounted(), list(solved.outliers), solved.prior_spread,
                      dict(solved.flag_reasons))))

        t0 = time.perf_counter()
        oh, ow = ts.output_shape
        writer = ZarrStackWriter(out, (n, oh, ow), dtype, resume=True, overwrite=overwrite,
                                 run=ckpt.digest(),
                                 voxel_size=None if physical is None else physical[0],
                                 unit=None if physical is None else physical[1])
        done = writer.completed()
        counts["render_skipped"] = len(done)
        bar = Progress(n - len(done), "render (dask)", progress)
        futs = [client.submit(render_task, path, z, ts.affines[z], (oh, ow),
                              str(writer.array_path), "linear", opts.num_threads,
                              key=f"da-render-{tok}-{z}", priority=-z)
                for z in range(n) if z not in done]
        counts["render"] = len(futs)
        try:
            for fut in as_completed(futs):  # type: ignore[no-untyped-call]
                z = int(fut.result())
                fut.release()
                writer.mark_written(z)
                bar.step()
                if on_progress is not None:
                    on_progress("render", z)
        finally:
            bar.close()
            for fut in futs:
                fut.cancel()
        # Raises (keeping .partial) if a slice is missing; the transforms file is published
        # just before the output, so neither appears without the other.
        def publish() -> None:
            ckpt.check_input()
            if transforms_path is not None:
                ts.save(transforms_path)

        with ckpt.recording():
            writer.close(before_publish=publish)
        t_render = time.perf_counter() - t0
    if not keep_work:
        work.remove()
    timings = {**solver.times.seconds, "estimate": t_est, "render": t_render,
               "total": time.perf_counter() - t_start}
    result = DistributedResult(ts, list(solver.matches), timings, solver.neighbour_score(),
                               solved.motion, solver.noise_discounted(),
                               list(solved.outliers), solved.prior_spread,
                               dict(solved.flag_reasons), tasks=counts)
    with ckpt.recording():
        for _, write in extra:
            write(result)
    ckpt.remove()
    return result
