"""Every rendering mode on the tiny test stack (tests/data): one render path, reproduced by
`apply`, kept in memory, streamed, and equal or refused on a cluster. Needs no shared data."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile
from deepalign_fast import Aligner, AlignOptions, DeepAlignError
from deepalign_fast.cli import main
from deepalign_fast.datasets import sample_stack_path
from deepalign_fast.qc.metrics import ncc
from deepalign_fast.transforms import TransformSet

MODES = ["affine", "elastic", "expected-affine"]


@pytest.fixture
def stack_for(tiny_stack: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The input each mode is exercised on: the tiny stack, except for expected affine, whose
    clusters need more matches than 224^2 slices give (4 clusters of >= 12): the first 5
    slices of the bundled sample (384 x 512), refined with dense block matches
    (``refine_features="blocks"``: the learned keypoints are too few on this raw sample)."""
    def pick(mode: str) -> Path:
        if mode != "expected-affine":
            return tiny_stack
        path = tmp_path_factory.mktemp("sample") / "sample5.tif"
        tifffile.imwrite(path, tifffile.imread(sample_stack_path())[:5])
        return path
    return pick


def _neighbour_ncc(stack: np.ndarray, margin: int = 12) -> float:
    c = stack[:, margin:-margin, margin:-margin].astype(np.float64)
    return float(np.mean([ncc(c[z], c[z + 1]) for z in range(len(c) - 1)]))


def test_tiny_stack_is_aligned(tiny_stack: Path, tmp_path: Path) -> None:
    """The crop offsets (up to 4 px) are taken out: neighbours correlate better, no slice is
    flagged, and the slow-drift default keeps the offsets' straight-line trend only."""
    info = json.loads(tiny_stack.with_suffix(".json").read_text())
    res = Aligner().align_stack(tiny_stack, tmp_path / "out.tif", progress=False)
    assert res.flagged == []
    before = tifffile.imread(tiny_stack)
    after = tifffile.imread(tmp_path / "out.tif")
    assert _neighbour_ncc(after) > _neighbour_ncc(before) + 0.05
    # The pull translations move against the crop offsets: correlation close to -1.
    off = np.array(info["offsets_yx"], np.float64)[:, ::-1]
    t = res.transforms.affines[:, :, 2]
    for k in range(2):
        assert np.corrcoef(t[:, k], off[:, k])[0, 1] < -0.8


