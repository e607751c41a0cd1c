"""Tests for deepalign_fast.estimate (LO-RANSAC and least-squares fits in the C++ core).

References: ground truth of synthetic matches, numpy least squares / SVD Umeyama for the fits,
and OpenCV's estimateAffine2D / estimateAffinePartial2D for the robust estimates.
"""

from __future__ import annotations

import cv2
import deepalign_fast as da
import numpy as np
import pytest
from deepalign_fast import _core

FRAME = 2048.0
CORNERS = np.array([[0.0, 0.0], [FRAME - 1, 0.0], [0.0, FRAME - 1], [FRAME - 1, FRAME - 1]])


def truth_matrix(model: str) -> np.ndarray:
    th, s = 0.1, 1.05
    c, n = np.cos(th), np.sin(th)
    return {
        "translation": np.array([[1.0, 0.0, 12.5], [0.0, 1.0, -7.25]]),
        "rigid": np.array([[c, -n, 12.5], [n, c, -7.25]]),
        "similarity": np.array([[s * c, -s * n, 12.5], [s * n, s * c, -7.25]]),
        "affine": np.array([[1.03, 0.04, 12.5], [-0.02, 0.97, -7.25]]),
    }[model]


def apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ m[:, :2].T + m[:, 2]


def corner_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(apply(a, CORNERS) - apply(b, CORNERS), axis=1).mean())


