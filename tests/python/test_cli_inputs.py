"""Bad input on the command line: one line naming the file (and slice) and the problem, no
usage block, no library log, no silent wrong result."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile
from deepalign_fast.cli import main


def _texture(rng: np.random.Generator, n: int, size: int = 96) -> np.ndarray:
    import cv2

    big = cv2.GaussianBlur((rng.random((size + 16, size + 16)) * 255).astype(np.float32),
                           (0, 0), 2.0)
    return np.stack([np.roll(big, (z % 3, z % 2), axis=(0, 1))[8:-8, 8:-8]
                     for z in range(n)]).astype(np.uint8)


@pytest.fixture
def src(tmp_path: Path, rng: np.random.Generator) -> Path:
    path = tmp_path / "s.tif"
    tifffile.imwrite(path, _texture(rng, 6), photometric="minisblack")
    return path


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_usage_error_is_one_line(src: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A bad choice: the error and where to look, not the 24-line usage block."""
    with pytest.raises(SystemExit) as exc:
        main(["align", str(src), "-o", str(tmp_path / "o.tif"), "--model", "foo"])
    assert exc.value.code == 2
    err = _one_line(capsys)
    assert "invalid choice: 'foo'" in err and "deepalign-fast align --help" in err
    assert "usage:" not in err
    # a flag the command does not know: the command's help, not the top-level one
    with pytest.raises(SystemExit) as exc:
        main(["align", str(src), "-o", str(tmp_path / "o.tif"), "--neighbours", "2"])
    assert exc.value.code == 2
    err = _one_line(capsys)
    assert "unrecognized arguments: --neighbours 2" in err
    assert "(see: deepalign-fast align --help)" in err


def test_truncated_tiff_logs_nothing_from_tifffile(tmp_path: Path, rng: np.random.Generator,
                                                   caplog: pytest.LogCaptureFixture,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """tifffile's own 'invalid page offset' line stays out of stderr (was a second line)."""
    path = tmp_path / "cut.tif"
    tifffile.imwrite(path, _texture(rng, 12), photometric="minisblack")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 3])
    with caplog.at_level(logging.DEBUG):
        assert main(["align", str(path), "-o", str(tmp_path / "o.tif"), "--quiet"]) == 2
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("tifffile")]
    assert "cut.tif, slice 4: truncated" in _one_line(capsys)
    assert logging.getLogger("tifffile").level == logging.NOTSET  # restored after the run


