"""apply_transforms: an earlier alignment's transforms applied from Python, with the checks
of the command line's `apply`."""

from __future__ import annotations

from pathlib import Path

import deepalign_fast as daf
import numpy as np
import pytest
import tifffile
from deepalign_fast import Aligner, DeepAlignError


@pytest.fixture()
def aligned(tmp_path: Path, tiny_stack: Path) -> tuple[Path, Path]:
    out, tf = tmp_path / "aligned.tif", tmp_path / "aligned.json"
    Aligner(num_threads=1).align_stack(tiny_stack, out, transforms_path=tf, progress=False)
    return out, tf


def test_apply_reproduces_the_alignment_and_keeps_wide_label_ids(
        tmp_path: Path, tiny_stack: Path, aligned: tuple[Path, Path]) -> None:
    """Linear: the aligned stack again, pixel for pixel. Nearest on uint32 labels: every
    output value is one of the input's IDs (none blended, none lost to float32), placed
    where the image's pixels went."""
    out, tf = aligned
    again = tmp_path / "again.tif"
    ts = daf.apply_transforms(tf, tiny_stack, again, interpolation="linear", progress=False)
    np.testing.assert_array_equal(tifffile.imread(again), tifffile.imread(out))
    assert len(ts) == len(tifffile.imread(out))

    image = tifffile.imread(tiny_stack)
    ids = (image.astype(np.uint32) // 32) * 1_000_003 + 4_000_000_000  # near 2**32
    tifffile.imwrite(tmp_path / "labels.tif", ids)
    daf.apply_transforms(tf, tmp_path / "labels.tif", tmp_path / "l.tif", progress=False)
    got = tifffile.imread(tmp_path / "l.tif")
    assert got.dtype == np.uint32
    assert set(np.unique(got)) <= set(np.unique(ids)) | {0}
    # where the image's render is its nearest sample, the labels' is the same sample's ID
    near = tmp_path / "near.tif"
    daf.apply_transforms(tf, tiny_stack, near, progress=False)  # nearest on the image
    want = (tifffile.imread(near).astype(np.uint32) // 32) * 1_000_003 + 4_000_000_000
    inside = got != 0
    assert inside.mean() > 0.8
    np.testing.assert_array_equal(got[inside], want[inside])


def test_apply_checks_its_paths_and_arguments_before_any_work(
        tmp_path: Path, tiny_stack: Path, aligned: tuple[Path, Path]) -> None:
    out, tf = aligned
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(DeepAlignError, match="overwrite=True"):
        daf.apply_transforms(tf, tiny_stack, out)  # exists
    with pytest.raises(DeepAlignError, match="is the input|an input"):
        daf.apply_transforms(tf, tiny_stack, tiny_stack, overwrite=True)
    with pytest.raises(DeepAlignError, match="scale must lie between"):
        daf.apply_transforms(tf, tiny_stack, tmp_path / "x.tif", scale=100.0)
    with pytest.raises(DeepAlignError, match="scale must lie between"):
        daf.apply_transforms(tf, tiny_stack, tmp_path / "x.tif", scale=float("nan"))
    with pytest.raises(DeepAlignError, match="interpolation must be"):
        daf.apply_transforms(tf, tiny_stack, tmp_path / "x.tif",
                             interpolation="cubic")  # type: ignore[arg-type]
    with pytest.raises(DeepAlignError, match="compression applies to TIFF"):
        daf.apply_transforms(tf, tiny_stack, tmp_path / "x.ome.zarr", compression="zlib")
    short = tmp_path / "short.tif"
    tifffile.imwrite(short, tifffile.imread(tiny_stack)[:4], photometric="minisblack")
    before.append(short)
    with pytest.raises(DeepAlignError, match="holds 4 slice"):
        daf.apply_transforms(tf, short, tmp_path / "x.tif")
    big = tmp_path / "big.tif"  # a 2x finer copy given without scale, then with 3
    tifffile.imwrite(big, np.repeat(np.repeat(tifffile.imread(tiny_stack), 2, 1), 2, 2),
                     photometric="minisblack")
    before.append(big)
    with pytest.raises(DeepAlignError, match=r"slices are 448 x 448 .* made for 224 x 224;"):
        daf.apply_transforms(tf, big, tmp_path / "x.tif")
    with pytest.raises(DeepAlignError, match=r"made for 224 x 224 \(scaled by 3: 672 x 672\)"):
        daf.apply_transforms(tf, big, tmp_path / "x.tif", scale=3.0)
    assert sorted(tmp_path.rglob("*")) == sorted(before)  # nothing written
    # overwrite=True replaces the output with the same render
    first = tifffile.imread(out)
    daf.apply_transforms(tf, tiny_stack, out, interpolation="linear", overwrite=True,
                         progress=False)
    np.testing.assert_array_equal(tifffile.imread(out), first)


def test_the_transforms_file_keeps_why_slices_were_flagged(
        tmp_path: Path, tiny_stack: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A blank slice: the transforms file says why it was flagged, and `apply` names the
    reason where the labels are used (it said "its summary says why", gone by then); a file
    whose reasons name a slice that is not flagged is refused."""
    import json

    from deepalign_fast import TransformSet
    from deepalign_fast.cli import main

    stack = tifffile.imread(tiny_stack)
    stack[3] = 17
    src = tmp_path / "b.tif"
    tifffile.imwrite(src, stack, photometric="minisblack")
    tf = tmp_path / "b.json"
    Aligner(num_threads=1).align_stack(src, tmp_path / "o.tif", transforms_path=tf,
                                       progress=False)
    ts = TransformSet.load(tf)
    assert ts.flagged == [3] and ts.flag_reasons == {3: "blank"}
    assert main(["apply", str(tf), str(src), "-o", str(tmp_path / "l.tif"), "--quiet"]) == 0
    assert "flagged 1 slice(s) [3] (3: blank (one value throughout))" in capsys.readouterr().out
    data = json.loads(tf.read_text())
    data["flag_reasons"] = {"2": "blank"}
    tf.write_text(json.dumps(data))
    with pytest.raises(DeepAlignError, match="'flag_reasons' must map flagged slices"):
        TransformSet.load(tf)
