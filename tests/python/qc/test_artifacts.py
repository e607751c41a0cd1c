from __future__ import annotations

import numpy as np
import pytest
from deepalign_fast import DeepAlignError
from deepalign_fast.qc.artifacts import ARTIFACT_KINDS, ArtifactParams, apply_artifacts


def _slice(rng: np.random.Generator) -> np.ndarray:
    # Smooth texture plus edges, uint8 like real EM.
    import cv2

    base = rng.random((96, 128)).astype(np.float32)
    base = cv2.GaussianBlur(base, (0, 0), 3)
    base = (base - base.min()) / (base.max() - base.min())
    return (base * 200 + 20).astype(np.uint8)


@pytest.mark.parametrize("kind", ARTIFACT_KINDS)
def test_each_kind_changes_image_and_keeps_contract(kind: str, rng: np.random.Generator) -> None:
    img = _slice(rng)
    out = apply_artifacts(img, np.random.default_rng(7), kinds=[kind])
    assert out.dtype == np.float32
    assert out.shape == img.shape
    assert np.isfinite(out).all()
    diff = np.abs(out - img.astype(np.float32))
    assert diff.mean() > 0.05, f"{kind} left the image unchanged"


@pytest.mark.parametrize("kind", ARTIFACT_KINDS)
def test_deterministic_for_a_seed(kind: str, rng: np.random.Generator) -> None:
    img = _slice(rng)
    a = apply_artifacts(img, np.random.default_rng(3), kinds=[kind])
    b = apply_artifacts(img, np.random.default_rng(3), kinds=[kind])
    c = apply_artifacts(img, np.random.default_rng(4), kinds=[kind])
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_all_kinds_uint16_and_float(rng: np.random.Generator) -> None:
    img8 = _slice(rng)
    img16 = img8.astype(np.uint16) * 200
    a8 = apply_artifacts(img8, np.random.default_rng(1))
    a16 = apply_artifacts(img16, np.random.default_rng(1))
    assert a16.dtype == np.float32 and a16.shape == img16.shape
    # Amplitudes are relative to the slice's intensity span: same corruption up to scale
    # (noise is Poisson so only approximately equal).
    r = np.corrcoef(a8.ravel(), a16.ravel())[0, 1]
    assert r > 0.99
    af = apply_artifacts(img8.astype(np.float64) / 255.0, np.random.default_rng(1))
    assert af.dtype == np.float32


def test_strength_zero_is_identity_for_amplitude_kinds(rng: np.random.Generator) -> None:
    img = _slice(rng)
    kinds = ["inhomogeneity", "charging", "curtaining", "contrast"]
    out = apply_artifacts(img, np.random.default_rng(2), strength=0.0, kinds=kinds)
    np.testing.assert_allclose(out, img.astype(np.float32), atol=1e-3)


def test_stronger_is_further_from_clean(rng: np.random.Generator) -> None:
    img = _slice(rng).astype(np.float32)
    weak = apply_artifacts(img, np.random.default_rng(5), strength=0.3)
    strong = apply_artifacts(img, np.random.default_rng(5), strength=1.5)
    assert np.abs(strong - img).mean() > np.abs(weak - img).mean()


def test_custom_ranges_are_used(rng: np.random.Generator) -> None:
    img = _slice(rng)
    params = ArtifactParams(brightness=(0.5, 0.5), contrast=(1.0, 1.0))
    out = apply_artifacts(img, np.random.default_rng(0), kinds=["contrast"], params=params)
    span = np.percentile(img, 99.5) - np.percentile(img, 0.5)
    np.testing.assert_allclose((out - img).mean(), 0.5 * span, rtol=0.05)


def test_errors() -> None:
    img = np.zeros((8, 8), np.uint8)
    with pytest.raises(DeepAlignError, match="unknown artifact"):
        apply_artifacts(img, np.random.default_rng(0), kinds=["smudge"])
    with pytest.raises(DeepAlignError, match="2-D"):
        apply_artifacts(np.zeros((2, 8, 8)), np.random.default_rng(0))
    with pytest.raises(DeepAlignError, match="Generator"):
        apply_artifacts(img, 0)  # type: ignore[arg-type]
    with pytest.raises(DeepAlignError, match="low <= high"):
        ArtifactParams(blur_sigma_px=(2.0, 1.0))
