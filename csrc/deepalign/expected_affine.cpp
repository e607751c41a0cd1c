// Expected-affine kernels (see expected_affine.hpp for the method and conventions).
#include "deepalign/expected_affine.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <deque>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "deepalign/parallel.hpp"
#include "deepalign/sampling.hpp"

namespace deepalign {
namespace {

constexpr double kSqrt2 = 1.4142135623730951;

// A sorted (distance, index) list of at most k entries: the running k nearest of one node.
struct TopK {
  int k, count = 0;
  double* d;
  std::int32_t* idx;
  TopK(int k_, double* d_, std::int32_t* i_) : k(k_), d(d_), idx(i_) {}
  double worst() const { return count < k ? std::numeric_limits<double>::infinity() : d[k - 1]; }
  void offer(double dist, std::int32_t i) {
    if (count == k && !(dist < d[k - 1] || (dist == d[k - 1] && i < idx[k - 1]))) return;
    int pos = count < k ? count++ : k - 1;
    while (pos > 0 && (d[pos - 1] > dist || (d[pos - 1] == dist && idx[pos - 1] > i))) {
      d[pos] = d[pos - 1];
      idx[pos] = idx[pos - 1];
      --pos;
    }
    d[pos] = dist;
    idx[pos] = i;
  }
};

void check_grid(std::int64_t rows, std::int64_t cols, double step, int k) {
  if (rows < 1 || cols < 1) throw std::invalid_argument("knn_grid: grid must have >= 1 node");
  if (!(step > 0.0) || !std::isfinite(step)) {
    throw std::invalid_argument("knn_grid: step must be finite and > 0");
  }
  if (k < 1) throw std::invalid_argument("knn_grid: k must be >= 1");
}

void knn_euclidean(const double* pts, std::int64_t n, double step, KnnGrid& g, int num_threads) {
  if (n == 0) return;
  double minx = pts[0], maxx = pts[0], miny = pts[1], maxy = pts[1];
  for (std::int64_t i = 1; i < n; ++i) {
    minx = std::min(minx, pts[2 * i]);
    maxx = std::max(maxx, pts[2 * i]);
    miny = std::min(miny, pts[2 * i + 1]);
    maxy = std::max(maxy, pts[2 * i + 1]);
  }
  // Buckets of about 2 points each on average: rings grow until k points are certain.
  const double area = (maxx - minx + 1.0) * (maxy - miny + 1.0);
  const double cell = std::max(1.0, std::sqrt(2.0 * area / static_cast<double>(n)));
  const auto nbx = static_cast<std::int64_t>((maxx - minx) / cell) + 1;
  const auto nby = static_cast<std::int64_t>((maxy - miny) / cell) + 1;
  std::vector<std::int64_t> start(static_cast<std::size_t>(nbx * nby + 1), 0);
  std::vector<std::int32_t> order(static_cast<std::size_t>(n));
  auto bucket_of = [&](std::int64_t i) {
    const auto bx = std::min(nbx - 1, static_cast<std::int64_t>((pts[2 * i] - minx) / cell));
    const auto by = std::min(nby - 1, static_cast<std::int64_t>((pts[2 * i + 1] - miny) / cell));
    return by * nbx + bx;
  };
  for (std::int64_t i = 0; i < n; ++i) ++start[static_cast<std::size_t>(bucket_of(i) + 1)];
  for (std::int64_t b = 0; b < nbx * nby; ++b) start[b + 1] += start[b];
  {
    std::vector<std::int64_t> fillpos(start.begin(), start.end() - 1);
    // Points enter their bucket in index order, so ties are resolved the same way however
    // the rings are visited (TopK orders by (distance, index) anyway).
    for (std::int64_t i = 0; i < n; ++i) {
      order[static_cast<std::size_t>(fillpos[static_cast<std::size_t>(bucket_of(i))]++)] =
          static_cast<std::int32_t>(i);
    }
  }
  const int k = g.k;
  const std::int64_t cols = g.cols;
  parallel_for(0, g.rows, num_threads, [&](std::int64_t r0, std::int64_t r1) {
    std::vector<double> d(static_cast<std::size_t>(k));
    std::vector<std::int32_t> ix(static_cast<std::size_t>(k));
    for (std::int64_t r = r0; r < r1; ++r) {
      const double qy = static_cast<double>(r) * step;
      for (std::int64_t c = 0; c < cols; ++c) {
        const double qx = static_cast<double>(c) * step;
        TopK top(k, d.data(), ix.data());
        const auto cx = std::clamp(static_cast<std::int64_t>(std::floor((qx - minx) / cell)),
                                   std::int64_t{0}, nbx - 1);
        const auto cy = std::clamp(static_cast<std::int64_t>(std::floor((qy - miny) / cell)),
                                   std::int64_t{0}, nby - 1);
        const std::int64_t max_ring = std::max(nbx, nby);
        for (std::int64_t ring = 0; ring <= max_ring; ++ring) {
          const std::int64_t y_lo = cy - ring, y_hi = cy + ring;
          for (std::int64_t by = std::max<std::int64_t>(0, y_lo);
               by <= std::min(nby - 1, y_hi); ++by) {
            const bool edge_row = (by == y_lo || by == y_hi);
            const std::int64_t step_x = edge_row ? 1 : 2 * ring;
            for (std::int64_t bx = cx - ring; bx <= cx + ring; bx += std::max<std::int64_t>(1, step_x)) {
              if (bx < 0 || bx >= nbx) continue;
              const std::int64_t b = by * nbx + bx;
              for (std::int64_t t = start[b]; t < start[b + 1]; ++t) {
                const std::int32_t i = order[static_cast<std::size_t>(t)];
                const double dx = pts[2 * i] - qx, dy = pts[2 * i + 1] - qy;
                top.offer(std::sqrt(dx * dx + dy * dy), i);
              }
            }
          }
          // Every point not yet seen lies in a ring >= ring + 1, at least ring * cell away.
          if (top.count == k && top.worst() < static_cast<double>(ring) * cell) break;
        }
        const std::int64_t base = (r * cols + c) * k;
        for (int t = 0; t < top.count; ++t) {
          g.dist[static_cast<std::size_t>(base + t)] = static_cast<float>(d[t]);
          g.index[static_cast<std::size_t>(base + t)] = ix[t];
        }
      }
    }
  }, /*min_chunk=*/4);
}

struct Label {
  double d;
  std::int32_t node;
  std::int32_t src;
};

// The settle order of the k-label Dijkstra: (distance, source, node).
inline bool label_less(const Label& a, const Label& b) {
  if (a.d != b.d) return a.d < b.d;
  if (a.src != b.src) return a.src < b.src;
  return a.node < b.node;
}

// Node-major order (node, distance, source): the same order per node as label_less, with
// the node's neighbours close in memory.
inline bool node_major_less(const Label& a, const Label& b) {
  if (a.node != b.node) return a.node < b.node;
  return label_less(a, b);
}

// Buckets per grid step of the label queue (see knn_geodesic).
constexpr int kBucketsPerStep = 2;
// Ring of buckets: a push lands at most ceil(sqrt(2) * kBucketsPerStep) + 1 buckets ahead.
constexpr int kRing = 2 * kBucketsPerStep + 2;

void knn_geodesic(const double* pts, std::int64_t n, double step, const std::uint8_t* blocked,
                  KnnGrid& g, int num_threads) {
  const std::int64_t rows = g.rows, cols = g.cols;
  const int k = g.k;
  std::vector<int> count(static_cast<std::size_t>(rows * cols), 0);
  // Bucket queue (Dial's algorithm for real edge lengths): bucket b holds the labels whose
  // distance lies in [b * width, (b + 1) * width). Every edge is longer than width, so a label
  // settled from the current bucket never lands in it: once a bucket is current it is
  // complete, and sorting it by (distance, source, node) gives exactly the order in which a
  // binary heap would pop it, hence bit-identical results, without a heap's log factor and
  // cache misses. Edges are at most step * sqrt(2) long, so a ring of kRing buckets holds
  // every pending label; seeds (entry labels, any distance) wait in a sorted list.
  const double width = step / kBucketsPerStep * (1.0 - 1e-9);
  auto bucket_of = [&](double d) { return static_cast<std::int64_t>(std::floor(d / width)); };
  std::vector<Label> seeds;
  seeds.reserve(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) {
    const double x = pts[2 * i], y = pts[2 * i + 1];
    if (!std::isfinite(x) || !std::isfinite(y)) continue;
    const double gx = x / step, gy = y / step;
    const auto fx = static_cast<std::int64_t>(std::floor(gx));
    const auto fy = static_cast<std::int64_t>(std::floor(gy));
    double best = std::numeric_limits<double>::infinity();
    std::int64_t best_node = -1;
    for (std::int64_t yy = fy; yy <= fy + 1; ++yy) {
      for (std::int64_t xx = fx; xx <= fx + 1; ++xx) {
        const std::int64_t cy = std::clamp<std::int64_t>(yy, 0, rows - 1);
        const std::int64_t cx = std::clamp<std::int64_t>(xx, 0, cols - 1);
        const std::int64_t node = cy * cols + cx;
        if (blocked[node]) continue;
        const double dx = x - static_cast<double>(cx) * step;
        const double dy = y - static_cast<double>(cy) * step;
        const double dd = std::sqrt(dx * dx + dy * dy);
        if (dd < best) {
          best = dd;
          best_node = node;
        }
      }
    }
    if (best_node < 0) continue;
    g.used[static_cast<std::size_t>(i)] = 1;
    seeds.push_back({best, static_cast<std::int32_t>(best_node), static_cast<std::int32_t>(i)});
  }
  // Tentative labels: per node, the best known distance of up to k distinct sources (settled
  // or queued). A label is queued only when it enters or improves its node's tentative top k,
  // so most of the up to 8 labels a settled source sends towards a node are never queued.
  // Exact: entries only improve, so a source kept out of a node's tentative top k can never
  // be among its k nearest; a queued label that was improved upon or evicted later fails the
  // check when it is popped. Settled entries are never evicted (every later offer is at least
  // one edge longer).
  std::vector<double> tent_d(static_cast<std::size_t>(rows * cols * k));
  std::vector<std::int32_t> tent_s(static_cast<std::size_t>(rows * cols * k));
  std::vector<int> tent_n(static_cast<std::size_t>(rows * cols), 0);
  // Slot of the worst (distance, source) entry of a full node, and its distance (+inf while
  // the node has fewer than k entries): most offers to a full node are rejected by one test.
  std::vector<int> tent_worst(static_cast<std::size_t>(rows * cols), 0);
  std::vector<double> tent_worst_d(static_cast<std::size_t>(rows * cols),
                                   std::numeric_limits<double>::infinity());
  auto find_worst = [&](std::int64_t u) {
    const double* td = tent_d.data() + u * k;
    const std::int32_t* ts = tent_s.data() + u * k;
    int w = 0;
    for (int t = 1; t < k; ++t) {
      if (td[t] > td[w] || (td[t] == td[w] && ts[t] > ts[w])) w = t;
    }
    tent_worst[static_cast<std::size_t>(u)] = w;
    tent_worst_d[static_cast<std::size_t>(u)] = td[w];
  };
  auto offer = [&](std::int64_t u, std::int32_t src, double d) {
    const auto su = static_cast<std::size_t>(u);
    if (d > tent_worst_d[su]) return false;  // full, and d is beaten by all k entries
    double* td = tent_d.data() + u * k;
    std::int32_t* ts = tent_s.data() + u * k;
    int& tn = tent_n[su];
    int found = -1;
    for (int t = 0; t < tn; ++t) {
      if (ts[t] == src) {
        found = t;
        break;
      }
    }
    if (found >= 0) {
      if (td[found] <= d) return false;
      td[found] = d;
      if (tn == k && found == tent_worst[su]) find_worst(u);
      return true;
    }
    if (tn < k) {
      td[tn] = d;
      ts[tn] = src;
      if (++tn == k) find_worst(u);
      return true;
    }
    const int w = tent_worst[su];
    if (d < td[w] || (d == td[w] && src < ts[w])) {
      td[w] = d;
      ts[w] = src;
      find_worst(u);
      return true;
    }
    return false;
  };
  // A popped label is current iff it is still its node's tentative entry for its source
  // (labels are queued only on strict improvement, so (node, source, distance) is unique).
  auto current = [&](const Label& l) {
    const double* td = tent_d.data() + static_cast<std::int64_t>(l.node) * k;
    const std::int32_t* ts = tent_s.data() + static_cast<std::int64_t>(l.node) * k;
    const int tn = tent_n[static_cast<std::size_t>(l.node)];
    for (int t = 0; t < tn; ++t) {
      if (ts[t] == l.src) return td[t] == l.d;
    }
    return false;
  };
  std::sort(seeds.begin(), seeds.end(), label_less);
  seeds.erase(std::remove_if(seeds.begin(), seeds.end(),
                             [&](const Label& l) { return !offer(l.node, l.src, l.d); }),
              seeds.end());
  static constexpr int kDx[8] = {1, -1, 0, 0, 1, 1, -1, -1};
  static constexpr int kDy[8] = {0, 0, 1, -1, 1, -1, 1, -1};
  const double diag = step * kSqrt2;
  const std::int64_t nodes = rows * cols;
  // Threads split a bucket by node id (labels are node-major): each owns a contiguous range
  // of nodes and is the only one to read or write their state. Offers to a node another
  // thread owns are deferred and made after the join, in thread order. Offers made in a
  // bucket cannot change the fate of a label in it (every offer is at least one edge longer),
  // and the tentative top k does not depend on the order of offers, so the result is the same
  // for any thread count.
  const int threads = resolve_num_threads(num_threads);
  struct Lane {
    std::vector<std::vector<Label>> ring = std::vector<std::vector<Label>>(kRing);
    std::vector<Label> deferred;
    std::int64_t queued = 0;
  };
  std::vector<Lane> lanes(static_cast<std::size_t>(threads));
  std::vector<Label> bk;
  std::size_t next_seed = 0;
  std::int64_t pending = 0;  // labels in the rings
  std::int64_t cur = seeds.empty() ? 0 : bucket_of(seeds.front().d);
  auto queue_label = [&](Lane& lane, const Label& l) {
    const std::int64_t b = std::clamp<std::int64_t>(bucket_of(l.d), cur + 1, cur + kRing - 1);
    lane.ring[static_cast<std::size_t>(b % kRing)].push_back(l);
    ++lane.queued;
  };
  // Settles the current labels of bk[lo, hi), all on nodes in [own_lo, own_hi).
  auto run = [&](Lane& lane, std::size_t lo, std::size_t hi, std::int64_t own_lo,
                 std::int64_t own_hi) {
    for (std::size_t i = lo; i < hi; ++i) {
      const Label top = bk[i];
      if (!current(top)) continue;
      const std::int64_t v = top.node;
      int& cv = count[static_cast<std::size_t>(v)];
      g.dist[static_cast<std::size_t>(v * k + cv)] = static_cast<float>(top.d);
      g.index[static_cast<std::size_t>(v * k + cv)] = top.src;
      ++cv;
      const std::int64_t vy = v / cols, vx = v % cols;
      for (int e = 0; e < 8; ++e) {
        const std::int64_t ux = vx + kDx[e], uy = vy + kDy[e];
        if (ux < 0 || ux >= cols || uy < 0 || uy >= rows) continue;
        const std::int64_t u = uy * cols + ux;
        if (blocked[u]) continue;
        if (e >= 4 && (blocked[vy * cols + ux] || blocked[uy * cols + vx])) continue;  // no corner cut
        const Label next{top.d + (e >= 4 ? diag : step), static_cast<std::int32_t>(u), top.src};
        if (u < own_lo || u >= own_hi) {
          lane.deferred.push_back(next);
          continue;
        }
        if (count[static_cast<std::size_t>(u)] == k) continue;
        if (offer(u, next.src, next.d)) queue_label(lane, next);
      }
    }
  };
  // Below this many labels a bucket is settled on one thread (thread start-up dominates).
  constexpr std::size_t kParallelLabels = 8192;
  std::vector<std::size_t> cut(static_cast<std::size_t>(threads) + 1);
  std::vector<std::int64_t> own(static_cast<std::size_t>(threads) + 1);
  while (true) {
    bk.clear();
    for (Lane& lane : lanes) {
      std::vector<Label>& r = lane.ring[static_cast<std::size_t>(cur % kRing)];
      bk.insert(bk.end(), r.begin(), r.end());
      r.clear();
    }
    pending -= static_cast<std::int64_t>(bk.size());
    while (next_seed < seeds.size() && bucket_of(seeds[next_seed].d) <= cur) {
      bk.push_back(seeds[next_seed++]);
    }
    std::sort(bk.begin(), bk.end(), node_major_less);
    const int parts = bk.size() < kParallelLabels ? 1 : threads;
    cut[0] = 0;
    own[0] = 0;
    for (int t = 1; t < parts; ++t) {
      std::size_t c = std::max(cut[t - 1], bk.size() * static_cast<std::size_t>(t) /
                                               static_cast<std::size_t>(parts));
      while (c > cut[t - 1] && c < bk.size() && bk[c].node == bk[c - 1].node) ++c;
      cut[t] = c;
      own[t] = c < bk.size() ? bk[c].node : nodes;
    }
    cut[parts] = bk.size();
    own[parts] = nodes;
    if (parts == 1) {
      run(lanes[0], 0, bk.size(), 0, nodes);
    } else {
      parallel_for(0, parts, parts, [&](std::int64_t t0, std::int64_t t1) {
        for (std::int64_t t = t0; t < t1; ++t) {
          const auto st = static_cast<std::size_t>(t);
          run(lanes[st], cut[st], cut[st + 1], own[st], own[st + 1]);
        }
      });
    }
    for (Lane& lane : lanes) {
      for (const Label& l : lane.deferred) {
        if (count[static_cast<std::size_t>(l.node)] == k) continue;
        if (offer(l.node, l.src, l.d)) queue_label(lanes[0], l);
      }
      lane.deferred.clear();
      pending += lane.queued;
      lane.queued = 0;
    }
    if (pending == 0) {
      if (next_seed == seeds.size()) break;
      cur = std::max(cur + 1, bucket_of(seeds[next_seed].d));
    } else {
      ++cur;
    }
  }
}

// Bilinear interpolation of a rows x cols x 6 field at grid coordinates (gx, gy), clamped.
inline void bilerp6(const double* f, std::int64_t rows, std::int64_t cols, double gx, double gy,
                    double out[6]) {
  gx = std::min(std::max(gx, 0.0), static_cast<double>(cols - 1));
  gy = std::min(std::max(gy, 0.0), static_cast<double>(rows - 1));
  const auto x0 = std::min(static_cast<std::int64_t>(gx), cols - 1);
  const auto y0 = std::min(static_cast<std::int64_t>(gy), rows - 1);
  const std::int64_t x1 = std::min(x0 + 1, cols - 1), y1 = std::min(y0 + 1, rows - 1);
  const double wx = gx - static_cast<double>(x0), wy = gy - static_cast<double>(y0);
  const double* a = f + (y0 * cols + x0) * 6;
  const double* b = f + (y0 * cols + x1) * 6;
  const double* c = f + (y1 * cols + x0) * 6;
  const double* d = f + (y1 * cols + x1) * 6;
  for (int t = 0; t < 6; ++t) {
    out[t] = (1.0 - wy) * ((1.0 - wx) * a[t] + wx * b[t]) + wy * ((1.0 - wx) * c[t] + wx * d[t]);
  }
}

using detail::to_pixel;  // rounding and saturation shared with the other warps

template <class T>
inline double sample(const ImageView<const T>& s, double sx, double sy, Interpolation interp,
                     Border border, double fill) {
  if (interp == Interpolation::Linear) return detail::sample_linear(s, sx, sy, border, fill);
  const double w = static_cast<double>(s.width), h = static_cast<double>(s.height);
  if (border == Border::Replicate) {
    sx = std::min(std::max(sx, 0.0), w - 1.0);
    sy = std::min(std::max(sy, 0.0), h - 1.0);
  }
  const double fx = std::floor(sx + 0.5), fy = std::floor(sy + 0.5);
  if (!(fx >= 0.0 && fx < w && fy >= 0.0 && fy < h)) return fill;
  return static_cast<double>(s.row(static_cast<std::int64_t>(fy))[static_cast<std::int64_t>(fx)]);
}

}  // namespace

std::int64_t grid_size(std::int64_t n, std::int64_t step) {
  if (n < 1 || step < 1) throw std::invalid_argument("grid_size: n and step must be >= 1");
  return (n - 1 + step - 1) / step + 1;
}

std::vector<std::uint8_t> coarsen_mask(const ImageView<const std::uint8_t>& mask,
                                       std::int64_t step, int num_threads) {
  if (mask.data == nullptr || mask.height < 1 || mask.width < 1 || mask.stride < mask.width) {
    throw std::invalid_argument("coarsen_mask: empty mask or bad stride");
  }
  const std::int64_t rows = grid_size(mask.height, step), cols = grid_size(mask.width, step);
  const std::int64_t r = step / 2 + 1;
  // Separable max: first along x for every image row (at node columns), then along y.
  std::vector<std::uint8_t> rowmax(static_cast<std::size_t>(mask.height * cols), 0);
  parallel_for(0, mask.height, num_threads, [&](std::int64_t y0, std::int64_t y1) {
    for (std::int64_t y = y0; y < y1; ++y) {
      const std::uint8_t* m = mask.row(y);
      for (std::int64_t c = 0; c < cols; ++c) {
        const std::int64_t lo = std::max<std::int64_t>(0, c * step - r);
        const std::int64_t hi = std::min(mask.width - 1, c * step + r);
        std::uint8_t any = 0;
        for (std::int64_t x = lo; x <= hi && !any; ++x) any = m[x] != 0;
        rowmax[static_cast<std::size_t>(y * cols + c)] = any;
      }
    }
  }, 16);
  std::vector<std::uint8_t> out(static_cast<std::size_t>(rows * cols), 0);
  for (std::int64_t i = 0; i < rows; ++i) {
    const std::int64_t lo = std::max<std::int64_t>(0, i * step - r);
    const std::int64_t hi = std::min(mask.height - 1, i * step + r);
    for (std::int64_t y = lo; y <= hi; ++y) {
      for (std::int64_t c = 0; c < cols; ++c) {
        out[static_cast<std::size_t>(i * cols + c)] |= rowmax[static_cast<std::size_t>(y * cols + c)];
      }
    }
  }
  return out;
}

KnnGrid knn_grid(const double* points, std::int64_t n, std::int64_t rows, std::int64_t cols,
                 double step, int k, const std::uint8_t* blocked, int num_threads) {
  check_grid(rows, cols, step, k);
  if (n < 0 || (n > 0 && points == nullptr)) throw std::invalid_argument("knn_grid: bad points");
  if (n > std::numeric_limits<std::int32_t>::max()) {
    throw std::invalid_argument("knn_grid: too many points");
  }
  resolve_num_threads(num_threads);  // validates
  KnnGrid g;
  g.rows = rows;
  g.cols = cols;
  g.k = k;
  const auto total = static_cast<std::size_t>(rows * cols * k);
  g.dist.assign(total, std::numeric_limits<float>::infinity());
  g.index.assign(total, -1);
  if (blocked == nullptr) {
    g.used.assign(static_cast<std::size_t>(n), 1);
    for (std::int64_t i = 0; i < n; ++i) {
      if (!std::isfinite(points[2 * i]) || !std::isfinite(points[2 * i + 1])) {
        throw std::invalid_argument("knn_grid: non-finite point coordinates");
      }
    }
    knn_euclidean(points, n, step, g, num_threads);
  } else {
    g.used.assign(static_cast<std::size_t>(n), 0);
    knn_geodesic(points, n, step, blocked, g, num_threads);
  }
  return g;
}

void expected_affine_field(const ExpectedAffineInputs& in, std::int64_t out_rows,
                           std::int64_t out_cols, double out_step, int iterations,
                           int num_threads, ExpectedAffineField* source,
                           ExpectedAffineField* output) {
  if (in.knn == nullptr || in.global_affine == nullptr || source == nullptr || output == nullptr) {
    throw std::invalid_argument("expected_affine_field: missing input");
  }
  if (in.num_clusters < 0 || (in.num_clusters > 0 && in.affines == nullptr)) {
    throw std::invalid_argument("expected_affine_field: bad cluster affines");
  }
  if (in.num_points > 0 && in.labels == nullptr) {
    throw std::invalid_argument("expected_affine_field: missing labels");
  }
  if (!(in.step > 0.0) || !(out_step > 0.0) || out_rows < 1 || out_cols < 1) {
    throw std::invalid_argument("expected_affine_field: bad grid");
  }
  if (iterations < 1) throw std::invalid_argument("expected_affine_field: iterations must be >= 1");
  for (std::int64_t i = 0; i < in.num_points; ++i) {
    if (in.labels[i] >= in.num_clusters) {
      throw std::invalid_argument("expected_affine_field: label " + std::to_string(in.labels[i]) +
                                  " >= num_clusters");
    }
  }
  const KnnGrid& g = *in.knn;
  const std::int64_t rows = g.rows, cols = g.cols, nodes = rows * cols;
  const int k = g.k;
  source->rows = rows;
  source->cols = cols;
  source->step = in.step;
  source->affine.assign(static_cast<std::size_t>(nodes * 6), 0.0);
  std::vector<std::uint8_t> state(static_cast<std::size_t>(nodes), 0);  // 0 blocked, 1 set
  double* E = source->affine.data();
  parallel_for(0, nodes, num_threads, [&](std::int64_t a, std::int64_t b) {
    for (std::int64_t v = a; v < b; ++v) {
      if (in.blocked && in.blocked[v]) continue;
      double acc[6] = {0, 0, 0, 0, 0, 0};
      int m = 0;
      for (int t = 0; t < k; ++t) {
        const std::int32_t idx = g.index[static_cast<std::size_t>(v * k + t)];
        if (idx < 0) break;
        if (idx >= in.num_points) continue;
        const std::int32_t lab = in.labels[idx];
        if (lab < 0) continue;
        for (int p = 0; p < 6; ++p) acc[p] += in.affines[lab * 6 + p];
        ++m;
      }
      // P(c | q) = k_c / m, so E = sum_c (k_c / m) A_c = mean of the neighbours' affines.
      for (int p = 0; p < 6; ++p) {
        E[v * 6 + p] = m > 0 ? acc[p] / m : in.global_affine[p];
      }
      state[static_cast<std::size_t>(v)] = 1;
    }
  }, 256);
  if (in.blocked) {
    // Blocked nodes copy their nearest unblocked node (multi-source BFS, 8-connected).
    std::deque<std::int64_t> queue;
    for (std::int64_t v = 0; v < nodes; ++v) {
      if (state[static_cast<std::size_t>(v)]) queue.push_back(v);
    }
    if (queue.empty()) {
      for (std::int64_t v = 0; v < nodes; ++v) {
        std::memcpy(E + v * 6, in.global_affine, 6 * sizeof(double));
      }
    }
    while (!queue.empty()) {
      const std::int64_t v = queue.front();
      queue.pop_front();
      const std::int64_t vy = v / cols, vx = v % cols;
      for (std::int64_t dy = -1; dy <= 1; ++dy) {
        for (std::int64_t dx = -1; dx <= 1; ++dx) {
          const std::int64_t uy = vy + dy, ux = vx + dx;
          if (uy < 0 || uy >= rows || ux < 0 || ux >= cols) continue;
          const std::int64_t u = uy * cols + ux;
          if (state[static_cast<std::size_t>(u)]) continue;
          state[static_cast<std::size_t>(u)] = 1;
          std::memcpy(E + u * 6, E + v * 6, 6 * sizeof(double));
          queue.push_back(u);
        }
      }
    }
  }
  output->rows = out_rows;
  output->cols = out_cols;
  output->step = out_step;
  output->affine.assign(static_cast<std::size_t>(out_rows * out_cols * 6), 0.0);
  double* F = output->affine.data();
  const double* G = in.global_affine;
  parallel_for(0, out_rows, num_threads, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t i = r0; i < r1; ++i) {
      const double y = static_cast<double>(i) * out_step;
      for (std::int64_t j = 0; j < out_cols; ++j) {
        const double x = static_cast<double>(j) * out_step;
        double A[6];
        std::memcpy(A, G, sizeof A);
        for (int it = 0; it < iterations; ++it) {
          const double qx = A[0] * x + A[1] * y + A[2];
          const double qy = A[3] * x + A[4] * y + A[5];
          bilerp6(E, rows, cols, qx / in.step, qy / in.step, A);
        }
        std::memcpy(F + (i * out_cols + j) * 6, A, sizeof A);
      }
    }
  }, 4);
}

