// Unit tests for csrc/deepalign/transform_fit.* and ransac.*: exact recovery of each model,
// robustness to outliers, degenerate inputs, determinism across thread counts and CPUs.
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <stdexcept>
#include <vector>

#include "check.hpp"
#include "deepalign/ransac.hpp"
#include "deepalign/sampling.hpp"  // force_portable_kernels
#include "deepalign/transform_fit.hpp"

using deepalign::fit_transform;
using deepalign::ransac;
using deepalign::RansacOptions;
using deepalign::TransformModel;

namespace {

const TransformModel kModels[] = {TransformModel::translation, TransformModel::rigid,
                                  TransformModel::similarity, TransformModel::affine};

// A ground-truth matrix of the given model (rotation 0.1 rad, scale 1.05, some shear).
std::vector<double> truth(TransformModel model) {
  const double c = std::cos(0.1), s = std::sin(0.1);
  switch (model) {
    case TransformModel::translation: return {1, 0, 12.5, 0, 1, -7.25};
    case TransformModel::rigid: return {c, -s, 12.5, s, c, -7.25};
    case TransformModel::similarity: return {1.05 * c, -1.05 * s, 12.5, 1.05 * s, 1.05 * c, -7.25};
    case TransformModel::affine: return {1.03, 0.04, 12.5, -0.02, 0.97, -7.25};
  }
  return {};
}

void apply(const std::vector<double>& m, const std::vector<double>& src, std::vector<double>& dst) {
  dst.resize(src.size());
  for (std::size_t i = 0; i < src.size() / 2; ++i) {
    const double x = src[2 * i], y = src[2 * i + 1];
    dst[2 * i] = m[0] * x + m[1] * y + m[2];
    dst[2 * i + 1] = m[3] * x + m[4] * y + m[5];
  }
}

struct Problem {
  std::vector<double> src, dst;
  std::vector<std::uint8_t> is_inlier;
};

Problem make_problem(TransformModel model, int n, double outlier_ratio, double noise,
                     unsigned seed) {
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<double> uni(0.0, 2048.0);
  std::normal_distribution<double> gauss(0.0, noise > 0 ? noise : 1.0);
  Problem p;
  p.src.resize(2 * static_cast<std::size_t>(n));
  for (auto& v : p.src) v = uni(gen);
  apply(truth(model), p.src, p.dst);
  p.is_inlier.assign(static_cast<std::size_t>(n), 1);
  for (int i = 0; i < n; ++i) {
    if (i < static_cast<int>(outlier_ratio * n)) {  // the first ones are outliers
      p.dst[2 * i] = uni(gen);
      p.dst[2 * i + 1] = uni(gen);
      p.is_inlier[static_cast<std::size_t>(i)] = 0;
    } else if (noise > 0) {
      p.dst[2 * i] += gauss(gen);
      p.dst[2 * i + 1] += gauss(gen);
    }
  }
  return p;
}

// Mean distance between the images of the 4 corners of a 2048 frame under a and b.
double corner_error(const double* a, const std::vector<double>& b) {
  double err = 0;
  for (double x : {0.0, 2047.0}) {
    for (double y : {0.0, 2047.0}) {
      err += std::hypot(a[0] * x + a[1] * y + a[2] - (b[0] * x + b[1] * y + b[2]),
                        a[3] * x + a[4] * y + a[5] - (b[3] * x + b[4] * y + b[5]));
    }
  }
  return err / 4;
}

}  // namespace

TEST_CASE(fit_transform_recovers_each_model_exactly) {
  for (TransformModel model : kModels) {
    const Problem p = make_problem(model, 50, 0.0, 0.0, 1);
    double m[6];
    CHECK(fit_transform(p.src.data(), p.dst.data(), 50, model, nullptr, m));
    const auto t = truth(model);
    for (int k = 0; k < 6; ++k) CHECK_NEAR(m[k], t[k], 1e-9);
    // The minimal number of pairs determines the model too.
    const int ms = deepalign::min_samples(model);
    CHECK(fit_transform(p.src.data(), p.dst.data(), ms, model, nullptr, m));
    for (int k = 0; k < 6; ++k) CHECK_NEAR(m[k], t[k], 1e-9);
  }
}

