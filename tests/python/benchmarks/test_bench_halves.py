"""bench_halves: a slice misaligned as a whole against halves that move on their own."""

from __future__ import annotations

import numpy as np
import pytest


def test_bench_halves_tells_a_whole_slice_misalignment_from_independent_halves() -> None:
    """Slices jittered as a whole: the two halves' fast motion correlates near 1 and has the
    jitter's size; halves jittered independently: near 0."""
    import cv2
    from deepalign_fast.qc.synth import drift_transforms, misalign_stack

    from benchmarks.bench_halves import compare

    rng = np.random.default_rng(7)
    texture = cv2.GaussianBlur(rng.normal(128, 60, (140, 260)), (0, 0), 2.0)
    clean = np.repeat(np.clip(texture, 0, 255).astype(np.uint8)[None], 24, axis=0)
    still = {"walk": 0.0, "smooth": 0.0, "jitter": 1.0, "rotation_deg": 0.0, "scale": 0.0,
             "shear": 0.0}

    def jittered(stack: np.ndarray, seed: int) -> np.ndarray:
        moves = drift_transforms(len(stack), stack.shape[1:], np.random.default_rng(seed),
                                 **still)
        return misalign_stack(stack, moves, margin=6)[0]

    whole = compare(jittered(clean, 1), "left/right")
    assert min(whole["correlation"]) > 0.95
    assert all(0.6 < r < 1.4 for half in whole["rms"] for r in half)
    apart = np.concatenate([jittered(clean[:, :, :130], 2), jittered(clean[:, :, 130:], 3)],
                           axis=2)
    independent = compare(apart, "left/right")
    assert max(abs(c) for c in independent["correlation"]) < 0.6
    with pytest.raises(ValueError, match="unknown split"):
        compare(apart, "diagonal")
