// Closed-form weighted least-squares fits of 2D transforms to point pairs.
//
// Points are (x, y) pixels, interleaved: pair i is src[2i], src[2i+1] -> dst[2i], dst[2i+1].
// The fitted 2x3 matrix M = [[a, b, tx], [c, d, ty]] (row-major, 6 doubles) maps src to dst:
// dst ~= M @ (x, y, 1). Used by RANSAC (minimal samples and local refits) and by the
// pipeline's global solve.
#pragma once

#include <cstdint>
#include <string>

namespace deepalign {

enum class TransformModel {
  translation,  // dst = src + t                      (1 pair determines it)
  rigid,        // rotation + translation               (2 pairs)
  similarity,   // uniform scale + rotation + translation (2 pairs)
  affine,       // full 2x3 affine                      (3 pairs)
};

// Smallest number of point pairs that determines the model.
int min_samples(TransformModel model);

// "translation" | "rigid" | "similarity" | "affine"; anything else throws std::invalid_argument.
TransformModel parse_model(const std::string& name);
const char* model_name(TransformModel model);

// Weighted least-squares fit of `model` to n pairs (weights may be null = all ones).
//   translation: weighted mean of dst - src;
//   rigid / similarity: Umeyama/Procrustes on centred points (proper rotations only);
//   affine: normal equations on centred points.
// Returns false (out_matrix untouched) when the fit is undetermined: fewer pairs than
// min_samples, non-finite coordinates, zero total weight, coincident points (rigid/similarity)
// or collinear points (affine). Negative or non-finite weights and n < 0 throw
// std::invalid_argument (caller errors).
bool fit_transform(const double* src, const double* dst, std::int64_t n, TransformModel model,
                   const double* weights, double out_matrix[6]);

}  // namespace deepalign
