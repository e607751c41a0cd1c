// Robust estimation of a 2D transform from point matches (LO-RANSAC).
//
// Points are (x, y) pixels, interleaved (pair i: src[2i], src[2i+1] -> dst[2i], dst[2i+1]).
// The estimated 2x3 matrix maps src to dst (dst ~= M @ (x, y, 1)); pass reference points as
// src and moving points as dst to get the package's pull map (reference -> moving).
//
// Determinism: hypothesis k draws its minimal sample from an RNG seeded by (seed, k) alone,
// hypotheses are scored in fixed batches whose size never depends on the thread count, and the
// best one is chosen by (more inliers, lower inlier SSE, lower k). The result is therefore
// identical for a given seed whatever num_threads is, and whatever the CPU (the AVX2 scoring
// kernel counts and sums exactly as the portable one).
//
// Speed: hypotheses are scored on a float32 copy of the points (each set centred on its mean)
// in a shuffled order, so a hypothesis that cannot beat the best is dropped after a sample of
// the points; the local refits and the returned mask and RMS use the float64 input.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "deepalign/transform_fit.hpp"

namespace deepalign {

struct RansacOptions {
  TransformModel model = TransformModel::affine;
  double threshold = 2.0;          // inlier if |M src - dst| < threshold (px)
  double confidence = 0.999;       // in (0, 1]: stop once a better model is this unlikely
  std::int64_t max_iterations = 10000;  // hard cap on hypotheses drawn (>= 1)
  std::uint64_t seed = 0;
  int num_threads = 0;             // 0 = all cores
  bool refine = true;              // local least-squares refits (LO) and a final refit on inliers
};

struct RansacResult {
  bool success = false;
  std::string reason;              // why success is false; empty on success
  std::array<double, 6> matrix{};  // row-major 2x3; NaN when success is false
  std::vector<std::uint8_t> inliers;  // one 0/1 per pair (all 0 when success is false)
  std::int64_t num_inliers = 0;
  std::int64_t iterations = 0;     // hypotheses drawn
  double rms = 0.0;                // RMS reprojection distance over the inliers (NaN on failure)
};

// Data problems (too few pairs, non-finite coordinates, coincident/collinear points,
// threshold <= 0, no consistent model) give success == false with a reason; bad options
// (negative num_threads, confidence outside (0, 1], max_iterations < 1) throw
// std::invalid_argument.
RansacResult ransac(const double* src, const double* dst, std::int64_t n,
                    const RansacOptions& options);

// Same, for inputs whose lengths are not yet known to agree (mismatch -> success == false).
RansacResult ransac(const double* src, std::int64_t n_src, const double* dst, std::int64_t n_dst,
                    const RansacOptions& options);

}  // namespace deepalign
