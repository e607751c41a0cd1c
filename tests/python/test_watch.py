"""watch: a folder filled at acquisition pace (a half-written file included), restart."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from deepalign_fast import Aligner, DeepAlignError
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
    # Rerun the same call: it continues, and the result is that of one uninterrupted run.
    result = watch_folder(folder, out, lookahead=3, poll=0.02, idle_timeout=5.0)
    assert result.written == len(slices) and len(result.files) == len(slices)
    assert result.files[:3] == ["slice_0.tif", "slice_1.tif", "slice_2.tif"]
    got = np.asarray(zarr.open_group(str(out), mode="r")["0"])
    expected = np.stack(list(Aligner().stream(iter(slices), lookahead=3)))
    np.testing.assert_array_equal(got, expected)
    state = (tmp_path / "live.ome.zarr.watch.json").read_text()
    assert '"written": 12' in state


def test_watch_refusals(tmp_path: Path) -> None:
    folder = tmp_path / "acq"
    folder.mkdir()
    with pytest.raises(DeepAlignError, match="OME-Zarr"):
        watch_folder(folder, tmp_path / "o.tif")
    with pytest.raises(DeepAlignError, match="inside the watched folder"):
        watch_folder(folder, folder / "o.zarr")
    (tmp_path / "other.zarr").mkdir()
    with pytest.raises(DeepAlignError, match="not a watch"):
        watch_folder(folder, tmp_path / "other.zarr", idle_timeout=0.1, poll=0.01)


def test_an_unreadable_file_stops_the_watch_with_its_name(tmp_path: Path) -> None:
    """A junk file among good slices is never dropped silently with the slices after it: at
    the idle timeout the watch fails naming it; removed, the rerun continues to the end."""
    from deepalign_fast.cli import main

    slices = _slices(8)
    folder = tmp_path / "acq"
    folder.mkdir()
    for z, s in enumerate(slices):
        tifffile.imwrite(folder / f"s{z:04d}.tif", s)
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
    folder = tmp_path / "acq"
    folder.mkdir()
    for z, s in enumerate(slices[:3]):
        tifffile.imwrite(folder / f"s{z}.tif", s)
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
