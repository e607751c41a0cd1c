from __future__ import annotations

import numpy as np
import pytest
from deepalign_fast._errors import DeepAlignError
from deepalign_fast.qc.metrics import (
    dice,
    exact_truth_score,
    gauge_residuals,
    iou,
    jitter_error,
    ncc,
    neighbour_similarity,
    normalized_improvement,
    slow_translation,
    ssim,
    target_registration_error,
    tre_from_composites,
)
from deepalign_fast.qc.synth import GroundTruth, compose, invert, misalign_stack, random_transforms
from scipy import ndimage
from skimage.metrics import structural_similarity

# an arbitrary common frame: rotation 7 deg about a point, shift (3, -2); unit scale so that a
# 1-px error in the output frame is a 1-px error in the clean frame
_TH = np.deg2rad(7.0)
G = np.array([[np.cos(_TH), -np.sin(_TH), 3.0], [np.sin(_TH), np.cos(_TH), -2.0]])


def _truth(rng, n=6, shape=(120, 160)):
    t = random_transforms(n, shape, rng, profile="sstem")
    return GroundTruth(transforms=t, shape=shape, clean_shape=(200, 240))


def test_tre_zero_for_exact_inverse_with_common_frame(rng):
    truth = _truth(rng)
    est = [compose(invert(t), G) for t in truth.transforms]
    res = target_registration_error(est, truth, (120, 160))
    assert res.max < 1e-9 and res.median < 1e-9
    np.testing.assert_allclose(res.gauge, G, atol=1e-9)
    assert res.failed == () and res.n_points > 100
    # a scaled/sheared common frame is still a common frame
    g2 = np.array([[1.1, 0.05, 10.0], [-0.02, 0.9, 4.0]])
    res2 = target_registration_error([compose(invert(t), g2) for t in truth.transforms],
                                     truth.transforms, (120, 160))
    assert res2.max < 1e-9


def test_tre_known_single_slice_error(rng):
    n = 5
    truth = _truth(rng, n=n)
    shift = np.array([[1.0, 0, 1.0], [0, 1.0, 0]])  # +1 px in x on slice 2
    est = [compose(invert(t), G) for t in truth.transforms]
    est[2] = compose(invert(truth.transforms[2]), G, shift)
    res = target_registration_error(est, truth.transforms, (120, 160))
    # least squares spreads 1/n of the offset into G: slice 2 errs by (n-1)/n, others by 1/n
    expect = np.full(n, 1.0 / n)
    expect[2] = (n - 1) / n
    np.testing.assert_allclose(res.per_slice_median, expect, atol=1e-9)
    np.testing.assert_allclose(res.per_slice_max, expect, atol=1e-9)
    np.testing.assert_allclose(res.mean, (2 * (n - 1) / n) / n, atol=1e-9)
    # a rotation error about the origin grows with distance: |(R - I) p| = 2 sin(a/2) |p|,
    # (n-1)/n of it left on slice 2, largest at the far corner (159, 119)
    rot = np.array([[np.cos(0.01), -np.sin(0.01), 0], [np.sin(0.01), np.cos(0.01), 0]])
    est[2] = compose(invert(truth.transforms[2]), G, rot)
    res = target_registration_error(est, truth.transforms, (120, 160))
    corner = (n - 1) / n * 2 * np.sin(0.005) * np.hypot(159, 119)
    np.testing.assert_allclose(res.per_slice_max[2], corner, rtol=1e-9)
    assert res.per_slice_median[2] < 0.7 * corner


def test_tre_failed_rows_and_frame_filter(rng):
    truth = _truth(rng, n=4)
    est: list = [compose(invert(t), G) for t in truth.transforms]
    est[1] = None
    res = target_registration_error(est, truth, (120, 160))
    assert res.failed == (1,)
    assert np.isnan(res.per_slice_median[1]) and res.max < 1e-9
    d = res.to_dict()
    assert d["per_slice_median"][1] is None and d["failed"] == [1]
    # G shifting most of the frame outside the clean slice leaves only the overlapping points
    far = np.array([[1.0, 0, 200.0], [0, 1.0, 0]])
    res = tre_from_composites([far, far], (120, 160), clean_shape=(200, 240), grid=16)
    assert 0 < res.n_points < 256
    with pytest.raises(DeepAlignError):
        target_registration_error([None] * 4, truth, (120, 160))