def test_single_slice_says_what_a_cli_user_can_do(tmp_path: Path, rng: np.random.Generator,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "one.tif"
    tifffile.imwrite(path, _texture(rng, 1), photometric="minisblack")
    assert main(["align", str(path), "-o", str(tmp_path / "o.tif")]) == 2
    err = _one_line(capsys)
    assert "one.tif: holds a single 2-D image" in err and "Pass the whole stack" in err
    assert "allow_single" not in err and "read_image" not in err


def test_all_flagged_summary_says_no_slice_matched(tmp_path: Path, rng: np.random.Generator,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "tiny.tif"
    tifffile.imwrite(path, rng.integers(0, 255, (6, 8, 8), dtype=np.uint8),
                     photometric="minisblack")
    assert main(["align", str(path), "-o", str(tmp_path / "o.tif"), "--quiet"]) == 3
    out = capsys.readouterr().out
    assert "no slice could be matched to a neighbour (every slice was flagged)" in out
    assert "single slice" not in out


@pytest.mark.parametrize("suffix", [".tif", ".zarr"])
def test_unknown_unit_is_refused(src: Path, tmp_path: Path, suffix: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    """--unit furlongs was dropped from the OME-Zarr metadata without a word."""
    out = tmp_path / f"o{suffix}"
    assert main(["align", str(src), "-o", str(out), "--pixel-size", "5", "--unit",
                 "furlongs"]) == 2
    assert "--unit 'furlongs': not a length unit of OME-NGFF" in _one_line(capsys)
    assert not out.exists()


def test_register_names_both_files_and_sizes(tmp_path: Path, rng: np.random.Generator,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    stack = _texture(rng, 3)
    fixed, small, many = tmp_path / "fixed.tif", tmp_path / "small.tif", tmp_path / "many.tif"
    tifffile.imwrite(fixed, stack[0])
    tifffile.imwrite(small, stack[1, :16, :16])
    tifffile.imwrite(many, stack, photometric="minisblack")
    out = str(tmp_path / "o.tif")
    # was: "operands could not be broadcast together with shapes (93,95) (16,15)"
    assert main(["register", str(fixed), str(small), "-o", out, "--features", "blocks"]) == 2
    err = _one_line(capsys)
    assert "small.tif: (MOVING) is 16 x 16 px" in err and "fixed.tif (FIXED) is 96 x 96 px" \
        in err
    assert main(["register", str(fixed), str(fixed), "--mask", str(small), "-o", out]) == 2
    assert "small.tif: (--mask) is 16 x 16 px but" in _one_line(capsys)
    assert main(["register", str(fixed), str(fixed), "--mask", str(many), "-o", out]) == 2
    assert "many.tif: (--mask) holds 3 slices" in _one_line(capsys)
    full = tmp_path / "full.tif"
    tifffile.imwrite(full, np.full(stack[0].shape, 255, np.uint8))
    assert main(["register", str(fixed), str(fixed), "--mask", str(full), "-o", out]) == 2
    assert "full.tif: (--mask) mask covers the whole moving section" in _one_line(capsys)
    # was: "a folder of slices needs one 2-D image per file"
    assert main(["register", str(fixed), str(many), "-o", out]) == 2
    err = _one_line(capsys)
    assert "many.tif: holds 3 slices (pages), but a single 2-D image is needed" in err
    assert "folder" not in err


def test_make_benchmark_overwrite_refuses_an_earlier_runs_labels(
        src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Rewriting a benchmark without --labels would leave the earlier run's labels beside a
    stack they do not match: refused before anything is written."""
    labels = tmp_path / "labels.tif"
    tifffile.imwrite(labels, np.zeros((6, 96, 96), np.uint8), photometric="minisblack")
    bench = tmp_path / "b"
    assert main(["make-benchmark", str(src), str(bench), "--labels", str(labels)]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in bench.iterdir()}
    assert main(["make-benchmark", str(src), str(bench), "--overwrite", "--seed", "7"]) == 2
    err = _one_line(capsys)
    assert "labels of an earlier benchmark" in err and "misaligned_labels.tif" in err
    assert {p.name: p.read_bytes() for p in bench.iterdir()} == before
    assert main(["make-benchmark", str(src), str(bench), "--overwrite", "--seed", "7",
                 "--labels", str(labels)]) == 0


def test_a_killed_make_benchmark_is_finished_by_the_same_command(
        src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Killed between its files (the stack in place, the ground truth not): the same command
    refused ("already exists"); with --overwrite over another seed's benchmark, the new stack
    sat beside the old ground truth, silently. The same command now finishes the run; a
    killed --overwrite leaves no ground truth (the earlier one goes first), eval refuses the
    folder, and the same command finishes it."""
    import os

    bench, ref = tmp_path / "b", tmp_path / "ref"
    real = os.replace

    def killed_at_the_truth(src_: object, dst: object, *a: object, **k: object) -> None:
        if Path(str(dst)).name == "ground_truth.json":
            raise KeyboardInterrupt
        real(src_, dst, *a, **k)  # type: ignore[arg-type]

    def run(*extra: str, into: Path = bench, killed: bool = False) -> int:
        with monkeypatch.context() as m:
            if killed:
                m.setattr(os, "replace", killed_at_the_truth)
            return main(["make-benchmark", str(src), str(into), *extra])

    def files(folder: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.startswith(".")}

    assert run(killed=True) == 130
    assert (bench / "misaligned.tif").is_file() and not (bench / "ground_truth.json").exists()
    assert run() == 0
    assert run("--seed", "4", into=ref) == 0
    assert run("--seed", "4", "--overwrite", killed=True) == 130
    # the earlier benchmark's ground truth went first: none sits beside the new stack, and
    # eval refuses the folder (it scored the mix, silently wrong)
    assert not (bench / "ground_truth.json").exists()
    capsys.readouterr()
    assert main(["eval", str(bench / "misaligned.tif"), str(bench)]) == 2
    assert "stopped before it finished" in _one_line(capsys)
    # nothing of the first benchmark is left: this run's command finishes it, with or
    # without --overwrite
    assert run("--seed", "4") == 0
    assert files(bench) == files(ref) and not list(bench.glob(".*"))


def test_make_benchmark_and_eval_name_the_file(src: Path, tmp_path: Path,
                                               rng: np.random.Generator,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    labels = tmp_path / "labels.tif"
    tifffile.imwrite(labels, np.zeros((2, 96, 96), np.uint8), photometric="minisblack")
    assert main(["make-benchmark", str(src), str(tmp_path / "b1"), "--labels",
                 str(labels)]) == 2
    err = _one_line(capsys)
    assert "labels.tif: the label stack has shape (2, 96, 96)" in err and "s.tif" in err
    bench = tmp_path / "b2"
    assert main(["make-benchmark", str(src), str(bench)]) == 0
    capsys.readouterr()
    gt = bench / "ground_truth.json"
    nan, short = json.loads(gt.read_text()), json.loads(gt.read_text())
    nan["transforms"][3][0][2] = float("nan")
    short["transforms"] = short["transforms"][:5]
    for data, words in ((nan, "slice 3 holds NaN"), (short, "holds 5 transforms but")):
        gt.write_text(json.dumps(data))
        assert main(["eval", str(src), str(bench), "--quiet"]) == 2
        err = _one_line(capsys)
        assert str(gt) in err and words in err, err
    capsys.readouterr()
    assert main(["eval", str(src), str(tmp_path / "nowhere"), "--quiet"]) == 2
    assert "nowhere: no such folder; give a folder written by make-benchmark" in \
        _one_line(capsys)
    for text in ('{"x": 1}', "[1]", "garbage"):
        gt.write_text(text)
        assert main(["eval", str(src), str(bench), "--quiet"]) == 2
        err = _one_line(capsys)
        assert f"{gt}: not a valid ground-truth JSON" in err, err


def test_report_refuses_stacks_and_transforms_of_other_runs(
        src: Path, tmp_path: Path, rng: np.random.Generator,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Exit 0 with the mismatch only inside the HTML was easy to miss."""
    short = tmp_path / "short.tif"
    tifffile.imwrite(short, _texture(rng, 4), photometric="minisblack")
    assert main(["align", str(short), "-o", str(tmp_path / "a.tif"), "--quiet"]) == 0
    capsys.readouterr()
    html = tmp_path / "r.html"
    assert main(["report", str(src), str(short), "-o", str(html), "--quiet"]) == 2
    assert "short.tif: (AFTER) has 4 slices, but" in _one_line(capsys)
    assert main(["report", str(src), str(src), "--transforms",
                 str(tmp_path / "a.transforms.json"), "-o", str(html), "--quiet"]) == 2
    err = _one_line(capsys)
    assert "a.transforms.json: (--transforms) holds 4 slices' transforms" in err
    assert "s.tif (BEFORE) has 6 slices" in err
    # the transforms of a 2x binned copy of the same stacks: their frames do not fit
    binned = tmp_path / "binned.tif"
    tifffile.imwrite(binned, tifffile.imread(short)[:, ::2, ::2], photometric="minisblack")
    assert main(["align", str(binned), "-o", str(tmp_path / "b.tif"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["report", str(short), str(tmp_path / "a.tif"), "--transforms",
                 str(tmp_path / "b.transforms.json"), "-o", str(html), "--quiet"]) == 2
    assert "(--transforms) is for BEFORE slices of" in _one_line(capsys)
    assert not html.exists()
    assert main(["report", str(short), str(tmp_path / "a.tif"), "--transforms",
                 str(tmp_path / "a.transforms.json"), "-o", str(html), "--quiet"]) == 0


def test_apply_takes_label_stacks_of_any_integer_type(src: Path, tmp_path: Path,
                                                      rng: np.random.Generator,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """uint32/uint64 segmentations (IDs beyond float32's 2**24) come out of `apply` with their
    type and their IDs: exactly the input's pixels at the nearest sample points (was: refused,
    with advice to convert to float32, which changed 6039 of 6272 IDs). Linear interpolation
    of such labels is refused in one line that warns against float32."""
    from deepalign_fast import TransformSet
    from deepalign_fast.render import SliceMap, render_slice

    assert main(["align", str(src), "-o", str(tmp_path / "a.tif"), "--quiet"]) == 0
    ts = TransformSet.load(tmp_path / "a.transforms.json")
    for dtype in (np.uint32, np.uint64):
        top = np.iinfo(dtype).max
        labels = rng.integers(top - 10**6, top, size=(6, 96, 96), dtype=dtype, endpoint=True)
        path = tmp_path / f"labels_{np.dtype(dtype).name}.tif"
        tifffile.imwrite(path, labels, photometric="minisblack")
        for out in (tmp_path / f"{path.stem}.out.tif", tmp_path / f"{path.stem}.ome.zarr"):
            assert main(["apply", str(tmp_path / "a.transforms.json"), str(path), "-o",
                         str(out), "--quiet"]) == 0
            from deepalign_fast.io import open_stack

            with open_stack(out, labels=True) as r:
                assert r.dtype == dtype
                k = np.dtype(dtype).itemsize // 2  # 16-bit lanes; lane 0 = the low bits
                for z in range(6):  # the 16-bit nearest kernel's own choice, value by value
                    ref = render_slice(labels[z].view(np.uint16)[:, ::k].copy(),
                                       SliceMap(ts.affines[z]), ts.output_shape,
                                       interpolation="nearest")
                    got = r.read(z)
                    assert set(np.unique(got)) <= set(np.unique(labels[z])) | {0}
                    np.testing.assert_array_equal(got.view(np.uint16)[:, ::k], ref)
    # transforms of a 2x binned copy, applied to the full-size labels (was: refused)
    import cv2

    small = np.stack([cv2.resize(s, (48, 48), interpolation=cv2.INTER_AREA)
                      for s in tifffile.imread(src)])
    tifffile.imwrite(tmp_path / "small.tif", small, photometric="minisblack")
    assert main(["align", str(tmp_path / "small.tif"), "-o", str(tmp_path / "b.tif"),
                 "--quiet"]) == 0
    assert main(["apply", str(tmp_path / "b.transforms.json"), str(path), "--scale", "2",
                 "-o", str(tmp_path / "scaled.tif"), "--quiet"]) == 0
    from deepalign_fast.io import open_stack

    with open_stack(tmp_path / "scaled.tif", labels=True) as r:
        assert r.dtype == np.uint64 and r.shape == (6, 96, 96)
    capsys.readouterr()
    assert main(["apply", str(tmp_path / "a.transforms.json"), str(path), "-o",
                 str(tmp_path / "lin.tif"), "--interpolation", "linear", "--quiet"]) == 2
    err = _one_line(capsys)
    assert "uint64 is not supported" in err and "never labels to float32" in err


def test_outputs_named_for_another_format(src: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """--report x.png wrote HTML under that name; --transforms t.fields.zarr wrote a JSON file
    there and t.fields.zarr.fields.zarr beside it: refused in one line, nothing written."""
    for argv in (["--report", str(tmp_path / "r.png")],
                 ["--transforms", str(tmp_path / "t.fields.zarr"), "--mode", "elastic"]):
        assert main(["align", str(src), "-o", str(tmp_path / "a.tif"), *argv, "--quiet"]) == 2
        assert "is written as" in _one_line(capsys)
    assert main(["report", str(src), str(src), "-o", str(tmp_path / "r.png")]) == 2
    assert "is written as an HTML page" in _one_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.tif"]


def test_watch_options_are_named_as_flags(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """--threads -2 named "num_threads"; --stop-file /etc/passwd (or ../STOP) was taken as a
    path outside FOLDER, and stopped the watch at once."""
    (tmp_path / "in").mkdir()
    for argv, words in ((["--threads", "-2"], "--threads must be >= 0"),
                        (["--stop-file", "/etc/passwd"], "(--stop-file) must be a file name"),
                        (["--stop-file", "../STOP"], "(--stop-file) must be a file name")):
        assert main(["watch", str(tmp_path / "in"), "-o", str(tmp_path / "o.ome.zarr"),
                     "--idle-timeout", "1", *argv]) == 2
        assert words in _one_line(capsys)
    assert not (tmp_path / "o.ome.zarr").exists()


def test_a_repeated_flagged_slice_is_refused(src: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["align", str(src), "-o", str(tmp_path / "a.tif"), "--quiet"]) == 0
    tf = tmp_path / "a.transforms.json"
    data = json.loads(tf.read_text())
    tf.write_text(json.dumps({**data, "flagged": [3, 3]}))
    capsys.readouterr()
    assert main(["apply", str(tf), str(src), "-o", str(tmp_path / "b.tif")]) == 2
    assert "'flagged' must list slice numbers 0..5, each once" in _one_line(capsys)


def test_sigterm_says_resume_only_where_a_rerun_resumes(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from deepalign_fast import cli

    def terminated(args: object) -> int:
        raise cli._Terminated()
    monkeypatch.setattr(cli, "_cmd_config", terminated)
    assert main(["config", "--defaults"]) == 143
    err = _one_line(capsys)
    assert "terminated (SIGTERM)" in err and "resumes" not in err


def test_apply_names_the_slice_count_of_a_single_image(src: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    """A single 2-D image given to `apply` (was: "one slice has no neighbour to align to",
    a reason for `align`): the count against the transforms'."""
    assert main(["align", str(src), "-o", str(tmp_path / "a.tif"), "--quiet"]) == 0
    one = tmp_path / "one.tif"
    tifffile.imwrite(one, tifffile.imread(src)[0])
    capsys.readouterr()
    assert main(["apply", str(tmp_path / "a.transforms.json"), str(one), "-o",
                 str(tmp_path / "o.tif")]) == 2
    err = _one_line(capsys)
    assert "one.tif: holds 1 slice(s), but the transforms" in err and "are for 6" in err
    assert "neighbour" not in err and not (tmp_path / "o.tif").exists()


def test_align_names_slices_the_followed_drift_moves_off_the_frame(
        tmp_path: Path, rng: np.random.Generator, capsys: pytest.CaptureFixture[str]) -> None:
    """`--slow-drift follow` on a stack drifting 6 px per slice over a 96-px frame: the end
    slices map wholly outside their input, empty in the output, and the summary says so
    (was: silent black slices); `--canvas union` keeps every slice."""
    import cv2

    big = cv2.GaussianBlur((rng.random((160, 400)) * 255).astype(np.float32), (0, 0), 2.0)
    stack = np.stack([big[30:126, 6 * z: 6 * z + 96] for z in range(40)]).astype(np.uint8)
    src = tmp_path / "drift.tif"
    tifffile.imwrite(src, stack, photometric="minisblack")
    assert main(["align", str(src), "-o", str(tmp_path / "f.tif"), "--slow-drift", "follow",
                 "--model", "translation", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["outside"] and summary["outside"][0] == 0 and summary["outside"][-1] == 39
    assert main(["align", str(src), "-o", str(tmp_path / "g.tif"), "--slow-drift", "follow",
                 "--model", "translation"]) == 0
    assert "map wholly outside their input and are empty" in capsys.readouterr().out
    assert main(["align", str(src), "-o", str(tmp_path / "u.tif"), "--slow-drift", "follow",
                 "--model", "translation", "--canvas", "union", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["outside"] == []


def test_the_summary_warns_when_the_slices_hardly_match(tmp_path: Path, src: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    """Unrelated images (noise) were "aligned" with exit 0 and nothing to say so but a match
    count near the minimum: the summary now warns; a real stack's does not."""
    rng = np.random.default_rng(0)
    noise = tmp_path / "noise.tif"
    tifffile.imwrite(noise, rng.integers(0, 255, (8, 128, 128)).astype(np.uint8),
                     photometric="minisblack")
    assert main(["align", str(noise), "-o", str(tmp_path / "n.tif"), "--quiet"]) in (0, 3)
    assert "warning: few matches (a pair needs 12)" in capsys.readouterr().out
    assert main(["align", str(src), "-o", str(tmp_path / "out.tif"), "--quiet"]) == 0
    assert "warning: few matches" not in capsys.readouterr().out
