"""Runtime flow predictor (ONNX, no torch): contract, tiling, recovery of a known deformation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from deepalign_fast import DeepAlignError
from deepalign_fast.fields import nonpositive_jacobian_fraction
from deepalign_fast.refine.flow import FlowPredictor, default_flow_model_path
from deepalign_fast.warp import warp_displacement

needs_model = pytest.mark.skipif(not default_flow_model_path().is_file(),
                                 reason="shipped flow.onnx not present")


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], amplitude: float,
                  spacing: float) -> np.ndarray:
    import cv2

    h, w = shape
    coarse = rng.normal(size=(2, int(h / spacing) + 2, int(w / spacing) + 2)).astype(np.float32)
    f = np.stack([cv2.resize(c, (w, h), interpolation=cv2.INTER_CUBIC) for c in coarse])
    return (f * amplitude / np.sqrt((f ** 2).sum(0)).max()).astype(np.float32)


def _inverse(d: np.ndarray) -> np.ndarray:
    u = -d
    for _ in range(30):
        u = -np.stack([warp_displacement(c, u) for c in d])  # interior only is used
    return u


@pytest.fixture(scope="module")
def predictor() -> FlowPredictor:
    if not default_flow_model_path().is_file():
        pytest.skip("shipped flow.onnx not present")
    return FlowPredictor(num_threads=1)


def test_bad_options_and_inputs(tmp_path: Path) -> None:
    with pytest.raises(DeepAlignError):
        FlowPredictor(tmp_path / "missing.onnx")
    with pytest.raises(DeepAlignError):
        FlowPredictor(tile=64)
    with pytest.raises(DeepAlignError):
        FlowPredictor(overlap=24)


@needs_model
def test_shape_dtype_determinism(predictor: FlowPredictor, lucchi) -> None:  # type: ignore[no-untyped-def]
    img = lucchi[0]
    f, m = img[140, :200, :300], img[141, :200, :300]  # not multiples of 16: padded inside
    u1 = predictor.predict(f, m)
    u2 = predictor.predict(f, m)
    assert u1.shape == (2, 200, 300) and u1.dtype == np.float32
    assert np.array_equal(u1, u2)
    assert np.isfinite(u1).all()
    with pytest.raises(DeepAlignError):
        predictor.predict(f, m[:100])
    with pytest.raises(DeepAlignError):
        predictor.predict(f[None], m[None])


@needs_model
def test_tiled_equals_untiled(lucchi) -> None:  # type: ignore[no-untyped-def]
    img = lucchi[0]
    f, m = img[150], img[151]  # 384 x 512
    whole = FlowPredictor(num_threads=1).predict(f, m)
    tiled = FlowPredictor(num_threads=1, tile=256, overlap=96).predict(f, m)
    diff = np.sqrt(((whole - tiled) ** 2).sum(0))
    # Tiles see less context; blended over the overlap, they agree to a small fraction of a px.
    assert float(np.mean(diff)) < 0.1
    assert float(np.percentile(diff, 99)) < 0.5


@needs_model
def test_recovers_known_deformation(predictor: FlowPredictor, lucchi, rng) -> None:  # type: ignore[no-untyped-def]
    img = lucchi[0][145].astype(np.float32)
    d = _smooth_field(rng, img.shape, amplitude=3.0, spacing=64)
    moving = warp_displacement(img, d)  # moving(p) = img(p + d(p))
    truth = _inverse(d)  # moving(p + truth(p)) = img(p)
    u = predictor.predict(img, moving)
    inner = (slice(24, -24), slice(24, -24))
    epe = np.sqrt(((u - truth) ** 2).sum(0))[inner].mean()
    epe_identity = np.sqrt((truth ** 2).sum(0))[inner].mean()
    assert epe < 0.5 * epe_identity
    assert nonpositive_jacobian_fraction(u) < 0.001
    err_before = np.abs(moving - img)[inner].mean()
    err_after = np.abs(warp_displacement(moving, u) - img)[inner].mean()
    assert err_after < err_before
