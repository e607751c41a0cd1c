#include "deepalign/ransac.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

#include "deepalign/parallel.hpp"
#include "deepalign/sampling.hpp"  // (the CPU dispatch)

namespace deepalign {
namespace {

// Hypotheses scored per parallel round. The first round is small: with a usable inlier ratio
// it already holds a good sample, whose local refit then tells how many more are needed.
constexpr std::int64_t kFirstBatch = 16;
constexpr std::int64_t kMaxBatch = 64;
constexpr int kSampleRetries = 16;           // draws per hypothesis before giving up on it
constexpr int kRefitIterations = 4;          // local optimisation rounds per new best model

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

// Inlier count and inlier SSE of m over every point, in double precision and input order,
// with the inlier mask: the final answer (the search below scores in float32).
Score score_exact(const double* m, const double* src, const double* dst, std::int64_t n,
                  double t2, std::uint8_t* mask) {
  const double a = m[0], b = m[1], tx = m[2], c = m[3], d = m[4], ty = m[5];
  std::int64_t count = 0;
  double sse = 0.0;
  for (std::int64_t i = 0; i < n; ++i) {
    const double x = src[2 * i], y = src[2 * i + 1];
    const double rx = a * x + b * y + tx - dst[2 * i];
    const double ry = c * x + d * y + ty - dst[2 * i + 1];
    const double r2 = rx * rx + ry * ry;
    const bool in = r2 < t2;
    count += in;
    sse += in ? r2 : 0.0;
    mask[i] = static_cast<std::uint8_t>(in);
  }
  return Score{count, sse};
}

// The points as the hypotheses are scored: float32 (8 per AVX2 instruction), each set centred
// on its mean (so float32 keeps a residual to ~1e-3 px even 10^4 px from the origin),
// structure of arrays, and in a pseudo-random order fixed by the seed, so that the early
// rejection below sees a random sample of the points first, not one corner of the frame.
struct ScoringPoints;
struct CentredModel;
// Points [lo, hi) of a scoring (lo a multiple of 8): adds their inlier count to `count` and
// each inlier's squared residual to lane (i % 8) of `acc`; writes their mask bytes when `mask`
// is given. The AVX2 kernel gives the portable kernel's bits (same operations, same lanes,
// no contraction: ransac.cpp is built with -ffp-contract=off).
using ChunkKernel = void (*)(const ScoringPoints&, std::int64_t, std::int64_t,
                             const CentredModel&, float, std::int64_t&, float*, std::uint8_t*);

struct ScoringPoints {
  ChunkKernel kernel = nullptr;  // chosen once per estimate (chunk_kernel)
  std::vector<float> sx, sy, dx, dy;
  std::vector<std::int64_t> order;  // order[i]: the input index of scoring point i
  double cs[2] = {0.0, 0.0}, cd[2] = {0.0, 0.0};  // the means taken off src and dst
  std::int64_t n = 0;
};

ScoringPoints scoring_points(const double* src, const double* dst, std::int64_t n,
                             std::uint64_t seed) {
  ScoringPoints p;
  p.n = n;
  const auto un = static_cast<std::size_t>(n);
  p.order.resize(un);
  for (std::int64_t i = 0; i < n; ++i) p.order[static_cast<std::size_t>(i)] = i;
  SplitMix64 rng{seed ^ 0x5851F42D4C957F2DULL};
  for (std::int64_t i = n - 1; i > 0; --i) {  // Fisher-Yates
    // An index in [0, i]: a multiply-shift below 2^32 points (a 64-bit division per point
    // cost as much as scoring 16 hypotheses).
    const auto bound = static_cast<std::uint64_t>(i + 1);
    const std::uint64_t r = rng.next();
    const auto j = static_cast<std::int64_t>(bound <= 0xFFFFFFFFULL ? ((r >> 32) * bound) >> 32
                                                                      : r % bound);
    std::swap(p.order[static_cast<std::size_t>(i)], p.order[static_cast<std::size_t>(j)]);
  }
  for (std::int64_t i = 0; i < n; ++i) {
    p.cs[0] += src[2 * i]; p.cs[1] += src[2 * i + 1];
    p.cd[0] += dst[2 * i]; p.cd[1] += dst[2 * i + 1];
  }
  for (double* v : {&p.cs[0], &p.cs[1], &p.cd[0], &p.cd[1]}) *v /= static_cast<double>(n);
  p.sx.resize(un); p.sy.resize(un); p.dx.resize(un); p.dy.resize(un);
  for (std::size_t i = 0; i < un; ++i) {
    const auto k = static_cast<std::size_t>(p.order[i]);
    p.sx[i] = static_cast<float>(src[2 * k] - p.cs[0]);
    p.sy[i] = static_cast<float>(src[2 * k + 1] - p.cs[1]);
    p.dx[i] = static_cast<float>(dst[2 * k] - p.cd[0]);
    p.dy[i] = static_cast<float>(dst[2 * k + 1] - p.cd[1]);
  }
  return p;
}

// m in the centred frames of ScoringPoints, as float32: a b tx c d ty.
struct CentredModel {
  float a, b, tx, c, d, ty;
};

CentredModel centred(const double* m, const ScoringPoints& p) {
  // r = M (s' + cs) - (d' + cd) = A s' + (A cs + t - cd) - d'
  return CentredModel{static_cast<float>(m[0]), static_cast<float>(m[1]),
                      static_cast<float>(m[0] * p.cs[0] + m[1] * p.cs[1] + m[2] - p.cd[0]),
                      static_cast<float>(m[3]), static_cast<float>(m[4]),
                      static_cast<float>(m[3] * p.cs[0] + m[4] * p.cs[1] + m[5] - p.cd[1])};
}

inline float residual2(const ScoringPoints& p, std::size_t i, const CentredModel& m) {
  const float rx = m.a * p.sx[i] + m.b * p.sy[i] + m.tx - p.dx[i];
  const float ry = m.c * p.sx[i] + m.d * p.sy[i] + m.ty - p.dy[i];
  return rx * rx + ry * ry;
}

void chunk_portable(const ScoringPoints& p, std::int64_t lo, std::int64_t hi,
                    const CentredModel& m, float t2, std::int64_t& count, float* acc,
                    std::uint8_t* mask) {
  std::int64_t c = 0;
  for (std::int64_t i = lo; i < hi; ++i) {
    const float r2 = residual2(p, static_cast<std::size_t>(i), m);
    const bool in = r2 < t2;
    c += in;
    acc[i & 7] += in ? r2 : 0.0f;
    if (mask != nullptr) mask[i] = static_cast<std::uint8_t>(in);
  }
  count += c;
}

#if DEEPALIGN_X86_DISPATCH
__attribute__((target("arch=x86-64-v3"))) void chunk_avx2(
    const ScoringPoints& p, std::int64_t lo, std::int64_t hi, const CentredModel& m, float t2,
    std::int64_t& count, float* acc, std::uint8_t* mask) {
  const __m256 a = _mm256_set1_ps(m.a), b = _mm256_set1_ps(m.b), tx = _mm256_set1_ps(m.tx);
  const __m256 c = _mm256_set1_ps(m.c), d = _mm256_set1_ps(m.d), ty = _mm256_set1_ps(m.ty);
  const __m256 limit = _mm256_set1_ps(t2);
  __m256 sum = _mm256_loadu_ps(acc);
  std::int64_t n_in = 0;
  const float *sx = p.sx.data(), *sy = p.sy.data(), *dx = p.dx.data(), *dy = p.dy.data();
  std::int64_t i = lo;
  for (; i + 8 <= hi; i += 8) {
    const __m256 x = _mm256_loadu_ps(sx + i), y = _mm256_loadu_ps(sy + i);
    const __m256 rx = _mm256_sub_ps(
        _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(a, x), _mm256_mul_ps(b, y)), tx),
        _mm256_loadu_ps(dx + i));
    const __m256 ry = _mm256_sub_ps(
        _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(c, x), _mm256_mul_ps(d, y)), ty),
        _mm256_loadu_ps(dy + i));
    const __m256 r2 = _mm256_add_ps(_mm256_mul_ps(rx, rx), _mm256_mul_ps(ry, ry));
    const __m256 in = _mm256_cmp_ps(r2, limit, _CMP_LT_OQ);
    sum = _mm256_add_ps(sum, _mm256_and_ps(in, r2));
    const int bits = _mm256_movemask_ps(in);
    n_in += __builtin_popcount(static_cast<unsigned>(bits));
    if (mask != nullptr) {
      for (int u = 0; u < 8; ++u) mask[i + u] = static_cast<std::uint8_t>((bits >> u) & 1);
    }
  }
  _mm256_storeu_ps(acc, sum);
  count += n_in;
  if (i < hi) chunk_portable(p, i, hi, m, t2, count, acc, mask);
}
#endif

