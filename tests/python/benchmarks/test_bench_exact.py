"""make-benchmark's exact-truth stacks (reslices, drift profiles) and eval's jitter error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from deepalign_fast.cli import main
from deepalign_fast.qc.synth import GroundTruth


def _volume() -> np.ndarray:
    """A smooth random isotropic (z, y, x) volume: its reslices are exactly aligned."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(7)
    vol = gaussian_filter(rng.random((48, 72, 120)), 1.6)
    vol = (vol - vol.min()) / np.ptp(vol) * 255
    return vol.astype(np.uint8)


def test_reslice_drift_benchmark_align_eval(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    tifffile.imwrite(tmp_path / "vol.tif", _volume())
    bench = tmp_path / "bench"
    assert main(["make-benchmark", str(tmp_path / "vol.tif"), str(bench), "--reslice", "xz",
                 "--profile", "drift-mild", "--seed", "3"]) == 0
    truth = GroundTruth.from_json((bench / "ground_truth.json").read_text())
    mis = tifffile.imread(bench / "misaligned.tif")
    assert len(truth) == 72 and mis.shape[0] == 72  # one plane per y
    assert truth.profile == "drift-mild"
    assert not list(bench.glob(".*"))  # no temp litter
    out = tmp_path / "aligned.tif"
    assert main(["align", str(bench / "misaligned.tif"), "-o", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), str(bench), "--json", "--quiet"]) == 0
    after = json.loads(capsys.readouterr().out)
    assert main(["eval", str(bench / "misaligned.tif"), str(bench), "--json", "--quiet"]) == 0
    before = json.loads(capsys.readouterr().out)
    # Fast errors are removed: the jitter error falls well below doing nothing's.
    assert after["jitter"]["median"] < 0.5 * before["jitter"]["median"]
    assert after["jitter"]["median"] < 0.7  # small planes: eval's own re-registration adds noise
    # the linear part is a part of each slice's error (the grid is symmetric about the centre)
    assert 0 < after["linear"]["median"] <= after["tre"]["median"]


def test_bad_reslice_and_profile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tifffile.imwrite(tmp_path / "vol.tif", _volume())
    with pytest.raises(SystemExit):
        main(["make-benchmark", str(tmp_path / "vol.tif"), str(tmp_path / "b"),
              "--reslice", "zz"])
    with pytest.raises(SystemExit):
        main(["make-benchmark", str(tmp_path / "vol.tif"), str(tmp_path / "b"),
              "--profile", "drift-wild"])


def test_select_planes_takes_every_kth_of_a_centred_run() -> None:
    from benchmarks.bench_exact import select_planes

    stack = np.arange(20)[:, None, None] * np.ones((1, 2, 2))
    assert select_planes(stack, None)[:, 0, 0].tolist() == list(range(20))
    assert select_planes(stack, 4)[:, 0, 0].tolist() == [8, 9, 10, 11]
    assert select_planes(stack, 4, 3)[:, 0, 0].tolist() == [4, 7, 10, 13]
    assert select_planes(stack, None, 3)[:, 0, 0].tolist() == [0, 3, 6, 9, 12, 15, 18]
    assert select_planes(stack, 50, 2)[:, 0, 0].tolist() == list(range(0, 20, 2))


def test_cases_are_what_their_names_say() -> None:
    from deepalign_fast.qc.synth import DRIFT_PROFILES

    from benchmarks.bench_exact import CASES, QUICK

    for case in [*CASES.values(), *QUICK.values()]:
        assert case.spacing == 1 and case.upsample >= 1
        assert (case.profile is None) == case.name.endswith("control")
        assert case.profile is None or case.profile in DRIFT_PROFILES
        assert case.describe().startswith(case.source)