TEST_CASE(fit_transform_weights_select_points) {
  // Half the pairs follow truth, half a different shift; zero weights must remove the latter.
  const auto t = truth(TransformModel::affine);
  Problem p = make_problem(TransformModel::affine, 40, 0.0, 0.0, 2);
  std::vector<double> w(40, 1.0);
  for (int i = 0; i < 20; ++i) {
    p.dst[2 * i] += 30.0;
    w[static_cast<std::size_t>(i)] = 0.0;
  }
  double m[6];
  CHECK(fit_transform(p.src.data(), p.dst.data(), 40, TransformModel::affine, w.data(), m));
  for (int k = 0; k < 6; ++k) CHECK_NEAR(m[k], t[k], 1e-9);
  // Uniform weights of any scale give the unweighted fit.
  std::vector<double> w3(40, 3.0);
  double m1[6], m3[6];
  CHECK(fit_transform(p.src.data(), p.dst.data(), 40, TransformModel::similarity, nullptr, m1));
  CHECK(fit_transform(p.src.data(), p.dst.data(), 40, TransformModel::similarity, w3.data(), m3));
  for (int k = 0; k < 6; ++k) CHECK_NEAR(m1[k], m3[k], 1e-9);
}

TEST_CASE(fit_transform_similarity_matches_normal_equations) {
  // Independent check of the Umeyama closed form: the similarity [[a,-b,tx],[b,a,ty]] is
  // linear in (a, b, tx, ty); solve its 4x4 normal equations by Gaussian elimination.
  const Problem p = make_problem(TransformModel::similarity, 30, 0.0, 3.0, 3);
  double A[4][5] = {};
  for (int i = 0; i < 30; ++i) {
    const double x = p.src[2 * i], y = p.src[2 * i + 1], u = p.dst[2 * i], v = p.dst[2 * i + 1];
    const double r1[5] = {x, -y, 1, 0, u}, r2[5] = {y, x, 0, 1, v};
    for (int r = 0; r < 4; ++r) {
      for (int c = 0; c < 5; ++c) A[r][c] += r1[r] * r1[c] + r2[r] * r2[c];
    }
  }
  for (int c = 0; c < 4; ++c) {
    for (int r = c + 1; r < 4; ++r) {
      const double f = A[r][c] / A[c][c];
      for (int k = c; k < 5; ++k) A[r][k] -= f * A[c][k];
    }
  }
  double sol[4];
  for (int r = 3; r >= 0; --r) {
    double s = A[r][4];
    for (int k = r + 1; k < 4; ++k) s -= A[r][k] * sol[k];
    sol[r] = s / A[r][r];
  }
  double m[6];
  CHECK(fit_transform(p.src.data(), p.dst.data(), 30, TransformModel::similarity, nullptr, m));
  CHECK_NEAR(m[0], sol[0], 1e-9);
  CHECK_NEAR(m[3], sol[1], 1e-9);
  CHECK_NEAR(m[2], sol[2], 1e-6);
  CHECK_NEAR(m[5], sol[3], 1e-6);
}

TEST_CASE(fit_transform_degenerate_returns_false) {
  double m[6] = {7, 7, 7, 7, 7, 7};
  const std::vector<double> same = {5, 5, 5, 5, 5, 5, 5, 5};
  const std::vector<double> line = {0, 0, 1, 1, 2, 2, 3, 3};
  CHECK(!fit_transform(same.data(), line.data(), 4, TransformModel::similarity, nullptr, m));
  CHECK(!fit_transform(same.data(), line.data(), 4, TransformModel::rigid, nullptr, m));
  CHECK(!fit_transform(line.data(), line.data(), 4, TransformModel::affine, nullptr, m));
  CHECK(fit_transform(line.data(), line.data(), 4, TransformModel::similarity, nullptr, m));
  CHECK(!fit_transform(line.data(), line.data(), 2, TransformModel::affine, nullptr, m));
  CHECK(!fit_transform(line.data(), line.data(), 0, TransformModel::translation, nullptr, m));
  std::vector<double> bad = line;
  bad[3] = std::numeric_limits<double>::quiet_NaN();
  CHECK(!fit_transform(bad.data(), line.data(), 4, TransformModel::translation, nullptr, m));
  const std::vector<double> zero_w(4, 0.0);
  CHECK(!fit_transform(line.data(), line.data(), 4, TransformModel::translation, zero_w.data(), m));
  const std::vector<double> neg_w = {1, -1, 1, 1};
  CHECK_THROWS(fit_transform(line.data(), line.data(), 4, TransformModel::translation,
                             neg_w.data(), m),
               std::invalid_argument);
  CHECK_THROWS(deepalign::parse_model("homography"), std::invalid_argument);
}

