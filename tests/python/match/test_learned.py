from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pytest
from deepalign_fast.match.keypoints import FeatureExtractor, match_features
from deepalign_fast.match.learned import LearnedExtractor
from deepalign_fast.qc.artifacts import ArtifactParams, apply_artifacts


@pytest.fixture(scope="module")
def extractor() -> LearnedExtractor:
    return LearnedExtractor(num_threads=1)


def _affine(angle_deg: float, scale: float, tx: float, ty: float, centre: tuple[float, float]
            ) -> np.ndarray:
    m = cv2.getRotationMatrix2D(centre, angle_deg, scale)
    m[:, 2] += (tx, ty)
    return m


def _recover(ex: LearnedExtractor, ref: np.ndarray, truth: np.ndarray, seed: int
             ) -> tuple[np.ndarray, int]:
    """Make ``moving`` with ``moving(truth(p)) = ref(p)`` (``truth`` maps reference coords to
    moving coords, the package convention), corrupt it, and estimate ``truth`` back."""
    h, w = ref.shape
    # Without WARP_INVERSE_MAP OpenCV samples src at truth^-1(q): dst(truth(p)) = src(p).
    moving = cv2.warpAffine(ref, truth, (w, h), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_REFLECT)
    # Test-time artifact ranges differ from the training defaults.
    params = ArtifactParams(curtain_amplitude=(0.1, 0.25), gaussian_sigma=(0.05, 0.1),
                            contrast=(0.7, 1.3))
    moving = apply_artifacts(moving, np.random.default_rng(seed), params=params)
    fr, fm = ex.extract(ref), ex.extract(moving)
    ia, ib = match_features(fr, fm)
    est, inl = cv2.estimateAffine2D(fr.keypoints[ia], fm.keypoints[ib],
                                    ransacReprojThreshold=3.0, maxIters=5000, confidence=0.999)
    assert est is not None, "no affine found"
    return est, int(inl.sum())


def _corner_error(est: np.ndarray, truth: np.ndarray, shape: tuple[int, int]) -> float:
    h, w = shape
    corners = np.array([[0, 0, 1], [w - 1, 0, 1], [0, h - 1, 1], [w - 1, h - 1, 1]], float)
    return float(np.abs(corners @ est.T - corners @ truth.T).max())


def test_protocol(extractor: LearnedExtractor) -> None:
    assert isinstance(extractor, FeatureExtractor)
    assert extractor.name == "learned"
    assert extractor.metadata["model_version"].startswith("ssl-encoder")


@pytest.mark.parametrize("keypoints", ["dog", "response"])
def test_deterministic_and_in_range(keypoints: str, lucchi) -> None:
    extractor = LearnedExtractor(num_threads=1, keypoints=keypoints)
    img = lucchi[0][140]
    a = extractor.extract(img)
    b = extractor.extract(img.copy())
    np.testing.assert_array_equal(a.keypoints, b.keypoints)
    np.testing.assert_array_equal(a.descriptors, b.descriptors)
    h, w = img.shape
    assert len(a) > 200
    assert a.keypoints.dtype == np.float32 and a.descriptors.dtype == np.float32
    assert (a.keypoints[:, 0] >= 0).all() and (a.keypoints[:, 0] <= w - 1).all()
    assert (a.keypoints[:, 1] >= 0).all() and (a.keypoints[:, 1] <= h - 1).all()
    np.testing.assert_allclose(np.linalg.norm(a.descriptors, axis=1), 1.0, atol=1e-5)
    assert a.shape == (h, w)


@pytest.mark.parametrize("keypoints", ["dog", "response"])
def test_odd_sizes_and_mask(keypoints: str, lucchi) -> None:
    extractor = LearnedExtractor(num_threads=1, keypoints=keypoints)
    img = lucchi[0][150, :301, :257]
    f = extractor.extract(img)
    assert len(f) > 20
    assert f.keypoints[:, 0].max() <= 256 and f.keypoints[:, 1].max() <= 300
    mask = np.zeros(img.shape, np.uint8)
    mask[:, :128] = 1
    fm = extractor.extract(img, mask=mask)
    assert 0 < len(fm) < len(f)
    assert (fm.keypoints[:, 0] <= 128.5).all()


def test_tiling_matches_whole_slice(lucchi) -> None:
    img = lucchi[0][145]
    whole = LearnedExtractor(num_threads=1).feature_map(img)
    tiled = LearnedExtractor(num_threads=1, tile=256, overlap=96, batch=3).feature_map(img)
    assert whole.shape == tiled.shape
    cos = (whole * tiled).sum(axis=2)
    # Tiles see padding instead of tissue beyond their edge; discarding half the overlap keeps
    # the receptive field mostly inside: nearly all cells agree.
    assert np.median(cos) > 0.999
    assert np.mean(cos > 0.95) > 0.98


@pytest.mark.parametrize(("angle", "scale", "tx", "ty"),
                         [(0.0, 1.0, 7.0, -5.0), (3.0, 1.0, -4.0, 6.0), (-2.0, 1.03, 3.5, 2.5)])
def test_recovers_known_affine_lucchi(extractor: LearnedExtractor, lucchi, angle: float,
                                      scale: float, tx: float, ty: float) -> None:
    ref = lucchi[0][150]
    h, w = ref.shape
    truth = _affine(angle, scale, tx, ty, ((w - 1) / 2, (h - 1) / 2))
    est, inliers = _recover(extractor, ref, truth, seed=int(100 + angle * 10))
    assert inliers >= 30
    # Learned keypoints sit on a DoG detector: ~1 px precise (0.9 px with OpenCV 5.1, 1.35 px
    # with 4.8-4.10 on this pair; RESULTS.md "learned features": 1.32 px on lucchi).
    assert _corner_error(est, truth, ref.shape) < 1.5


def test_recovers_known_affine_sstem(extractor: LearnedExtractor, isbi) -> None:
    ref = isbi[0][27]
    h, w = ref.shape
    truth = _affine(2.0, 0.98, 5.0, -3.0, ((w - 1) / 2, (h - 1) / 2))
    est, inliers = _recover(extractor, ref, truth, seed=7)
    assert inliers >= 30
    assert _corner_error(est, truth, ref.shape) < 1.0


def test_runtime_never_imports_torch() -> None:
    code = ("import sys, deepalign_fast, deepalign_fast.match.learned, "
            "deepalign_fast.qc.artifacts, "
            "deepalign_fast.onnx.session, deepalign_fast.match.keypoints; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "False"
