"""The stack matcher's bookkeeping: the neighbour score the solve uses."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import tifffile
from deepalign_fast.alignment.matcher import StackMatcher
from deepalign_fast.alignment.options import AlignOptions
from deepalign_fast.alignment.solve import SIMILAR_CONTENT


def _matched(stack: np.ndarray, **kw) -> StackMatcher:
    matcher = StackMatcher(AlignOptions(**kw), shape=stack.shape[1:])
    for z, image in enumerate(stack):
        matcher.add(z, matcher.backend.prepare(image))
    return matcher


def _field(rng: np.random.Generator) -> np.ndarray:
    f = cv2.GaussianBlur(rng.random((256, 256)), (0, 0), 3.0)
    return (f - f.mean()) / f.std()


def _u8(values: np.ndarray) -> np.ndarray:
    return np.clip(128 + 40 * values, 0, 255).astype(np.uint8)


def test_neighbour_score_discounts_noise():
    rng = np.random.default_rng(0)
    base = _field(rng)
    # one image shifted slice by slice: neighbours whose content does not change
    stack = np.stack([_u8(np.roll(base, (z, 2 * z), axis=(0, 1))) for z in range(8)])
    matcher = _matched(stack)
    score = matcher.neighbour_score()
    assert score is not None and score > 0.95
    # one per slice, as ``matches``; the first slice has no predecessor
    assert len(matcher.scores) == len(matcher.alike) == len(stack)
    assert np.isnan(matcher.scores[0]) and np.isnan(matcher.alike[1][1])
    assert matcher.neighbour_score(start=3) is not None
    # strong independent noise on every slice (raw FIB-SEM): the blocks correlate far less,
    # but the content is the same, and the score says so
    noisy = np.clip(stack + rng.normal(0, 80, stack.shape), 0, 255).astype(np.uint8)
    noisy_matcher = _matched(noisy)
    assert np.nanmedian(noisy_matcher.scores) < np.nanmedian(matcher.scores) - 0.3
    noisy_score = noisy_matcher.neighbour_score()
    assert noisy_score is not None and noisy_score > 0.95


@pytest.mark.parametrize("alike", [0.5, 0.7])
def test_neighbour_score_is_the_contents_correlation(alike):
    # content that changes from slice to slice (thick sections): each slice keeps a share of
    # the previous one's content, correlation ``alike``, and gets new content for the rest
    rng = np.random.default_rng(1)
    content, slices = _field(rng), []
    for _ in range(8):
        slices.append(_u8(content))
        content = alike * content + np.sqrt(1 - alike**2) * _field(rng)
    noisy = np.clip(np.stack(slices) + rng.normal(0, 70, (8, 256, 256)), 0, 255)
    matcher = _matched(noisy.astype(np.uint8))
    score = matcher.neighbour_score()
    assert score is not None and abs(score - alike) < 0.08
    assert np.nanmedian(matcher.scores) < alike - 0.1  # what the noise leaves of the blocks


def test_neighbour_score_falls_back_to_the_inlier_correlation():
    # no second-nearest pairs (offsets without 2): the nearest pairs' inlier correlation
    rng = np.random.default_rng(2)
    base = _field(rng)
    stack = np.stack([_u8(np.roll(base, (z, z), axis=(0, 1))) for z in range(5)])
    noisy = np.clip(stack + rng.normal(0, 80, stack.shape), 0, 255).astype(np.uint8)
    matcher = _matched(noisy, offsets=(1, 4))
    assert np.isnan(np.asarray(matcher.alike)[:, 1]).all()
    assert matcher.neighbour_score() == pytest.approx(float(np.nanmedian(matcher.scores)))


def test_a_lasting_drop_of_the_snr_becomes_the_baseline():
    # the content persists, but from slice 10 on every slice is far noisier: its nearest
    # pairs correlate at a fraction of the earlier ones; within a few slices that is what the
    # stack's neighbours look like, and later slices are matched as usual, not failed
    rng = np.random.default_rng(3)
    base = _field(rng)
    stack = np.stack([_u8(np.roll(base, (z, 2 * z), axis=(0, 1))) for z in range(24)])
    noisy = stack.astype(np.float64)
    noisy[10:] += rng.normal(0, 250, noisy[10:].shape)
    matcher = _matched(np.clip(noisy, 0, 255).astype(np.uint8))
    assert all(10 <= z < 15 for z in matcher.failed)


def test_one_second_nearest_pair_does_not_make_the_score(tiny_stack):
    # offsets without 2: a second-nearest pair is matched only after a nearest pair was left
    # out (a slice of noise); one such pair must not replace the fallback score
    from deepalign_fast.datasets import sample_stack_path

    stack = tifffile.imread(sample_stack_path())
    plain = _matched(stack, offsets=(1, 4))
    noisy = stack.copy()
    noisy[7] = np.random.default_rng(0).integers(0, 255, noisy[7].shape)
    matcher = _matched(noisy, offsets=(1, 4))
    assert np.isfinite(np.asarray(matcher.alike)[:, 1]).sum() <= 2
    assert matcher.neighbour_score() == pytest.approx(float(np.nanmedian(matcher.scores)))
    assert abs(matcher.neighbour_score() - plain.neighbour_score()) < 0.1


def test_neighbour_score_of_the_raw_shale_sample(tiny_stack):
    # raw, noisy FIB-SEM (the tiny stack): its blocks correlate as little as 50-nm sections
    # do, but its content persists over two slices nearly as over one: FIB-SEM, whose walks
    # are all the stage's
    matcher = _matched(tifffile.imread(tiny_stack))
    assert np.nanmedian(matcher.scores) < SIMILAR_CONTENT
    score = matcher.neighbour_score()
    assert score is not None and SIMILAR_CONTENT <= score <= 1.0


def test_neighbour_score_is_unknown_for_keypoints(tiny_stack):
    stack = tifffile.imread(tiny_stack)
    assert _matched(stack, features="sift").neighbour_score() is None


def test_a_nearest_pair_with_few_correspondences_is_recognised() -> None:
    matcher = StackMatcher(AlignOptions(), shape=(64, 64))
    matcher.matches = [0, 300, 320, 280, 310, 40, 30, 300]  # a blank slice, two damaged ones
    assert matcher._few(140)  # under half the median of the matched ones (300)
    assert not matcher._few(160)
    # too few matched nearest pairs to know what is usual: any count may be few (farther
    # pairs are matched from scratch too, and the pair with the most correspondences places
    # the slice)
    matcher.matches = [0, 300, 40]
    assert matcher._few(10) and matcher._few(1000)


def _turned_stack(degrees: float, shift: tuple[float, float] = (0.0, 0.0), margin: int = 40
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Fourteen copies of a real FIB-SEM slice on a wide, short frame (an XZ reslice's),
    slice 9 turned by ``degrees`` about the centre and shifted by ``shift``: the stack and
    the exact maps."""
    from deepalign_fast.datasets import sample_stack_path
    from deepalign_fast.qc.synth import misalign_stack

    base = tifffile.imread(sample_stack_path())[3][:200, :480]
    h, w = base.shape
    c = np.array([(w - 1) / 2.0, (h - 1) / 2.0])
    moves = np.tile(np.eye(2, 3), (14, 1, 1))
    t = np.deg2rad(degrees)
    moves[9, :, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    moves[9, :, 2] = c - moves[9, :, :2] @ c + shift
    stack, truth = misalign_stack(np.repeat(base[None], 14, axis=0), moves, margin=margin)
    return stack, truth.transforms


@pytest.mark.parametrize(("degrees", "shift", "margin"),
                         [(8.0, (0.0, 0.0), 40), (-7.0, (0.0, 0.0), 40),
                          (10.0, (12.0, -8.0), 56)])
def test_a_turned_slice_is_matched_from_a_turned_start(monkeypatch, degrees, shift, margin):
    """A slice turned by 7-10 degrees against its neighbours: from scratch (translation
    search, then refinement) its pairs were lost, and it was flagged and placed 25-29 px
    off; matched again from turned starts, it is placed within a few hundredths of a
    pixel. Turned by 10 degrees and shifted, the turned starts must search the translation
    too (a turn about the centre left it beyond the refinement's reach). (The back-end's
    spectral check, switched off here, finds these turns as well.)"""
    from deepalign_fast.alignment import matcher as matcher_module
    from deepalign_fast.geometry import apply_affine, compose, invert
    from deepalign_fast.match import blocks as blocks_module

    stack, truth = _turned_stack(degrees, shift, margin)
    monkeypatch.setattr(blocks_module, "spectral_turns", lambda *_a, **_k: [])
    monkeypatch.setattr(matcher_module, "TURNS", ())
    assert 9 in _matched(stack).failed  # without the turned starts
    monkeypatch.undo()
    assert _matched(stack).failed == []  # the defaults
    monkeypatch.setattr(blocks_module, "spectral_turns", lambda *_a, **_k: [])
    matched = _matched(stack)  # the turned starts alone
    assert matched.failed == []
    h, w = stack.shape[1:]
    gx, gy = np.meshgrid(np.linspace(0, w - 1, 8), np.linspace(0, h - 1, 8))
    grid = np.stack([gx.ravel(), gy.ravel()], 1)
    # the chained pose of slice 9 (slice 0's frame -> slice 9) against the exact one
    pose = next(p for z, _, p in matched.history if z == 9)
    exact = compose(invert(truth[9]), truth[0])
    assert np.linalg.norm(apply_affine(pose, grid) - apply_affine(exact, grid), axis=1).max() \
        < 0.05


def test_sections_turned_far_apart_are_matched_from_the_spectras_turn():
    """Copies of a real FIB-SEM slice, 5-9 turned by 24 degrees (and shifted) against 0-4:
    beyond the turned
    starts' reach (12-14 degrees), pair 4 -> 5 failed or held at a false turn, and slices
    5-9 were placed as a group tens of px off. From the turn the two slices' amplitude
    spectra show, every slice is matched and slice 9 placed within a few hundredths of a
    pixel."""
    from deepalign_fast.datasets import sample_stack_path
    from deepalign_fast.geometry import apply_affine, compose, invert
    from deepalign_fast.qc.synth import misalign_stack

    base = np.repeat(tifffile.imread(sample_stack_path())[3][None], 10, axis=0)
    h, w = base.shape[1:]
    c = np.array([(w - 1) / 2.0, (h - 1) / 2.0])
    t = np.deg2rad(24.0)
    turn = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    moves = np.tile(np.eye(2, 3), (10, 1, 1))
    moves[5:, :, :2] = turn
    moves[5:, :, 2] = c - turn @ c + (9.0, -6.0)
    stack, truth = misalign_stack(base, moves, margin=90)
    matched = _matched(stack)
    assert matched.failed == []
    hh, ww = stack.shape[1:]
    gx, gy = np.meshgrid(np.linspace(0, ww - 1, 8), np.linspace(0, hh - 1, 8))
    grid = np.stack([gx.ravel(), gy.ravel()], 1)
    pose = next(p for z, _, p in matched.history if z == 9)
    exact = compose(invert(truth.transforms[9]), truth.transforms[0])
    assert np.linalg.norm(apply_affine(pose, grid) - apply_affine(exact, grid), axis=1).max() \
        < 0.05


@pytest.mark.parametrize(("features", "retried"), [("blocks", True), ("sift", False)])
def test_turned_retries_only_where_the_start_matters(monkeypatch, features, retried):
    """A slice of noise among copies: the block matcher's failed pair is matched again from
    turned starts; a keypoint back-end matches the same whatever the start, so it is not
    asked again (it was, four times per failed pair)."""
    from deepalign_fast.alignment import matcher as matcher_module

    stack, _ = _turned_stack(0.0)
    stack[9] = np.random.default_rng(3).integers(0, 256, stack[9].shape)
    calls: list[int] = []
    real = matcher_module.StackMatcher._turned

    def counting(self, *args):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(self, *args)

    monkeypatch.setattr(matcher_module.StackMatcher, "_turned", counting)
    _matched(stack, features=features)
    assert bool(calls) == retried