TEST_CASE(ransac_exact_recovery_each_model) {
  for (TransformModel model : kModels) {
    const Problem p = make_problem(model, 200, 0.0, 0.0, 4);
    RansacOptions opt;
    opt.model = model;
    opt.num_threads = 1;
    const auto r = ransac(p.src.data(), p.dst.data(), 200, opt);
    CHECK(r.success);
    CHECK(r.num_inliers == 200);
    const auto t = truth(model);
    for (int k = 0; k < 6; ++k) CHECK_NEAR(r.matrix[static_cast<std::size_t>(k)], t[k], 1e-9);
    CHECK(r.rms < 1e-9);
  }
}

TEST_CASE(ransac_outliers_each_model) {
  for (TransformModel model : kModels) {
    for (double ratio : {0.5, 0.8}) {
      const Problem p = make_problem(model, 1000, ratio, 0.5, 5);
      RansacOptions opt;
      opt.model = model;
      opt.threshold = 2.0;
      opt.num_threads = 2;
      const auto r = ransac(p.src.data(), p.dst.data(), 1000, opt);
      CHECK(r.success);
      CHECK(corner_error(r.matrix.data(), truth(model)) < 0.2);
      std::int64_t wrong = 0;
      for (std::size_t i = 0; i < 1000; ++i) wrong += r.inliers[i] != p.is_inlier[i];
      CHECK(wrong <= 5);  // 0.5 px noise: an inlier beyond 2 px is a 3e-4 event
      CHECK_NEAR(r.rms, 0.5 * std::sqrt(2.0), 0.1);
      CHECK(r.iterations < opt.max_iterations);  // the adaptive stop kicked in
    }
  }
}

TEST_CASE(ransac_deterministic_across_threads) {
  const Problem p = make_problem(TransformModel::affine, 3000, 0.7, 1.0, 6);
  RansacOptions opt;
  opt.seed = 42;
  opt.num_threads = 1;
  const auto r1 = ransac(p.src.data(), p.dst.data(), 3000, opt);
  for (int threads : {1, 2, 3, 7}) {
    opt.num_threads = threads;
    const auto r = ransac(p.src.data(), p.dst.data(), 3000, opt);
    CHECK(r.success);
    CHECK(r.matrix == r1.matrix);  // bitwise identical
    CHECK(r.inliers == r1.inliers);
    CHECK(r.iterations == r1.iterations);
    CHECK(r.rms == r1.rms);
  }
  // Without refinement it is still identical.
  opt.refine = false;
  opt.num_threads = 1;
  const auto u1 = ransac(p.src.data(), p.dst.data(), 3000, opt);
  opt.num_threads = 2;
  const auto u2 = ransac(p.src.data(), p.dst.data(), 3000, opt);
  CHECK(u1.matrix == u2.matrix);
  CHECK(u1.iterations == u2.iterations);
  CHECK(u1.success);
  // A different seed draws different hypotheses (the model found is still right).
  opt.refine = true;
  opt.seed = 43;
  const auto r43 = ransac(p.src.data(), p.dst.data(), 3000, opt);
  CHECK(r43.success);
  CHECK(corner_error(r43.matrix.data(), truth(TransformModel::affine)) < 0.3);
}