def test_tre_of_real_resampling_pipeline(rng):
    """End to end: misalign, align with the exact inverse, score: TRE ~ 0."""
    clean = rng.normal(size=(3, 80, 100)).astype(np.float32)
    _, truth = misalign_stack(clean, rng, profile="jitter")
    est = [invert(t) for t in truth.transforms]  # output frame = clean frame
    res = target_registration_error(est, truth, truth.clean_shape)
    assert res.max < 1e-9
    np.testing.assert_allclose(res.gauge, np.eye(2, 3), atol=1e-9)


def test_dice_iou_hand_computed():
    a = np.zeros((4, 4), int)
    b = np.zeros((4, 4), int)
    a[0, :3] = 1  # 3 px
    b[0, 1:] = 1  # 3 px, overlap 2
    assert dice(a, b) == pytest.approx(2 * 2 / 6)
    assert iou(a, b) == pytest.approx(2 / 4)
    a[3, 3], b[3, 3] = 2, 2  # label 2 agrees perfectly
    assert dice(a, b, labels=[1, 2], per_label=True) == {1: pytest.approx(4 / 6), 2: 1.0}
    assert dice(a, b, labels=[1, 2]) == pytest.approx((4 / 6 + 1) / 2)
    # binary mode: non-zero is foreground: 4 each, overlap 3
    assert dice(a, b) == pytest.approx(6 / 8) and iou(a, b) == pytest.approx(3 / 5)
    assert iou(np.zeros(3), np.zeros(3)) == 1.0
    assert dice(np.ones(3), np.zeros(3)) == 0.0
    with pytest.raises(DeepAlignError):
        dice(a, b[:2])


def test_ncc(rng):
    a = rng.normal(size=(20, 30))
    b = a + 0.5 * rng.normal(size=a.shape)
    assert ncc(a, b) == pytest.approx(np.corrcoef(a.ravel(), b.ravel())[0, 1])
    assert ncc(a, 2 * a + 3) == pytest.approx(1.0)
    assert ncc(a, -a) == pytest.approx(-1.0)
    m = np.zeros(a.shape, bool)
    m[:10] = True
    assert ncc(a, b, m) == pytest.approx(np.corrcoef(a[:10].ravel(), b[:10].ravel())[0, 1])
    assert np.isnan(ncc(np.ones((4, 4)), a[:4, :4]))


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_ssim_matches_skimage(rng, dtype):
    base = ndimage.gaussian_filter(rng.normal(size=(64, 80)), 2) * 300 + 128
    other = ndimage.shift(base, (0.7, 1.3)) + rng.normal(scale=10, size=base.shape)
    if dtype == np.uint8:
        a, b = (np.clip(x, 0, 255).astype(np.uint8) for x in (base, other))
        kw: dict = {}
        ref = structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, data_range=255)
    else:
        a, b = base.astype(np.float32) / 255, other.astype(np.float32) / 255
        kw = {"data_range": 1.0}
        ref = structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, data_range=1.0)
    got = ssim(a, b, **kw)
    assert abs(got - ref) < 1e-3
    assert 0.05 < got < 0.95  # a non-trivial case
    assert ssim(a, a, **kw) == pytest.approx(1.0)


def test_neighbour_similarity_lazy(rng):
    stack = rng.normal(size=(5, 24, 24)).astype(np.float32)
    stack[2] = stack[1] * 2 + 1

    class Lazy:
        def __init__(self):
            self.reads = []

        def __len__(self):
            return len(stack)

        def read(self, i):
            self.reads.append(i)
            return stack[i]

    lazy = Lazy()
    got = neighbour_similarity(lazy, "ncc")
    assert lazy.reads == [0, 1, 2, 3, 4]  # each slice read once, in order
    assert got.shape == (4,) and got[1] == pytest.approx(1.0)
    np.testing.assert_allclose(got, [ncc(stack[i], stack[i + 1]) for i in range(4)])
    s = neighbour_similarity(stack, "ssim")
    assert s[1] < 1  # SSIM is not invariant to gain/offset
    np.testing.assert_allclose(s, [ssim(stack[i], stack[i + 1]) for i in range(4)])