def test_bench_slope_compares_limits_on_the_same_matches(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """benchmarks.bench_slope on a small smooth volume: the specs stay inside the reslices,
    every stack gets a TRE per limit from one matching, the limit is restored, and a limit
    that binds moves an aligned stack with a steep apparent slope more than a loose one."""
    from deepalign_fast.alignment import solve

    from benchmarks import bench_slope

    vol = _volume()
    n_planes = {"xz": vol.shape[1], "yz": vol.shape[2]}
    specs = bench_slope.specs_for(24, n_planes)
    assert specs and all(s[1] + s[2] <= n_planes[s[0]] for s in specs)
    assert {s[5] for s in specs} == {"none", "mild", "strong"}
    default = solve.ANATOMY_SLOPE
    # An aligned stack whose content moves 0.5 px per slice: a limit of 0.1 corrects most of
    # it as drift, a limit of 1.0 keeps it.
    shifted = np.stack([np.roll(vol[20], (0, k // 2), axis=(0, 1)) for k in range(24)])
    shifted = np.ascontiguousarray(shifted[:, 8:-8, 8:-8])
    monkeypatch.setattr(bench_slope, "build", lambda spec, volume: (
        shifted, np.tile(np.eye(2, 3), (len(shifted), 1, 1))))
    row = bench_slope.run(("xz", 0, 24, 0, 0, "none", 0), vol, [0.1, 1.0])
    assert solve.ANATOMY_SLOPE == default
    assert row["tre"]["0.1"] > 2.0 > 0.5 > row["tre"]["1.0"]
    assert "| 24 |" in bench_slope.table([row], [0.1, 1.0])


def test_damage_leaves_a_strip_of_each_drawn_slice_and_nothing_else() -> None:
    from benchmarks.bench_exact import damage

    rng = np.random.default_rng(3)
    stack = rng.integers(0, 256, (12, 20, 40), dtype=np.uint8)
    before = stack.copy()
    out, slices = damage(stack, 4, 0.25, np.random.default_rng(5))
    assert np.array_equal(stack, before)  # the input is not modified
    assert len(slices) == 4 and len(set(slices)) == 4
    for z in range(len(stack)):
        same = (out[z] == stack[z]).all(axis=0)  # columns left as they were
        if z not in slices:
            assert same.all()
            continue
        kept = np.flatnonzero(same)
        assert len(kept) >= 10 and np.all(np.diff(kept) == 1)  # one strip of 10 columns...
        flat = np.delete(out[z], kept, axis=1)
        assert np.all(flat == np.median(stack[z]).astype(np.uint8))  # ... the rest flat
    again, slices2 = damage(stack, 4, 0.25, np.random.default_rng(5))
    assert slices2 == slices and np.array_equal(again, out)  # a function of the seed


def test_damage_rejects_bad_counts_and_fractions() -> None:
    from benchmarks.bench_exact import damage
    from benchmarks.bench_exact import main as bench_main

    stack = np.zeros((5, 8, 8), np.uint8)
    with pytest.raises(ValueError, match="cannot damage 6 of 5"):
        damage(stack, 6, 0.5, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        damage(stack, 1, 0.0, np.random.default_rng(0))
    with pytest.raises(SystemExit, match="--damaged-keep"):
        bench_main(["--cases", "xz-drift", "--damaged", "3", "--damaged-keep", "1.5"])


def test_invert_contrast_inverts_the_drawn_slices_only() -> None:
    from benchmarks.bench_exact import invert_contrast

    stack = np.random.default_rng(1).integers(10, 200, (8, 6, 7), dtype=np.uint8)
    before = stack.copy()
    out, slices = invert_contrast(stack, 2, np.random.default_rng(0))
    assert np.array_equal(stack, before) and len(set(slices)) == 2
    for z in range(len(stack)):
        if z in slices:  # value -> min + max - value
            total = int(stack[z].min()) + int(stack[z].max())
            assert np.all(out[z].astype(int) + stack[z].astype(int) == total)
        else:
            assert np.array_equal(out[z], stack[z])
    with pytest.raises(ValueError, match="cannot invert 9 of 8"):
        invert_contrast(stack, 9, np.random.default_rng(0))


def test_glitch_moves_and_rotates_the_drawn_slices_only() -> None:
    from deepalign_fast.geometry import apply_affine

    from benchmarks.bench_exact import glitch
    from benchmarks.bench_exact import main as bench_main

    shape = (40, 60)
    transforms = np.tile(np.eye(2, 3), (10, 1, 1))
    transforms[:, :, 2] = np.random.default_rng(2).normal(0, 1, (10, 2))
    before = transforms.copy()
    out, slices = glitch(transforms, 3, 12.0, 2.0, shape, np.random.default_rng(4))
    assert np.array_equal(transforms, before) and len(set(slices)) == 3
    centre = np.array([[29.5, 19.5]])
    corner = np.array([[59.0, 39.0]])
    for z in range(10):
        if z not in slices:
            assert np.array_equal(out[z], transforms[z])
            continue
        # the centre moves by the shift; the frame turns by the rotation about it
        moved = apply_affine(out[z], centre) - apply_affine(transforms[z], centre)
        assert np.isclose(np.linalg.norm(moved), 12.0)
        turned = np.degrees(np.arctan2(out[z][1, 0], out[z][0, 0]))
        assert np.isclose(abs(turned), 2.0)
        arm = apply_affine(out[z], corner) - apply_affine(out[z], centre)
        assert np.isclose(np.linalg.norm(arm), np.linalg.norm(corner - centre))
    again, slices2 = glitch(transforms, 3, 12.0, 2.0, shape, np.random.default_rng(4))
    assert slices2 == slices and np.array_equal(again, out)  # a function of the seed
    with pytest.raises(ValueError, match="cannot glitch 11 of 10"):
        glitch(transforms, 11, 1.0, 0.0, shape, np.random.default_rng(0))
    with pytest.raises(SystemExit, match="--glitched"):
        bench_main(["--cases", "xz-drift", "--glitched", "-1"])
    with pytest.raises(SystemExit, match="--glitch-shift"):
        bench_main(["--cases", "xz-drift", "--glitched", "2", "--glitch-shift", "nan"])
    # chosen slices instead of drawn ones (a glitch among the first slices)
    chosen, at = glitch(transforms, 2, 12.0, 0.0, shape, np.random.default_rng(4), (1, 0))
    assert at == [0, 1] and np.array_equal(chosen[2:], transforms[2:])
    assert not np.array_equal(chosen[:2], transforms[:2])
    with pytest.raises(ValueError, match="cannot glitch slices"):
        glitch(transforms, 2, 1.0, 0.0, shape, np.random.default_rng(0), (3, 10))
    for bad in ("x", "-1", "1,2 --glitched 3"):
        with pytest.raises(SystemExit, match="--glitch-at"):
            bench_main(["--cases", "xz-drift", "--glitch-at", *bad.split()])



def test_turn_volume_samples_each_slice_at_the_turned_positions() -> None:
    """A linear intensity ramp is reproduced exactly by bilinear sampling, so each output
    pixel must equal the ramp at its source position under the turn (float64 reference), and
    every z slice is turned alike (a constant per slice survives unchanged)."""
    from benchmarks.bench_exact import turn_volume

    h, w, deg = 60, 80, 30.0
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    ramp = 0.7 * xx - 0.4 * yy
    vol = np.stack([ramp + 100.0 * z for z in range(3)]).astype(np.float32)
    out = turn_volume(vol, deg)
    _, ch, cw = out.shape
    assert out.shape[0] == 3 and 0.5 * h < ch < h and 0.5 * w < cw < w
    assert abs(ch / cw - h / w) < 0.02  # same aspect ratio
    t = np.radians(deg)
    r, c = np.mgrid[0:ch, 0:cw].astype(np.float64)
    u, v = c - (cw - 1) / 2, r - (ch - 1) / 2  # output position about the frame centre
    # the output is the input turned counter-clockwise on screen (y down): source = R^-1 out
    xs = np.cos(t) * u - np.sin(t) * v + (w - 1) / 2
    ys = np.sin(t) * u + np.cos(t) * v + (h - 1) / 2
    assert xs.min() >= 0 and xs.max() <= w - 1 and ys.min() >= 0 and ys.max() <= h - 1
    for z in range(3):
        np.testing.assert_allclose(out[z], 0.7 * xs - 0.4 * ys + 100.0 * z, atol=2e-2)
    assert turn_volume(vol, 0.0) is vol
    with pytest.raises(ValueError, match="leaves"):  # a thin frame has no inside left
        turn_volume(np.zeros((1, 7, 300), np.float32), 10.0)
    from benchmarks.bench_exact import main as bench_main

    with pytest.raises(SystemExit, match="--turn nan"):
        bench_main(["--cases", "xz-control", "--turn", "nan", "--peers", "none"])