TEST_CASE(ransac_degenerate_inputs_fail_cleanly) {
  RansacOptions opt;
  auto expect_fail = [&](const std::vector<double>& s, const std::vector<double>& d,
                         std::int64_t n) {
    const auto r = ransac(s.data(), d.data(), n, opt);
    CHECK(!r.success);
    CHECK(!r.reason.empty());
    CHECK(std::isnan(r.matrix[0]));
    CHECK(static_cast<std::int64_t>(r.inliers.size()) == n);
    CHECK(r.num_inliers == 0);
  };
  const std::vector<double> line = {0, 0, 1, 1, 2, 2, 3, 3, 4, 4};
  const std::vector<double> same = {5, 5, 5, 5, 5, 5, 5, 5, 5, 5};
  opt.model = TransformModel::affine;
  expect_fail(line, line, 5);   // collinear
  expect_fail(line, line, 2);   // too few
  expect_fail(line, line, 0);   // empty
  opt.model = TransformModel::similarity;
  expect_fail(same, line, 5);   // coincident src
  expect_fail(line, line, 1);
  opt.model = TransformModel::rigid;
  expect_fail(same, same, 5);
  opt.model = TransformModel::translation;
  std::vector<double> nan_pts = line;
  nan_pts[7] = std::numeric_limits<double>::quiet_NaN();
  expect_fail(nan_pts, line, 5);
  nan_pts[7] = std::numeric_limits<double>::infinity();
  expect_fail(line, nan_pts, 5);
  opt.threshold = 0.0;
  expect_fail(line, line, 5);
  opt.threshold = -1.0;
  expect_fail(line, line, 5);
  opt.threshold = std::numeric_limits<double>::quiet_NaN();
  expect_fail(line, line, 5);
  opt.threshold = 2.0;
  const auto mismatch = ransac(line.data(), 5, line.data(), 4, opt);
  CHECK(!mismatch.success);
  CHECK(!mismatch.reason.empty());
  // Argument errors throw.
  opt.num_threads = -1;
  CHECK_THROWS(ransac(line.data(), line.data(), 5, opt), std::invalid_argument);
  opt.num_threads = 0;
  opt.confidence = 1.5;
  CHECK_THROWS(ransac(line.data(), line.data(), 5, opt), std::invalid_argument);
  opt.confidence = 0.99;
  opt.max_iterations = 0;
  CHECK_THROWS(ransac(line.data(), line.data(), 5, opt), std::invalid_argument);
}

TEST_CASE(ransac_skips_degenerate_samples) {
  // 80 % of the src points sit on one line (any triple of them is collinear); the other 20 %
  // determine the affine. RANSAC must skip collinear triples and still find the model.
  const auto t = truth(TransformModel::affine);
  std::vector<double> src;
  for (int i = 0; i < 400; ++i) {
    src.push_back(3.0 * i);
    src.push_back(2.0 * i + 10);
  }
  std::mt19937_64 gen(7);
  std::uniform_real_distribution<double> uni(0.0, 2048.0);
  for (int i = 0; i < 200; ++i) src.push_back(uni(gen));  // 100 points
  std::vector<double> dst;
  apply(t, src, dst);
  RansacOptions opt;
  const auto r = ransac(src.data(), dst.data(), 500, opt);
  CHECK(r.success);
  CHECK(r.num_inliers == 500);
  for (int k = 0; k < 6; ++k) CHECK_NEAR(r.matrix[static_cast<std::size_t>(k)], t[k], 1e-9);
}

TEST_CASE(ransac_no_consensus_fails_or_reports) {
  // Pure noise: whatever RANSAC finds has only a handful of inliers; it must not crash and
  // must report the count honestly.
  std::mt19937_64 gen(8);
  std::uniform_real_distribution<double> uni(0.0, 2048.0);
  std::vector<double> src(400), dst(400);
  for (auto& v : src) v = uni(gen);
  for (auto& v : dst) v = uni(gen);
  RansacOptions opt;
  opt.max_iterations = 500;
  const auto r = ransac(src.data(), dst.data(), 200, opt);
  CHECK(r.iterations == 500);
  CHECK(r.num_inliers < 10);
}