template <class T>
void warp_affine_field(const ImageView<const T>& src, const ImageView<T>& dst,
                       const double* field, std::int64_t rows, std::int64_t cols, double step,
                       Interpolation interp, Border border, double fill, int num_threads) {
  if (src.data == nullptr || dst.data == nullptr || src.height < 1 || src.width < 1 ||
      dst.height < 1 || dst.width < 1 || src.stride < src.width || dst.stride < dst.width) {
    throw std::invalid_argument("warp_affine_field: empty image or bad stride");
  }
  if (field == nullptr || rows < 1 || cols < 1 || !(step > 0.0)) {
    throw std::invalid_argument("warp_affine_field: bad field grid");
  }
  if (static_cast<double>(rows - 1) * step < static_cast<double>(dst.height - 1) ||
      static_cast<double>(cols - 1) * step < static_cast<double>(dst.width - 1)) {
    throw std::invalid_argument("warp_affine_field: field grid does not cover the output");
  }
  if (interp != Interpolation::Nearest && interp != Interpolation::Linear) {
    throw std::invalid_argument("warp_affine_field: unknown interpolation");
  }
  if (border != Border::Constant && border != Border::Replicate) {
    throw std::invalid_argument("warp_affine_field: unknown border");
  }
  if (!std::is_floating_point_v<T> && std::isnan(fill)) {
    throw std::invalid_argument("warp_affine_field: NaN fill for an integer image");
  }
  for (std::int64_t i = 0; i < rows * cols * 6; ++i) {
    if (!std::isfinite(field[i])) throw std::invalid_argument("warp_affine_field: non-finite field");
  }
  const auto* s_lo = reinterpret_cast<const unsigned char*>(src.data);
  const auto* s_hi = reinterpret_cast<const unsigned char*>(src.row(src.height - 1) + src.width);
  const auto* d_lo = reinterpret_cast<const unsigned char*>(dst.data);
  const auto* d_hi = reinterpret_cast<const unsigned char*>(dst.row(dst.height - 1) + dst.width);
  if (s_lo < d_hi && d_lo < s_hi) throw std::invalid_argument("warp_affine_field: src and dst overlap");
  const double fillv = std::is_floating_point_v<T> ? fill : static_cast<double>(to_pixel<T>(fill));
  parallel_for(0, dst.height, num_threads, [&](std::int64_t y0, std::int64_t y1) {
    std::vector<double> rowp(static_cast<std::size_t>(cols * 6));
    for (std::int64_t y = y0; y < y1; ++y) {
      const double yd = static_cast<double>(y);
      // One interpolated parameter row per output row (the field is bilinear in y).
      const double gy = std::min(yd / step, static_cast<double>(rows - 1));
      const auto i0 = std::min(static_cast<std::int64_t>(gy), rows - 1);
      const std::int64_t i1 = std::min(i0 + 1, rows - 1);
      const double wy = gy - static_cast<double>(i0);
      const double* fa = field + i0 * cols * 6;
      const double* fb = field + i1 * cols * 6;
      for (std::int64_t t = 0; t < cols * 6; ++t) rowp[t] = (1.0 - wy) * fa[t] + wy * fb[t];
      T* out = dst.row(y);
      for (std::int64_t x = 0; x < dst.width; ++x) {
        const double xd = static_cast<double>(x);
        const double gx = std::min(xd / step, static_cast<double>(cols - 1));
        const auto j0 = std::min(static_cast<std::int64_t>(gx), cols - 1);
        const std::int64_t j1 = std::min(j0 + 1, cols - 1);
        const double wx = gx - static_cast<double>(j0);
        const double* a = rowp.data() + j0 * 6;
        const double* b = rowp.data() + j1 * 6;
        double A[6];
        for (int p = 0; p < 6; ++p) A[p] = (1.0 - wx) * a[p] + wx * b[p];
        const double sx = A[0] * xd + A[1] * yd + A[2];
        const double sy = A[3] * xd + A[4] * yd + A[5];
        out[x] = to_pixel<T>(sample(src, sx, sy, interp, border, fillv));
      }
    }
  }, 8);
}

template void warp_affine_field<std::uint8_t>(const ImageView<const std::uint8_t>&,
                                              const ImageView<std::uint8_t>&, const double*,
                                              std::int64_t, std::int64_t, double, Interpolation,
                                              Border, double, int);
template void warp_affine_field<std::uint16_t>(const ImageView<const std::uint16_t>&,
                                               const ImageView<std::uint16_t>&, const double*,
                                               std::int64_t, std::int64_t, double,
                                               Interpolation, Border, double, int);
template void warp_affine_field<float>(const ImageView<const float>&, const ImageView<float>&,
                                       const double*, std::int64_t, std::int64_t, double,
                                       Interpolation, Border, double, int);

}  // namespace deepalign
