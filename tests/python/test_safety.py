"""Fault injection: no command loses a user's data, every failure is one line with the right exit
status, and an interrupted run resumes to the same output.

Tiny synthetic stacks (6 slices of 96 x 96, smooth random texture with known shifts) keep each
case to about a second.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import deepalign_fast
import numpy as np
import pytest
import tifffile
from deepalign_fast import DeepAlignError, TransformSet
from deepalign_fast.cli import main
from deepalign_fast.io import open_stack, open_writer
from deepalign_fast.outputs import (
    OutputPlan,
    checkpoint_path_for,
    create_temp,
    output_lock,
    transforms_path_for,
)

ROOT = Path(__file__).resolve().parents[2]
# Child processes import the same deepalign_fast as this one (the installed package in CI, an
# in-place build during development), never a source tree without its compiled core.
_PACKAGE_PARENT = Path(deepalign_fast.__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(_PACKAGE_PARENT), str(ROOT)])}


def _stack(n: int = 6, size: int = 96, seed: int = 0) -> np.ndarray:
    import cv2

    rng = np.random.default_rng(seed)
    base = cv2.GaussianBlur((rng.random((size + 24, size + 24)) * 255).astype(np.float32),
                            (0, 0), 2.0)
    base = (base - base.min()) / (np.ptp(base) + 1e-9) * 255
    return np.stack([base[12 + z % 3: 12 + z % 3 + size, 12 - z % 2: 12 - z % 2 + size]
                     for z in range(n)]).astype(np.uint8)


@pytest.fixture
def src(tmp_path: Path) -> Path:
    path = tmp_path / "s.tif"
    tifffile.imwrite(path, _stack(), photometric="minisblack")
    return path


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry under ``folder`` with its bytes (None for folders)."""
    return {str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes())
            for p in sorted(folder.rglob("*"))}


def _one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def _align(*argv: str) -> int:
    return main(["align", *argv, "--model", "translation", "--quiet"])


# --- 1. side outputs never replace an input -------------------------------------------------