@pytest.mark.parametrize("mode", MODES)
def test_apply_reproduces_align(mode: str, stack_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`apply` on the input itself gives the aligned output pixel for pixel, in every mode:
    the transforms file carries the affine and the mode's per-slice fields."""
    src = stack_for(mode)
    out, tf = tmp_path / "out.tif", tmp_path / "t.json"
    refine = ["--refine-features", "blocks"] if mode == "expected-affine" else []
    assert main(["align", str(src), "-o", str(out), "--transforms", str(tf),
                 "--mode", mode, *refine, "--quiet", "--threads", "1"]) == 0
    ts = TransformSet.load(tf)
    kinds = {ts.slice_map(z).kind for z in range(len(ts))}
    expected = {"affine": "affine", "elastic": "displacement",
                "expected-affine": "affine-field"}[mode]
    assert expected in kinds  # the refinement really produced (and persisted) fields
    again = tmp_path / "again.tif"
    assert main(["apply", str(tf), str(src), "-o", str(again), "--interpolation", "linear",
                 "--quiet",
                 "--threads", "1"]) == 0
    np.testing.assert_array_equal(tifffile.imread(again), tifffile.imread(out))


@pytest.mark.parametrize("mode", ["elastic", "expected-affine"])
def test_in_memory_transforms_hold_the_fields(mode: str, stack_for,  # type: ignore[no-untyped-def]
                                              tmp_path: Path) -> None:
    """After align_stack the returned transforms hold the fields (no reload from disk), and
    render never changes the transforms it was given."""
    src = stack_for(mode)
    aligner = Aligner(mode=mode, refine_features="blocks", num_threads=1)
    estimated = aligner.estimate(src, progress=False).transforms
    rendered, _ = aligner.render(src, estimated, tmp_path / "r.tif", progress=False)
    assert estimated.fields is None and rendered.fields is not None
    assert any(rendered.slice_map(z).kind != "affine" for z in range(len(rendered)))
    res = aligner.align_stack(src, tmp_path / "out.tif", progress=False)
    assert res.transforms.fields is not None
    assert any(res.transforms.slice_map(z).kind != "affine" for z in range(len(res.transforms)))


@pytest.mark.parametrize("mode", MODES)
def test_stream_every_mode(mode: str, stack_for) -> None:  # type: ignore[no-untyped-def]
    """A stream renders each slice with the mode's map: refined modes differ from the affine
    render on some slice, and every slice comes out once, in order."""
    stack = tifffile.imread(stack_for(mode))
    out = list(Aligner(mode=mode, refine_features="blocks", num_threads=1).stream(
        iter(stack), lookahead=2))
    assert len(out) == len(stack) and all(o.shape == stack[0].shape for o in out)
    if mode != "affine":
        plain = list(Aligner(num_threads=1).stream(iter(stack), lookahead=2))
        assert any(not np.array_equal(a, b) for a, b in zip(out, plain, strict=True))


def test_transforms_versions_load(tiny_stack: Path, tmp_path: Path) -> None:
    """A version 2 file (displacement fields, no "kind") still loads as displacement fields;
    a field store whose kind contradicts the file is refused."""
    out, tf = tmp_path / "out.tif", tmp_path / "t.json"
    Aligner(mode="elastic", num_threads=1).align_stack(tiny_stack, out, transforms_path=tf,
                                                       progress=False)
    data = json.loads(tf.read_text())
    assert data["version"] == 3 and data["fields"]["kind"] == "displacement"
    data["version"] = 2
    del data["fields"]["kind"]
    tf.write_text(json.dumps(data))
    assert TransformSet.load(tf).slice_map(1).kind == "displacement"
    data["fields"]["kind"] = "affine"
    data["version"] = 3
    tf.write_text(json.dumps(data))
    from deepalign_fast import DeepAlignError

    with pytest.raises(DeepAlignError, match="holds displacement fields"):
        TransformSet.load(tf)


@pytest.mark.parametrize("mode", ["elastic", "expected-affine"])
def test_refined_modes_are_refused_on_a_cluster(mode: str, tiny_stack: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Refinement runs on one machine (slices in order, each reusing what its predecessor
    computed for their pair), so a cluster run of a refined mode is refused before any work,
    by the CLI and the API alike."""
    out = tmp_path / "out.ome.zarr"
    rc = main(["align", str(tiny_stack), "-o", str(out), "--mode", mode,
               "--scheduler", "local:2", "--quiet"])
    assert rc == 2
    assert f"--mode {mode} runs on one machine" in capsys.readouterr().err
    assert not out.exists()
    pytest.importorskip("distributed")
    from deepalign_fast.alignment.distributed import align_distributed

    with pytest.raises(ValueError, match="runs on one machine"):
        align_distributed(tiny_stack, out, scheduler="local:1",
                          options=AlignOptions(mode=mode))
    assert not out.exists()


def test_existing_field_store_is_never_replaced_without_overwrite(tiny_stack: Path,
                                                                  tmp_path: Path) -> None:
    """A refined run would write NAME.fields.zarr beside the transforms file: an existing one
    (from an earlier run, or anything of the user's) is refused before any work."""
    from deepalign_fast import DeepAlignError

    tf = tmp_path / "t.json"
    store = tmp_path / "t.fields.zarr"
    store.mkdir()
    (store / "keep.txt").write_text("mine")
    with pytest.raises(DeepAlignError, match=r"\(field store\) already exists"):
        Aligner(mode="elastic", num_threads=1).align_stack(
            tiny_stack, tmp_path / "out.tif", transforms_path=tf, progress=False)
    assert (store / "keep.txt").read_text() == "mine" and not (tmp_path / "out.tif").exists()


def test_an_affine_run_refuses_to_leave_an_earlier_field_store_beside_it(
        tiny_stack: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An affine run writes no field store, so an elastic run's store beside the transforms
    file it replaces would be left there, taken for the new run's. Refused before any work,
    with --overwrite too, by the CLI and the API; nothing is replaced or removed."""
    out = tmp_path / "o.tif"
    assert main(["align", str(tiny_stack), "-o", str(out), "--mode", "elastic",
                 "--quiet"]) == 0
    store = tmp_path / "o.fields.zarr"
    assert store.is_dir()
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    assert main(["align", str(tiny_stack), "-o", str(out), "--overwrite", "--quiet"]) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and str(store) in line and "earlier elastic" in line
    with pytest.raises(DeepAlignError, match="earlier elastic"):
        Aligner(num_threads=1).align_stack(tiny_stack, out, overwrite=True, progress=False,
                                           transforms_path=tmp_path / "o.transforms.json")
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before
    # Another transforms file has no store beside it: that run goes ahead.
    assert main(["align", str(tiny_stack), "-o", str(tmp_path / "p.tif"), "--quiet"]) == 0


def test_elastic_slices_are_never_refined_toward_a_blank_one(tiny_stack: Path,
                                                              tmp_path: Path) -> None:
    """Slices 3 and 5 blank: they are flagged and serve no other slice as a neighbour, so
    slice 4 between them keeps its affine (no field: its folding is None) while slices 2
    and 6 move toward their other neighbour; the stream runs the same way."""
    stack = tifffile.imread(tiny_stack)
    stack[[3, 5]] = 0
    src = tmp_path / "blanks.tif"
    tifffile.imwrite(src, stack, photometric="minisblack")
    result = Aligner(mode="elastic", num_threads=1).align_stack(src, tmp_path / "o.tif",
                                                                progress=False)
    folding = result.transforms.folding
    assert result.flagged == [3, 5]
    assert folding[3] is None and folding[4] is None and folding[5] is None
    assert all(folding[z] is not None for z in (0, 1, 2, 6, 7))
    stream = Aligner(mode="elastic", num_threads=1).stream(iter(stack), lookahead=1)
    assert len(list(stream)) == len(stack) and stream.flagged == [3, 5]


def test_a_slice_whose_refinement_failed_is_flagged_with_its_reason(
        tiny_stack: Path, tmp_path: Path, nan_flow_at: Callable[[int], list[int]]) -> None:
    """A flow of NaN between two slices (the second flow: slices 1 and 2): both keep their
    affine, are flagged, and the summary says why ("unrefined"), in a file-to-file run and
    in a stream."""
    calls = nan_flow_at(2)
    result = Aligner(mode="elastic", num_threads=1).align_stack(
        tiny_stack, tmp_path / "out.tif", progress=False)
    assert len(calls) == len(tifffile.imread(tiny_stack)) - 1  # one flow per pair
    assert result.flagged == [1, 2]
    assert result.summary()["flag_reasons"] == {"1": "unrefined", "2": "unrefined"}
    # the stream flags them too (it did not, before reasons were kept)
    calls.clear()
    stream = Aligner(mode="elastic", num_threads=1).stream(iter(tifffile.imread(tiny_stack)),
                                                           lookahead=2)
    list(stream)
    assert stream.flagged == [1, 2]
    assert stream.flag_reasons == {1: "unrefined", 2: "unrefined"}


def test_a_flow_that_folds_even_scaled_down_is_flagged_and_apply_still_works(
        tiny_stack: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A flow that folds beyond max_folding even at 1/8 strength is dropped: the slice keeps
    its affine, is flagged "unrefined" (it was not flagged at all), and its transforms still
    apply (its folding was recorded without a field, which apply took for a damaged store)."""
    from deepalign_fast.refine import flow

    rng = np.random.default_rng(0)

    def folding(self, previous, moving):  # type: ignore[no-untyped-def]
        # 40 px at random per pixel: neighbouring pixels swap places, the Jacobian is
        # negative nearly everywhere (and the mean of two such flows too)
        return rng.normal(0.0, 40.0, (2,) + previous.shape).astype(np.float32)

    monkeypatch.setattr(flow.FlowPredictor, "predict", folding)
    tf = tmp_path / "t.json"
    result = Aligner(mode="elastic", num_threads=1).align_stack(
        tiny_stack, tmp_path / "out.tif", transforms_path=tf, progress=False)
    n = len(tifffile.imread(tiny_stack))
    assert result.flagged == list(range(n))  # every slice has a neighbour to move toward
    assert set(result.flag_reasons.values()) == {"unrefined"}
    assert TransformSet.load(tf).flag_reasons == result.flag_reasons  # (kept in the file)
    assert main(["apply", str(tf), str(tiny_stack), "-o", str(tmp_path / "again.tif"),
                 "--interpolation", "linear", "--quiet"]) == 0
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "again.tif"),
                                  tifffile.imread(tmp_path / "out.tif"))


@pytest.mark.parametrize("failing", [(4, 5), (4,)])
def test_an_expected_affine_fallback_is_flagged(failing: tuple[int, ...], stack_for,  # type: ignore[no-untyped-def]
                                                tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Slice 2 is registered onto slices 1 and 2 (calls 4 and 5: one call for slice 0, two
    for slice 1). Both fall back (too few matches): it keeps its affine and is flagged
    "unrefined". One falls back: it is refined
    toward the other neighbour alone, and not flagged."""
    from deepalign_fast.refine import expected_affine

    real = expected_affine.register_pair
    calls: list[int] = []

    def fails(*a, **k):  # type: ignore[no-untyped-def]
        calls.append(1)
        res = real(*a, **k)
        if len(calls) in failing:
            res.fallback, res.reason = True, "too few matches"
        return res

    monkeypatch.setattr(expected_affine, "register_pair", fails)
    path = stack_for("expected-affine")
    tf = tmp_path / "t.json"
    result = Aligner(mode="expected-affine", refine_features="blocks", num_threads=1
                     ).align_stack(path, tmp_path / "out.tif", transforms_path=tf,
                                   progress=False)
    n = len(tifffile.imread(path))
    assert len(calls) == 2 * (n - 1)  # each slice onto both neighbours
    fields = TransformSet.load(tf)
    notes = result.summary()["refine_notes"]
    assert fields.notes == {int(z): t for z, t in notes.items()}  # kept in the file too
    if len(failing) == 2:
        assert result.flagged == [2] and result.flag_reasons == {2: "unrefined"}
        assert fields.slice_map(2).affine_field is None
        assert notes["2"].startswith("affine kept: onto slice 1: too few matches; onto "
                                     "slice 3: too few matches")
    else:
        assert result.flagged == []
        assert fields.slice_map(2).affine_field is not None
        assert notes["2"] == "refined toward one neighbour: onto slice 1: too few matches"
    assert all(fields.slice_map(z).affine_field is not None for z in range(n) if z != 2)


@pytest.mark.parametrize("damage", ["deleted", "corrupt", "inf", "huge", "part-nan"])
def test_apply_names_a_damaged_field_store(damage: str, tiny_stack: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A slice's field chunk deleted or overwritten after `align --mode elastic`, or its values
    edited to inf, to displacements beyond the frame or partly to NaN (were: an empty slice
    with exit 0, or "missing from the store"): `apply` stops with one line naming the store
    and the slice (never renders the slice without its field, never a raw error), and
    writes no output."""
    out, tf = tmp_path / "out.tif", tmp_path / "t.json"
    assert main(["align", str(tiny_stack), "-o", str(out), "--transforms", str(tf),
                 "--mode", "elastic", "--quiet", "--threads", "1"]) == 0
    store = TransformSet.load(tf).fields
    assert store is not None and TransformSet.load(tf).folding[3] is not None
    chunks = [p for p in store.path.rglob("*")
              if p.is_file() and p.relative_to(store.path).parts[:2] == ("c", "3")]
    assert len(chunks) == 1
    if damage == "deleted":
        chunks[0].unlink()
    elif damage == "corrupt":
        chunks[0].write_bytes(b"not a chunk")
    else:
        import zarr

        edited = zarr.open_array(str(store.path), mode="r+")
        grid = np.asarray(edited[3])
        grid[0, 0, 0] = {"inf": np.inf, "huge": 5000.0, "part-nan": np.nan}[damage]
        edited[3] = grid
    capsys.readouterr()
    again = tmp_path / "again.tif"
    assert main(["apply", str(tf), str(tiny_stack), "-o", str(again), "--quiet",
                 "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(store.path) in err and "slice 3" in err
    if damage not in ("deleted", "corrupt"):
        assert "non-finite values or values beyond the output frame" in err
    assert not again.exists()


@pytest.mark.parametrize("mode, module, name", [
    ("elastic", "deepalign_fast.refine.flow", "default_flow_model_path"),
    ("expected-affine", "deepalign_fast.match.learned", "default_model_path")])
def test_a_missing_network_is_named_before_any_work(mode: str, module: str, name: str,
                                                     tiny_stack: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    monkeypatch.setattr(importlib.import_module(module), name,
                        lambda: tmp_path / "gone.onnx")

    def no_estimate(*a, **k):  # type: ignore[no-untyped-def]
        raise AssertionError("estimated before refusing")

    monkeypatch.setattr(Aligner, "estimate", no_estimate)
    with pytest.raises(DeepAlignError, match="gone.onnx: the network"):
        Aligner(mode=mode).align_stack(tiny_stack, tmp_path / "o.tif", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_field_store_of_another_run_is_refused(tiny_stack: Path, tmp_path: Path) -> None:
    """Two elastic runs of one stack write stores of one shape; one put in the other's place
    was used without a word (exit 0, the other run's deformation)."""
    for name in ("a", "b"):
        Aligner(mode="elastic", num_threads=1).align_stack(
            tiny_stack, tmp_path / f"{name}.tif", transforms_path=tmp_path / f"{name}.json",
            progress=False)
    (tmp_path / "a.fields.zarr").rename(tmp_path / "a.kept")
    (tmp_path / "b.fields.zarr").rename(tmp_path / "a.fields.zarr")
    with pytest.raises(DeepAlignError, match="written by another run"):
        TransformSet.load(tmp_path / "a.json")


def test_masks_given_as_a_path_are_kept_as_text(stack_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """``Aligner(masks=Path(...))``: the run works and its record keeps the masks' name as
    text (a Path stopped the run with a raw TypeError while writing the resume record)."""
    path = stack_for("expected-affine")
    masks = tmp_path / "masks.tif"
    tifffile.imwrite(masks, np.zeros(tifffile.imread(path).shape, np.uint8))
    assert AlignOptions(masks=masks).masks == str(masks)
    tf = tmp_path / "t.json"
    Aligner(mode="expected-affine", refine_features="blocks", masks=masks, num_threads=1
            ).align_stack(path, tmp_path / "out.tif", transforms_path=tf, progress=False)
    assert json.loads(tf.read_text())["options"]["masks"] == str(masks)


def test_a_followed_stream_gives_the_refiner_the_next_slice_in_its_own_frame(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``slow_drift="follow"``: each stream window has its own gauge, carried into the
    stream's frame. The next slice, handed to the refiner as a neighbour at this window's
    estimate, is carried over too: it lies where it later goes out, give or take what the
    next window changes (it was left in the window's frame, 27 px off after 24 slices of a
    2.5 px per slice drift)."""
    from deepalign_fast.alignment import aligner as aligner_module
    from deepalign_fast.render import SliceMap, render_slice
    from deepalign_fast.warp import warp_affine

    base = tifffile.imread(sample_stack_path()).astype(np.float32)
    slices = [warp_affine(base[z % len(base)], np.array([[1, 0, 2.5 * z], [0, 1, 1.5 * z]]),
                          base.shape[1:]) for z in range(24)]
    estimate: dict[int, np.ndarray] = {}
    own: dict[int, np.ndarray] = {}

    class Recorder:
        failed: list[int] = []

        def __init__(self, shape: tuple[int, int]) -> None:
            self.shape = shape

        def __call__(self, z, image, affine, neighbours=None, *, flagged=False):  # type: ignore[no-untyped-def]
            if neighbours is not None and neighbours.usable(z + 1):
                estimate[z + 1] = np.asarray(neighbours.read(z + 1)[1])
            own[z] = np.asarray(affine)
            return SliceMap(affine), render_slice(image, SliceMap(affine), self.shape)

        def close(self) -> None:
            pass

    monkeypatch.setattr(aligner_module, "make_refiner",
                        lambda mode, shape, **_: (Recorder(shape), None))
    out = list(Aligner(mode="elastic", slow_drift="follow", num_threads=1).stream(
        iter(slices), lookahead=2))
    assert len(out) == len(slices) and len(estimate) > 15
    gaps = [float(np.abs(estimate[z] - own[z])[:, 2].max()) for z in estimate]
    assert max(gaps) < 5.0, gaps


def test_the_cli_says_why_a_slice_kept_its_affine(stack_for, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """An unrefined slice's reason is printed under the flag reasons (it stayed in the
    refiner); a transforms file whose notes are not slice -> text is refused in one line."""
    from deepalign_fast.refine import expected_affine

    real = expected_affine.register_pair

    def falls_back(*a, **k):  # type: ignore[no-untyped-def]
        res = real(*a, **k)
        res.fallback, res.reason = True, "too few matches"
        return res

    monkeypatch.setattr(expected_affine, "register_pair", falls_back)
    path = stack_for("expected-affine")
    out, tf = tmp_path / "out.tif", tmp_path / "t.json"
    assert main(["align", str(path), "-o", str(out), "--transforms", str(tf), "--mode",
                 "expected-affine", "--refine-features", "blocks", "--threads", "1",
                 "--quiet"]) == 3  # every slice flagged
    text = capsys.readouterr().out
    assert "      slice 0: affine kept: onto slice 1: too few matches" in text
    data = json.loads(tf.read_text())
    from deepalign_fast import DeepAlignError

    for bad in ({"0": 5}, {"\u00b2": "x"}, {"01": "x"}, {"-1": "x"}, {"99": "x"}, ["x"]):
        data["notes"] = bad
        tf.write_text(json.dumps(data))
        with pytest.raises(DeepAlignError, match="'notes' must map slice numbers"):
            TransformSet.load(tf)