def test_normalized_improvement():
    assert normalized_improvement(0.9, 0.5) == pytest.approx(0.8)
    assert normalized_improvement(0.5, 0.5) == 0.0
    assert normalized_improvement(0.25, 0.5) == pytest.approx(-0.5)
    assert np.isnan(normalized_improvement(1.0, 1.0))
    np.testing.assert_allclose(normalized_improvement([1.0, 0.6], [0.6, 0.6]), [1.0, 0.0])


def test_masked_similarity_ignores_fill_border(rng):
    a = ndimage.gaussian_filter(rng.normal(size=(60, 70)), 2)
    b = a + 0.05 * rng.normal(size=a.shape)
    c = ndimage.gaussian_filter(rng.normal(size=(60, 70)), 2)  # unrelated
    mask = np.zeros(a.shape, bool)
    mask[:, :35] = True
    b2, c2 = b.copy(), c.copy()
    b2[:, 35:] = 0  # fill border
    c2[:, 35:] = 0
    # masked SSIM: mean of the map where the window lies inside the mask (and the image)
    val, smap = ssim(a, b, data_range=1.0, full=True)
    assert ssim(a, b2, data_range=1.0, mask=mask) == pytest.approx(smap[5:-5, 5:30].mean())
    masks = [mask, mask, mask]
    got = neighbour_similarity(np.stack([a, b2, c2]), "ncc", masks=masks)
    np.testing.assert_allclose(got, [ncc(a[:, :35], b[:, :35]), ncc(b[:, :35], c[:, :35])])
    assert got[1] < 0.5


# --------------------------------------------------------------------------------------------
# exact-truth scoring: TRE per slice, slope, jitter error
# --------------------------------------------------------------------------------------------
def _translations(t: np.ndarray) -> np.ndarray:
    """(n, 2) translations -> (n, 2, 3) pure-translation affines."""
    out = np.tile(np.eye(2, 3), (len(t), 1, 1))
    out[:, :, 2] = t
    return out


def test_exact_truth_score_zero_for_exact_answer(rng):
    from deepalign_fast.qc.synth import drift_transforms

    truth = drift_transforms(40, (100, 150), rng, profile="strong")
    est = compose(invert(truth), G)  # exact up to one common frame
    s = exact_truth_score(est, truth, (100, 150))
    assert s.tre_median < 1e-9 and s.tre_p95 < 1e-9 and abs(s.slope_per_100) < 1e-9
    assert s.jitter_median < 1e-9 and s.jitter_p95 < 1e-9
    np.testing.assert_allclose(s.per_slice_tre, 0, atol=1e-9)
    # doing nothing is not exact
    nothing = exact_truth_score(np.tile(np.eye(2, 3), (40, 1, 1)), truth, (100, 150))
    assert nothing.tre_median > 0.5 and nothing.jitter_median > 0.5


def test_linear_drift_is_slow_so_jitter_error_is_zero():
    n = 60
    z = np.arange(n, dtype=np.float64)
    drift = _translations(np.stack([0.3 * z, -0.1 * z], -1))  # straight-line drift, no jitter
    s = exact_truth_score(drift, np.tile(np.eye(2, 3), (n, 1, 1)), (64, 64))
    # the global affine removes the mean; what is left is |v| |z - mean z|
    speed = np.hypot(0.3, 0.1)
    np.testing.assert_allclose(s.per_slice_tre, speed * np.abs(z - z.mean()), atol=1e-9)
    assert s.tre_median > 4
    np.testing.assert_allclose(s.per_slice_jitter, 0, atol=1e-9)  # up to the stack's ends


