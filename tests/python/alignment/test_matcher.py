"""The stack matcher's bookkeeping: the neighbour score the solve uses."""

from __future__ import annotations

import cv2
import numpy as np
import tifffile
from deepalign_fast.alignment.matcher import StackMatcher
from deepalign_fast.alignment.options import AlignOptions
from deepalign_fast.alignment.solve import SIMILAR_CONTENT


def _matched(stack: np.ndarray, **kw) -> StackMatcher:
    matcher = StackMatcher(AlignOptions(**kw), shape=stack.shape[1:])
    for z, image in enumerate(stack):
        matcher.add(z, matcher.backend.prepare(image))
    return matcher


def test_neighbour_score_is_the_blocks_correlation():
    rng = np.random.default_rng(0)
    base = cv2.GaussianBlur(rng.random((256, 256)), (0, 0), 3.0)
    base = (255 * (base - base.min()) / np.ptp(base)).astype(np.uint8)
    # one image shifted slice by slice: neighbours that hardly change
    stack = np.stack([np.roll(base, (z, 2 * z), axis=(0, 1)) for z in range(6)])
    matcher = _matched(stack)
    score = matcher.neighbour_score()
    assert score is not None and SIMILAR_CONTENT < score <= 1.0
    # one per slice, as ``matches``; the first slice has no predecessor
    assert len(matcher.scores) == len(stack) and np.isnan(matcher.scores[0])
    assert matcher.neighbour_score(start=3) is not None
    # the same with independent noise on every slice: the content "changes"
    noisy = np.clip(stack + rng.normal(0, 40, stack.shape), 0, 255).astype(np.uint8)
    noisy_score = _matched(noisy).neighbour_score()
    assert noisy_score is not None and noisy_score < score - 0.1


def test_neighbour_score_of_the_raw_shale_sample(tiny_stack):
    # raw, noisy FIB-SEM (the tiny stack): blocks correlate below SIMILAR_CONTENT, so the
    # solve keeps walks beyond the stage's allowance there, as without a score
    score = _matched(tifffile.imread(tiny_stack)).neighbour_score()
    assert score is not None and 0 < score < SIMILAR_CONTENT


def test_neighbour_score_is_unknown_for_keypoints(tiny_stack):
    stack = tifffile.imread(tiny_stack)
    assert _matched(stack, features="sift").neighbour_score() is None
