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