def test_slow_curved_drift_scores_almost_no_jitter():
    n = 200
    z = np.arange(n, dtype=np.float64)
    curve = _translations(np.stack([10 * np.sin(2 * np.pi * z / 400), 0 * z], -1))
    s = exact_truth_score(curve, np.tile(np.eye(2, 3), (n, 1, 1)), (64, 64))
    assert s.tre_median > 2
    # Gaussian smoothing (sigma 8) keeps exp(-(omega sigma)^2 / 2) of a sinusoid: the jitter
    # error is the small remainder (< 1 % of the amplitude), exactly so inside the stack
    w = 2 * np.pi / 400
    expect = 10 * (1 - np.exp(-0.5 * (w * 8.0) ** 2)) * np.abs(np.sin(w * z))
    np.testing.assert_allclose(s.per_slice_jitter[50:150], expect[50:150], atol=1e-6)
    assert s.jitter_p95 < 0.01 * 10


def test_linear_part_error_is_the_rotation_about_the_centre_not_the_translation():
    n, shape = 40, (64, 96)
    h, w = shape
    centre = np.array([(w - 1) / 2.0, (h - 1) / 2.0])
    angle = np.deg2rad(0.5 * (-1.0) ** np.arange(n))  # +-0.5 degrees about the centre
    est = np.empty((n, 2, 3))
    est[:, 0, 0] = est[:, 1, 1] = np.cos(angle)
    est[:, 0, 1], est[:, 1, 0] = -np.sin(angle), np.sin(angle)
    est[:, :, 2] = centre - est[:, :, :2] @ centre + np.stack([3.0 * np.arange(n), 0 * angle], -1)
    s = exact_truth_score(est, np.tile(np.eye(2, 3), (n, 1, 1)), shape)
    # exact: the global affine is the mean of R(+a) and R(-a), cos(a) I, so each slice is
    # left R(+-a) - cos(a) I, which moves a point at radius r by r sin(a); the slices'
    # straight-line drift is translation, which this part leaves out
    xs, ys = np.meshgrid(np.linspace(0, w - 1, 16), np.linspace(0, h - 1, 16))
    r = np.hypot(xs - centre[0], ys - centre[1]).mean()
    expect = r * np.sin(np.deg2rad(0.5))
    np.testing.assert_allclose(s.per_slice_linear, expect, rtol=1e-9)
    np.testing.assert_allclose([s.linear_median, s.linear_p95], expect, rtol=1e-9)
    assert expect > 0.1 and s.tre_median > 10
    # a translation error of any size leaves no linear part
    moved = exact_truth_score(_translations(np.random.default_rng(0).normal(size=(n, 2)) * 5),
                              np.tile(np.eye(2, 3), (n, 1, 1)), shape)
    assert moved.tre_median > 1 and moved.linear_p95 < 1e-9


def test_linear_part_is_part_of_every_slices_error(rng):
    from deepalign_fast.qc.synth import drift_transforms

    # |t + A q| + |t - A q| >= 2 |A q| over a grid symmetric about the centre
    truth = drift_transforms(50, (80, 120), rng, profile="sstem")
    s = exact_truth_score(np.tile(np.eye(2, 3), (50, 1, 1)), truth, (80, 120))
    assert s.linear_median > 0.1
    assert np.all(s.per_slice_linear <= s.per_slice_tre + 1e-12)


def test_pure_jitter_scores_its_magnitude(rng):
    n = 400
    # alternating +-d along x: no slow part at all, so every slice errs by exactly d
    d = 0.7
    alt = _translations(np.stack([d * (-1.0) ** np.arange(n), np.zeros(n)], -1))
    s = exact_truth_score(alt, np.tile(np.eye(2, 3), (n, 1, 1)), (64, 64))
    np.testing.assert_allclose(s.jitter_median, d, rtol=1e-6)
    np.testing.assert_allclose(s.tre_median, d, rtol=1e-9)
    # i.i.d. Gaussian jitter of sigma per axis: mean norm sigma * sqrt(pi / 2)
    sigma = 0.5
    iid = _translations(rng.normal(scale=sigma, size=(n, 2)))
    s = exact_truth_score(iid, np.tile(np.eye(2, 3), (n, 1, 1)), (64, 64))
    expect = sigma * np.sqrt(np.pi / 2)
    assert abs(np.mean(s.per_slice_jitter) - expect) < 0.1 * expect
    assert abs(s.slope_per_100) < 0.1


