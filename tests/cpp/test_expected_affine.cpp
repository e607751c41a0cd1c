#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <stdexcept>
#include <vector>

#include "check.hpp"
#include "deepalign/expected_affine.hpp"

using deepalign::Border;
using deepalign::ImageView;
using deepalign::Interpolation;

TEST_CASE(grid_size_covers_image) {
  CHECK(deepalign::grid_size(1, 8) == 1);
  CHECK(deepalign::grid_size(9, 8) == 2);
  CHECK(deepalign::grid_size(10, 8) == 3);
  CHECK_THROWS(deepalign::grid_size(0, 8), std::invalid_argument);
}

TEST_CASE(euclidean_knn_matches_brute_force) {
  std::mt19937 rng(3);
  std::uniform_real_distribution<double> u(-20.0, 220.0);
  const std::int64_t n = 300;
  std::vector<double> pts(2 * n);
  for (auto& v : pts) v = u(rng);
  const std::int64_t rows = 26, cols = 21;
  const double step = 8.0;
  const int k = 7;
  for (int threads : {1, 3}) {
    const auto g = deepalign::knn_grid(pts.data(), n, rows, cols, step, k, nullptr, threads);
    for (std::int64_t r = 0; r < rows; ++r) {
      for (std::int64_t c = 0; c < cols; ++c) {
        std::vector<double> d(n);
        for (std::int64_t i = 0; i < n; ++i) {
          d[i] = std::hypot(pts[2 * i] - c * step, pts[2 * i + 1] - r * step);
        }
        std::vector<double> s = d;
        std::sort(s.begin(), s.end());
        for (int t = 0; t < k; ++t) {
          const std::size_t at = static_cast<std::size_t>((r * cols + c) * k + t);
          CHECK_NEAR(g.dist[at], s[t], 1e-3);
          CHECK_NEAR(d[g.index[at]], s[t], 1e-9);
        }
      }
    }
  }
}

TEST_CASE(geodesic_distance_goes_around_a_wall) {
  // 1-pixel-step grid, a wall at column 5 for rows 0..7 of a 10 x 11 grid: the only way from
  // the left to the right side is below row 7.
  const std::int64_t rows = 10, cols = 11;
  std::vector<std::uint8_t> blocked(rows * cols, 0);
  for (std::int64_t r = 0; r < 8; ++r) blocked[r * cols + 5] = 1;
  const double src[2] = {0.0, 0.0};
  const auto g = deepalign::knn_grid(src, 1, rows, cols, 1.0, 1, blocked.data(), 1);
  CHECK(g.used[0] == 1);
  // Same side: octile distance.
  CHECK_NEAR(g.dist[3 * cols + 4], 3.0 * std::sqrt(2.0) + 1.0, 1e-5);
  // Behind the wall at (x=6, y=0): down to row 8 (diagonal moves, no corner cutting at the
  // wall's end (5, 7)), across, and back up.
  const double d = g.dist[0 * cols + 6];
  CHECK(d > 15.0);  // Euclidean distance is 6
  CHECK(std::isinf(g.dist[2 * cols + 5]));  // the wall itself is never reached
  CHECK(g.index[2 * cols + 5] == -1);
}

TEST_CASE(geodesic_knn_is_sorted_and_distinct) {
  const std::int64_t rows = 12, cols = 12;
  std::vector<std::uint8_t> blocked(rows * cols, 0);
  std::vector<double> pts = {1, 1, 10, 1, 1, 10, 10, 10, 5.5, 5.5};
  const auto g = deepalign::knn_grid(pts.data(), 5, rows, cols, 1.0, 3, blocked.data(), 1);
  for (std::int64_t v = 0; v < rows * cols; ++v) {
    CHECK(g.dist[v * 3] <= g.dist[v * 3 + 1]);
    CHECK(g.dist[v * 3 + 1] <= g.dist[v * 3 + 2]);
    CHECK(g.index[v * 3] != g.index[v * 3 + 1]);
    CHECK(g.index[v * 3 + 2] != g.index[v * 3 + 1]);
  }
  CHECK(g.index[(1 * cols + 1) * 3] == 0);
  CHECK_NEAR(g.dist[(1 * cols + 1) * 3], 0.0, 1e-9);
}