TEST_CASE(ransac_simd_scoring_matches_portable_scoring) {
#if DEEPALIGN_X86_DISPATCH
  // The AVX2 scoring kernel gives the portable kernel's results (counts and inlier SSE), so
  // the estimate does not depend on the CPU: sizes that are not a multiple of 8 (the scalar
  // tail), with and without the local refits, several models and outlier ratios.
  for (TransformModel model : {TransformModel::rigid, TransformModel::affine}) {
    for (int n : {7, 203, 3001}) {
      for (double ratio : {0.0, 0.5, 0.8}) {
        // Without outliers every hypothesis holds every point, and the inlier SSE picks one.
        const double noise = ratio == 0.0 ? 0.3 : 0.7;
        const Problem p = make_problem(model, n, ratio, noise, static_cast<unsigned>(n));
        for (bool refine : {true, false}) {
          RansacOptions opt;
          opt.model = model;
          opt.refine = refine;
          opt.num_threads = 1;
          const auto simd = ransac(p.src.data(), p.dst.data(), n, opt);
          deepalign::detail::force_portable_kernels() = true;
          const auto portable = ransac(p.src.data(), p.dst.data(), n, opt);
          deepalign::detail::force_portable_kernels() = false;
          CHECK(simd.success == portable.success);
          CHECK(simd.matrix == portable.matrix);
          CHECK(simd.inliers == portable.inliers);
          CHECK(simd.iterations == portable.iterations);
        }
      }
    }
  }
#endif
}

TEST_CASE(ransac_far_from_origin_with_clustered_outliers) {
  // Points 10^4 px from the origin (the search scores in float32, centred) and given in
  // raster order with every outlier in the first 40 % (one side of the frame): the early
  // rejection must not judge a hypothesis by that side alone.
  const int n = 4000;
  std::mt19937_64 gen(21);
  std::uniform_real_distribution<double> uni(0.0, 2048.0);
  std::normal_distribution<double> gauss(0.0, 0.3);
  const std::vector<double> t = {1.01, 0.02, 5.5, -0.015, 0.995, -3.25};
  std::vector<double> src(2 * n), dst;
  for (int i = 0; i < n; ++i) {
    src[2 * i] = 10000.0 + 2048.0 * i / n;  // raster order along x
    src[2 * i + 1] = 10000.0 + uni(gen);
  }
  std::vector<double> shifted = src;
  for (auto& v : shifted) v -= 10000.0;
  apply(t, shifted, dst);
  for (auto& v : dst) v += 10000.0 + gauss(gen);
  const int outliers = 2 * n / 5;
  for (int i = 0; i < outliers; ++i) {
    dst[2 * i] = 10000.0 + uni(gen);
    dst[2 * i + 1] = 10000.0 + uni(gen);
  }
  // The truth in absolute coordinates: x' = A (x - o) + t + o.
  std::vector<double> m = t;
  m[2] = t[2] + 10000.0 - 10000.0 * (t[0] + t[1]);
  m[5] = t[5] + 10000.0 - 10000.0 * (t[3] + t[4]);
  for (int threads : {1, 2}) {
    RansacOptions opt;
    opt.num_threads = threads;
    const auto r = ransac(src.data(), dst.data(), n, opt);
    CHECK(r.success);
    std::int64_t inliers_found = 0;
    for (int i = outliers; i < n; ++i) inliers_found += r.inliers[static_cast<std::size_t>(i)];
    CHECK(inliers_found >= n - outliers - 2);  // 0.3 px noise: all within 2 px
    // Corner error around the frame actually used.
    double err = 0;
    for (double x : {10000.0, 12047.0}) {
      for (double y : {10000.0, 12047.0}) {
        const double* a = r.matrix.data();
        err += std::hypot(a[0] * x + a[1] * y + a[2] - (m[0] * x + m[1] * y + m[2]),
                          a[3] * x + a[4] * y + a[5] - (m[3] * x + m[4] * y + m[5]));
      }
    }
    CHECK(err / 4 < 0.05);
  }
}
