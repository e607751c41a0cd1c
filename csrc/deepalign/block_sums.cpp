#include "deepalign/block_sums.hpp"

#include <stdexcept>
#include <string>

#include "deepalign/parallel.hpp"
#include "deepalign/sampling.hpp"  // (the CPU dispatch)

namespace deepalign {

namespace {

constexpr int kLanes = 8;

void check_same(const ImageView<const float>& ref, const ImageView<const float>& other,
                const char* name) {
  if (other.height != ref.height || other.width != ref.width) {
    throw std::invalid_argument(std::string("lk_block_sums: ") + name +
                                " must have the reference's size");
  }
  if (other.stride < other.width) {
    throw std::invalid_argument(std::string("lk_block_sums: ") + name +
                                " has a stride smaller than its width");
  }
}

// Adds one row's float32 lanes to the block's float64 lanes (both kernels).
inline void add_row(const float (&a)[kLanes], double (&acc)[kLanes]) {
  for (int k = 0; k < kLanes; ++k) acc[k] += static_cast<double>(a[k]);
}

// The block's four sums from its float64 lanes, the lanes added in order (both kernels).
inline void finish(const double (&acc)[4][kLanes], double* out) {
  for (int c = 0; c < 4; ++c) {
    double total = 0.0;
    for (int k = 0; k < kLanes; ++k) total += acc[c][k];
    out[c] = total;
  }
}

// The columns past the last full group of 8, into lanes 0, 1, ... (both kernels).
inline void tail(const float* r, const float* m, const float* u, const float* v,
                 std::int64_t x, std::int64_t block, float (&ax)[kLanes], float (&ay)[kLanes],
                 float (&arm)[kLanes], float (&amm)[kLanes]) {
  for (int k = 0; x < block; ++x, ++k) {
    const float e = r[x] - m[x];
    ax[k] += u[x] * e;
    ay[k] += v[x] * e;
    arm[k] += r[x] * m[x];
    amm[k] += m[x] * m[x];
  }
}

// The four sums of one block (see the header): each row in 8 float32 lanes (lane k takes
// columns k, k + 8, ...), each lane's rows added in float64, then the lanes in order.
void block_portable(const ImageView<const float>& ref, const ImageView<const float>& mov,
                    const ImageView<const float>& gx, const ImageView<const float>& gy,
                    std::int64_t x0, std::int64_t y0, std::int64_t block, double* out) {
  double acc[4][kLanes] = {};
  for (std::int64_t y = y0; y < y0 + block; ++y) {
    const float* r = ref.row(y) + x0;
    const float* m = mov.row(y) + x0;
    const float* u = gx.row(y) + x0;
    const float* v = gy.row(y) + x0;
    float ax[kLanes] = {}, ay[kLanes] = {}, arm[kLanes] = {}, amm[kLanes] = {};
    std::int64_t x = 0;
    for (; x + kLanes <= block; x += kLanes) {
      for (int k = 0; k < kLanes; ++k) {
        const float e = r[x + k] - m[x + k];
        ax[k] += u[x + k] * e;
        ay[k] += v[x + k] * e;
        arm[k] += r[x + k] * m[x + k];
        amm[k] += m[x + k] * m[x + k];
      }
    }
    tail(r, m, u, v, x, block, ax, ay, arm, amm);
    add_row(ax, acc[0]);
    add_row(ay, acc[1]);
    add_row(arm, acc[2]);
    add_row(amm, acc[3]);
  }
  finish(acc, out);
}

using BlockFn = void (*)(const ImageView<const float>&, const ImageView<const float>&,
                         const ImageView<const float>&, const ImageView<const float>&,
                         std::int64_t, std::int64_t, std::int64_t, double*);

#if DEEPALIGN_X86_DISPATCH
// The same arithmetic on 8 lanes at once, bit-identical to block_portable (this file is built
// with -ffp-contract=off, so neither kernel fuses a multiply and an add).
__attribute__((target("arch=x86-64-v3"))) void block_avx2(
    const ImageView<const float>& ref, const ImageView<const float>& mov,
    const ImageView<const float>& gx, const ImageView<const float>& gy, std::int64_t x0,
    std::int64_t y0, std::int64_t block, double* out) {
  const bool full = block % kLanes == 0;  // no tail: the lanes stay in registers
  __m256d lo[4], hi[4];  // float64 lanes 0-3 and 4-7 of the four sums
  for (int c = 0; c < 4; ++c) lo[c] = hi[c] = _mm256_setzero_pd();
  double acc[4][kLanes] = {};  // (rows with a tail)
  for (std::int64_t y = y0; y < y0 + block; ++y) {
    const float* r = ref.row(y) + x0;
    const float* m = mov.row(y) + x0;
    const float* u = gx.row(y) + x0;
    const float* v = gy.row(y) + x0;
    __m256 row[4];
    for (int c = 0; c < 4; ++c) row[c] = _mm256_setzero_ps();
    std::int64_t x = 0;
    for (; x + kLanes <= block; x += kLanes) {
      const __m256 rr = _mm256_loadu_ps(r + x), mm = _mm256_loadu_ps(m + x);
      const __m256 e = _mm256_sub_ps(rr, mm);
      row[0] = _mm256_add_ps(row[0], _mm256_mul_ps(_mm256_loadu_ps(u + x), e));
      row[1] = _mm256_add_ps(row[1], _mm256_mul_ps(_mm256_loadu_ps(v + x), e));
      row[2] = _mm256_add_ps(row[2], _mm256_mul_ps(rr, mm));
      row[3] = _mm256_add_ps(row[3], _mm256_mul_ps(mm, mm));
    }
    if (full) {
      for (int c = 0; c < 4; ++c) {
        lo[c] = _mm256_add_pd(lo[c], _mm256_cvtps_pd(_mm256_castps256_ps128(row[c])));
        hi[c] = _mm256_add_pd(hi[c], _mm256_cvtps_pd(_mm256_extractf128_ps(row[c], 1)));
      }
      continue;
    }
    alignas(32) float lanes[4][kLanes];
    for (int c = 0; c < 4; ++c) _mm256_store_ps(lanes[c], row[c]);
    tail(r, m, u, v, x, block, lanes[0], lanes[1], lanes[2], lanes[3]);
    for (int c = 0; c < 4; ++c) add_row(lanes[c], acc[c]);
  }
  if (full) {
    for (int c = 0; c < 4; ++c) {
      _mm256_storeu_pd(acc[c], lo[c]);
      _mm256_storeu_pd(acc[c] + 4, hi[c]);
    }
  }
  finish(acc, out);
}
#endif

BlockFn block_kernel() {
#if DEEPALIGN_X86_DISPATCH
  if (detail::cpu_has_avx2()) return block_avx2;
#endif
  return block_portable;
}

}  // namespace

void lk_block_sums(const ImageView<const float>& ref, const ImageView<const float>& mov,
                   const ImageView<const float>& gx, const ImageView<const float>& gy,
                   const std::int64_t* x0, const std::int64_t* y0, std::int64_t count,
                   std::int64_t block, double* out, int num_threads) {
  if (ref.stride < ref.width) {
    throw std::invalid_argument("lk_block_sums: ref has a stride smaller than its width");
  }
  check_same(ref, mov, "mov");
  check_same(ref, gx, "gx");
  check_same(ref, gy, "gy");
  if (block < 1) throw std::invalid_argument("lk_block_sums: block must be at least 1");
  if (count < 0) throw std::invalid_argument("lk_block_sums: negative block count");
  for (std::int64_t i = 0; i < count; ++i) {
    // (written so that no sum can overflow: block <= width is checked first)
    if (block > ref.width || block > ref.height || x0[i] < 0 || y0[i] < 0 ||
        x0[i] > ref.width - block || y0[i] > ref.height - block) {
      throw std::invalid_argument("lk_block_sums: block " + std::to_string(i) + " at (" +
                                  std::to_string(x0[i]) + ", " + std::to_string(y0[i]) +
                                  ") of size " + std::to_string(block) +
                                  " is not inside the " + std::to_string(ref.width) + " x " +
                                  std::to_string(ref.height) + " images");
    }
  }
  const int threads = resolve_num_threads(num_threads);
  const BlockFn one_block = block_kernel();
  parallel_for(
      0, count, threads,
      [&](std::int64_t begin, std::int64_t end) {
        for (std::int64_t i = begin; i < end; ++i) {
          one_block(ref, mov, gx, gy, x0[i], y0[i], block, out + 4 * i);
        }
      },
      /*min_chunk=*/256);
}

}  // namespace deepalign