def make_matches(rng: np.random.Generator, m: np.ndarray, n: int, outlier_ratio: float,
                 noise: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    src = rng.uniform(0, FRAME, (n, 2))
    dst = apply(m, src) + rng.normal(0, noise, (n, 2))
    outlier = rng.random(n) < outlier_ratio
    dst[outlier] = rng.uniform(0, FRAME, (int(outlier.sum()), 2))
    return src, dst, ~outlier


@pytest.mark.parametrize("model", da.MODELS)
def test_exact_recovery(model: str, rng: np.random.Generator, num_threads: int) -> None:
    m = truth_matrix(model)
    src = rng.uniform(0, FRAME, (300, 2))
    dst = apply(m, src)
    res = da.estimate_transform(src, dst, model, num_threads=num_threads)
    assert res
    assert res.success and res.reason == ""
    np.testing.assert_allclose(res.matrix, m, rtol=0, atol=1e-9)
    assert res.num_inliers == 300 and res.inliers.all()
    assert res.rms < 1e-9
    fit = da.fit_transform(src, dst, model)
    assert fit is not None
    np.testing.assert_allclose(fit, m, rtol=0, atol=1e-9)


@pytest.mark.parametrize("model", ["affine", "similarity", "rigid", "translation"])
@pytest.mark.parametrize("outlier_ratio", [0.0, 0.5, 0.8])
def test_noise_and_outliers(model: str, outlier_ratio: float, rng: np.random.Generator) -> None:
    m = truth_matrix(model)
    threshold = 3.0
    src, dst, is_inlier = make_matches(rng, m, 2000, outlier_ratio, noise=1.0)
    res = da.estimate_transform(src, dst, model, threshold=threshold, num_threads=2)
    assert res, res.reason
    # ~400 to 2000 inliers with 1 px noise: the fit is good to a few tenths of a pixel.
    assert corner_error(res.matrix, m) < 0.3
    # The mask is the set the truth itself would call inliers, up to the borderline points.
    truth_mask = np.linalg.norm(apply(m, src) - dst, axis=1) < threshold
    assert np.mean(res.inliers != truth_mask) < 0.005
    precision = (res.inliers & is_inlier).sum() / res.num_inliers
    recall = (res.inliers & is_inlier).sum() / is_inlier.sum()
    assert precision > 0.995
    assert recall > 0.97  # 1 px noise per axis: 1.1 % of true inliers lie beyond 3 px
    assert res.num_inliers == int(res.inliers.sum())
    np.testing.assert_allclose(res.rms, np.sqrt(np.mean(np.sum(
        (apply(res.matrix, src[res.inliers]) - dst[res.inliers]) ** 2, axis=1))), rtol=1e-9)

    # OpenCV as the reference where it has the same model.
    if model in ("affine", "similarity"):
        estimator = cv2.estimateAffine2D if model == "affine" else cv2.estimateAffinePartial2D
        ref, ref_mask = estimator(src, dst, method=cv2.RANSAC,
                                  ransacReprojThreshold=threshold, confidence=0.999,
                                  maxIters=10_000)
        assert ref is not None
        assert corner_error(res.matrix, m) <= corner_error(ref, m) + 0.05
        # OpenCV's mask comes from its best minimal sample (before its refinement), so it is
        # compared through the truth: ours must be at least as close to it.
        ref_wrong = np.mean(ref_mask.ravel().astype(bool) != truth_mask)
        assert np.mean(res.inliers != truth_mask) <= ref_wrong + 0.001


def test_deterministic_for_seed_and_threads(rng: np.random.Generator, num_threads: int) -> None:
    src, dst, _ = make_matches(rng, truth_matrix("affine"), 3000, 0.7, noise=1.0)
    ref = da.estimate_transform(src, dst, seed=7, num_threads=1)
    res = da.estimate_transform(src, dst, seed=7, num_threads=num_threads)
    again = da.estimate_transform(src, dst, seed=7, num_threads=num_threads)
    for r in (res, again):
        np.testing.assert_array_equal(r.matrix, ref.matrix)  # bitwise
        np.testing.assert_array_equal(r.inliers, ref.inliers)
        assert (r.iterations, r.rms, r.num_inliers) == (ref.iterations, ref.rms, ref.num_inliers)


def test_refine_improves_on_plain_ransac(rng: np.random.Generator) -> None:
    m = truth_matrix("affine")
    src, dst, _ = make_matches(rng, m, 2000, 0.5, noise=1.0)
    plain = da.estimate_transform(src, dst, refine=False, threshold=3.0)
    lo = da.estimate_transform(src, dst, refine=True, threshold=3.0)
    assert plain and lo
    assert corner_error(lo.matrix, m) < corner_error(plain.matrix, m)


_LINE = np.stack([np.arange(10.0), 2 * np.arange(10.0) + 1], axis=1)
_SAME = np.full((10, 2), 3.0)


@pytest.mark.parametrize(
    ("src", "dst", "model", "threshold", "needle"),
    [
        (_LINE[:2], _LINE[:2], "affine", 2.0, "at least 3"),
        (np.zeros((0, 2)), np.zeros((0, 2)), "translation", 2.0, "at least 1"),
        (_LINE, _LINE + 5, "affine", 2.0, "collinear"),
        (_SAME, _LINE, "similarity", 2.0, "coincident"),
        (_SAME, _SAME, "rigid", 2.0, "coincident"),
        (np.where(np.arange(20).reshape(10, 2) == 5, np.nan, _LINE), _LINE, "translation",
         2.0, "non-finite"),
        (_LINE, np.where(np.arange(20).reshape(10, 2) == 5, np.inf, _LINE), "translation",
         2.0, "non-finite"),
        (_LINE, _LINE, "translation", 0.0, "threshold"),
        (_LINE, _LINE, "translation", -1.0, "threshold"),
        (_LINE, _LINE, "translation", float("nan"), "threshold"),
        (_LINE, _LINE[:9], "translation", 2.0, "different numbers"),
    ],
)
def test_degenerate_input_is_falsy(src: np.ndarray, dst: np.ndarray, model: str,
                                   threshold: float, needle: str) -> None:
    res = da.estimate_transform(src, dst, model, threshold=threshold)  # type: ignore[arg-type]
    assert not res
    assert needle in res.reason
    assert np.isnan(res.matrix).all() and res.matrix.shape == (2, 3)
    assert res.num_inliers == 0 and not res.inliers.any()


def test_degenerate_fit_returns_none() -> None:
    assert da.fit_transform(_LINE, _LINE, "affine") is None
    assert da.fit_transform(_SAME, _LINE, "rigid") is None
    assert da.fit_transform(_LINE[:1], _LINE[:1], "similarity") is None
    assert da.fit_transform(_LINE, _LINE, "translation", weights=np.zeros(10)) is None


def test_skips_collinear_samples(rng: np.random.Generator) -> None:
    # 80 % of the points on one line: most triples are collinear and must be skipped.
    m = truth_matrix("affine")
    t = np.arange(800.0)
    src = np.concatenate([np.stack([2 * t, t + 3], 1), rng.uniform(0, FRAME, (200, 2))])
    res = da.estimate_transform(src, apply(m, src))
    assert res
    np.testing.assert_allclose(res.matrix, m, atol=1e-9)


def test_fit_transform_matches_lstsq(rng: np.random.Generator) -> None:
    src = rng.uniform(0, FRAME, (100, 2))
    dst = apply(truth_matrix("affine"), src) + rng.normal(0, 2.0, (100, 2))
    w = rng.uniform(0.0, 3.0, 100)
    a = np.concatenate([src, np.ones((100, 1))], axis=1) * np.sqrt(w)[:, None]
    ref = np.linalg.lstsq(a, dst * np.sqrt(w)[:, None], rcond=None)[0].T
    got = da.fit_transform(src, dst, "affine", weights=w)
    assert got is not None
    np.testing.assert_allclose(got, ref, atol=1e-8)


@pytest.mark.parametrize("model", ["rigid", "similarity"])
def test_fit_transform_matches_svd_umeyama(model: str, rng: np.random.Generator) -> None:
    src = rng.uniform(0, FRAME, (100, 2))
    dst = apply(truth_matrix(model), src) + rng.normal(0, 2.0, (100, 2))
    # Umeyama (1991) with the SVD, as an independent reference for the closed form.
    ms, md = src.mean(0), dst.mean(0)
    cov = (dst - md).T @ (src - ms) / len(src)
    u, sig, vt = np.linalg.svd(cov)
    e = np.diag([1.0, np.sign(np.linalg.det(u @ vt))])
    r = u @ e @ vt
    var_src = ((src - ms) ** 2).sum(1).mean()
    scale = 1.0 if model == "rigid" else np.trace(np.diag(sig) @ e) / var_src
    ref = np.concatenate([scale * r, (md - scale * r @ ms)[:, None]], axis=1)
    got = da.fit_transform(src, dst, model)
    assert got is not None
    np.testing.assert_allclose(got, ref, atol=1e-8)


def test_accepts_other_dtypes(rng: np.random.Generator) -> None:
    src = rng.uniform(0, 500, (100, 2)).astype(np.float32)
    dst = src + np.float32(4.0)
    res = da.estimate_transform(src, dst, "translation")
    assert res
    np.testing.assert_allclose(res.matrix, [[1, 0, 4], [0, 1, 4]], atol=1e-9)
    res_int = da.estimate_transform(np.asarray(src[:, ::-1], dtype=np.int64),
                                    np.asarray(dst[:, ::-1], dtype=np.int64), "translation")
    assert res_int


@pytest.mark.parametrize(
    "kwargs",
    [
        {"src": np.zeros((5, 3))},
        {"src": np.zeros(10)},
        {"dst": np.zeros((5, 2, 1))},
        {"model": "homography"},
        {"confidence": 0.0},
        {"confidence": 1.5},
        {"max_iterations": 0},
        {"num_threads": -1},
        {"seed": -1},
    ],
)
def test_caller_errors_raise(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"src": _LINE, "dst": _LINE, "model": "translation"}
    args.update(kwargs)
    with pytest.raises(ValueError):
        da.estimate_transform(**args)  # type: ignore[arg-type]


def test_fit_transform_caller_errors() -> None:
    with pytest.raises(ValueError, match="weights"):
        da.fit_transform(_LINE, _LINE, weights=np.ones(3))
    with pytest.raises(ValueError, match="weights"):
        da.fit_transform(_LINE, _LINE, weights=-np.ones(10))
    with pytest.raises(ValueError):
        da.fit_transform(_LINE, _LINE[:5])
    with pytest.raises(TypeError):
        da.fit_transform(np.array([["a", "b"]]), np.array([["a", "b"]]))


def test_core_rejects_wrong_arrays_naming_the_argument() -> None:
    good = np.zeros((4, 2))
    opts = _core.RansacOptions()
    with pytest.raises(ValueError, match="src.*dtype"):
        _core.ransac(good.astype(np.float32), good, opts)
    with pytest.raises(ValueError, match="dst.*contiguous"):
        _core.ransac(good, np.zeros((2, 4)).T, opts)
    with pytest.raises(ValueError, match=r"dst.*\(N, 2\)"):
        _core.ransac(good, np.zeros((4, 3)), opts)


def test_bound_options_and_result() -> None:
    """RansacOptions and RansacResult are classes; the model is an enum (its name works)."""
    rng = np.random.default_rng(0)
    src = rng.random((30, 2)) * 100
    dst = src + [3.0, -2.0]
    opts = _core.RansacOptions()
    assert opts.model == _core.TransformModel.affine and opts.threshold == 2.0
    opts.model = _core.TransformModel("translation")
    opts.seed = 3
    res = _core.ransac(src, dst, opts)
    assert isinstance(res, da.RansacResult) and res and res.success and res.reason == ""
    np.testing.assert_allclose(res.matrix, [[1, 0, 3], [0, 1, -2]], atol=1e-9)
    assert res.inliers.dtype == np.bool_ and res.inliers.all() and res.num_inliers == 30
    bad = _core.ransac(src[:0], dst[:0], opts)
    assert not bad and bad.reason and np.isnan(bad.matrix).all()
    with pytest.raises(ValueError, match="model"):
        _core.TransformModel("projective")
    with pytest.raises(TypeError):
        opts.model = 2  # type: ignore[assignment]