def test_jitter_counts_per_slice_rotation():
    # a per-slice rotation about the frame centre has no mean translation: the jitter error
    # forgives nothing of it
    n, h, w = 30, 101, 101
    a = np.deg2rad(0.5) * (-1.0) ** np.arange(n)
    c, s_ = np.cos(a), np.sin(a)
    est = np.zeros((n, 2, 3))
    est[:, 0, 0], est[:, 0, 1], est[:, 1, 0], est[:, 1, 1] = c, -s_, s_, c
    centre = np.array([50.0, 50.0])
    est[:, :, 2] = centre - np.einsum("nij,j->ni", est[:, :, :2], centre)
    res = exact_truth_score(est, np.tile(np.eye(2, 3), (n, 1, 1)), (h, w))
    np.testing.assert_allclose(res.per_slice_jitter, res.per_slice_tre, rtol=1e-6)
    assert res.tre_median > 0.2


def test_slope_of_growing_error():
    n = 101
    z = np.arange(n, dtype=np.float64)
    quad = _translations(np.stack([0.002 * z * z, 0 * z], -1))  # error grows along z
    s = exact_truth_score(quad, np.tile(np.eye(2, 3), (n, 1, 1)), (32, 32))
    assert s.slope_per_100 > 1


def test_slow_translation_is_gaussian_smoothing_inside():
    rng = np.random.default_rng(5)
    t = rng.normal(size=(200, 2))
    sigma = 8.0
    slow = slow_translation(t, sigma)
    inner = slice(50, 150)  # more than 6 sigma from either end
    ref = ndimage.gaussian_filter1d(t, sigma, axis=0, mode="constant", truncate=8.0)
    np.testing.assert_allclose(slow[inner], ref[inner], atol=1e-9)
    line = np.stack([np.arange(200.0), 3 - 0.5 * np.arange(200.0)], -1)
    np.testing.assert_allclose(slow_translation(line, sigma), line, atol=1e-9)


def test_exact_truth_score_errors():
    eye = np.tile(np.eye(2, 3), (4, 1, 1))
    with pytest.raises(DeepAlignError, match="same n"):
        exact_truth_score(eye[:3], eye, (10, 10))
    bad = eye.copy()
    bad[2, 0, 2] = np.nan
    with pytest.raises(DeepAlignError, match=r"slices \[2\]"):
        exact_truth_score(bad, eye, (10, 10))
    with pytest.raises(DeepAlignError, match="sigma"):
        slow_translation(np.zeros((4, 2)), 0.0)
    with pytest.raises(DeepAlignError, match="residuals"):
        jitter_error(np.zeros((4, 2)))
    r, g = gauge_residuals(eye, (10, 10), grid=4)
    assert r.shape == (4, 16, 2) and np.allclose(r, 0) and np.allclose(g, np.eye(2, 3))


def test_pair_error_and_drift_rate():
    n = 50
    z = np.arange(n, dtype=np.float64)
    # a chain with a constant per-pair bias of (0.1, -0.05) px: neighbours err by |bias|,
    # the stack drifts by 100 * bias per 100 slices
    chain = _translations(np.stack([0.1 * z, -0.05 * z], -1))
    s = exact_truth_score(chain, np.tile(np.eye(2, 3), (n, 1, 1)), (32, 32))
    np.testing.assert_allclose(s.per_pair_error, np.hypot(0.1, 0.05), atol=1e-12)
    np.testing.assert_allclose(s.pair_median, np.hypot(0.1, 0.05), atol=1e-12)
    np.testing.assert_allclose(s.drift_per_100, [10.0, -5.0], atol=1e-9)
    # alternating jitter: neighbours err by twice the amplitude, no drift
    alt = _translations(np.stack([0.3 * (-1.0) ** z, 0 * z], -1))
    s = exact_truth_score(alt, np.tile(np.eye(2, 3), (n, 1, 1)), (32, 32))
    np.testing.assert_allclose(s.pair_median, 0.6, atol=1e-12)
    assert np.abs(s.drift_per_100).max() < 0.1
