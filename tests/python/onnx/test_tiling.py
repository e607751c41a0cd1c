"""Tiling shared by the feature and flow networks."""

from __future__ import annotations

from deepalign_fast.onnx.tiling import blend_ramp, tile_starts


def test_tiles_cover_and_blend() -> None:
    assert tile_starts(512, 512, 64) == [0]
    s = tile_starts(1040, 512, 128)
    assert s[0] == 0 and s[-1] == 1040 - 512
    assert all(b - a <= 512 - 128 for a, b in zip(s, s[1:], strict=False))
    r = blend_ramp(256, 64)
    assert r.min() > 0 and r.max() == 1.0 and r[0] < 0.05