@pytest.mark.parametrize("flag", ["--transforms", "--report"])
def test_side_output_on_the_input_is_refused(src: Path, tmp_path: Path, flag: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    before = _snapshot(tmp_path)
    assert _align(str(src), "-o", str(tmp_path / "o.tif"), flag, str(src)) == 2
    line = _one_line(capsys.readouterr().err)
    assert flag in line and "s.tif" in line
    assert _snapshot(tmp_path) == before  # nothing written, nothing replaced, no stray files


def test_report_on_the_output_and_png_slice_as_transforms(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    import cv2

    folder = tmp_path / "pngs"
    folder.mkdir()
    for z, s in enumerate(_stack()):
        cv2.imwrite(str(folder / f"{z}.png"), s)
    before = _snapshot(tmp_path)
    out = tmp_path / "o.tif"
    assert _align(str(folder), "-o", str(out), "--transforms", str(folder / "0.png")) == 2
    assert "inside the input" in _one_line(capsys.readouterr().err)
    assert _align(str(folder), "-o", str(out), "--report", str(out)) == 2
    assert "collides" in _one_line(capsys.readouterr().err)
    assert _snapshot(tmp_path) == before


def test_hard_link_and_symlink_to_an_input_are_refused(src: Path, tmp_path: Path) -> None:
    os.link(src, tmp_path / "hard.tif")
    (tmp_path / "sym.tif").symlink_to(src)
    before = src.read_bytes()
    for name in ("hard.tif", "sym.tif"):
        with pytest.raises(DeepAlignError, match="is the input|symbolic link"):
            OutputPlan(overwrite=True).input(src, "INPUT").output(tmp_path / name, "-o").check()
    assert _align(str(src), "-o", str(tmp_path / "hard.tif"), "--overwrite") == 2
    assert src.read_bytes() == before


@pytest.mark.parametrize("case, words", [
    ("transforms on the input", "(transforms_path) is the input"),
    ("transforms on the output", "collides"),
    ("output inside the input folder", "lies inside the input"),
    ("transforms an existing folder", "exists and is a folder"),
    ("transforms inside a new store output", "collides"),
])
def test_the_api_checks_every_path_before_any_work(src: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch, case: str,
                                                   words: str) -> None:
    """``Aligner.align_stack`` refuses what the CLI refuses, before it estimates or writes
    anything (before, a transforms file on the input replaced the input's TIFF with JSON,
    and an output inside the input folder left a checkpoint there)."""
    from deepalign_fast.alignment import Aligner

    folder = tmp_path / "slices"
    folder.mkdir()
    for z, s in enumerate(_stack()):
        tifffile.imwrite(folder / f"{z:02d}.tif", s)
    (tmp_path / "existing").mkdir()
    stack, output, tpath = {
        "transforms on the input": (src, tmp_path / "o.tif", src),
        "transforms on the output": (src, tmp_path / "o.tif", tmp_path / "o.tif"),
        "output inside the input folder": (folder, folder / "o.tif", None),
        "transforms an existing folder": (src, tmp_path / "o.tif", tmp_path / "existing"),
        "transforms inside a new store output": (src, tmp_path / "a.zarr",
                                                 tmp_path / "a.zarr" / "t.json"),
    }[case]

    def no_estimate(*a: Any, **k: Any) -> Any:
        raise AssertionError("estimated before refusing")

    monkeypatch.setattr(Aligner, "estimate", no_estimate)
    before = _snapshot(tmp_path)
    with pytest.raises(DeepAlignError, match=words.replace("(", r"\(").replace(")", r"\)")):
        Aligner(model="translation").align_stack(stack, output, transforms_path=tpath,
                                                 overwrite=True, progress=False)
    assert _snapshot(tmp_path) == before  # the input intact, nothing written


def test_other_commands_refuse_to_overwrite_inputs(src: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import cv2

    other = tmp_path / "b.tif"
    tifffile.imwrite(other, _stack(seed=1), photometric="minisblack")
    fixed, moving = tmp_path / "f.png", tmp_path / "m.png"
    cv2.imwrite(str(fixed), _stack()[0])
    cv2.imwrite(str(moving), _stack()[1])
    bench = tmp_path / "bench"
    assert main(["make-benchmark", str(src), str(bench), "--profile", "jitter"]) == 0
    before = _snapshot(tmp_path)
    runs = [
        ["report", str(src), str(other), "-o", str(src)],
        ["register", str(fixed), str(moving), "-o", str(moving)],
        ["make-benchmark", str(bench / "misaligned.tif"), str(bench)],
        ["register", str(fixed), str(moving), "-o", str(tmp_path / "out.xyz")],
    ]
    for argv in runs:
        assert main(argv) == 2, argv
        _one_line(capsys.readouterr().err)
    assert _snapshot(tmp_path) == before


# --- 2. output plan: existing outputs, sidecars, --overwrite ---------------------------------


def test_existing_output_refused_before_any_work(src: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o.tif"
    assert _align(str(src), "-o", str(out)) == 0
    tpath = transforms_path_for(out)
    old = (out.read_bytes(), tpath.read_bytes())
    from deepalign_fast.alignment import Aligner

    def no_estimate(*a: Any, **k: Any) -> Any:
        raise AssertionError("estimated before refusing")

    monkeypatch.setattr(Aligner, "estimate", no_estimate)
    assert _align(str(src), "-o", str(out)) == 2
    line = _one_line(capsys.readouterr().err)
    assert "--overwrite" in line and "overwrite=True" not in line
    assert (out.read_bytes(), tpath.read_bytes()) == old
    monkeypatch.undo()
    assert _align(str(src), "-o", str(out), "--overwrite") == 0


def test_tif_and_zarr_outputs_have_their_own_sidecars(src: Path, tmp_path: Path) -> None:
    assert _align(str(src), "-o", str(tmp_path / "x.tif")) == 0
    assert _align(str(src), "-o", str(tmp_path / "x.ome.zarr")) == 0
    assert (tmp_path / "x.transforms.json").is_file()
    assert (tmp_path / "x.ome.zarr.transforms.json").is_file()


def test_a_killed_runs_lock_inside_a_store_does_not_block_overwrite(
        src: Path, tmp_path: Path, lock_held: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """`apply -o STORE/labels/x` killed with -9 leaves its lock file inside the store: the
    store's own tool may still replace it (it was "not Zarr data"), unless a live run holds
    that lock."""
    store = tmp_path / "a.ome.zarr"
    assert _align(str(src), "-o", str(store)) == 0
    (store / "labels").mkdir()
    (store / "labels" / ".x.deepalign.lock").write_text("12345\n")  # no process holds it
    assert _align(str(src), "-o", str(store), "--overwrite") == 0
    (store / "labels").mkdir()
    capsys.readouterr()
    with lock_held(store / "labels" / "x"):
        assert _align(str(src), "-o", str(store), "--overwrite") == 2
        assert "being written by another deepalign-fast run" in \
            _one_line(capsys.readouterr().err)


def _foreign_folders(tmp_path: Path) -> dict[str, Path]:
    """Folders named like Zarr outputs that deepalign-fast did not write."""
    import zarr

    plain = tmp_path / "home.zarr"  # not a Zarr store at all
    (plain / "sub").mkdir(parents=True)
    (plain / "sub" / "thesis.docx").write_text("years of work")
    other = tmp_path / "other.zarr"  # a Zarr store of another tool
    zarr.create_array(other, shape=(2, 8, 8), dtype="u1")
    return {"plain": plain, "other": other}


@pytest.mark.parametrize("kind", ["plain", "other", "ours+docx"])
def test_overwrite_replaces_only_a_zarr_store_of_this_tool(src: Path, tmp_path: Path,
                                                           kind: str,
                                                           capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    """--overwrite never deletes a folder that is not a Zarr store written by this tool (align,
    apply, the API writer), nor a tool's store holding files that are not Zarr data."""
    if kind == "ours+docx":
        target = tmp_path / "ours.ome.zarr"
        assert _align(str(src), "-o", str(target)) == 0
        (target / "0" / "notes.docx").write_text("mine")
    else:
        target = _foreign_folders(tmp_path)[kind]
    before = _snapshot(tmp_path)
    assert _align(str(src), "-o", str(target), "--overwrite") == 2
    line = _one_line(capsys.readouterr().err)
    assert str(target) in line and "written by deepalign-fast" in line
    assert main(["apply", str(_aligned(src, tmp_path)), str(src), "-o", str(target),
                 "--overwrite", "--quiet"]) == 2
    assert str(target) in _one_line(capsys.readouterr().err)
    with pytest.raises(DeepAlignError, match="written by deepalign-fast"):
        open_writer(target, (2, 8, 8), np.uint8, overwrite=True)
    after = _snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing replaced
    # The tool's own earlier output is replaced, and so is a watch's store.
    mine = tmp_path / "mine.ome.zarr"
    assert _align(str(src), "-o", str(mine)) == 0
    assert _align(str(src), "-o", str(mine), "--overwrite") == 0


def test_a_foreign_folder_at_the_unfinished_name_is_refused(src: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    partial = tmp_path / "o.ome.zarr.partial"
    partial.mkdir()
    (partial / "keep.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        assert _align(str(src), "-o", str(tmp_path / "o.ome.zarr"), *extra) == 2
        assert "not an unfinished output" in _one_line(capsys.readouterr().err)
    assert (partial / "keep.txt").read_text() == "mine"
    fields = tmp_path / "f.fields.zarr"  # the field store of --mode elastic
    _foreign_folders(tmp_path)["plain"].rename(fields)
    assert _align(str(src), "-o", str(tmp_path / "f.tif"), "--mode", "elastic",
                  "--overwrite") == 2
    assert "fields" in _one_line(capsys.readouterr().err)
    assert (fields / "sub" / "thesis.docx").is_file()


def test_demo_runs_twice_with_overwrite(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--overwrite"]) == 0
    capsys.readouterr()
    assert main(["demo", "--out", str(out)]) == 2  # second run without --overwrite: refused
    printed = capsys.readouterr()
    line = _one_line(printed.err)  # naming demo's option (it said "(-o)")
    assert "(--out) already exists" in line and "(-o)" not in line
    assert printed.out == ""  # (it said which sample it would align first)
    assert main(["demo", "--out", str(out), "--overwrite"]) == 0
    (tmp_path / "file").write_text("x")
    assert main(["demo", "--out", str(tmp_path / "file")]) == 2


def test_demo_reports_an_environment_failure_as_one(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder demo cannot write is exit 1, as for align (was 2: renamed as bad input)."""
    from deepalign_fast import cli
    from deepalign_fast._errors import EnvironmentFailure

    def unwritable(args: Any, started: Any = None) -> int:
        raise EnvironmentFailure(f"{args.output}: (-o) the folder cannot be written")
    monkeypatch.setattr(cli, "_cmd_align", unwritable)
    assert main(["demo", "--out", str(tmp_path / "d")]) == 1


def _bad_inputs(tmp_path: Path) -> dict[str, Path]:
    nan = _stack().astype(np.float32)
    nan[2, 5, 5] = np.nan
    small = _stack(size=8)
    paths = {"nan": tmp_path / "nan.tif", "small": tmp_path / "small.tif",
             "two": tmp_path / "two.tif", "labels": tmp_path / "labels.tif"}
    for name, data in (("nan", nan), ("small", small), ("two", _stack(n=2)),
                       ("labels", _stack(size=16))):
        tifffile.imwrite(paths[name], data, photometric="minisblack")
    return paths


@pytest.mark.parametrize("argv, words", [
    (["align", "{nan}", "-o", "{new}/o.tif", "--report", "{new}/r/r.html"], "NaN"),
    (["apply", "{transforms}", "{small}", "-o", "{new}/l.ome.zarr"], "small.tif"),
    (["make-benchmark", "{src}", "{new}", "--labels", "{labels}"], "labels.tif"),
    (["make-benchmark", "{nan}", "{new}"], "NaN"),
    (["make-benchmark", "{small}", "{new}"], "small.tif"),
    (["make-benchmark", "{two}", "{new}", "--reslice", "xz"], "two.tif"),
])
def test_a_failed_run_removes_the_folders_it_created(src: Path, tmp_path: Path,
                                                     argv: list[str], words: str,
                                                     capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    """Missing output folders are created for the run and, when it fails before writing
    anything there, removed again (only the ones it created, only empty ones)."""
    names = {"src": str(src), "new": str(tmp_path / "keep" / "new" / "sub"),
             "transforms": str(_aligned(src, tmp_path)),
             **{k: str(v) for k, v in _bad_inputs(tmp_path).items()}}
    (tmp_path / "keep").mkdir()  # an existing folder: never removed
    capsys.readouterr()
    before = _snapshot(tmp_path)
    assert main([a.format(**names) for a in argv] + (["--quiet"] if argv[0] != "make-benchmark"
                                                     else [])) == 2
    assert words in _one_line(capsys.readouterr().err)
    assert _snapshot(tmp_path) == before


# --- 3/4. environment failures, temp files, locks --------------------------------------------


@pytest.mark.parametrize(("error", "free", "words"), [
    (OSError(errno.ENOSPC, "No space left on device"), 10**12, "disk is full"),
    # numpy's short write has no errno: the disk filled up, or the device failed
    (OSError("196608 requested and 167584 written"), 10**6, "disk is full"),
    # full while the unfinished file takes its space (was: read after it was deleted)
    (OSError("196608 requested and 167584 written"), None, "disk is full"),
    (OSError("196608 requested and 167584 written"), 10**12, "quota is exceeded or the device"),
])
def test_disk_full_while_writing(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str], error: OSError,
                                 free: int | None, words: str) -> None:
    """ENOSPC in the TIFF writer: exit 1, one line, no output, no transforms, no temp file. A
    short write on a disk with space left is an I/O error (was: always "the disk is full")."""
    import shutil

    from tifffile import TiffWriter

    def full(self: Any, *a: Any, **k: Any) -> None:
        raise error

    monkeypatch.setattr(TiffWriter, "write", full)
    def usage(_: Any) -> Any:
        left = free if free is not None else \
            (10**6 if any(tmp_path.glob(".o.tif.deepalign-*")) else 10**12)
        return shutil._ntuple_diskusage(2 * left, left, left)  # type: ignore[attr-defined]
    monkeypatch.setattr(shutil, "disk_usage", usage)
    before = _snapshot(tmp_path)
    assert _align(str(src), "-o", str(tmp_path / "o.tif")) == 1
    assert words in _one_line(capsys.readouterr().err)
    after = _snapshot(tmp_path)
    stray = set(after) - set(before)
    # only the estimation checkpoint (a rerun resumes from it) may remain
    assert stray <= {checkpoint_path_for(tmp_path / "o.tif").name}, stray


def test_disk_full_on_the_lock_names_the_output_and_leaves_no_lock(
        src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """ENOSPC writing the lock's pid: one line naming the output (it said "?"), and the lock
    file it had created is gone."""
    def full(*a: Any, **k: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    before = _snapshot(tmp_path)
    assert _align(str(src), "-o", str(tmp_path / "o.tif")) == 1
    line = _one_line(capsys.readouterr().err)
    assert "o.tif" in line and "disk is full" in line
    assert _snapshot(tmp_path) == before


def test_disk_full_on_transforms_publishes_nothing(src: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    def full(self: Any, path: Any) -> Any:
        raise __import__("deepalign_fast.outputs").outputs.os_error(
            OSError(errno.ENOSPC, "No space left on device"), path, "cannot write")

    monkeypatch.setattr(TransformSet, "save", full)
    assert _align(str(src), "-o", str(tmp_path / "o.tif")) == 1
    _one_line(capsys.readouterr().err)
    assert not (tmp_path / "o.tif").exists()  # the image is never published without them
    assert not list(tmp_path.glob(".o.tif.deepalign-*"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert _align(str(src), "-o", str(ro / "o.tif")) == 1
        assert "ro" in _one_line(capsys.readouterr().err)
    finally:
        ro.chmod(0o755)


def test_unwritable_folder_is_an_environment_failure(src: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """EROFS when probing the output folder (works as root too): exit 1 before any work."""
    real_open = os.open

    def ro_open(path: Any, flags: int, *a: Any, **k: Any) -> int:
        if ".deepalign-probe" in str(path):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", ro_open)
    assert _align(str(src), "-o", str(tmp_path / "o.tif")) == 1
    assert "read-only" in _one_line(capsys.readouterr().err)


def test_a_probe_file_a_killed_run_left_is_removed(src: Path, tmp_path: Path) -> None:
    """The writability probe of a run killed between making and removing it stayed for good
    (in the output's folder, or the nearest existing one); the next run on the output removes
    it (its name is one of the output's temporary names)."""
    left = tmp_path / ".o.tif.deepalign-probe"
    left.touch()
    assert _align(str(src), "-o", str(tmp_path / "o.tif"), "--model", "translation") == 0
    assert not left.exists()
    deep = tmp_path / ".new.deepalign-probe"
    deep.touch()
    assert _align(str(src), "-o", str(tmp_path / "new" / "o.tif"), "--model",
                  "translation") == 0
    assert not deep.exists()


def test_planted_symlink_at_the_temp_name_is_not_followed(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    import secrets

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    final = tmp_path / "o.tif"
    tokens = iter(["aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb"])
    monkeypatch.setattr(secrets, "token_hex", lambda n: next(tokens))
    planted = tmp_path / ".o.tif.deepalign-aaaaaaaaaaaaaaaa.tmp"
    planted.symlink_to(victim)
    fd, tmp = create_temp(final)
    os.close(fd)
    assert tmp.name == ".o.tif.deepalign-bbbbbbbbbbbbbbbb.tmp" and not tmp.is_symlink()
    assert victim.read_text() == "precious"


def test_apply_rerun_after_a_stopped_zarr_output_finishes_it(src: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    # an apply stopped while writing a Zarr output leaves its unfinished store; the error
    # said to rerun the same command, which refused it again for ever
    tpath = _aligned(src, tmp_path)
    ref, out = tmp_path / "ref.zarr", tmp_path / "l.zarr"
    assert main(["apply", str(tpath), str(src), "-o", str(ref), "--quiet"]) == 0
    ts = TransformSet.load(tpath)
    stopped = open_writer(out, (len(ts), *ts.output_shape), np.uint8)
    stopped.write(0, np.full(ts.output_shape, 7, np.uint8))  # (not what apply writes)
    assert main(["apply", str(tpath), str(src), "-o", str(out), "--quiet"]) == 0
    with open_stack(out) as a, open_stack(ref) as b:
        assert all(np.array_equal(a.read(z), b.read(z)) for z in range(len(ts)))
    assert not (tmp_path / "l.zarr.partial").exists()


def test_stale_temp_files_are_removed_by_the_next_run(src: Path, tmp_path: Path) -> None:
    stale = tmp_path / ".o.tif.deepalign-0123456789abcdef.tmp"
    stale.write_bytes(b"x" * 1000)
    # (and those of its hidden side files: the resume record's and the matches' temps)
    sides = [tmp_path / "..o.tif.deepalign.resume.json.deepalign-0123456789abcdef.tmp",
             tmp_path / "..o.tif.deepalign.matches.npz.deepalign-0123456789abcdef.npz"]
    for path in sides:
        path.write_bytes(b"x")
    unrelated = tmp_path / ".o.tif.something-else"
    unrelated.write_text("keep")
    users = tmp_path / "..o.tif.deepalign.notes"  # not a temp file of ours
    users.write_text("keep")
    assert _align(str(src), "-o", str(tmp_path / "o.tif")) == 0
    assert not stale.exists() and unrelated.exists() and users.exists()
    assert not any(path.exists() for path in sides)
    assert not list(tmp_path.glob(".o.tif.deepalign*"))  # no lock or checkpoint left either


def test_second_run_on_one_output_is_refused(src: Path, tmp_path: Path, lock_held: Any,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Another process holds the output's lock: refused at once; SIGKILL of the holder leaves
    a lock file, but no lock, so the next run proceeds."""
    out = tmp_path / "o.tif"
    with lock_held(out) as pid:
        assert _align(str(src), "-o", str(out)) == 2
        line = _one_line(capsys.readouterr().err)
        assert f"pid {pid}" in line and "another deepalign-fast run" in line
        assert not out.exists() and not transforms_path_for(out).exists()
    assert _align(str(src), "-o", str(out)) == 0


def test_a_refused_rerun_removes_the_lock_a_killed_run_left(src: Path, tmp_path: Path,
                                                            lock_held: Any,
                                                            capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    """A killed run leaves its (released) lock file and temporary files; a rerun refused
    before locking (the output exists, no --overwrite) removed nothing, so such files
    stayed. A lock that a running process holds stays, and so do its temporary files."""
    out = tmp_path / "o.tif"
    assert _align(str(src), "-o", str(out)) == 0
    stale = tmp_path / ".o.tif.deepalign.lock"
    stale.write_text("12345\n")
    temp = tmp_path / ".o.tif.deepalign-0123456789abcdef.tmp"  # the killed run's, too
    temp.write_text("half")
    assert _align(str(src), "-o", str(out)) == 2
    assert "already exists" in _one_line(capsys.readouterr().err)
    assert not stale.exists() and not temp.exists()
    with lock_held(out):
        temp.write_text("half")  # (a live run's)
        assert _align(str(src), "-o", str(out)) == 2
        assert stale.exists() and temp.exists()  # held: not stale


def test_lock_is_reentrant_in_one_process(tmp_path: Path) -> None:
    out = tmp_path / "o.tif"
    with output_lock([out]), output_lock([out]):
        assert (tmp_path / ".o.tif.deepalign.lock").exists()
    assert not (tmp_path / ".o.tif.deepalign.lock").exists()


def test_a_moments_hold_of_the_lock_is_waited_out(tmp_path: Path) -> None:
    """Checking whether a store's leftover lock is live (store_problem) holds that lock for a
    moment; a run starting then is not refused as if another run wrote its output."""
    import fcntl
    import threading

    out = tmp_path / "o.tif"
    lock = tmp_path / ".o.tif.deepalign.lock"
    lock.write_text("")
    held = threading.Event()

    def hold_briefly() -> None:
        fd = os.open(lock, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        held.set()
        time.sleep(0.03)
        os.close(fd)

    thread = threading.Thread(target=hold_briefly)
    thread.start()
    held.wait()
    with output_lock([out]):
        assert lock.exists()
    thread.join()


# --- 5. validation and exit statuses -----------------------------------------------------------


@pytest.mark.parametrize("argv, words", [
    (["--threshold", "nan"], "--threshold"),
    (["--masks", "MASKS"], "--masks"),
    # options of another mode (they were accepted and did nothing)
    (["--max-folding", "0.01"], "--max-folding only applies with --mode elastic"),
    (["--field-stride", "8", "--mode", "expected-affine"], "--field-stride only applies"),
    (["--refine-features", "sift", "--mode", "elastic"], "--refine-features only applies"),
    (["--provider", "cuda"], "--provider cuda only applies to the learned models"),
    (["--scheduler", "local:1", "--mode", "elastic"], "--scheduler"),
    (["--work-dir", "W"], "--work-dir"),
])
def test_option_checks(src: Path, tmp_path: Path, argv: list[str], words: str,
                       capsys: pytest.CaptureFixture[str]) -> None:
    argv = [a.replace("MASKS", str(src)).replace("W", str(tmp_path / "w")) for a in argv]
    out = tmp_path / ("o.ome.zarr" if "--scheduler" in argv else "o.tif")
    assert _align(str(src), "-o", str(out), *argv) == 2
    assert words in _one_line(capsys.readouterr().err)
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--clusters", "--k"])
def test_register_names_a_bad_count(src: Path, tmp_path: Path, flag: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    import cv2

    fixed, moving = tmp_path / "f.png", tmp_path / "m.png"
    cv2.imwrite(str(fixed), _stack()[0])
    cv2.imwrite(str(moving), _stack()[1])
    out = tmp_path / "r.png"
    assert main(["register", str(fixed), str(moving), "-o", str(out), flag, "0"]) == 2
    assert f"{flag} must be >= 1, got 0" in _one_line(capsys.readouterr().err)
    assert not out.exists()


def test_register_refuses_a_float_image_as_png(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """OpenCV writes a float image as 8-bit PNG, its 0-1 values truncated to 0 and 1."""
    import cv2

    fixed, moving = tmp_path / "f.png", tmp_path / "m.tif"
    cv2.imwrite(str(fixed), _stack()[0])
    tifffile.imwrite(moving, _stack()[1].astype(np.float32) / 255)
    out = tmp_path / "r.png"
    assert main(["register", str(fixed), str(moving), "-o", str(out)]) == 2
    assert "PNG holds 8- or 16-bit integers" in _one_line(capsys.readouterr().err)
    assert not out.exists()


@pytest.mark.parametrize("address", ["foo", "local:0", "local:x", "127.0.0.1:8786",
                                     "tcp://host:99999", "tcp://"])
def test_bad_scheduler_address_creates_nothing(src: Path, tmp_path: Path, address: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A malformed --scheduler is refused before anything (work folder, output folder) is
    created, with one line naming the address."""
    before = _snapshot(tmp_path)
    assert _align(str(src), "-o", str(tmp_path / "new" / "o.ome.zarr"), "--scheduler",
                  address) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"--scheduler {address!r}" in line
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("kind, words", [
    ("size", "masks are 16 x 16"), ("count", "2 masks for the 6 slices"),
    ("corrupt", "masks.tif: (--masks)"), ("bad slice", "slice 3: (--masks)"),
])
def test_bad_masks_are_refused_before_any_work(src: Path, tmp_path: Path, kind: str,
                                               words: str, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """--masks is checked (count, size, every mask readable) before the estimation: one line
    naming the masks file (and slice), no resume record, no field store, no folder."""
    from deepalign_fast.alignment import Aligner

    masks = tmp_path / "masks.tif"
    if kind == "size":
        tifffile.imwrite(masks, np.zeros((6, 16, 16), np.uint8), photometric="minisblack")
    elif kind == "count":
        tifffile.imwrite(masks, np.zeros((2, 96, 96), np.uint8), photometric="minisblack")
    elif kind == "corrupt":
        masks.write_bytes(b"II*\x00" + bytes(range(256)) * 8)
    else:  # a compressed stack whose slice 3 does not decode (found only by reading it)
        tifffile.imwrite(masks, np.tile(np.arange(96, dtype=np.uint8), (6, 96, 1)),
                         compression="zlib", photometric="minisblack")
        with tifffile.TiffFile(masks) as t:
            start, size = t.pages[3].dataoffsets[0], t.pages[3].databytecounts[0]
        data = bytearray(masks.read_bytes())
        data[start:start + size] = bytes(size)
        masks.write_bytes(bytes(data))

    def no_estimate(*a: Any, **k: Any) -> Any:
        raise AssertionError("estimated before checking the masks")

    monkeypatch.setattr(Aligner, "estimate", no_estimate)
    before = _snapshot(tmp_path)
    assert _align(str(src), "-o", str(tmp_path / "new" / "o.tif"), "--mode", "expected-affine",
                  "--refine-features", "blocks", "--masks", str(masks)) == 2
    line = _one_line(capsys.readouterr().err)
    assert words in line and str(masks) in line
    assert _snapshot(tmp_path) == before


def test_debug_shows_the_traceback(src: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["align", str(src), "-o", str(src), "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_mostly_flagged_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stack = _stack()
    stack[1:5] = 17  # four blank slices of six: flagged
    tifffile.imwrite(tmp_path / "b.tif", stack, photometric="minisblack")
    assert _align(str(tmp_path / "b.tif"), "-o", str(tmp_path / "o.tif")) == 3
    out = capsys.readouterr().out
    assert "flagged slices: 4 of 6" in out and "more than half" in out
    assert "blank (one value throughout): [1, 2, 3, 4]" in out
    assert (tmp_path / "o.tif").exists()  # the output is still written


def _aligned(src: Path, tmp_path: Path) -> Path:
    assert _align(str(src), "-o", str(tmp_path / "a.tif")) == 0
    return tmp_path / "a.transforms.json"


@pytest.mark.parametrize("content, words", [
    ("null", "not an object"),
    ("[1, 2]", "not an object"),
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
    ("{bad json", "not valid JSON"),
])
def test_hostile_transforms_json(src: Path, tmp_path: Path, content: str, words: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    t = tmp_path / "t.json"
    t.write_text(content)
    assert main(["apply", str(t), str(src), "-o", str(tmp_path / "l.tif"), "--quiet"]) == 2
    assert words in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "l.tif").exists()


@pytest.mark.parametrize("edit, words", [
    (lambda d: d["affines"][2][0].__setitem__(0, float("nan")), "slice 2"),
    (lambda d: d["affines"].pop(), "affines but input_shape"),
    (lambda d: d.__setitem__("output_shape", [100000, 100000]), "implausible"),
    (lambda d: d.__setitem__("input_shape", [6, 96.5, 96]), "positive integers"),
    (lambda d: d.__setitem__("affines", "x"), "2x3"),
    (lambda d: d.__setitem__("flagged", [99]), "flagged"),
    (lambda d: d.__setitem__("fields", {"path": "../../etc", "stride": 4}), "outside"),
    # integers beyond any float (it was an unexpected OverflowError)
    (lambda d: d["affines"][1][0].__setitem__(2, 10 ** 400), "too large"),
    (lambda d: d.__setitem__("residuals", [10 ** 400] * 6), "residuals"),
    (lambda d: d.__setitem__("version", 99), "versions 1 to"),
    # edited: a scale no alignment makes (warping with it overflowed)
    (lambda d: d["affines"][1].__setitem__(0, [1e300, 0.0, 0.0]), "slice 1 scales by"),
    (lambda d: d["affines"][4].__setitem__(1, [0.0, 0.01, 0.0]), "slice 4 scales by"),
])
def test_invalid_transforms_are_refused(src: Path, tmp_path: Path, edit: Any, words: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    data = json.loads(_aligned(src, tmp_path).read_text())
    edit(data)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    assert main(["apply", str(bad), str(src), "-o", str(tmp_path / "l.tif"), "--quiet"]) == 2
    assert words in _one_line(capsys.readouterr().err)


def test_slices_mapped_outside_their_input_load_and_apply_says_so(
        src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An alignment that follows a strong drift on a frame fixed to the stack's mean maps its
    end slices wholly outside their input: its transforms file (and checkpoint) must load, so
    they are not refused (an edit to 1e300 px looks the same); apply says which render empty."""
    data = json.loads(_aligned(src, tmp_path).read_text())
    data["affines"][0][0][2] = 1e300
    data["affines"][5][1][2] = -200.0
    tpath = tmp_path / "far.json"
    tpath.write_text(json.dumps(data))
    assert TransformSet.load(tpath).affines[5, 1, 2] == -200.0
    capsys.readouterr()
    assert main(["apply", str(tpath), str(src), "-o", str(tmp_path / "l.tif"), "--quiet"]) == 0
    assert "2 slice(s) [0, 5] map wholly outside their input" in capsys.readouterr().out
    out = tifffile.imread(tmp_path / "l.tif")
    assert not out[0].any() and not out[5].any() and out[2].any()


def test_apply_names_the_slices_the_alignment_flagged(src: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    """Labels or channels warped with an alignment's transforms: its flagged slices are
    named (apply said only "wrote ...")."""
    data = json.loads(_aligned(src, tmp_path).read_text())
    data["flagged"] = [2, 4]
    tpath = tmp_path / "flagged.json"
    tpath.write_text(json.dumps(data))
    capsys.readouterr()
    assert main(["apply", str(tpath), str(src), "-o", str(tmp_path / "l.tif"), "--quiet"]) == 0
    assert "flagged 2 slice(s) [2, 4]" in capsys.readouterr().out


def test_a_closed_pipe_is_no_error(monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    # `deepalign-fast ... | head`: the reader goes away; it said "error: ?: Broken pipe"
    import deepalign_fast.cli as cli

    def closed(*a: Any, **k: Any) -> None:
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    monkeypatch.setattr(cli, "print", closed, raising=False)
    assert main(["config", "--defaults"]) == 1
    assert capsys.readouterr().err == ""


def test_apply_refuses_a_stack_of_another_size(src: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    tpath = _aligned(src, tmp_path)
    binned = tmp_path / "half.tif"
    tifffile.imwrite(binned, _stack()[:, ::2, ::2].copy(), photometric="minisblack")
    assert main(["apply", str(tpath), str(binned), "-o", str(tmp_path / "l.tif")]) == 2
    assert "--scale" in _one_line(capsys.readouterr().err)
    # --scale 0.5 makes the transforms fit the binned copy
    assert main(["apply", str(tpath), str(binned), "-o", str(tmp_path / "l.tif"), "--scale",
                 "0.5", "--quiet"]) == 0
    assert tifffile.imread(tmp_path / "l.tif").shape == (6, 48, 48)
    # odd sides: a binned side is the full one's halved and rounded either way
    odd = tmp_path / "odd.tif"
    tifffile.imwrite(odd, _stack()[:, :95, :95].copy(), photometric="minisblack")
    assert main(["apply", str(tpath), str(odd), "-o", str(tmp_path / "o1.tif"), "--scale",
                 "2", "--quiet"]) == 2  # 95 px is no 2x finer copy of 96 px
    capsys.readouterr()
    half_tpath = _aligned(binned, tmp_path / "half")
    assert main(["apply", str(half_tpath), str(odd), "-o", str(tmp_path / "o2.tif"),
                 "--scale", "2", "--quiet"]) == 0  # 48 px: 95 px binned, rounded up
    assert tifffile.imread(tmp_path / "o2.tif").shape == (6, 96, 96)
    for scale in ("1000", "nan", "0"):
        assert main(["apply", str(tpath), str(src), "-o", str(tmp_path / "m.tif"), "--scale",
                     scale]) == 2
        assert "--scale" in _one_line(capsys.readouterr().err)


def test_nan_flow_is_flagged_and_rendered_affine_only() -> None:
    pytest.importorskip("onnxruntime")
    from deepalign_fast.refine import Neighbours
    from deepalign_fast.refine.elastic import ElasticRefiner

    ident = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    stack = _stack(n=3)
    refiner = ElasticRefiner((96, 96))

    class NanFlow:
        def predict(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
            return np.full((2, *a.shape), np.nan, np.float32)

    refiner.predictor = NanFlow()  # type: ignore[assignment]
    neighbours = Neighbours(usable=lambda k: 0 <= k < len(stack),
                            read=lambda k: (stack[k], ident))
    outs = [refiner(z, s, ident, neighbours)[1] for z, s in enumerate(stack)]
    assert refiner.failed == [0, 1, 2]
    np.testing.assert_array_equal(outs[2], stack[2])  # the affine render, not a black slice
    assert refiner.folding[1] is None


# --- 7. huge declared slices, empty files ------------------------------------------------------


def test_huge_declared_zarr_slice_is_refused(tmp_path: Path) -> None:
    import zarr

    path = tmp_path / "huge.zarr"
    zarr.create_array(str(path), shape=(3, 100000, 100000), chunks=(3, 100000, 100000),
                      dtype="uint8", zarr_format=3)
    t0 = time.perf_counter()
    with pytest.raises(DeepAlignError, match="above the limit.*DEEPALIGN_MAX_SLICE_PIXELS"):
        open_stack(path)
    assert time.perf_counter() - t0 < 5


def test_tiff_without_pages(tmp_path: Path) -> None:
    path = tmp_path / "empty.tif"
    path.write_bytes(b"II*\x00\x00\x00\x00\x00")
    with pytest.raises(DeepAlignError, match="empty.tif"):
        open_stack(path)


# --- 6. kill and resume --------------------------------------------------------------------------

_SLOW_RENDER = """
import os, sys, time
import deepalign_fast.alignment.aligner as pl
real = pl.render_slice
def slow(image, *a, **k):
    out = real(image, *a, **k)
    slow.n = getattr(slow, "n", 0) + 1
    if slow.n == 3:
        open(os.environ["MARK"], "w").close()
    if slow.n >= 3:
        time.sleep(4)
    return out
pl.render_slice = slow
from deepalign_fast.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _interrupted_run(src: Path, out: Path, sig: int, tmp_path: Path
                     ) -> subprocess.CompletedProcess[str]:
    mark = tmp_path / "mark"
    mark.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_RENDER, "align", str(src), "-o",
                             str(out), "--model", "translation", "--quiet", "--threads", "1"],
                            env={**ENV, "MARK": str(mark)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not mark.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    progress = out.with_name(out.name + ".partial") / "deepalign_progress.json"
    while out.suffix == ".zarr":  # kill only once the store records a finished slice
        try:
            if json.loads(progress.read_text())["completed"]:
                break
        except (OSError, ValueError):
            pass
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.parametrize("suffix", [".tif", ".ome.zarr"])
def test_sigterm_cleans_up_and_rerun_resumes(src: Path, tmp_path: Path, suffix: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    ref = tmp_path / f"ref{suffix}"
    assert _align(str(src), "-o", str(ref), "--threads", "1") == 0
    out = tmp_path / f"o{suffix}"
    done = _interrupted_run(src, out, signal.SIGTERM, tmp_path)
    assert done.returncode == 143, done.stderr
    assert "Traceback" not in done.stderr and "terminated" in done.stderr
    assert not out.exists() and not transforms_path_for(out).exists()
    assert not list(tmp_path.glob(f".{out.name}.deepalign-*"))  # temp files removed
    assert checkpoint_path_for(out).is_file()
    if suffix == ".ome.zarr":
        progress = json.loads((tmp_path / f"o{suffix}.partial" /
                               "deepalign_progress.json").read_text())
        assert progress["completed"] and progress["completed"][0][0] == 0
    _rerun_resumes(src, out, ref, monkeypatch)


@pytest.mark.parametrize("suffix", [".tif", ".ome.zarr"])
def test_sigkill_then_rerun_resumes(src: Path, tmp_path: Path, suffix: str,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    ref = tmp_path / f"ref{suffix}"
    assert _align(str(src), "-o", str(ref), "--threads", "1") == 0
    out = tmp_path / f"o{suffix}"
    done = _interrupted_run(src, out, signal.SIGKILL, tmp_path)
    assert done.returncode == -signal.SIGKILL
    assert not out.exists() and not transforms_path_for(out).exists()
    _rerun_resumes(src, out, ref, monkeypatch)
    assert not list(tmp_path.glob(f".{out.name}.deepalign*"))  # stale temp + lock gone


def _rerun_resumes(src: Path, out: Path, ref: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same command again: no estimation, (Zarr) only the missing slices, same output."""
    from deepalign_fast.alignment import Aligner
    from deepalign_fast.io import ZarrStackWriter

    def no_estimate(*a: Any, **k: Any) -> Any:
        raise AssertionError("estimated again instead of resuming")

    written: list[int] = []
    real_write = ZarrStackWriter.write

    def counting(self: Any, i: int, data: np.ndarray) -> None:
        written.append(i)
        real_write(self, i, data)

    with monkeypatch.context() as m:
        m.setattr(Aligner, "estimate", no_estimate)
        m.setattr(ZarrStackWriter, "write", counting)
        assert _align(str(src), "-o", str(out), "--threads", "1") == 0
    if out.suffix == ".zarr":
        assert 0 < len(written) < 6, written  # finished slices were kept
    with open_stack(out) as a, open_stack(ref) as b:
        np.testing.assert_array_equal(np.stack(list(a)), np.stack(list(b)))
    ta = json.loads(transforms_path_for(out).read_text())
    tb = json.loads(transforms_path_for(ref).read_text())
    assert ta["affines"] == tb["affines"] and ta["flagged"] == tb["flagged"]
    assert not checkpoint_path_for(out).exists()


_LOST_SIGTERM = """
import os, sys, time
from deepalign_fast import cli
from deepalign_fast.alignment import Aligner
cli.TERM_GRACE_S = 1.0
def swallowing(*a, **k):
    open(os.environ["MARK"], "w").close()
    while True:  # the signal's exception lost, as Python loses it in a callback
        try:
            time.sleep(0.05)
        except BaseException:
            pass
Aligner.estimate = swallowing
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_lost_sigterm_still_ends_the_run(src: Path, tmp_path: Path) -> None:
    """Python drops an exception raised in a callback: a SIGTERM landing there was lost, and
    a watch hung with its output's lock held. The run now exits (143) a grace period after
    the signal, as after ``kill -9``; the next run on the output is not blocked."""
    out, mark = tmp_path / "o.tif", tmp_path / "mark"
    proc = subprocess.Popen([sys.executable, "-c", _LOST_SIGTERM, "align", str(src), "-o",
                             str(out), "--quiet"], env={**ENV, "MARK": str(mark)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not mark.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == 143
    assert _align(str(src), "-o", str(out), "--model", "translation") == 0


_SLOW_REPORT = """
import os, sys, time
import deepalign_fast.qc.report as rp
real = rp.write_report
def slow(*a, **k):
    open(os.environ["MARK"], "w").close()
    time.sleep(30)
    return real(*a, **k)
rp.write_report = slow
from deepalign_fast.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_during_the_report_rerun_finishes_the_run(src: Path, tmp_path: Path, sig: int,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed after the image and transforms are in place, while the report is written: the
    same command again writes the report, keeps what the run put in place, leaves nothing."""
    out, report = tmp_path / "o.tif", tmp_path / "r.html"
    argv = ["align", str(src), "-o", str(out), "--report", str(report), "--model",
            "translation", "--quiet", "--threads", "1"]
    mark = tmp_path / "mark"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_REPORT, *argv],
                            env={**ENV, "MARK": str(mark)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not mark.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    assert out.is_file() and transforms_path_for(out).is_file() and not report.exists()
    published = {p: (p.stat().st_ino, p.read_bytes()) for p in (out, transforms_path_for(out))}
    from deepalign_fast.alignment import Aligner

    def no_estimate(*a: Any, **k: Any) -> Any:
        raise AssertionError("estimated again instead of finishing the run")

    with monkeypatch.context() as m:
        m.setattr(Aligner, "estimate", no_estimate)
        assert main(argv) == 0
    assert report.is_file() and "<html" in report.read_text()
    assert {p: (p.stat().st_ino, p.read_bytes()) for p in published} == published
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["s.tif", "mark", "o.tif", "o.transforms.json", "r.html"])  # no record, lock or temp


def _interrupted_in_the_report(argv: list[str], monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    """Run ``align argv`` and interrupt it while the report is written (exit status 130)."""
    import deepalign_fast.qc.report as rp

    def interrupted(*a: Any, **k: Any) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(rp, "write_report", interrupted)
        assert _align(*argv) == 130
    capsys.readouterr()


def test_rerun_never_takes_a_users_file_for_the_runs_output(src: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    """After an interrupted report, a file the run did not put there is refused, not kept as
    the run's output nor replaced."""
    out, report = tmp_path / "o.tif", tmp_path / "r.html"
    argv = [str(src), "-o", str(out), "--report", str(report)]

    _interrupted_in_the_report(argv, monkeypatch, capsys)
    assert out.is_file() and not report.exists()
    report.write_text("my own notes")  # the user's file at the report's name
    assert _align(*argv) == 2
    assert "r.html" in _one_line(capsys.readouterr().err)
    assert report.read_text() == "my own notes"
    report.unlink()
    out.unlink()
    out.write_bytes(b"the user's own file")  # the image replaced by the user's file
    assert _align(*argv) == 2
    assert "o.tif" in _one_line(capsys.readouterr().err)
    assert out.read_bytes() == b"the user's own file" and not report.exists()


@pytest.mark.parametrize("name", ["o.tif", "o.zarr"])
def test_rerun_with_an_output_gone_or_changed_is_no_dead_end(src: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str],
                                                              name: str) -> None:
    """After an interrupted report, a transforms file that was removed (TIFF) or changed
    (Zarr) is refused with an accurate message, and --overwrite starts the run over instead
    of refusing again."""
    out, report = tmp_path / name, tmp_path / "r.html"
    tpath = transforms_path_for(out)
    argv = [str(src), "-o", str(out), "--report", str(report)]

    _interrupted_in_the_report(argv, monkeypatch, capsys)
    assert out.exists() and tpath.is_file() and not report.exists()
    if out.suffix == ".tif":
        tpath.unlink()
        state = "is no longer there"
    else:
        st = tpath.stat()
        os.utime(tpath, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched
        state = "already exists"  # no longer what the run put there
    assert _align(*argv) == 2
    err = _one_line(capsys.readouterr().err)
    assert state in err and "--overwrite" in err
    assert _align(*argv, "--overwrite") == 0
    assert out.exists() and tpath.is_file() and report.is_file()
    assert not checkpoint_path_for(out).exists()


def test_rerun_never_takes_another_store_for_the_runs_zarr_output(
        src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """After an interrupted report, another store of this tool put at the output's name, even
    in the very folder (so its inode is the one the run recorded), is refused, not kept."""
    import shutil

    other_src = tmp_path / "other.tif"
    tifffile.imwrite(other_src, _stack(n=4, seed=1), photometric="minisblack")
    other = tmp_path / "other.zarr"
    assert _align(str(other_src), "-o", str(other)) == 0
    out, report = tmp_path / "o.zarr", tmp_path / "r.html"
    argv = [str(src), "-o", str(out), "--report", str(report)]

    _interrupted_in_the_report(argv, monkeypatch, capsys)
    assert out.is_dir() and not report.exists()
    ino = out.stat().st_ino
    for entry in out.iterdir():  # the store's contents replaced by the other store's
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    shutil.copytree(other, out, dirs_exist_ok=True)
    assert out.stat().st_ino == ino
    assert _align(*argv) == 2
    err = _one_line(capsys.readouterr().err)
    assert "o.zarr" in err and "--overwrite" in err
    with open_stack(out) as reader:
        assert reader.shape[0] == 4  # left as it is
    assert not report.exists()


def test_zarr_writer_refuses_unfinished_store_of_another_run(tmp_path: Path) -> None:
    out = tmp_path / "o.zarr"
    with pytest.raises(RuntimeError), open_writer(out, (2, 8, 8), np.uint8) as w:
        w.write(0, np.zeros((8, 8), np.uint8))
        raise RuntimeError
    with pytest.raises(DeepAlignError, match="unfinished output"):
        open_writer(out, (2, 8, 8), np.uint8)
    open_writer(out, (2, 8, 8), np.uint8, restart=True).abort()


def test_a_store_left_aside_by_a_killed_replace_is_removed_and_a_link_never_followed(
        tmp_path: Path) -> None:
    """`replace_store` renames the older store aside before the new one goes in; the next
    run on that output removes what a kill left aside (a folder; a symbolic link there is
    unlinked, its target kept), and nothing of another output's."""
    from deepalign_fast.outputs import remove_stale_temps, replace_store, replaced_path_for

    final, staged = tmp_path / "o.ome.zarr", tmp_path / "o.ome.zarr.partial"
    for folder, text in ((final, "old"), (staged, "new")):
        (folder / "0").mkdir(parents=True)
        (folder / "0" / "c").write_text(text)
    aside = replaced_path_for(final)
    assert aside.name == ".o.ome.zarr.deepalign-replaced"
    aside.mkdir()  # an earlier killed replace's
    replace_store(staged, final)
    assert (final / "0" / "c").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.ome.zarr"]

    keep = tmp_path / "keep"
    (keep / "x").mkdir(parents=True)
    aside.symlink_to(keep, target_is_directory=True)
    other = replaced_path_for(tmp_path / "other.ome.zarr")
    other.mkdir()
    assert remove_stale_temps(final) == [aside]
    assert not os.path.lexists(aside) and (keep / "x").is_dir() and other.is_dir()


@pytest.mark.parametrize(("suffix", "mode"), [(".tif", "affine"), (".ome.zarr", "affine"),
                                             (".tif", "elastic")])
def test_an_input_changed_during_the_run_is_not_published(tmp_path: Path, suffix: str,
                                                          mode: str,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    """A slice file of a folder input replaced while the run reads it: slices of the old and
    the new input would be mixed under the old transforms (was: exit 0, output slice 10 was
    slice 150's image). The run stops before anything is put in place (a refined run's
    field store included), naming the file; the same command afterwards aligns the input as
    it then is. A file that is not a slice (a microscope's log) may change meanwhile."""
    from deepalign_fast.outputs import Checkpoint

    folder = tmp_path / "slices"
    folder.mkdir()
    for z, s in enumerate(_stack(8)):
        tifffile.imwrite(folder / f"s{z:02d}.tif", s)
    real_save = Checkpoint.save

    def save_then_replace(self: Checkpoint, *a: Any, **k: Any) -> None:
        real_save(self, *a, **k)  # the estimate is done; rendering starts next
        (folder / "acquisition.log").write_text("slice 8 acquired\n")  # not the input
        (folder / "s03.tif").write_bytes((folder / "s06.tif").read_bytes())
    monkeypatch.setattr(Checkpoint, "save", save_then_replace)
    out = tmp_path / f"out{suffix}"
    capsys.readouterr()
    assert _align(str(folder), "-o", str(out), "--mode", mode) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"{folder / 's03.tif'} was rewritten while the run read it" in line, line
    # nothing under an output's name, no resume record (an unfinished field store is
    # started again by the next refined run)
    left = {p.name for p in tmp_path.iterdir()} - {"slices"}
    assert left <= {"out.fields.zarr.partial"}, left
    monkeypatch.setattr(Checkpoint, "save", real_save)
    assert _align(str(folder), "-o", str(out), "--mode", mode) == 0
    with open_stack(out) as r:
        assert len(r) == 8

    def save_then_log(self: Checkpoint, *a: Any, **k: Any) -> None:
        real_save(self, *a, **k)
        (folder / "acquisition.log").write_text("slice 9 acquired\n")
    monkeypatch.setattr(Checkpoint, "save", save_then_log)
    assert _align(str(folder), "-o", str(out), "--mode", mode, "--overwrite") == 0


def test_apply_to_an_input_changed_during_the_run_is_not_published(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`apply` as `align`: a label file rewritten while the run reads it stops the run before
    the output is put in place."""
    from deepalign_fast.alignment import aligner as module

    src = tmp_path / "s.tif"
    tifffile.imwrite(src, _stack(), photometric="minisblack")
    assert _align(str(src), "-o", str(tmp_path / "a.tif")) == 0
    labels = tmp_path / "labels.tif"
    tifffile.imwrite(labels, (_stack() > 128).astype(np.uint8))
    real = module.render_slice

    import threading

    once = threading.Lock()

    def render_then_rewrite(*a: Any, **k: Any) -> np.ndarray:
        # replaced by a rename, as tools save (a rewrite in place under the reader's memory
        # map would be a bus error); once, from whichever render thread comes first
        if once.acquire(blocking=False):
            tifffile.imwrite(tmp_path / "new.tif", (_stack() > 100).astype(np.uint8))
            os.replace(tmp_path / "new.tif", labels)
        return real(*a, **k)
    monkeypatch.setattr(module, "render_slice", render_then_rewrite)
    capsys.readouterr()
    assert main(["apply", str(tmp_path / "a.transforms.json"), str(labels), "-o",
                 str(tmp_path / "l.tif")]) == 2
    assert f"{labels} was rewritten while the run read it" in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "l.tif").exists()


def test_outputs_named_dot_or_root(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """`-o .` and `--work-dir .` (was: "PosixPath('.') has an empty name"): an output without
    a name of its own is refused in one line; export-transforms writes its files into `.`."""
    assert _align(str(src), "-o", str(tmp_path / "a.tif")) == 0
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    capsys.readouterr()
    assert main(["export-transforms", str(tmp_path / "a.transforms.json"), "-o", "."]) == 0
    assert sorted(p.name for p in work.iterdir()) == [f"slice_{z:04d}.tfm" for z in range(6)]
    for argv in (["align", str(src), "-o", "."],
                 ["align", str(src), "-o", "x.ome.zarr", "--scheduler", "local:1",
                  "--work-dir", "."],
                 ["export-transforms", str(tmp_path / "a.transforms.json"), "-o", "/"]):
        capsys.readouterr()
        assert main(argv) == 2
        line = _one_line(capsys.readouterr().err)
        assert "PosixPath" not in line and ("name the output" in line or "suffix" in line), line


def test_an_output_inside_a_zarr_store_is_refused(src: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A report or TIFF written inside an output store (were: accepted, after which the store
    held a file that is not Zarr data and `--overwrite` refused to replace it); an NGFF
    label image IMAGE/labels/NAME still goes there."""
    out = tmp_path / "a.ome.zarr"
    assert _align(str(src), "-o", str(out)) == 0
    tf = str(tmp_path / "a.ome.zarr.transforms.json")
    for argv in (["report", str(src), str(src), "-o", str(out / "r.html")],
                 ["apply", tf, str(src), "-o", str(out / "new.tif")],
                 ["apply", tf, str(src), "-o", str(out / "labels" / "x" / "y.ome.zarr")]):
        capsys.readouterr()
        assert main(argv) == 2
        assert f"lies inside the Zarr store {out}" in _one_line(capsys.readouterr().err)
    labels = tmp_path / "labels.tif"
    tifffile.imwrite(labels, (_stack() > 128).astype(np.uint8))
    assert main(["apply", tf, str(labels), "-o", str(out / "labels" / "cells"), "--quiet"]) == 0
    assert _align(str(src), "-o", str(out), "--overwrite") == 0


def test_an_output_inside_a_zarr_hierarchy_of_the_users_is_taken(src: Path,
                                                                 tmp_path: Path) -> None:
    """Only stores this tool wrote are closed to other outputs: a project's own Zarr group
    may hold the aligned store and a report."""
    import zarr

    project = tmp_path / "project.zarr"
    zarr.create_group(str(project), zarr_format=2)
    assert _align(str(src), "-o", str(project / "aligned.ome.zarr"), "--report",
                  str(project / "results" / "r.html")) == 0
    assert (project / "aligned.ome.zarr").is_dir() and (project / "results" / "r.html").is_file()
