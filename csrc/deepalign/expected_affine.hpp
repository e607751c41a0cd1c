// Expected affine (Xin et al. 2022, Front. Neuroinform., doi 10.3389/fninf.2022.944050):
// the hot loops of registering a damaged (folded / cracked) section with a per-pixel affine.
//
// Reading of the paper used here (the Python side, deepalign_fast.expected_affine, does the
// keypoint matching, K-means and per-cluster RANSAC):
// - Matched keypoints of the moving (damaged) section are clustered; cluster c has a local
//   affine A_c (a pull map, reference -> moving).
// - KNN density estimation: around a point q, the k nearest clustered keypoints are found;
//   with k_c of them in cluster c the KNN estimate of the cluster's density at q is
//   p(q | c) = k_c / (N_c V) and the posterior P(c | q) = k_c / k.
// - Expected affine: E(q) = sum_c P(c | q) A_c.
// - Where a damage mask is given, "nearest" uses the path (geodesic) distance in the undamaged
//   part of the section, so a fold or crack separates the two sides.
//
// All of this lives on a coarse node grid: node (i, j) sits at pixel (x, y) = (j * step,
// i * step) and the grid has grid_size(n, step) = ceil((n - 1) / step) + 1 nodes per axis, so
// the last node lies on or past the last pixel and bilinear interpolation covers every pixel.
//
// Conventions (image.hpp): points are (x, y) pixels, origin at the centre of the top-left
// pixel; affines are row-major 2x3 float64 PULL maps (output/reference -> input/moving).
// Bad arguments throw std::invalid_argument.
#pragma once

#include <cstdint>
#include <vector>

#include "deepalign/image.hpp"

namespace deepalign {

// Number of coarse nodes covering n pixels at spacing step (step >= 1, n >= 1).
std::int64_t grid_size(std::int64_t n, std::int64_t step);

// Blocked (damaged) nodes of the coarse grid of `mask` (non-zero = damage): a node is blocked
// when any damaged pixel lies within Chebyshev distance step / 2 + 1 of it. The extra pixel
// makes the cells of neighbouring nodes overlap, so a damaged curve one pixel thin (4- or
// 8-connected) always blocks at least one end of every grid edge that crosses it: paths on the
// grid cannot leak through a thin crack. Returns rows * cols bytes (1 = blocked).
std::vector<std::uint8_t> coarsen_mask(const ImageView<const std::uint8_t>& mask,
                                       std::int64_t step, int num_threads);

// The k nearest points of every grid node, sorted by (distance, point index).
struct KnnGrid {
  std::int64_t rows = 0, cols = 0;
  int k = 0;
  std::vector<float> dist;          // rows * cols * k, +inf where fewer than k were found
  std::vector<std::int32_t> index;  // rows * cols * k, -1 where fewer than k were found
  std::vector<std::uint8_t> used;   // one per point: 0 when the point could not be placed on
                                    // the grid (geodesic: its nearby nodes are all blocked)
};

// k nearest of the n points (x, y interleaved) for every node of a rows x cols grid with
// spacing step.
// - blocked == nullptr: exact Euclidean distances (bucket grid search, parallel over rows).
// - blocked != nullptr (rows * cols bytes): path distance on the 8-connected node graph of the
//   unblocked nodes (edge lengths step and step * sqrt(2); a diagonal step needs both
//   orthogonal neighbours free, so paths never cut a blocked corner). A point enters at the
//   nearest unblocked of the (up to 4) nodes around it, at its Euclidean distance from that
//   node. Solved exactly by a k-label Dijkstra (each node settles its k nearest distinct
//   sources; a source that is not among a node's k nearest cannot be among the k nearest of
//   any node whose shortest path to it passes through that node, so pruning there is exact).
//   Bucket queue (2 buckets per step) instead of a heap; large buckets are split over
//   num_threads threads by node range, with the same result for any thread count. The
//   8-neighbour metric overestimates straight-line lengths by up to 8 % (octile distance).
KnnGrid knn_grid(const double* points, std::int64_t n, std::int64_t rows, std::int64_t cols,
                 double step, int k, const std::uint8_t* blocked, int num_threads);

struct ExpectedAffineField {
  std::int64_t rows = 0, cols = 0;
  double step = 0;
  std::vector<double> affine;  // rows * cols * 6
};

// Inputs of expected_affine_field.
struct ExpectedAffineInputs {
  const KnnGrid* knn = nullptr;          // on the moving-image grid
  double step = 0;                       // spacing of that grid
  const std::int32_t* labels = nullptr;  // cluster of each point (-1 = in no cluster)
  std::int64_t num_points = 0;
  const double* affines = nullptr;       // num_clusters * 6
  int num_clusters = 0;
  const double* global_affine = nullptr;  // 6
  const std::uint8_t* blocked = nullptr;  // moving-grid blocked nodes, or nullptr
};

// The expected affine, twice:
// - `source`: E(q) on the moving-image grid, E(q) = sum_c (k_c / m) A_c over the m <= k
//   labelled neighbours of q. Nodes with no labelled neighbour (an undamaged island no keypoint
//   reaches) get the global affine; blocked nodes copy the nearest (8-connected BFS) unblocked
//   node, only so that interpolation next to the damage stays well defined.
// - `output`: the pull field on an output grid of out_rows x out_cols nodes, spacing
//   out_step. The density lives in moving coordinates, but a pull map is indexed by output
//   (reference) coordinates, so each output node p is assigned by a fixed-point iteration:
//   A_0 = global affine, A_{t+1} = E(A_t p) (E bilinear in q), `iterations` times (>= 1). One
//   step already puts p on the side of the damage its source lies on, up to the difference
//   between the global and the local affine; the next ones remove that.
void expected_affine_field(const ExpectedAffineInputs& in, std::int64_t out_rows,
                           std::int64_t out_cols, double out_step, int iterations,
                           int num_threads, ExpectedAffineField* source,
                           ExpectedAffineField* output);

// Warps `src` into `dst` with a per-pixel affine pull map: the 6 parameters at output pixel
// (x, y) are the bilinear interpolation of `field` (rows x cols nodes at spacing step, which
// must cover dst) at (x / step, y / step); then dst(y, x) = src(A (x, y, 1)) sampled exactly as
// warp_affine does (same interpolation / border / fill semantics, float64 coordinates). Only
// one interpolated row of parameters per output row is materialised. Parallel over rows.
template <class T>
void warp_affine_field(const ImageView<const T>& src, const ImageView<T>& dst,
                       const double* field, std::int64_t rows, std::int64_t cols, double step,
                       Interpolation interp, Border border, double fill, int num_threads);

extern template void warp_affine_field<std::uint8_t>(const ImageView<const std::uint8_t>&,
                                                     const ImageView<std::uint8_t>&,
                                                     const double*, std::int64_t, std::int64_t,
                                                     double, Interpolation, Border, double, int);
extern template void warp_affine_field<std::uint16_t>(const ImageView<const std::uint16_t>&,
                                                      const ImageView<std::uint16_t>&,
                                                      const double*, std::int64_t,
                                                      std::int64_t, double, Interpolation,
                                                      Border, double, int);
extern template void warp_affine_field<float>(const ImageView<const float>&,
                                              const ImageView<float>&, const double*,
                                              std::int64_t, std::int64_t, double, Interpolation,
                                              Border, double, int);

}  // namespace deepalign