ChunkKernel chunk_kernel() {
#if DEEPALIGN_X86_DISPATCH
  if (detail::cpu_has_avx2()) return chunk_avx2;
#endif
  return chunk_portable;
}

// Points scored between "can this hypothesis still win?" checks (a multiple of 8).
constexpr std::int64_t kChunk = 128;
// A hypothesis is dropped once its inliers among the first k points (a random sample: the
// scoring order is shuffled) fall this many standard deviations, and kRejectSlack points,
// below what a hypothesis as good as the best so far would show (binomial), at k = 128, 512
// and 2048 only: a wrong hypothesis (few inliers) goes after 128 points instead of after
// most of them, and one at least as good as the best is dropped with a probability of about
// 1e-4 (three one-sided 4-sigma tests; the slack covers the skewed binomial of inlier ratios
// near 1, where the normal approximation is poor: a ratio of 0.99 would need 10 outliers
// among the first 128 points, a 1e-6 event).
constexpr double kRejectSigmas = 4.0;
constexpr double kRejectSlack = 4.0;

bool checkpoint(std::int64_t k) { return k == 128 || k == 512 || k == 2048; }

// Inlier count and inlier SSE of m over `p`. With `mask`, every point is scored and its mask
// byte written (scoring order). Without, the scoring stops early (count = -1) once the
// remaining points cannot lift the count to `must_reach`, or the inlier ratio so far is
// clearly below `best_ratio` (see kRejectSigmas).
Score score_model(const double* m6, const ScoringPoints& p, double t2, std::int64_t must_reach,
                  double best_ratio, std::uint8_t* mask) {
  const CentredModel m = centred(m6, p);
  const auto t2f = static_cast<float>(t2);
  const std::int64_t n = p.n;
  std::int64_t count = 0;
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  const double spread = best_ratio * (1.0 - best_ratio);
  for (std::int64_t lo = 0; lo < n; lo += kChunk) {
    const std::int64_t hi = std::min(n, lo + kChunk);
    p.kernel(p, lo, hi, m, t2f, count, acc, mask);
    if (mask != nullptr) continue;
    if (count + (n - hi) < must_reach) return Score{};
    if (best_ratio > 0.0 && hi < n && checkpoint(hi)) {
      const auto k = static_cast<double>(hi);
      const double expected = best_ratio * k;
      if (static_cast<double>(count) <
          expected - kRejectSigmas * std::sqrt(k * spread) - kRejectSlack) {
        return Score{};
      }
    }
  }
  double sse = 0.0;
  for (float v : acc) sse += static_cast<double>(v);
  return Score{count, sse};
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
bool refine_model(const double* src, const double* dst, const ScoringPoints& p,
                  TransformModel model, double t2, int rounds, double m[6], Score& score,
                  RefineBuffers& buf) {
  const std::int64_t n = p.n;
  const auto un = static_cast<std::size_t>(n);
  buf.mask.resize(un);
  buf.cand_mask.resize(un);
  score = score_model(m, p, t2, 0, 0.0, buf.mask.data());
  for (int r = 0; r < rounds; ++r) {
    buf.in_src.clear();
    buf.in_dst.clear();
    for (std::size_t i = 0; i < un; ++i) {  // (scoring order: the fit does not care)
      if (!buf.mask[i]) continue;
      const auto k = static_cast<std::size_t>(p.order[i]);
      buf.in_src.push_back(src[2 * k]); buf.in_src.push_back(src[2 * k + 1]);
      buf.in_dst.push_back(dst[2 * k]); buf.in_dst.push_back(dst[2 * k + 1]);
    }
    double cand[6];
    const auto n_in = static_cast<std::int64_t>(buf.in_src.size() / 2);
    if (!fit_transform(buf.in_src.data(), buf.in_dst.data(), n_in, model, nullptr, cand)) {
      return true;
    }
    const Score s = score_model(cand, p, t2, 0, 0.0, buf.cand_mask.data());
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
  // started for less work than they cost (scoring costs well under a ns per point).
  const std::int64_t min_chunk = std::max<std::int64_t>(1, 200000 / std::max<std::int64_t>(n, 1));

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
  ScoringPoints points = scoring_points(src, dst, n, options.seed);
  points.kernel = chunk_kernel();
  RefineBuffers buf;
  bool refined = false;  // best_m is a converged local refit

  while (iterations < needed) {
    // Batch size depends only on what earlier batches found, never on num_threads; near the
    // adaptive stop it shrinks so we draw no more hypotheses than the confidence asks for.
    std::int64_t b = have_best ? std::min(kMaxBatch, needed - iterations)
                               : (iterations == 0 ? kFirstBatch : kMaxBatch);
    b = std::min(b, options.max_iterations - iterations);
    const std::int64_t must_reach = have_best ? best_score.count : 0;
    const double best_ratio =
        have_best ? static_cast<double>(best_score.count) / static_cast<double>(n) : 0.0;
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
        h.score = score_model(h.m, points, t2, must_reach, best_ratio, nullptr);
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
      refined = options.refine && refine_model(src, dst, points, model, t2, kRefitIterations,
                                               best_m, best_score, buf);
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
    refine_model(src, dst, points, model, t2, 4 * kRefitIterations, best_m, best_score, buf);
  }

  RansacResult r;
  r.inliers.assign(static_cast<std::size_t>(n), 0);
  const Score final_score = score_exact(best_m, src, dst, n, t2, r.inliers.data());
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
