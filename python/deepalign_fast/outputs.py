"""Output safety: sidecar names, the output plan checked before any work, locks and temp files.

Every command that writes builds one :class:`OutputPlan`: the inputs it reads and every path it
will write (image, transforms, fields, report, work folder, unfinished stores). ``check()``
resolves them all before any work starts and refuses, with one line naming the flag and path,
an output that

- is, or lies inside, an input, or contains one (symbolic links resolved, hard links detected);
- collides with another output (same path, or one inside the other);
- already exists, unless ``--overwrite``;
- cannot be written (its folder is read-only, not a folder, or not creatable).

:func:`output_lock` takes an exclusive lock per output (``.NAME.deepalign.lock`` beside it,
``flock``), so two runs on one output cannot interleave: the second is refused at once.
Temporary files (:func:`create_temp`) have unpredictable names, are created exclusively without
following symbolic links, in the output's folder, and a later run on the same output (holding
its lock) removes the ones an earlier, killed run left (:func:`remove_stale_temps`).

Every finished output is put in place by :func:`publish` (a rename). While a run records its
outputs (:meth:`Checkpoint.recording`), ``publish`` first notes in the run's resume record
which file or folder (device, inode; for a file its size and modification time, for a store
those of its top-level metadata files) is about to appear under which name; a rerun of the
same command then knows which outputs that run already put in place
(:meth:`Checkpoint.committed`), accepts them without ``--overwrite`` and writes only the missing
ones, so the outputs of one run are completed as a unit. A file or store at an output name that
the run did not put there is still refused.

Zarr stores (``--overwrite`` over a ``.zarr`` output, an unfinished ``NAME.partial``) are
replaced or deleted only when :func:`store_problem` finds no reason against it: the folder is a
Zarr store whose top-level metadata carries this tool's mark (:data:`STORE_MARK`, written by
every store this tool creates) and it holds nothing but Zarr data. A folder of the user's that
merely ends in ``.zarr`` is never deleted.

Sidecar names are decided here only: :func:`transforms_path_for` and :func:`fields_path_for`.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._errors import DeepAlignError, EnvironmentFailure, InputChanged

__all__ = [
    "Checkpoint",
    "EnvironmentFailure",
    "FIELDS_LEFT",
    "OutputPlan",
    "PROGRESS_FILE",
    "STORE_MARK",
    "checkpoint_path_for",
    "committed_outputs",
    "TEMP_TAG",
    "create_temp",
    "os_error",
    "fields_path_for",
    "output_lock",
    "partial_path_for",
    "progress_temps",
    "publish",
    "remove_stale_locks",
    "remove_stale_temps",
    "remove_zarr_temps",
    "replace_store",
    "replaced_path_for",
    "store_being_created",
    "store_mark",
    "store_problem",
    "transforms_path_for",
    "work_dir_for",
    "write_atomic",
]

#: Part of every temporary name this tool creates (``.NAME.deepalign-<random>.tmp``).
TEMP_TAG = ".deepalign-"

_STACK_SUFFIXES = (".tif",)  # stripped from the output name for the sidecars (see below)


def transforms_path_for(output: str | os.PathLike[str]) -> Path:
    """Default transforms file of an aligned stack.

    ``NAME.tif`` gives ``NAME.transforms.json``; every other output keeps its full name,
    e.g. ``NAME.ome.zarr.transforms.json``, ``NAME.tiff.transforms.json``, so two outputs never
    share one transforms file (``x.tif`` and ``x.ome.zarr`` used to).
    """
    p = Path(output)
    name = p.name
    for suffix in _STACK_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return p.with_name(name + ".transforms.json")


def fields_path_for(transforms: str | os.PathLike[str]) -> Path:
    """Displacement-field store of a transforms file: ``NAME.transforms.json`` ->
    ``NAME.fields.zarr`` (``NAME.json`` -> ``NAME.fields.zarr``; any other name gets
    ``.fields.zarr`` appended)."""
    p = Path(transforms)
    name = p.name
    for suffix in (".transforms.json", ".json"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return p.with_name(name + ".fields.zarr")


#: What :meth:`OutputPlan.leftover` says of a field store beside the transforms file of an
#: affine run: an earlier refining run's, which the new transforms do not use.
FIELDS_LEFT = "the field store of an earlier elastic or expected-affine run"


def partial_path_for(output: str | os.PathLike[str]) -> Path:
    """Where an unfinished (resumable) Zarr output or field store is kept: ``NAME.partial``."""
    p = Path(output)
    return p.with_name(p.name + ".partial")


def work_dir_for(output: str | os.PathLike[str]) -> Path:
    """Default work folder of a distributed run: ``NAME.work``."""
    p = Path(output)
    return p.with_name(p.name + ".work")


# --------------------------------------------------------------------------------------------
# Zarr stores this tool wrote
# --------------------------------------------------------------------------------------------

#: Attribute in the top-level metadata (``.zattrs``, or ``zarr.json`` ``attributes``) of every
#: Zarr store this tool writes; only a store carrying it is ever replaced (``--overwrite``).
STORE_MARK = "deepalign_fast"

#: The progress record of an unfinished Zarr output (``NAME.partial/deepalign_progress.json``).
PROGRESS_FILE = "deepalign_progress.json"

_ZARR_METADATA = (".zgroup", ".zarray", "zarr.json")
_PROGRESS_TEMP = re.compile(rf"\.{re.escape(PROGRESS_FILE)}\.tmp-\d+-\d+")
# Zarr writes each file through a temporary ``NAME.<32 hex>.partial`` and renames it.
_ZARR_TEMP = re.compile(r".+\.[0-9a-f]{32}\.partial")
_ZARR_METADATA_TEMP = re.compile(r"(\.zgroup|\.zattrs|\.zarray|zarr\.json)\.[0-9a-f]{32}\.partial")
# Files a store of this tool may hold: Zarr metadata, chunks (v2 "0.1.2" or nested digits, v3
# "c/0/1/2"), Zarr's own temporary files, the progress record and this tool's temporary files
# (and an apply's run record, in IMAGE/labels).
_STORE_FILE = re.compile(r"\.zgroup|\.zarray|\.zattrs|\.zmetadata|zarr\.json|\d+(\.\d+)*"
                         r"|\..+\.deepalign\.resume\.json"
                         rf"|{_ZARR_TEMP.pattern}"
                         rf"|{re.escape(PROGRESS_FILE)}|{_PROGRESS_TEMP.pattern}"
                         rf"|\..+{re.escape(TEMP_TAG)}[0-9a-f]{{16}}\.tmp")


def store_mark() -> dict[str, Any]:
    """The value of :data:`STORE_MARK` in a new store's top-level attributes."""
    return {"writer": "deepalign-fast"}