TEST_CASE(point_in_blocked_cell_is_unused) {
  std::vector<std::uint8_t> blocked(16, 1);
  const double p[2] = {1.2, 1.7};
  const auto g = deepalign::knn_grid(p, 1, 4, 4, 1.0, 2, blocked.data(), 1);
  CHECK(g.used[0] == 0);
  CHECK(g.index[0] == -1);
}

TEST_CASE(coarsen_mask_blocks_thin_crack) {
  // A 1-pixel diagonal crack through a 64 x 64 mask: no 8-connected grid path without corner
  // cutting may cross it.
  const std::int64_t h = 64, w = 64, step = 8;
  std::vector<std::uint8_t> mask(h * w, 0);
  for (std::int64_t y = 0; y < h; ++y) mask[y * w + std::min<std::int64_t>(w - 1, y + 3)] = 255;
  const ImageView<const std::uint8_t> mv{mask.data(), h, w, w};
  const auto blocked = deepalign::coarsen_mask(mv, step, 2);
  const std::int64_t rows = deepalign::grid_size(h, step), cols = deepalign::grid_size(w, step);
  CHECK(static_cast<std::int64_t>(blocked.size()) == rows * cols);
  const double src[2] = {0.0, 56.0};  // below-left of the crack
  const auto g = deepalign::knn_grid(src, 1, rows, cols, double(step), 1, blocked.data(), 1);
  CHECK(g.used[0] == 1);
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t c = 0; c < cols; ++c) {
      const double x = c * step, y = r * step;
      if (x > y + 3 + step) CHECK(std::isinf(g.dist[r * cols + c]));  // other side: unreachable
    }
  }
}

TEST_CASE(geodesic_knn_same_for_any_thread_count_and_matches_per_source_dijkstra) {
  // Big enough that buckets hold more than the parallel threshold of labels; a wall with a
  // gap makes paths bend. Reference: one plain Dijkstra per source, then the k smallest.
  const std::int64_t rows = 160, cols = 200;
  const int k = 12, n = 600;
  std::vector<std::uint8_t> blocked(rows * cols, 0);
  for (std::int64_t r = 0; r < rows - 20; ++r) blocked[r * cols + 100] = 1;
  std::mt19937 gen(7);
  std::uniform_real_distribution<double> ux(0.0, double(cols - 1)), uy(0.0, double(rows - 1));
  std::vector<double> pts;
  while (static_cast<int>(pts.size()) < 2 * n) {
    const double x = ux(gen), y = uy(gen);
    if (std::abs(x - 100.0) < 2.0) continue;  // keep clear of the wall
    pts.insert(pts.end(), {x, y});
  }
  const auto g1 = deepalign::knn_grid(pts.data(), n, rows, cols, 1.0, k, blocked.data(), 1);
  const auto g3 = deepalign::knn_grid(pts.data(), n, rows, cols, 1.0, k, blocked.data(), 3);
  CHECK(g1.index == g3.index);
  CHECK(g1.dist == g3.dist);
  const std::int64_t nodes = rows * cols;
  std::vector<std::vector<double>> all(n);
  for (int i = 0; i < n; ++i) {
    const auto gi = deepalign::knn_grid(pts.data() + 2 * i, 1, rows, cols, 1.0, 1,
                                        blocked.data(), 1);
    all[i].assign(gi.dist.begin(), gi.dist.end());
  }
  int checked = 0;
  for (std::int64_t v = 0; v < nodes; v += 7) {
    if (blocked[v]) continue;
    std::vector<double> d(n);
    for (int i = 0; i < n; ++i) d[i] = all[i][v];
    std::sort(d.begin(), d.end());
    for (int t = 0; t < k; ++t) CHECK(std::abs(g1.dist[v * k + t] - d[t]) < 1e-3);
    ++checked;
  }
  CHECK(checked > 1000);
}

