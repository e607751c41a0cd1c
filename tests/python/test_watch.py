"""watch: a folder filled at acquisition pace (a half-written file included), restart."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import zarr
from deepalign_fast import Aligner, AlignOptions, DeepAlignError
from deepalign_fast.cli import main
from deepalign_fast.watch import watch_folder


def _slices(n: int = 12) -> np.ndarray:
    import cv2

    rng = np.random.default_rng(6)
    big = cv2.GaussianBlur((rng.random((110, 130)) * 255).astype(np.float32), (0, 0), 2.0)
    shifts = rng.integers(-3, 4, (n, 2))
    return np.stack([np.roll(big, tuple(s), axis=(0, 1))[10:-10, 10:-10]
                     for s in shifts]).astype(np.uint8)


def _microscope(folder: Path, slices: np.ndarray, pause: float) -> threading.Thread:
    """Writes one slice file after another; slice 5 arrives in two halves."""
    def run() -> None:
        for z, s in enumerate(slices):
            path = folder / f"slice_{z}.tif"  # natural order: slice_10 after slice_9
            if z == 5:
                tmp = folder / "partial.bin"
                tifffile.imwrite(tmp, s)
                data = tmp.read_bytes()
                tmp.unlink()
                path.write_bytes(data[: len(data) // 2])
                time.sleep(pause * 3)
                path.write_bytes(data)
            else:
                tifffile.imwrite(path, s)
            time.sleep(pause)
        (folder / "STOP").touch()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _acquired(tmp_path: Path, slices: np.ndarray, name: str = "slice_{z}.tif") -> Path:
    """``tmp_path/acq`` holding ``slices`` as files named by ``name`` (``{z}``: the index)."""
    folder = tmp_path / "acq"
    folder.mkdir()
    for z, s in enumerate(slices):
        tifffile.imwrite(folder / name.format(z=z), s)
    return folder


def test_watch_aligns_a_folder_as_it_fills_and_resumes(tmp_path: Path) -> None:
    slices = _slices()
    folder = tmp_path / "acq"
    folder.mkdir()
    out = tmp_path / "live.ome.zarr"
    writer = _microscope(folder, slices, pause=0.05)
    done: list[int] = []

    def stop_after_five(z: int) -> None:
        done.append(z)
        if z == 4:
            raise KeyboardInterrupt  # killed after 5 slices were written

    with pytest.raises(KeyboardInterrupt):
        watch_folder(folder, out, lookahead=3, poll=0.02, idle_timeout=5.0,
                     on_slice=stop_after_five)
    writer.join()
    # interrupted: the slices written so far have their transforms beside the store
    from deepalign_fast import TransformSet

    assert len(TransformSet.load(tmp_path / "live.ome.zarr.transforms.json")) == 5
    # Rerun the same call: it continues, and the result is that of one uninterrupted run.
    result = watch_folder(folder, out, lookahead=3, poll=0.02, idle_timeout=5.0)
    assert result.written == len(slices) and len(result.files) == len(slices)
    assert result.files[:3] == ["slice_0.tif", "slice_1.tif", "slice_2.tif"]
    got = np.asarray(zarr.open_group(str(out), mode="r")["0"])
    expected = np.stack(list(Aligner().stream(iter(slices), lookahead=3)))
    np.testing.assert_array_equal(got, expected)
    state = (tmp_path / "live.ome.zarr.watch.json").read_text()
    assert '"written": 12' in state
    # the transforms file beside it: `apply` renders the slices into the store's frame again
    assert result.transforms == tmp_path / "live.ome.zarr.transforms.json"
    tifffile.imwrite(tmp_path / "all.tif", np.stack(slices), photometric="minisblack")
    assert main(["apply", str(result.transforms), str(tmp_path / "all.tif"), "-o",
                 str(tmp_path / "again.tif"), "--interpolation", "linear", "--quiet"]) == 0
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "again.tif"), got)


def test_a_rerun_with_nothing_new_reports_the_earlier_flags(tmp_path: Path) -> None:
    """The result (and the CLI's summary) lists every flagged slice, also those written
    before a restart: a rerun that finds no new file used to report none."""
    slices = _slices(8)
    slices[3] = 40  # blank: flagged
    folder = _acquired(tmp_path, slices)
    (folder / "STOP").touch()
    out = tmp_path / "live.ome.zarr"
    first = watch_folder(folder, out, lookahead=2, poll=0.02, idle_timeout=5.0)
    again = watch_folder(folder, out, lookahead=2, poll=0.02, idle_timeout=5.0)
    assert first.written == again.written == 8
    assert first.flagged == again.flagged == [3]
    assert again.flag_reasons == {3: "blank"}


def test_hidden_files_are_not_slices_and_order_is_kept(tmp_path: Path) -> None:
    """macOS's ``._NAME`` files are skipped (as align skips them in a folder); a file that
    arrives after the watch has passed its place in the natural order stops the watch with
    its name (it was appended as the last slice, unflagged as such)."""
    slices = _slices(8)
    folder = _acquired(tmp_path, slices[:6], "slice_{z:02d}.tif")
    (folder / "._slice_03.tif").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    out = tmp_path / "live.ome.zarr"
    first = watch_folder(folder, out, lookahead=2, poll=0.02, idle_timeout=0.5)
    assert first.files == [f"slice_{z:02d}.tif" for z in range(6)] and first.written == 6
    tifffile.imwrite(folder / "slice_02b.tif", slices[6])
    with pytest.raises(DeepAlignError, match=r"slice_02b\.tif: arrived after slice_05\.tif"):
        watch_folder(folder, out, lookahead=2, poll=0.02, idle_timeout=0.5)
    # a file written under a temporary name that sorts earlier, then renamed into place, is
    # no late slice: only a complete file about to be taken is checked
    (folder / "slice_02b.tif").unlink()
    partial = folder / "acquiring.tif"
    partial.write_bytes(b"II*\x00")  # a TIFF being written: not decodable yet

    def rename_later() -> None:
        time.sleep(0.3)
        tifffile.imwrite(partial, slices[6])
        partial.rename(folder / "slice_06.tif")

    thread = threading.Thread(target=rename_later)
    thread.start()
    result = watch_folder(folder, out, lookahead=2, poll=0.02, idle_timeout=1.0)
    thread.join()
    assert result.files[-1] == "slice_06.tif" and result.written == 7


def test_a_slice_in_another_image_format_stops_the_watch(tmp_path: Path) -> None:
    """A .jpg among the slices was skipped (every later slice one z early); align refuses it
    in a folder, and so does the watch, naming it."""
    import cv2

    slices = _slices(6)
    folder = _acquired(tmp_path, slices[:3])
    cv2.imwrite(str(folder / "slice_3.jpg"), slices[3])
    with pytest.raises(DeepAlignError, match=r"slice_3\.jpg: an image the watch does not"):
        watch_folder(folder, tmp_path / "live.ome.zarr", lookahead=2, poll=0.02,
                     idle_timeout=0.5)


def test_a_restart_removes_the_record_temp_a_killed_watch_left(tmp_path: Path) -> None:
    """A watch killed while saving its record leaves the record's temporary file beside the
    output; the restart (which holds the output's lock) removes it, and nothing else."""
    folder = _acquired(tmp_path, _slices(4))
    out = tmp_path / "live.ome.zarr"
    watch_folder(folder, out, lookahead=2, poll=0.02, idle_timeout=0.3)
    stale = tmp_path / ".live.ome.zarr.watch.json.deepalign-0123456789abcdef.tmp"
    stale.write_text("{")
    mine = tmp_path / ".live.ome.zarr.watch.json.notes"
    mine.write_text("mine")
    assert watch_folder(folder, out, lookahead=2, poll=0.02, idle_timeout=0.3).written == 4
    assert not stale.exists() and mine.read_text() == "mine"


@pytest.mark.parametrize("lost", [".zattrs", ".zgroup"])
def test_a_watch_stopped_while_creating_its_store_is_restarted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lost: str) -> None:
    """Stopped while creating its store: Zarr writes the group's metadata files in parallel,
    so one may be missing (the mark with ``.zattrs``). The restart was refused ("no
    'deepalign_fast' mark", "not a Zarr store"); the store is made again."""
    folder = _acquired(tmp_path, _slices(4))
    out = tmp_path / "live.ome.zarr"

    def stopped(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(zarr.Group, "create_array", stopped)
        with pytest.raises(KeyboardInterrupt):
            watch_folder(folder, out, lookahead=2, poll=0.02, idle_timeout=0.3)
    (out / lost).unlink()
    assert watch_folder(folder, out, lookahead=2, poll=0.02, idle_timeout=0.3).written == 4


def test_a_restart_refuses_a_taken_file_changed_or_gone(tmp_path: Path) -> None:
    """Slices aligned after a taken file used it as it was: a restart that finds it replaced
    or removed stops with its name and slice (it replayed the new file silently, or said only
    "no such image file")."""
    slices = _slices(8)
    folder = _acquired(tmp_path, slices[:6])
    out = tmp_path / "live.ome.zarr"
    watch_folder(folder, out, lookahead=2, poll=0.02, idle_timeout=0.5)
    # the same bytes copied again (a new modification time) are the same slice
    data = (folder / "slice_2.tif").read_bytes()
    (folder / "slice_2.tif").unlink()
    (folder / "slice_2.tif").write_bytes(data)
    os.utime(folder / "slice_2.tif", ns=(1, 1))
    assert watch_folder(folder, out, lookahead=2, poll=0.02, idle_timeout=0.5).written == 6
    tifffile.imwrite(folder / "slice_2.tif", np.roll(slices[2], 3, axis=1))
    with pytest.raises(DeepAlignError, match=r"slice_2\.tif: slice 2 of this watch has changed"):
        watch_folder(folder, out, lookahead=2, poll=0.02, idle_timeout=0.5)
    (folder / "slice_2.tif").unlink()
    with pytest.raises(DeepAlignError, match=r"slice_2\.tif: slice 2 of this watch .* is gone"):
        watch_folder(folder, out, lookahead=2, poll=0.02, idle_timeout=0.5)


def test_watch_refusals(tmp_path: Path) -> None:
    folder = tmp_path / "acq"
    folder.mkdir()
    with pytest.raises(DeepAlignError, match="OME-Zarr"):
        watch_folder(folder, tmp_path / "o.tif")
    with pytest.raises(DeepAlignError, match="inside the watched folder"):
        watch_folder(folder, folder / "o.zarr")
    (tmp_path / "other.zarr").mkdir()
    (tmp_path / "other.zarr" / "notes.txt").write_text("mine")
    with pytest.raises(DeepAlignError, match="not an unfinished output of deepalign-fast"):
        watch_folder(folder, tmp_path / "other.zarr", idle_timeout=0.1, poll=0.01)
    (tmp_path / "empty.zarr").mkdir()  # (as a watch stopped while creating it leaves, but
    with pytest.raises(DeepAlignError, match="not a watch of this tool"):  # with no record)
        watch_folder(folder, tmp_path / "empty.zarr", idle_timeout=0.1, poll=0.01)
    assert (tmp_path / "other.zarr" / "notes.txt").read_text() == "mine"
    assert (tmp_path / "empty.zarr").is_dir()
    # a fresh watch would replace a transforms file that is not its own (a user's, another
    # run's): refused before any slice, and the file is left as it was
    (tmp_path / "new.zarr.transforms.json").write_text("a user's file")
    with pytest.raises(DeepAlignError, match=r"new\.zarr\.transforms\.json: .* not this watch's"):
        watch_folder(folder, tmp_path / "new.zarr", idle_timeout=0.1, poll=0.01)
    assert (tmp_path / "new.zarr.transforms.json").read_text() == "a user's file"
    assert not (tmp_path / "new.zarr").exists()
    with pytest.raises(DeepAlignError, match="one affine per slice"):
        watch_folder(folder, tmp_path / "e.zarr", options=AlignOptions(mode="elastic"))


def test_watch_checks_its_outputs_before_any_slice(tmp_path: Path) -> None:
    # before, these were found only once the first slice was aligned (minutes into an
    # acquisition), or never when no slice came: "wrote 0 slices", exit 0
    folder = _acquired(tmp_path, _slices(3), "s{z}.tif")
    (tmp_path / "afile").write_text("a user's file")
    (tmp_path / "quiet").mkdir()
    (tmp_path / "dangling.zarr").symlink_to(tmp_path / "nowhere")
    before = sorted(p.name for p in tmp_path.iterdir())
    taken: list[int] = []
    with pytest.raises(Exception, match="afile"):  # (no slice comes: it returned)
        watch_folder(tmp_path / "quiet", tmp_path / "afile" / "o.zarr", idle_timeout=0.1,
                     poll=0.01, on_slice=taken.append)
    with pytest.raises(DeepAlignError, match="symbolic link"):
        watch_folder(folder, tmp_path / "dangling.zarr", idle_timeout=5, on_slice=taken.append)
    assert taken == [] and sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_second_watch_on_one_output_is_refused(tmp_path: Path, lock_held: Any) -> None:
    folder, out = tmp_path / "acq", tmp_path / "o.zarr"
    folder.mkdir()
    with lock_held(out) as pid, pytest.raises(DeepAlignError, match=f"pid {pid}"):
        watch_folder(folder, out, idle_timeout=5)


@pytest.mark.parametrize("made", ["group", "array"])
def test_a_watch_stopped_while_creating_its_store_continues(tmp_path: Path, made: str) -> None:
    # killed after the group (restart: KeyError '0') or after the array but before the OME
    # metadata (restart: a store without multiscales), with no slice written yet
    from deepalign_fast.outputs import STORE_MARK, store_mark

    folder, out = tmp_path / "acq", tmp_path / "o.zarr"
    folder.mkdir()
    slices = _slices(6)
    for z, s in enumerate(slices):
        tifffile.imwrite(folder / f"s{z}.tif", s)
    (folder / "STOP").touch()
    group = zarr.create_group(str(out), zarr_format=2, attributes={STORE_MARK: store_mark()})
    if made == "array":
        group.create_array("0", shape=(0, *slices.shape[1:]), chunks=(1, *slices.shape[1:]),
                           dtype=np.uint8)
    (tmp_path / "o.zarr.watch.json").write_text(json.dumps(
        {"folder": str(folder.resolve()), "files": [], "written": 0, "flagged": [],
         "lookahead": 2}))
    result = watch_folder(folder, out, lookahead=2, idle_timeout=5, poll=0.01)
    assert result.written == len(slices)
    stored = zarr.open_group(str(out), mode="r")
    assert "multiscales" in stored.attrs and stored["0"].shape == slices.shape


def test_an_unreadable_file_stops_the_watch_with_its_name(tmp_path: Path) -> None:
    """A junk file among good slices is never dropped silently with the slices after it: at
    the idle timeout the watch fails naming it; removed, the rerun continues to the end."""
    from deepalign_fast.cli import main

    slices = _slices(8)
    folder = _acquired(tmp_path, slices, "s{z:04d}.tif")
    junk = folder / "s0003b.tif"  # between slices 3 and 4 in natural order
    junk.write_text("hello, this is not a TIFF")
    out = tmp_path / "o.ome.zarr"
    with pytest.raises(DeepAlignError, match=r"s0003b\.tif.*idle timeout.*4 later file"):
        watch_folder(folder, out, lookahead=2, poll=0.02, idle_timeout=0.5)
    argv = ["watch", str(folder), "-o", str(out), "--lookahead", "2", "--poll", "0.02",
            "--idle-timeout", "0.5", "--quiet"]
    assert main(argv) == 2  # the CLI: non-zero, as with an unreadable file at STOP
    junk.unlink()
    assert main(argv) == 0
    got = np.asarray(zarr.open_group(str(out), mode="r")["0"])
    np.testing.assert_array_equal(got, np.stack(list(Aligner().stream(iter(slices),
                                                                      lookahead=2))))


def test_a_file_still_being_written_is_waited_for(tmp_path: Path) -> None:
    """A file that keeps growing is not idleness: the watch waits for it past the idle
    timeout and takes it once it is complete."""
    slices = _slices(4)
    folder = _acquired(tmp_path, slices[:3], "s{z}.tif")
    tmp = tmp_path / "whole.tif"
    tifffile.imwrite(tmp, slices[3])
    data = tmp.read_bytes()
    growing = folder / "s3.tif"

    def microscope() -> None:  # writes the last slice slowly, over 3 idle timeouts
        with open(growing, "wb") as fh:
            for i in range(0, len(data), len(data) // 12 + 1):
                fh.write(data[i:i + len(data) // 12 + 1])
                fh.flush()
                time.sleep(0.1)

    thread = threading.Thread(target=microscope)
    thread.start()
    result = watch_folder(folder, tmp_path / "o.ome.zarr", lookahead=1, poll=0.02,
                          idle_timeout=0.4)
    thread.join()
    assert result.written == 4 and result.files[-1] == "s3.tif"


def test_a_slice_of_another_size_names_its_file(tmp_path: Path) -> None:
    # it said "stream slice 2: shape ...", naming no file
    folder = tmp_path / "acq"
    folder.mkdir()
    slices = _slices(4)
    for z, s in enumerate(slices):
        tifffile.imwrite(folder / f"s{z}.tif", s[:-6] if z == 2 else s)
    (folder / "STOP").touch()
    with pytest.raises(DeepAlignError, match=r"s2\.tif: slice 2 is .*the first \(s0\.tif\)"):
        watch_folder(folder, tmp_path / "o.zarr", lookahead=1, idle_timeout=5, poll=0.01)


def test_a_full_disk_names_the_store_and_the_slice(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
        ) -> None:
    """The disk fills while the watch writes slice 3: one line naming the store and the
    slice, exit status 1 (it read "?: the disk is full"); the rerun continues."""
    import errno

    from deepalign_fast.cli import main

    slices = _slices(8)
    folder = _acquired(tmp_path, slices)
    (folder / "STOP").touch()
    out = tmp_path / "o.ome.zarr"
    real = zarr.Array.__setitem__

    def full(self: Any, key: Any, value: Any) -> None:
        if key == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, key, value)

    argv = ["watch", str(folder), "-o", str(out), "--lookahead", "2", "--poll", "0.02",
            "--quiet"]
    with monkeypatch.context() as m:
        m.setattr(zarr.Array, "__setitem__", full)
        assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(out) in err and "slice 3" in err and "full" in err
    assert main(argv) == 0
    got = np.asarray(zarr.open_group(str(out), mode="r")["0"])
    np.testing.assert_array_equal(got, np.stack(list(Aligner().stream(iter(slices),
                                                                      lookahead=2))))


def test_watch_takes_the_align_options_of_a_config_and_keeps_them(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`watch --config FILE`: the slices are aligned with the file's options (here a rigid
    model: the result is the stream's with those options), recorded in the watch record; a
    rerun with other options is refused (it would replay the slices written differently),
    and so is a config that is one of the watch's own outputs."""
    slices = _slices(10)
    folder = _acquired(tmp_path, slices)
    (folder / "STOP").touch()
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"model": "rigid", "offsets": [1, 2]}))
    out = tmp_path / "w.ome.zarr"
    argv = ["watch", str(folder), "-o", str(out), "--lookahead", "2", "--poll", "0.02",
            "--quiet"]
    assert main([*argv, "--config", str(cfg)]) == 0
    got = np.asarray(zarr.open_group(str(out), mode="r")["0"])
    expected = np.stack(list(Aligner(model="rigid", offsets=(1, 2)).stream(iter(slices),
                                                                          lookahead=2)))
    np.testing.assert_array_equal(got, expected)
    assert json.loads((tmp_path / "w.ome.zarr.transforms.json").read_text())[
        "options"]["model"] == "rigid"
    capsys.readouterr()
    assert main(argv) == 2  # the default options now
    assert "continues a watch with other align options" in capsys.readouterr().err
    assert main([*argv, "--config", str(cfg)]) == 0  # the same ones: continues
    capsys.readouterr()
    own = tmp_path / "w.ome.zarr.transforms.json"
    assert main([*argv, "--config", str(own)]) == 2
    assert "is a file this watch writes" in capsys.readouterr().err
    cfg.write_text(json.dumps({"mode": "elastic"}))
    assert main(["watch", str(folder), "-o", str(tmp_path / "e.zarr"), "--config",
                 str(cfg)]) == 2
    assert "one affine per slice" in capsys.readouterr().err


def test_a_continued_watch_refuses_a_transforms_file_it_did_not_write(tmp_path: Path) -> None:
    """A file put at OUTPUT.transforms.json after a watch stopped (a user's, another
    tool's): the rerun refuses it before any work and leaves it as it was (it was replaced
    when the watch stopped again)."""
    folder = _acquired(tmp_path, _slices(6))
    out = tmp_path / "w.ome.zarr"
    watch_folder(folder, out, lookahead=2, poll=0.02, idle_timeout=0.3)
    tpath = tmp_path / "w.ome.zarr.transforms.json"
    assert tpath.is_file()
    tpath.write_text('{"mine": 1}')
    tifffile.imwrite(folder / "slice_6.tif", _slices(7)[6])
    (folder / "STOP").touch()
    with pytest.raises(DeepAlignError, match="is not the one this watch wrote"):
        watch_folder(folder, out, lookahead=2, poll=0.02, idle_timeout=0.3)
    assert tpath.read_text() == '{"mine": 1}'
    tpath.unlink()  # moved away: the watch continues and writes its own
    assert watch_folder(folder, out, lookahead=2, poll=0.02, idle_timeout=0.3).written == 7
    assert tpath.is_file()


def test_watch_records_a_voxel_size_in_its_store_and_transforms(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`watch --pixel-size 5 --unit nm`: the store's NGFF metadata and the transforms file
    carry it (the store read back gives it); a rerun with another size is refused."""
    from deepalign_fast.io import voxel_size_of
    from deepalign_fast.transforms import TransformSet

    folder = _acquired(tmp_path, _slices(6))
    (folder / "STOP").touch()
    out = tmp_path / "v.ome.zarr"
    argv = ["watch", str(folder), "-o", str(out), "--lookahead", "2", "--poll", "0.02",
            "--quiet", "--unit", "nm"]
    assert main([*argv, "--pixel-size", "5,5,8"]) == 0
    assert voxel_size_of(out) == ((8.0, 5.0, 5.0), "nm")
    ts = TransformSet.load(tmp_path / "v.ome.zarr.transforms.json")
    assert ts.voxel_size == (8.0, 5.0, 5.0) and ts.unit == "nanometer"
    capsys.readouterr()
    assert main([*argv, "--pixel-size", "4"]) == 2
    assert "records another voxel size" in capsys.readouterr().err
    assert main([*argv, "--pixel-size", "5,5,8"]) == 0
    with pytest.raises(DeepAlignError, match="not a length unit"):
        watch_folder(folder, tmp_path / "u.zarr", voxel_size=(1.0, 1.0, 1.0), unit="furlong")


def test_the_watch_store_grows_a_pyramid(tmp_path: Path) -> None:
    """Slices of 600 x 530: the store grows level 1 (300 x 265, 2x2 means of level 0) with
    level 0, valid NGFF 0.4; a watch killed after some slices and rerun gives the store of
    one uninterrupted run, pyramid included."""
    import cv2

    rng = np.random.default_rng(2)
    big = cv2.GaussianBlur((rng.random((640, 570)) * 255).astype(np.float32), (0, 0), 3)
    slices = np.stack([np.roll(big, (z, -z), axis=(0, 1))[20:-20, 20:-20]
                       for z in range(6)]).astype(np.uint8)
    folder = _acquired(tmp_path, slices)
    out = tmp_path / "p.ome.zarr"

    def stop_after_three(z: int) -> None:
        if z == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        watch_folder(folder, out, lookahead=2, poll=0.02, idle_timeout=0.3,
                     on_slice=stop_after_three)
    (folder / "STOP").touch()
    assert watch_folder(folder, out, lookahead=2, poll=0.02, idle_timeout=0.3).written == 6
    group = zarr.open_group(str(out), mode="r")
    level0, level1 = np.asarray(group["0"]), np.asarray(group["1"])
    assert level0.shape == (6, 600, 530) and level1.shape == (6, 300, 265)
    np.testing.assert_array_equal(level0, np.stack(list(Aligner().stream(iter(slices),
                                                                         lookahead=2))))
    expected = level0.astype(np.float32).reshape(6, 300, 2, 265, 2).mean(axis=(2, 4))
    assert np.abs(level1.astype(np.float32) - expected).max() <= 0.5
    models = pytest.importorskip("ome_zarr_models.v04.image")
    image = models.Image.from_zarr(group)  # validates the metadata and the arrays
    assert [d.path for d in image.attributes.multiscales[0].datasets] == ["0", "1"]
