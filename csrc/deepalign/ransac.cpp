#include "deepalign/ransac.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

#include "deepalign/parallel.hpp"

namespace deepalign {
namespace {

// Hypotheses scored per parallel round. The first round is small: with a usable inlier ratio
// it already holds a good sample, whose local refit then tells how many more are needed.
constexpr std::int64_t kFirstBatch = 16;
constexpr std::int64_t kMaxBatch = 64;
constexpr int kSampleRetries = 16;           // draws per hypothesis before giving up on it
constexpr int kRefitIterations = 4;          // local optimisation rounds per new best model
constexpr std::int64_t kBailoutStride = 512; // points between "can this still win?" checks

// splitmix64: tiny, statistically fine for drawing a handful of indices, and seedable by
// (seed, k) so each hypothesis is reproducible in isolation.
struct SplitMix64 {
  std::uint64_t state;
  std::uint64_t next() {
    std::uint64_t z = (state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }
};

struct Score {
  std::int64_t count = -1;  // -1: not a candidate (degenerate sample or cannot beat the best)
  double sse = std::numeric_limits<double>::infinity();
};

// (more inliers, then lower inlier SSE) wins; ties on both are broken by the caller (lower k).
bool better(const Score& a, const Score& b) {
  return a.count > b.count || (a.count == b.count && a.sse < b.sse);
}

// Inlier count and inlier SSE of m. Stops early (count = -1) once the remaining points cannot
// lift the count to `must_reach`. Writes the inlier mask when WriteMask. Four independent
// partial sums (always combined in the same order, so results do not depend on threads) let
// the CPU overlap the additions instead of waiting on one accumulator.
template <bool WriteMask>
Score score_model(const double* m, const double* src, const double* dst, std::int64_t n,
                  double t2, std::int64_t must_reach, std::uint8_t* mask) {
  const double a = m[0], b = m[1], tx = m[2], c = m[3], d = m[4], ty = m[5];
  std::int64_t count = 0;
  double sse[4] = {0.0, 0.0, 0.0, 0.0};
  for (std::int64_t lo = 0; lo < n; lo += kBailoutStride) {
    const std::int64_t hi = std::min(n, lo + kBailoutStride);
    std::int64_t block_count = 0;
    std::int64_t i = lo;
    for (; i + 4 <= hi; i += 4) {
      for (int u = 0; u < 4; ++u) {
        const std::int64_t k = i + u;
        const double x = src[2 * k], y = src[2 * k + 1];
        const double rx = a * x + b * y + tx - dst[2 * k];
        const double ry = c * x + d * y + ty - dst[2 * k + 1];
        const double r2 = rx * rx + ry * ry;
        const bool in = r2 < t2;
        block_count += in;
        sse[u] += in ? r2 : 0.0;
        if (WriteMask) mask[k] = static_cast<std::uint8_t>(in);
      }
    }
    for (; i < hi; ++i) {
      const double x = src[2 * i], y = src[2 * i + 1];
      const double rx = a * x + b * y + tx - dst[2 * i];
      const double ry = c * x + d * y + ty - dst[2 * i + 1];
      const double r2 = rx * rx + ry * ry;
      const bool in = r2 < t2;
      block_count += in;
      sse[0] += in ? r2 : 0.0;
      if (WriteMask) mask[i] = static_cast<std::uint8_t>(in);
    }
    count += block_count;
    if (!WriteMask && count + (n - hi) < must_reach) return Score{};
  }
  return Score{count, (sse[0] + sse[1]) + (sse[2] + sse[3])};
}

bool points_coincident(const double* p, const double* q) {
  const double dx = q[0] - p[0], dy = q[1] - p[1];
  const double scale = 1.0 + std::max(std::fabs(p[0]), std::fabs(p[1]));
  return dx * dx + dy * dy <= 1e-18 * scale * scale;
}

// A triple whose angle at p0 is within ~0.06 degrees of 0 or 180 gives a wildly unstable
// affine; treat it as collinear (coincident points are included: both sides are zero).
bool points_collinear(const double* p0, const double* p1, const double* p2) {
  const double e1x = p1[0] - p0[0], e1y = p1[1] - p0[1];
  const double e2x = p2[0] - p0[0], e2y = p2[1] - p0[1];
  const double cross = e1x * e2y - e1y * e2x;
  return std::fabs(cross) <= 1e-3 * std::hypot(e1x, e1y) * std::hypot(e2x, e2y);
}

bool sample_degenerate(TransformModel model, const double* pts, const std::int64_t* idx) {
  switch (model) {
    case TransformModel::translation: return false;
    case TransformModel::rigid:
    case TransformModel::similarity: return points_coincident(pts + 2 * idx[0], pts + 2 * idx[1]);
    case TransformModel::affine:
      return points_collinear(pts + 2 * idx[0], pts + 2 * idx[1], pts + 2 * idx[2]);
  }
  return true;
}

// Draws hypothesis k's minimal sample and fits it. False when every draw was degenerate.
bool draw_hypothesis(const double* src, const double* dst, std::int64_t n, TransformModel model,
                     std::uint64_t seed, std::int64_t k, double m[6]) {
  const int ms = min_samples(model);
  SplitMix64 rng{seed * 0xD1B54A32D192ED03ULL ^ (static_cast<std::uint64_t>(k) + 1) *
                                                    0x9E3779B97F4A7C15ULL};
  std::int64_t idx[3];
  double s[6], t[6];
  for (int attempt = 0; attempt < kSampleRetries; ++attempt) {
    for (int j = 0; j < ms; ++j) {
      bool dup;
      do {
        idx[j] = static_cast<std::int64_t>(rng.next() % static_cast<std::uint64_t>(n));
        dup = false;
        for (int q = 0; q < j; ++q) dup = dup || idx[q] == idx[j];
      } while (dup);
    }
    if (sample_degenerate(model, src, idx) || sample_degenerate(model, dst, idx)) continue;
    for (int j = 0; j < ms; ++j) {
      s[2 * j] = src[2 * idx[j]]; s[2 * j + 1] = src[2 * idx[j] + 1];
      t[2 * j] = dst[2 * idx[j]]; t[2 * j + 1] = dst[2 * idx[j] + 1];
    }
    if (fit_transform(s, t, ms, model, nullptr, m)) return true;
  }
  return false;
}

// Truncated-quadratic (MSAC) cost: inliers pay their squared residual, outliers t^2.
double msac_cost(const Score& s, std::int64_t n, double t2) {
  return s.sse + static_cast<double>(n - s.count) * t2;
}

struct RefineBuffers {
  std::vector<std::uint8_t> mask, cand_mask;
  std::vector<double> in_src, in_dst;
};

// Iterated least-squares refit on the inliers of `m` (the "local optimisation" of LO-RANSAC).
// A refit is kept when it lowers the MSAC cost. Not the inlier count: a sloppy model can hold
// one more borderline match than the least-squares one and still be far less accurate.
// Returns true when it converged (the inlier set stopped changing or a refit did not help),
// false when it ran out of rounds.
bool refine_model(const double* src, const double* dst, std::int64_t n, TransformModel model,
                  double t2, int rounds, double m[6], Score& score, RefineBuffers& buf) {
  const auto un = static_cast<std::size_t>(n);
  buf.mask.resize(un);
  buf.cand_mask.resize(un);
  score = score_model<true>(m, src, dst, n, t2, 0, buf.mask.data());
  for (int r = 0; r < rounds; ++r) {
    buf.in_src.clear();
    buf.in_dst.clear();
    for (std::int64_t i = 0; i < n; ++i) {
      if (!buf.mask[static_cast<std::size_t>(i)]) continue;
      buf.in_src.push_back(src[2 * i]); buf.in_src.push_back(src[2 * i + 1]);
      buf.in_dst.push_back(dst[2 * i]); buf.in_dst.push_back(dst[2 * i + 1]);
    }
    double cand[6];
    const auto n_in = static_cast<std::int64_t>(buf.in_src.size() / 2);
    if (!fit_transform(buf.in_src.data(), buf.in_dst.data(), n_in, model, nullptr, cand)) {
      return true;
    }
    const Score s = score_model<true>(cand, src, dst, n, t2, 0, buf.cand_mask.data());
    if (!(msac_cost(s, n, t2) < msac_cost(score, n, t2))) return true;
    std::copy(cand, cand + 6, m);
    score = s;
    const bool same_set = buf.cand_mask == buf.mask;
    buf.mask.swap(buf.cand_mask);
    if (same_set) return true;  // the next refit would reproduce this model exactly
  }
  return false;
}

std::int64_t required_iterations(double inlier_ratio, int ms, double confidence,
                                 std::int64_t max_iterations) {
  if (confidence >= 1.0) return max_iterations;
  const double p_good = std::pow(inlier_ratio, ms);
  if (p_good >= 1.0) return 0;
  const double denom = std::log1p(-p_good);
  if (!(denom < 0.0)) return max_iterations;
  const double need = std::ceil(std::log(1.0 - confidence) / denom);
  return need >= static_cast<double>(max_iterations) ? max_iterations
                                                     : static_cast<std::int64_t>(need);
}

RansacResult failure(std::int64_t n, std::string reason) {
  RansacResult r;
  r.success = false;
  r.reason = std::move(reason);
  r.matrix.fill(std::numeric_limits<double>::quiet_NaN());
  r.inliers.assign(static_cast<std::size_t>(std::max<std::int64_t>(n, 0)), 0);
  r.rms = std::numeric_limits<double>::quiet_NaN();
  return r;
}

void check_options(const RansacOptions& o) {
  resolve_num_threads(o.num_threads);  // throws std::invalid_argument on a negative value
  if (!(o.confidence > 0.0 && o.confidence <= 1.0)) {
    throw std::invalid_argument("ransac: confidence must be in (0, 1], got " +
                                std::to_string(o.confidence));
  }
  if (o.max_iterations < 1) {
    throw std::invalid_argument("ransac: max_iterations must be >= 1, got " +
                                std::to_string(o.max_iterations));
  }
}

}  // namespace

RansacResult ransac(const double* src, std::int64_t n_src, const double* dst, std::int64_t n_dst,
                    const RansacOptions& options) {
  check_options(options);
  if (n_src != n_dst) {
    return failure(std::max(n_src, n_dst),
                   "src and dst have different numbers of points (" + std::to_string(n_src) +
                       " vs " + std::to_string(n_dst) + ")");
  }
  return ransac(src, dst, n_src, options);
}

RansacResult ransac(const double* src, const double* dst, std::int64_t n,
                    const RansacOptions& options) {
  check_options(options);
  const TransformModel model = options.model;
  const int ms = min_samples(model);
  if (n < 0) throw std::invalid_argument("ransac: n must be >= 0");
  if (n < ms) {
    return failure(n, std::string("the ") + model_name(model) + " model needs at least " +
                          std::to_string(ms) + " point pairs, got " + std::to_string(n));
  }
  if (!(options.threshold > 0.0) || !std::isfinite(options.threshold)) {
    return failure(n, "threshold must be a finite distance > 0 px, got " +
                          std::to_string(options.threshold));
  }
  for (std::int64_t i = 0; i < 2 * n; ++i) {
    if (!std::isfinite(src[i]) || !std::isfinite(dst[i])) {
      return failure(n, std::string("non-finite coordinate in ") +
                            (std::isfinite(src[i]) ? "dst" : "src") + " at point " +
                            std::to_string(i / 2));
    }
  }
  {
    // If all pairs together do not determine the model, no sample will.
    double m[6];
    if (!fit_transform(src, dst, n, model, nullptr, m)) {
      return failure(n, std::string("the points are degenerate for the ") + model_name(model) +
                            " model (all coincident" +
                            (model == TransformModel::affine ? " or collinear)" : ")"));
    }
  }

  const double t2 = options.threshold * options.threshold;
  const int threads = resolve_num_threads(options.num_threads);
  // Keep each thread's share of a batch worth tens of microseconds, so that threads are not
  // started for less work than they cost (scoring costs a few ns per point).
  const std::int64_t min_chunk = std::max<std::int64_t>(1, 20000 / std::max<std::int64_t>(n, 1));

  struct Hypothesis {
    double m[6];
    Score score;
  };
  std::vector<Hypothesis> batch(static_cast<std::size_t>(kMaxBatch));

  bool have_best = false;
  double best_m[6] = {0, 0, 0, 0, 0, 0};
  Score best_score;
  std::int64_t iterations = 0;
  std::int64_t needed = options.max_iterations;
  RefineBuffers buf;
  bool refined = false;  // best_m is a converged local refit

  while (iterations < needed) {
    // Batch size depends only on what earlier batches found, never on num_threads; near the
    // adaptive stop it shrinks so we draw no more hypotheses than the confidence asks for.
    std::int64_t b = have_best ? std::min(kMaxBatch, needed - iterations)
                               : (iterations == 0 ? kFirstBatch : kMaxBatch);
    b = std::min(b, options.max_iterations - iterations);
    const std::int64_t must_reach = have_best ? best_score.count : 0;
    const std::int64_t k0 = iterations;
    // Workers pull hypotheses from a shared counter, so a thread the OS schedules late (a
    // busy machine) does not hold the others up; each hypothesis writes only its own slot.
    std::atomic<std::int64_t> next{0};
    const std::int64_t workers =
        std::min<std::int64_t>(threads, std::max<std::int64_t>(1, b / min_chunk));
    parallel_for(0, workers, static_cast<int>(workers), [&](std::int64_t, std::int64_t) {
      for (std::int64_t j = next.fetch_add(1); j < b; j = next.fetch_add(1)) {
        Hypothesis& h = batch[static_cast<std::size_t>(j)];
        h.score = Score{};
        if (!draw_hypothesis(src, dst, n, model, options.seed, k0 + j, h.m)) continue;
        h.score = score_model<false>(h.m, src, dst, n, t2, must_reach, nullptr);
      }
    });
    iterations += b;

    // Best of the batch: first strictly better in k order, so equal scores keep the lower k.
    std::int64_t pick = -1;
    for (std::int64_t j = 0; j < b; ++j) {
      const Score& s = batch[static_cast<std::size_t>(j)].score;
      if (s.count < 0) continue;
      if (pick < 0 || better(s, batch[static_cast<std::size_t>(pick)].score)) pick = j;
    }
    if (pick >= 0 &&
        (!have_best || better(batch[static_cast<std::size_t>(pick)].score, best_score))) {
      const Hypothesis& h = batch[static_cast<std::size_t>(pick)];
      std::copy(h.m, h.m + 6, best_m);
      best_score = h.score;
      have_best = true;
      refined = options.refine &&
                refine_model(src, dst, n, model, t2, kRefitIterations, best_m, best_score, buf);
      const double ratio = static_cast<double>(best_score.count) / static_cast<double>(n);
      needed = std::max(iterations, required_iterations(ratio, ms, options.confidence,
                                                        options.max_iterations));
      if (needed <= iterations) break;
    }
  }

  if (!have_best) {
    return failure(n, "every minimal sample drawn was degenerate (coincident or collinear "
                      "points); no hypothesis could be fitted");
  }
  if (options.refine && !refined) {
    // Final refit on all inliers of the best model, iterated until it stops improving (a
    // best model whose local refit already converged would come out unchanged).
    refine_model(src, dst, n, model, t2, 4 * kRefitIterations, best_m, best_score, buf);
  }

  RansacResult r;
  r.inliers.assign(static_cast<std::size_t>(n), 0);
  const Score final_score = score_model<true>(best_m, src, dst, n, t2, 0, r.inliers.data());
  r.iterations = iterations;
  if (final_score.count < ms) {
    RansacResult f = failure(n, "no model is supported by at least " + std::to_string(ms) +
                                    " inliers within the threshold");
    f.iterations = iterations;
    return f;
  }
  r.success = true;
  std::copy(best_m, best_m + 6, r.matrix.begin());
  r.num_inliers = final_score.count;
  r.rms = std::sqrt(final_score.sse / static_cast<double>(final_score.count));
  return r;
}

}  // namespace deepalign
