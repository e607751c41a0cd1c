"""The block matcher's coarse start (:func:`coarse_shift`) against known shifts."""

from __future__ import annotations

import cv2
import numpy as np
from deepalign_fast.match.blocks import BlockMatcher, coarse_shift


def test_coarse_shift_finds_a_plain_shift(rng):
    image = cv2.GaussianBlur(rng.random((256, 256)), (0, 0), 2.0)
    moved = np.roll(image, (-7, 12), axis=(0, 1))  # moving(p + (12, -7)) = image(p)
    sx, sy = coarse_shift(image, moved)
    assert abs(sx - 12) < 0.5 and abs(sy + 7) < 0.5


def test_coarse_shift_is_never_a_false_far_peak_on_thick_sections(isbi):
    """50-nm sections (isbi) whose correlation peak is weak: each neighbour pair, the moving
    one misaligned by a known rotation (1 deg), scale (1 %) and shift (6 px) as in the
    benchmarks. The coarse start may be off by the content's own motion (up to ~30 px
    between these sections), never by a far false peak (it was up to 96 px on 5 of 174
    pairs before the null shift became a candidate)."""
    stack = np.asarray(isbi[0])
    matcher = BlockMatcher(model="affine", threshold=2.0, lk_block=24, lk_step=12)
    gen = np.random.default_rng(0)
    h, w = stack.shape[1:]
    worst = 0.0
    for z in range(len(stack) - 1):
        ref = matcher.prepare(stack[z])
        for _ in range(6):
            angle, scale = gen.normal(0, 1.0), 1 + gen.normal(0, 0.01)
            shift = gen.normal(0, 6.0, 2)
            m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle, scale)
            m[:, 2] += shift  # moving(m p) = slice(p): the centre moves by `shift`
            mov = matcher.prepare(cv2.warpAffine(stack[z + 1], m, (w, h),
                                                 borderMode=cv2.BORDER_REFLECT))
            top = min(len(ref.pyramid), len(mov.pyramid)) - 1
            sx, sy = coarse_shift(ref.pyramid[top], mov.pyramid[top])
            worst = max(worst, float(np.hypot(sx * 2**top - shift[0], sy * 2**top - shift[1])))
    assert worst < 40.0