TEST_CASE(expected_affine_is_mean_of_neighbour_affines) {
  // Two clusters: left points (cluster 0, translation +1) and right points (cluster 1, +5).
  std::vector<double> pts;
  std::vector<std::int32_t> labels;
  for (int i = 0; i < 10; ++i) {
    pts.insert(pts.end(), {2.0, 4.0 * i});
    labels.push_back(0);
    pts.insert(pts.end(), {38.0, 4.0 * i});
    labels.push_back(1);
  }
  const std::int64_t n = static_cast<std::int64_t>(labels.size());
  const std::int64_t rows = 11, cols = 11;
  const double step = 4.0;
  const auto g = deepalign::knn_grid(pts.data(), n, rows, cols, step, 4, nullptr, 1);
  const double aff[12] = {1, 0, 1, 0, 1, 0, 1, 0, 5, 0, 1, 0};
  const double glob[6] = {1, 0, 3, 0, 1, 0};
  deepalign::ExpectedAffineInputs in;
  in.knn = &g;
  in.step = step;
  in.labels = labels.data();
  in.num_points = n;
  in.affines = aff;
  in.num_clusters = 2;
  in.global_affine = glob;
  deepalign::ExpectedAffineField src, out;
  deepalign::expected_affine_field(in, rows, cols, step, 2, 2, &src, &out);
  CHECK_NEAR(src.affine[(5 * cols + 0) * 6 + 2], 1.0, 1e-12);   // left edge: all cluster 0
  CHECK_NEAR(src.affine[(5 * cols + 10) * 6 + 2], 5.0, 1e-12);  // right edge: all cluster 1
  // Output node at x = 0: global shift 3 lands at x = 3, still all-left neighbours.
  CHECK_NEAR(out.affine[(5 * cols + 0) * 6 + 2], 1.0, 1e-12);
  CHECK_THROWS(deepalign::expected_affine_field(in, rows, cols, step, 0, 1, &src, &out),
               std::invalid_argument);
}

TEST_CASE(warp_field_constant_equals_translation) {
  const std::int64_t h = 20, w = 30;
  std::vector<float> img(h * w);
  for (std::int64_t i = 0; i < h * w; ++i) img[i] = static_cast<float>(i % 97);
  std::vector<float> out(h * w, -1.f);
  const std::int64_t rows = deepalign::grid_size(h, 8), cols = deepalign::grid_size(w, 8);
  std::vector<double> field(rows * cols * 6);
  for (std::int64_t v = 0; v < rows * cols; ++v) {
    const double a[6] = {1, 0, 2, 0, 1, -1};
    for (int p = 0; p < 6; ++p) field[v * 6 + p] = a[p];
  }
  deepalign::warp_affine_field<float>({img.data(), h, w, w}, {out.data(), h, w, w}, field.data(),
                                      rows, cols, 8.0, Interpolation::Linear, Border::Constant,
                                      0.0, 2);
  for (std::int64_t y = 0; y < h; ++y) {
    for (std::int64_t x = 0; x < w; ++x) {
      const std::int64_t sx = x + 2, sy = y - 1;
      const float want = (sx < w && sy >= 0) ? img[sy * w + sx] : 0.f;
      CHECK_NEAR(out[y * w + x], want, 1e-5);
    }
  }
  CHECK_THROWS(deepalign::warp_affine_field<float>({img.data(), h, w, w}, {out.data(), h, w, w},
                                                   field.data(), 1, 1, 8.0, Interpolation::Linear,
                                                   Border::Constant, 0.0, 1),
               std::invalid_argument);
}