def _store_attrs(path: Path) -> dict[str, Any]:
    """Top-level attributes of a Zarr v2 (``.zattrs``) or v3 (``zarr.json``) store."""
    for name, key in ((".zattrs", None), ("zarr.json", "attributes")):
        try:
            data = json.loads((path / name).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            continue
        if isinstance(data, dict) and key is not None:
            data = data.get(key)
        if isinstance(data, dict):
            return data
    return {}


def remove_zarr_temps(store: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files Zarr left anywhere in ``store`` (a killed write's: the
    file it was writing is missing or whole, never half-written); returns them."""
    removed = []
    for root, _, files in os.walk(store):
        for name in files:
            if _ZARR_TEMP.fullmatch(name):
                path = Path(root, name)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed.append(path)
    return removed


def progress_temps(folder: str | os.PathLike[str]) -> list[Path]:
    """The temporary files of the progress record (:data:`PROGRESS_FILE`) at the top of
    ``folder`` that a killed writer left."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return [Path(folder, n) for n in names if _PROGRESS_TEMP.fullmatch(n)]


def store_being_created(path: str | os.PathLike[str]) -> bool:
    """Whether the folder ``path`` (an unfinished store, ``NAME.partial``) holds nothing a
    run wrote but metadata: a store stopped while being created, before its progress record
    (:data:`PROGRESS_FILE`) and any slice. Zarr writes a group's metadata files in parallel,
    so the mark (in ``.zattrs``) may be missing, or the folder empty. Nothing there is worth
    keeping; the writer makes it again."""
    p = Path(path)
    if p.is_symlink() or not p.is_dir():
        return False
    for root, dirs, files in os.walk(p):
        if any(Path(root, d).is_symlink() for d in dirs):
            return False
        for name in files:
            if name not in (*_ZARR_METADATA, ".zattrs") and not (
                    _PROGRESS_TEMP.fullmatch(name) or _ZARR_METADATA_TEMP.fullmatch(name)):
                return False
            if Path(root, name).is_symlink():
                return False
    return True


def store_problem(path: str | os.PathLike[str], *, unfinished: bool = False) -> str | None:
    """Why the folder ``path`` must not be replaced or deleted as a Zarr store of this tool,
    or None when it may.

    It may when it is a folder (not a symbolic link) with Zarr metadata at its top that
    carries :data:`STORE_MARK` (``unfinished=True``: or the progress record of an unfinished
    output, :data:`PROGRESS_FILE`, or nothing but metadata: :func:`store_being_created`), and
    holds only Zarr files and this tool's own (no symbolic links, nothing else anywhere
    inside).
    """
    p = Path(path)
    if p.is_symlink() or not p.is_dir():
        return "is not a folder"
    if unfinished and store_being_created(p):
        return None
    try:
        top = set(os.listdir(p))
    except OSError as exc:
        return f"cannot be listed ({exc.strerror or exc})"
    if not top & set(_ZARR_METADATA):
        return "is not a Zarr store (no .zgroup, .zarray or zarr.json at its top)"
    if STORE_MARK not in _store_attrs(p) and not (unfinished and PROGRESS_FILE in top):
        return (f"is a Zarr store that deepalign-fast did not write (no {STORE_MARK!r} mark in "
                "its metadata)")
    for root, dirs, files in os.walk(p):
        for name in [*dirs, *files]:
            entry = Path(root, name)
            if entry.is_symlink():
                return f"holds a symbolic link, {entry.relative_to(p)}"
        for name in files:
            if _LOCK_FILE.fullmatch(name):  # this tool's lock (an apply into labels/ killed)
                if _lock_held(Path(root, name)):
                    return (f"is being written by another deepalign-fast run (it holds "
                            f"{Path(root, name).relative_to(p)})")
                continue
            if not _STORE_FILE.fullmatch(name):
                return f"holds {Path(root, name).relative_to(p)}, which is not Zarr data"
    return None


_LOCK_FILE = re.compile(r"\..+\.deepalign\.lock")


def _lock_held(path: Path) -> bool:
    """Whether a live process holds the lock file ``path`` (:func:`output_lock`)."""
    try:
        fd = os.open(path, _LOCK_FLAGS)
    except OSError:
        return False  # gone, or not a plain file: nobody holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


# --------------------------------------------------------------------------------------------
# Temp files and locks
# --------------------------------------------------------------------------------------------


def create_temp(final: str | os.PathLike[str], suffix: str = ".tmp") -> tuple[int, Path]:
    """Create a new, empty temporary file for ``final`` in its folder.

    The name is ``.NAME.deepalign-<16 random hex>SUFFIX``; the file is created with
    ``O_CREAT | O_EXCL | O_NOFOLLOW`` (a planted file or symbolic link is never opened).

    Returns
    -------
    (int, pathlib.Path)
        An open read-write descriptor and the path. The caller closes and renames or deletes.
    """
    final = Path(final)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | \
        getattr(os, "O_CLOEXEC", 0)
    for _ in range(16):
        tmp = final.with_name(f".{final.name}{TEMP_TAG}{secrets.token_hex(8)}{suffix}")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
        except OSError as exc:
            raise os_error(exc, final, "cannot create a temporary file beside it") from exc
    raise EnvironmentFailure(f"{final}: cannot create a unique temporary file in its folder")


def write_atomic(path: str | os.PathLike[str], data: str | bytes, *,
                 doing: str = "cannot write the file") -> None:
    """Write ``data`` (text as UTF-8) to ``path`` atomically: an exclusive temp file beside it
    (:func:`create_temp`), fsync, rename. OS errors become one-line messages (``doing``); on
    any failure the temp file is removed and ``path`` is untouched."""
    path = Path(path)
    fd, tmp = create_temp(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        publish(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise os_error(exc, path, doing) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


_RECORDING: contextvars.ContextVar[Checkpoint | None] = contextvars.ContextVar(
    "deepalign_recording", default=None)


def publish(staged: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
    """Rename the finished ``staged`` file or ``.partial`` store to ``final`` (replacing a
    file there), the one way outputs are put in place.

    While a run records its outputs (:meth:`Checkpoint.recording`) and ``final`` is one of
    them, what is about to appear is noted in the run's record first, so that a kill right
    after the rename still leaves the output known as this run's (module docstring).
    """
    record = _RECORDING.get()
    if record is not None:
        record.committing(Path(final), Path(staged))
    os.replace(staged, final)


def replaced_path_for(final: str | os.PathLike[str]) -> Path:
    """Where :func:`replace_store` keeps the store it replaces until the new one is in place:
    ``.NAME.deepalign-replaced`` beside it."""
    p = Path(final)
    return p.with_name(f".{p.name}{TEMP_TAG}replaced")


def _remove_tree(path: Path) -> None:
    """Delete ``path``: a folder with what it holds; a file or a symbolic link itself (never
    followed)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def replace_store(staged: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
    """Put the finished store (a folder) ``staged`` in place of an older one at ``final``.

    The older store is first renamed aside (:func:`replaced_path_for`, one atomic rename),
    then ``staged`` is renamed to ``final`` (:func:`publish`), then the older store is
    deleted. Killed at any moment, ``final`` is the older store whole, absent (the new one
    still staged, its run's resume point), or the new store whole: never a store half
    deleted (deleting the older store in place first left one that every rerun refused).
    What is left aside is removed by the next run on ``final`` (:func:`remove_stale_temps`).
    """
    final = Path(final)
    aside = replaced_path_for(final)
    if os.path.lexists(aside):  # an earlier run killed while replacing
        _remove_tree(aside)
    if os.path.lexists(final):
        os.rename(final, aside)
    publish(staged, final)
    if os.path.lexists(aside):
        _remove_tree(aside)


def remove_stale_temps(*finals: str | os.PathLike[str]) -> list[Path]:
    """Delete temporary files an earlier run left for each of ``finals`` (call while holding
    their lock).

    Only regular files (or symbolic links, which are unlinked, never followed) named
    ``.NAME.deepalign-*`` in a final's folder are removed, excluding the lock file, and the
    temporary files of the run's hidden side files (``..NAME.deepalign.*.deepalign-*``: its
    resume record and matches, written atomically too); and the older store a run killed
    while replacing it left aside (:func:`replace_store`). Each folder is listed once.
    """
    by_folder: dict[Path, set[str]] = {}
    for final in map(Path, finals):
        by_folder.setdefault(final.parent, set()).add(final.name)
    removed: list[Path] = []
    for folder, names in by_folder.items():
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        aside = {replaced_path_for(n).name for n in names}
        for entry in entries:
            if entry.name in aside:
                with contextlib.suppress(FileNotFoundError):
                    _remove_tree(Path(entry.path))
                    removed.append(Path(entry.path))
                continue
            if entry.name.endswith(".lock") or not _temp_of(entry.name, names):
                continue
            if entry.is_symlink() or entry.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def _temp_of(entry: str, names: set[str]) -> bool:
    """Whether the file name ``entry`` is a temporary file of one of the outputs ``names``
    (see :func:`remove_stale_temps`)."""
    if entry.startswith("..") and ".deepalign." in entry:
        name, _, rest = entry[2:].partition(".deepalign.")
        if name in names and TEMP_TAG in rest:
            return True
    if entry.startswith(".") and TEMP_TAG in entry:
        return entry[1:entry.index(TEMP_TAG)] in names
    return False


# A lock file is opened for reading and writing, never through a symbolic link.
_LOCK_FLAGS = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def remove_stale_locks(outputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Delete the lock files of ``outputs`` that no process holds (a killed run's: the kernel
    released its lock, the file stayed), and that run's temporary files; a held lock, a
    symbolic link or anything but a regular file is left alone. Returns the lock files
    removed."""
    removed: list[Path] = []
    for out in outputs:
        path = _lock_path(Path(out))
        try:
            fd = os.open(path, _LOCK_FLAGS)
        except OSError:
            continue  # none, a symbolic link, or not ours to open
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if stat.S_ISREG(os.fstat(fd).st_mode) and os.path.samestat(
                    os.fstat(fd), os.stat(path, follow_symlinks=False)):
                remove_stale_temps(out)  # the killed run's too, while its lock is held here
                os.unlink(path)
                removed.append(path)
        except OSError:
            pass  # held by a running process (or gone meanwhile): not stale
        finally:
            os.close(fd)
    return removed


def _lock_path(output: Path) -> Path:
    full = Path(os.path.abspath(output))
    if not full.name:
        raise DeepAlignError(f"{output}: names no file or folder (the file system's root); "
                             "name the output.")
    return full.with_name(f".{full.name}.deepalign.lock")


_HELD: dict[Path, list[Any]] = {}  # resolved output -> [fd, lock path, depth]


@contextlib.contextmanager
def output_lock(outputs: Sequence[str | os.PathLike[str]]) -> Iterator[None]:
    """Hold an exclusive lock on each output for the duration of a ``with`` block.

    The lock is ``flock`` on ``.NAME.deepalign.lock`` beside the output, so the kernel releases
    it when the process dies (no stale locks); the file is removed on exit. A second run on the
    same output is refused at once with a message naming the output and the holder's pid.
    Re-entrant within one process (the CLI locks, then the API it calls locks again). On first
    acquisition the temporary files an earlier, killed run left for the output are removed.
    """
    taken: list[Path] = []
    try:
        for out in outputs:
            key = _resolve(Path(out))
            if key in _HELD:
                _HELD[key][2] += 1
            else:
                full = Path(os.path.abspath(out))  # ("." has a name only so)
                fd, path = _acquire(full)
                _HELD[key] = [fd, path, 1]
                remove_stale_temps(full)
            taken.append(key)
        yield
    finally:
        for key in reversed(taken):
            entry = _HELD[key]
            entry[2] -= 1
            if entry[2] == 0:
                del _HELD[key]
                with contextlib.suppress(OSError):
                    os.unlink(entry[1])
                os.close(entry[0])


def _flock_soon(fd: int) -> None:
    """``flock(LOCK_EX)`` without waiting for a run, but past a moment's hold: another
    command checking whether the lock is live (:func:`_lock_held`) holds it for
    microseconds. Raises BlockingIOError when it stays held."""
    for _ in range(4):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            time.sleep(0.02)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _acquire(output: Path) -> tuple[int, Path]:
    path = _lock_path(output)
    for _ in range(20):
        try:
            fd = os.open(path, _LOCK_FLAGS | os.O_CREAT, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise DeepAlignError(f"{path}: the lock file is a symbolic link; remove it."
                                     ) from exc
            raise os_error(exc, output, "cannot create its lock file") from exc
        try:
            _flock_soon(fd)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            finally:
                os.close(fd)
            raise DeepAlignError(
                f"{output}: another deepalign-fast run (pid {holder}) is writing this output; "
                "wait for it to finish or choose another output name.") from None
        # The holder may have removed the file between our open and flock: retry on a new one.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
        except FileNotFoundError:
            same = False
        if same:
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            except OSError as exc:  # (a full disk: the lock we made must not stay behind)
                with contextlib.suppress(OSError):
                    os.unlink(path)
                os.close(fd)
                raise os_error(exc, output, "cannot write its lock file") from exc
            return fd, path
        os.close(fd)
    raise EnvironmentFailure(f"{path}: could not take the output lock")


# --------------------------------------------------------------------------------------------
# Errors from the operating system
# --------------------------------------------------------------------------------------------

_ERRNO_HINTS = {
    errno.ENOSPC: "the disk is full; free space or write elsewhere",
    errno.EDQUOT: "the disk quota is exceeded; free space or write elsewhere",
    errno.EROFS: "the file system is read-only; write elsewhere",
    errno.EACCES: "permission denied; check the folder's permissions or write elsewhere",
    errno.EPERM: "operation not permitted (immutable or protected file?); write elsewhere",
    errno.ENOENT: "no such file or folder",
    errno.ENOTDIR: "a part of the path is not a folder",
    errno.EISDIR: "it is a folder",
    errno.ENAMETOOLONG: "the name is too long",
    errno.EIO: "input/output error from the device",
}


# ... where the failing operation reads an input rather than writes an output
_READ_HINTS = {**_ERRNO_HINTS,
               errno.EACCES: "permission denied; check the permissions of the file and of "
                             "the folders above it",
               errno.EPERM: "operation not permitted"}


# numpy's ndarray.tofile (under tifffile) reports a short write without an errno
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")


def _nearly_full(path: str | os.PathLike[str]) -> bool:
    """Whether the file system of ``path`` has less than 64 MiB free (or cannot say)."""
    import shutil

    folder = Path(os.path.abspath(path))
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free < 64 * 2**20
    except OSError:
        return True


def os_error(exc: OSError, path: str | os.PathLike[str] | None, doing: str = "", *,
             reading: bool = False) -> DeepAlignError:
    """One-line error for an ``OSError``: bad input (missing file, wrong kind) or an
    :class:`EnvironmentFailure` (full disk, read-only, permissions, I/O error). ``reading``:
    the operation read an input (the hints say so)."""
    where = path if path is not None else (exc.filename or "?")
    hints = _READ_HINTS if reading else _ERRNO_HINTS
    if exc.errno is None and _SHORT_WRITE.search(str(exc)):
        # numpy's short write: the disk filled up, a quota, or the device failed
        exc = OSError(errno.ENOSPC, str(exc))
        hints = hints if _nearly_full(where) else {
            errno.ENOSPC: "the write stopped short: the disk quota is exceeded or the device "
                          "failed (the disk has space left); check the quota, or write "
                          "elsewhere"}
    hint = hints.get(exc.errno or 0, exc.strerror or str(exc))
    text = f"{where}: {doing}: {hint}" if doing else f"{where}: {hint}"
    if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG):
        return DeepAlignError(text)
    return EnvironmentFailure(text)


# --------------------------------------------------------------------------------------------
# The output plan
# --------------------------------------------------------------------------------------------


@dataclass
class _Out:
    path: Path
    flag: str
    folder: bool
    may_exist: bool
    store: bool = False


@dataclass
class OutputPlan:
    """Inputs and outputs of one command, checked together before any work (module docstring).

    Parameters
    ----------
    overwrite : bool
        Existing outputs may be replaced (only once the new ones are complete).
    overwrite_flag : str
        How the caller names the permission in messages (``"--overwrite"`` for the CLI).
    resumes : path, optional
        The main output of a command that can finish an interrupted run (``align``).
    """

    overwrite: bool = False
    overwrite_flag: str = "--overwrite"
    inputs: list[tuple[Path, str]] = field(default_factory=list)
    outputs: list[_Out] = field(default_factory=list)
    #: An output whose resume record (:func:`checkpoint_path_for`) is checked: existing
    #: outputs that an interrupted run put in place are accepted, for the command to finish
    #: the run (it checks that the run is the same before relying on them).
    resumes: Path | None = None
    #: Paths that must not exist (a file of an earlier run the command would leave beside
    #: its new outputs, taken for one of them), with what they are.
    leftovers: list[tuple[Path, str]] = field(default_factory=list)

    def input(self, path: str | os.PathLike[str] | None, flag: str) -> OutputPlan:
        """Add an input (file or folder) the command reads; None is ignored."""
        if path is not None:
            self.inputs.append((Path(path), flag))
        return self

    def output(self, path: str | os.PathLike[str] | None, flag: str, *, folder: bool = False,
               may_exist: bool = False, store: bool = False) -> OutputPlan:
        """Add a path the command writes; ``folder``: a directory (Zarr store, work folder);
        ``may_exist``: an existing one is reused, not replaced (a resume point); ``store``: a
        Zarr store, of which an existing one is replaced (``--overwrite``), reused or deleted
        only when this tool wrote it (:func:`store_problem`).

        Raises
        ------
        DeepAlignError
            ``path`` has no name of its own (``.``, ``..``, the root).
        """
        if path is not None:
            if os.path.basename(os.path.normpath(path)) in ("", ".", ".."):
                raise DeepAlignError(f"{path}: {_flag_text(flag)}names a folder without a name "
                                     "of its own; name the output (e.g. "
                                     f"{Path(path) / 'aligned'}).")
            self.outputs.append(_Out(Path(path), flag, folder, may_exist, store))
        return self

    def leftover(self, path: str | os.PathLike[str], what: str) -> OutputPlan:
        """Refuse the plan while ``path`` exists: ``what`` it is (an earlier run's file the
        command would leave beside its new outputs, e.g. a field store beside new affine
        transforms). Neither ``overwrite`` nor a resume accepts it: the command does not
        write it, so it does not replace or remove it either."""
        self.leftovers.append((Path(path), what))
        return self

    def check(self) -> None:
        """Refuse the plan (see the module docstring) before any work; creates nothing.
        A refused plan removes the lock files that killed runs left beside its outputs
        (:func:`remove_stale_locks`): the run that would have removed them does not start.

        Raises
        ------
        DeepAlignError
            An output is or touches an input, collides with another output, or exists
            without ``overwrite``.
        EnvironmentFailure
            An output's folder cannot be written.
        """
        try:
            self._check()
        except DeepAlignError:
            remove_stale_locks(self.primary())
            raise

    def _check(self) -> None:
        ins = [(p, flag, _resolve(p)) for p, flag in self.inputs]
        for p, flag, r in ins:
            if not os.path.lexists(p):
                raise DeepAlignError(f"{p}: {_flag_text(flag)}does not exist")
            del r
        seen: list[tuple[_Out, Path]] = []
        done = committed_outputs(self.resumes) if self.resumes is not None else set()
        for out in self.outputs:
            r = _resolve(out.path)
            if os.path.islink(out.path):
                raise DeepAlignError(
                    f"{out.path}: {_flag_text(out.flag)}is a symbolic link (to "
                    f"{os.readlink(out.path)}); name the real destination instead.")
            for ip, iflag, ir in ins:
                self._check_against_input(out, r, ip, iflag, ir)
            _check_not_in_store(out.path, r, out.flag)
            for other, ro in seen:
                if r == ro or r.is_relative_to(ro) or ro.is_relative_to(r):
                    raise DeepAlignError(
                        f"{out.path}: {_flag_text(out.flag)}collides with "
                        f"{_flag_text(other.flag)}{other.path}; give them different names.")
            seen.append((out, r))
            if os.path.lexists(out.path) and not out.may_exist and \
                    Path(os.path.abspath(out.path)) not in done:
                if not self.overwrite:
                    raise DeepAlignError(
                        f"{out.path}: {_flag_text(out.flag)}already exists; pass "
                        f"{self.overwrite_flag} to replace it, or choose another name.")
                if out.folder != out.path.is_dir():
                    kind = "a folder" if out.path.is_dir() else "a file"
                    raise DeepAlignError(f"{out.path}: {_flag_text(out.flag)}exists and is "
                                         f"{kind}; {self.overwrite_flag} does not replace it. "
                                         "Remove it or choose another name.")
                why = store_problem(out.path) if out.store else None
                if why is not None:
                    raise DeepAlignError(
                        f"{out.path}: {_flag_text(out.flag)}exists and {why}; "
                        f"{self.overwrite_flag} replaces only a Zarr store written by "
                        "deepalign-fast. Remove it yourself or choose another name.")
            elif os.path.lexists(out.path) and out.store:
                why = store_problem(out.path, unfinished=True)
                if why is not None:
                    raise DeepAlignError(
                        f"{out.path}: {_flag_text(out.flag)}exists and {why}, so it is not "
                        "an unfinished output of deepalign-fast; remove it or choose another "
                        "name.")
            _check_writable(out.path, out.flag)
        for path, what in self.leftovers:
            if os.path.lexists(path):
                raise DeepAlignError(f"{path}: {what}; this run would leave it beside its "
                                     "new outputs. Remove it or choose another name.")

    def _check_against_input(self, out: _Out, r: Path, ip: Path, iflag: str, ir: Path) -> None:
        what = _flag_text(out.flag)
        if r == ir or _same_file(out.path, ip):
            raise DeepAlignError(f"{out.path}: {what}is the input {ip}; write it to another "
                                 "name so the input stays unchanged.")
        if r.is_relative_to(ir):
            raise DeepAlignError(f"{out.path}: {what}lies inside the input {ip}; write it "
                                 "elsewhere so the input stays unchanged.")
        if ir.is_relative_to(r):
            raise DeepAlignError(f"{out.path}: {what}contains the input {ip}; replacing it "
                                 "would delete the input. Write it elsewhere.")
        if ip.is_dir() and out.path.is_file() and os.stat(out.path).st_nlink > 1 \
                and _hardlinked_into(out.path, ip):
            raise DeepAlignError(f"{out.path}: {what}is a hard link to a file of the input "
                                 f"{ip}; write it elsewhere.")

    def prepare(self, created: list[Path] | None = None) -> list[Path]:
        """Create the outputs' missing parent folders (after :meth:`check`); returns those it
        created, outermost first (appended to ``created`` as they are made, if given)."""
        created = [] if created is None else created
        for out in self.outputs:
            missing = []
            parent = out.path.parent
            while not os.path.lexists(parent) and parent != parent.parent:
                missing.append(parent)
                parent = parent.parent
            for folder in reversed(missing):
                try:
                    folder.mkdir()
                except FileExistsError:
                    continue
                except OSError as exc:
                    raise os_error(exc, out.path, "cannot create its folder") from exc
                created.append(folder)
        return created

    @contextlib.contextmanager
    def prepared(self) -> Iterator[None]:
        """:meth:`prepare` for the block; when the block fails (an error or an interruption),
        the folders it created that are still empty are removed again, innermost first (a
        folder that holds anything, e.g. a resume checkpoint, stays). Enter it before the
        lock, so that the lock files are gone when it cleans up."""
        created: list[Path] = []
        try:
            self.prepare(created)
            yield
        except BaseException:
            for folder in reversed(created):
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only when empty
            raise

    def primary(self) -> list[Path]:
        return [o.path for o in self.outputs]


def _check_not_in_store(path: Path, resolved: Path, flag: str) -> None:
    """Refuse an output inside a Zarr store this tool wrote (such a store is replaced or
    deleted whole, and a foreign file inside it blocks that), except an NGFF label image
    ``IMAGE/labels/NAME``, which belongs there. Other Zarr hierarchies are the user's to
    organise (``project.zarr/aligned.ome.zarr``)."""
    def is_store(folder: Path) -> bool:
        return any(os.path.isfile(folder / name) for name in _ZARR_METADATA)

    if resolved.parent.name == "labels" and is_store(resolved.parent.parent):
        return  # (its own checks: io.label_target)
    for store in resolved.parents:
        if not is_store(store) or STORE_MARK not in _store_attrs(store):
            continue
        raise DeepAlignError(f"{path}: {_flag_text(flag)}lies inside the Zarr store {store}; "
                             "write it elsewhere (a store is replaced whole, and a file of "
                             "another kind inside it would stop that).")


def _flag_text(flag: str) -> str:
    return f"({flag}) " if flag else ""


def _resolve(p: Path) -> Path:
    try:
        return p.resolve()
    except (OSError, RuntimeError):  # symlink loop
        return p.absolute()


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _hardlinked_into(path: Path, folder: Path) -> bool:
    """True when ``path`` is a hard link to a file directly in ``folder`` (a slice folder)."""
    try:
        st = os.stat(path)
        for entry in os.scandir(folder):
            if entry.is_file(follow_symlinks=True):
                est = entry.stat()
                if (est.st_dev, est.st_ino) == (st.st_dev, st.st_ino):
                    return True
    except OSError:
        return False
    return False


def _check_writable(path: Path, flag: str) -> None:
    """The nearest existing ancestor folder must accept a new file (probed, then removed)."""
    parent = path.parent
    while not parent.exists():
        if parent.is_symlink():  # dangling link in the path
            raise DeepAlignError(f"{path}: {_flag_text(flag)}its folder {parent} is a broken "
                                 "symbolic link.")
        parent = parent.parent
    if not parent.is_dir():
        raise DeepAlignError(f"{path}: {_flag_text(flag)}{parent} is not a folder.")
    # Named after the output (or its first missing folder), one of its temporary names: a
    # run killed between creating and removing it leaves an empty file that the next run on
    # the output removes (here, or with the output's temporary files).
    probe = parent / f".{path.relative_to(parent).parts[0]}.deepalign-probe"
    with contextlib.suppress(OSError):
        if probe.is_file() and not probe.is_symlink() and probe.stat().st_size == 0:
            probe.unlink()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        try:
            fd = os.open(probe, flags, 0o600)
        except FileExistsError:  # another run probing this folder now
            probe = probe.with_name(f"{probe.name}-{secrets.token_hex(8)}")
            fd = os.open(probe, flags, 0o600)
    except OSError as exc:
        raise os_error(exc, path, f"{_flag_text(flag)}cannot write into {parent}") from exc
    os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(probe)
    if path.exists() and not path.is_dir():
        mode = os.stat(path).st_mode
        if stat.S_ISREG(mode) and not os.access(path, os.W_OK) and \
                not os.access(parent, os.W_OK):
            raise EnvironmentFailure(f"{path}: {_flag_text(flag)}cannot be replaced "
                                     "(permission denied).")


# --------------------------------------------------------------------------------------------
# Resume: the estimation checkpoint of one output
# --------------------------------------------------------------------------------------------


def checkpoint_path_for(output: str | os.PathLike[str]) -> Path:
    """``.NAME.deepalign.resume.json`` beside the output (kept until the output is published)."""
    p = Path(output)
    return p.with_name(f".{p.name}.deepalign.resume.json")


def _input_files(path: Path, data: Sequence[Path] | None = None
                 ) -> dict[str, tuple[int, int]]:
    """Size and modification time of the file ``path`` (key ""), or of every file in the
    folder (a folder of slices, a Zarr store), keyed by relative path; ``data``: only these
    files and folders in it (:meth:`~deepalign_fast.io.StackReader.data_paths`: a folder's
    slices, a Zarr group's array; a log file the microscope writes beside them is not the
    input)."""
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        return {"": (st.st_size, st.st_mtime_ns)}
    found: dict[str, tuple[int, int]] = {}
    for top in (path,) if data is None else data:
        walked = os.walk(top) if os.path.isdir(top) else [(os.path.dirname(top) or ".", [],
                                                            [os.path.basename(top)])]
        for folder, dirs, files in walked:
            dirs.sort()
            for name in sorted(files):
                full = os.path.join(folder, name)
                try:
                    fst = os.stat(full)
                except OSError:  # vanished while listed: the listing still differs
                    continue
                found[os.path.relpath(full, path)] = (fst.st_size, fst.st_mtime_ns)
    return found


def _input_identity(path: Path, files: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """What must be unchanged for a checkpoint to apply: the resolved path, and the size and
    modification time of the file, or of every file it reads in the folder (``files``, of
    :func:`_input_files`; one slice or chunk replaced in place changes it; a digest keeps the
    key short). The stack's shape is compared by the caller."""
    ident: dict[str, Any] = {"path": str(path.resolve())}
    if "" in files:
        size, mtime = files[""]
        ident.update(size=size, mtime_ns=mtime)
        return ident
    digest = hashlib.sha256()
    for rel, (size, mtime) in files.items():
        digest.update(f"{rel}\0{size}\0{mtime}\n".encode("utf-8", "surrogateescape"))
    ident["files"] = digest.hexdigest()
    return ident


def _changed_file(source: Path, before: dict[str, tuple[int, int]],
                  now: dict[str, tuple[int, int]]) -> str:
    """The first file of ``source`` that differs between two :func:`_input_files` listings."""
    for rel in sorted(set(before) | set(now)):
        if before.get(rel) != now.get(rel):
            what = ("was added" if rel not in before else "was removed" if rel not in now
                    else "was rewritten")
            return f"{source / rel if rel else source} {what}"
    return f"{source} was rewritten"


# Inputs of up to this many files keep their listing during a run, to name a changed one
# (about 200 bytes each); larger ones (a Zarr store of many chunks) keep the digest only.
_LISTED = 100_000


# Version of the checkpoint contents: a checkpoint of another version is ignored (the run
# starts over) rather than resumed with state it lacks (2: the matcher's neighbour scores;
# 3: transforms solved with the noise-discounted slice spacing and the 0.4 px per slice
# anatomy slope, and whether the neighbour score is noise discounted; 4: each pair's block
# correlation, by which the solve flags a slice that matched nothing it resembles).
CHECKPOINT_FORMAT = 4


def _identity(path: Path) -> dict[str, Any]:
    """What stays the same when ``path`` is renamed: device and inode, and for a file its size
    and modification time; for a folder (a Zarr store) also the inode, size and modification
    time of each metadata file at its top, since a folder's inode alone is reused at once
    by another store copied to the same name."""
    st = os.stat(path, follow_symlinks=False)
    ident: dict[str, Any] = {"dev": st.st_dev, "ino": st.st_ino}
    if not stat.S_ISDIR(st.st_mode):
        ident.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
        return ident
    metadata: dict[str, list[int]] = {}
    for name in (*_ZARR_METADATA, ".zattrs", ".zmetadata"):
        try:
            mst = os.stat(path / name, follow_symlinks=False)
        except FileNotFoundError:
            continue
        metadata[name] = [mst.st_ino, mst.st_size, mst.st_mtime_ns]
    ident["metadata"] = metadata
    return ident


def _committed_in(record: dict[str, Any]) -> set[Path]:
    found: set[Path] = set()
    entries = record.get("committed")
    for name, ident in (entries.items() if isinstance(entries, dict) else ()):
        try:
            if _identity(Path(name)) == ident:
                found.add(Path(name))
        except OSError:
            continue
    return found


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        if path.is_symlink() or not path.is_file():
            return None
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def committed_outputs(output: str | os.PathLike[str]) -> set[Path]:
    """The outputs (absolute paths) that an interrupted run on ``output`` put in place and that
    are still exactly what it put there (:meth:`Checkpoint.committed`, whatever the run)."""
    record = _read_record(checkpoint_path_for(output))
    return set() if record is None else _committed_in(record)


@dataclass
class Checkpoint:
    """The resume record of one ``align`` run: its finished estimation, saved before rendering
    starts, and the outputs it has put in place.

    A rerun of the same command (same input, unchanged, and the same options) after a kill or
    a failure during rendering loads it instead of estimating again; the output is then
    identical to an uninterrupted run. After a kill while the outputs were being put in place
    (or a report written), the rerun finds the ones already there in :meth:`committed` and
    writes only the rest. It is deleted once every output of the run is in place.

    ``outputs``: every path the run writes (set by the caller before :meth:`recording`); only
    those are recorded.
    """

    path: Path
    key: dict[str, Any]
    outputs: list[Path] = field(default_factory=list)
    #: The input, the paths its slices are read from, and their files as the run found them
    #: (:meth:`check_input`; the listing only up to _LISTED files, else its digest alone).
    source: Path | None = None
    data: list[Path] | None = None
    files: dict[str, tuple[int, int]] | None = None

    @classmethod
    def for_run(cls, source: Path | None, output: str | os.PathLike[str],
                shape: tuple[int, int, int], options: dict[str, Any],
                written: dict[str, Any] | None = None, *,
                data: Sequence[Path] | None = None) -> Checkpoint | None:
        """The checkpoint of aligning file/folder ``source`` into ``output`` (None: in-memory
        input, which cannot be resumed); ``written``: what else decides the outputs (their
        voxel size and unit), so a rerun that would write them otherwise is another run;
        ``data``: the paths in ``source`` the slices are read from (default: all of it)."""
        if source is None:
            return None
        data = None if data is None else [Path(p) for p in data]
        files = _input_files(source, data)
        key = {"format": CHECKPOINT_FORMAT, "input": _input_identity(source, files),
               "shape": [int(s) for s in shape], "options": json.loads(json.dumps(options)),
               "written": json.loads(json.dumps(written or {}))}
        return cls(checkpoint_path_for(output), key, source=Path(source), data=data,
                   files=files if len(files) <= _LISTED else None)

    def check_input(self) -> None:
        """Refuse to put outputs in place when the input changed during the run (a slice file
        replaced, added or removed; the file rewritten): slices read before and after the
        change would be mixed, under transforms of the old input.

        Raises
        ------
        InputChanged
            Naming the first changed file.
        """
        if self.source is None:
            return
        try:
            now = _input_files(self.source, self.data)
        except OSError:
            now = {}
        if _input_identity(self.source, now) != self.key["input"]:
            what = f"{self.source} was changed" if self.files is None else \
                _changed_file(self.source, self.files, now)
            self.remove()  # its estimation is of the old input
            raise InputChanged(
                f"{what} while the run read it; nothing was put in place under the outputs' "
                "names. Rerun once the input is complete and unchanged.")

    def digest(self) -> str:
        """A short digest of :attr:`key` (the input, the options, what else decides the
        outputs): names this run in the unfinished store it writes
        (:class:`~deepalign_fast.io.ZarrStackWriter` ``run``)."""
        text = json.dumps(self.key, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def load(self) -> dict[str, Any] | None:
        """The saved estimation (``transforms``, ``matches``, ``timings``, ``measured``) when
        it belongs to this run, else None (a checkpoint of another input or other options is
        ignored and replaced by the next :meth:`save`)."""
        data = _read_record(self.path)
        if data is None or data.get("key") != self.key:
            return None
        return data if isinstance(data.get("transforms"), dict) else None

    def committed(self) -> set[Path]:
        """The outputs (absolute paths) this run has put in place, each still the very file or
        folder that was renamed there (see :func:`publish`); empty for the record of another
        run."""
        data = self.load()
        return set() if data is None else _committed_in(data)

    def begin(self, outputs: Sequence[Path], flag: str, *, overwrite: bool) -> set[Path]:
        """Start the record of a command with no estimation to resume (``apply``,
        ``make-benchmark``) that writes ``outputs`` (``flag`` names them): one that exists
        and that this run did not put in place is refused unless ``overwrite``; this run's
        record is kept (what it put in place stays noted), another's replaced. Returns the
        outputs this run has put in place (absolute paths)."""
        done = self.committed()
        for path in outputs:
            if os.path.lexists(path) and not overwrite and \
                    Path(os.path.abspath(path)) not in done:
                raise DeepAlignError(f"{path}: {_flag_text(flag)}already exists; pass "
                                     "--overwrite to replace it, or choose another name.")
        if self.load() is None:
            self.save({}, [], {})
        self.outputs = list(outputs)
        return done

    def committing(self, final: Path, staged: Path) -> None:
        """Note (atomically) that ``staged`` is about to be renamed to ``final``, when
        ``final`` is one of :attr:`outputs` and the record is this run's."""
        name = Path(os.path.abspath(final))
        if name not in {Path(os.path.abspath(p)) for p in self.outputs}:
            return

        def note(data: dict[str, Any]) -> None:
            committed = data.get("committed")
            data["committed"] = {**(committed if isinstance(committed, dict) else {}),
                                 str(name): _identity(staged)}
        self._update(note)

    def forget_outputs(self) -> None:
        """Drop the record of the outputs put in place (and of the transforms noted with
        them): a run that starts the rendering over replaces them all, and a kill before it
        puts the output in place must not leave the earlier output counted as this run's."""
        def forget(data: dict[str, Any]) -> None:
            data.pop("committed", None)
            data.pop("rendered", None)
        self._update(forget)

    def rendered(self, transforms: dict[str, Any]) -> None:
        """Note (atomically) the transforms of the output as rendered (the refinement's
        failures flagged, its fields named relative to the checkpoint's folder), just before
        the output is put in place: a rerun after that reports them, not the estimation's
        (``load()["rendered"]``), also where the run writes no transforms file."""
        self._update(lambda data: data.update(rendered=transforms))

    def _update(self, change: Callable[[dict[str, Any]], Any]) -> None:
        """Read this run's record, ``change`` it in place and write it back atomically;
        nothing where the record is another run's (or gone)."""
        data = self.load()
        if data is None:
            return
        change(data)
        write_atomic(self.path, json.dumps(data), doing="cannot save the resume checkpoint")

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Within the block, :func:`publish` notes each of :attr:`outputs` it puts in place."""
        token = _RECORDING.set(self)
        try:
            yield
        finally:
            _RECORDING.reset(token)

    def save(self, transforms: dict[str, Any], matches: list[int],
             timings: dict[str, float], measured: dict[str, Any] | None = None) -> None:
        """Write atomically (exclusive temp file + rename). ``measured``: what the estimation
        measured for the summary (JSON values), given back by :meth:`load` as ``measured``."""
        text = json.dumps({"key": self.key, "transforms": transforms, "matches": matches,
                           "timings": timings, "measured": measured or {}})
        write_atomic(self.path, text, doing="cannot save the resume checkpoint")

    @property
    def matches_path(self) -> Path:
        """``.NAME.deepalign.matches.npz``: the pairwise matches of an unfinished estimation."""
        return self.path.with_name(self.path.name.replace(".resume.json", ".matches.npz"))

    def save_matches(self, state: dict[str, np.ndarray]) -> None:
        """Save the matcher state of an unfinished estimation (atomically), tagged with this
        run's key so that another input or other options never reuse it."""
        fd, tmp = create_temp(self.matches_path, ".npz")
        try:
            with os.fdopen(fd, "wb") as fh:
                arrays: dict[str, Any] = {"key": np.array(json.dumps(self.key, sort_keys=True)),
                                          **state}
                np.savez(fh, **arrays)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.matches_path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise os_error(exc, self.matches_path, "cannot save the estimation checkpoint") \
                from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def load_matches(self) -> dict[str, np.ndarray] | None:
        """The matcher state saved by :meth:`save_matches` for this run, else None."""
        p = self.matches_path
        try:
            if p.is_symlink() or not p.is_file():
                return None
            with np.load(p, allow_pickle=False) as data:
                if str(data["key"]) != json.dumps(self.key, sort_keys=True):
                    return None
                return {k: np.asarray(data[k]) for k in data.files if k != "key"}
        except (OSError, ValueError, KeyError):
            return None

    def remove(self) -> None:
        for path in (self.path, self.matches_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
