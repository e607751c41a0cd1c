// Displacement-field kernels. How they are fast (see displacement.hpp for the semantics):
//
// - warp_displacement reads each field value once, in row order, next to the output pixel it
//   belongs to: no coordinate maps are built (cv2.remap needs two full-size float32 maps).
//   Each row is processed in 64-pixel blocks: a first loop turns the block's displacements
//   into source coordinates, tap offsets and weights (float64 arithmetic the compiler
//   vectorises; the affine is folded in here at no extra pass), a second loop gathers and
//   blends. A block whose taps all lie inside the source takes the unchecked blend (uint8: the
//   exact fixed-point AVX2 blend shared with warp_affine); a block touching the border falls
//   back per pixel to the checked sampler shared with warp_affine (sampling.hpp).
// - With AVX2 (runtime dispatch), uint8 and float32 rows run fused 8-pixel steps instead:
//   the same float64 arithmetic in registers, the affine skipped when it is the identity,
//   uint8 taps from 16-byte window loads and float32 taps from pair loads (sampling.hpp); a
//   group that touches the border takes the block path above. The source is prefetched a few
//   rows ahead, and rows are handed out to the threads in chunks (parallel_for_dynamic).
// - The Jacobian is one pass over the field with three-row stencils; the folding fraction
//   counts per row from a one-row buffer and never materialises the determinant map.
//
// This file is compiled with -ffp-contract=off (CMakeLists.txt): the Jacobian must give the
// same bits as numpy's float64 arithmetic, which a fused multiply-add would not.
#include "deepalign/displacement.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "deepalign/parallel.hpp"
#include "deepalign/sampling.hpp"

namespace deepalign {
namespace {
using namespace detail;  // NOLINT: the shared sampling helpers (sampling.hpp)

constexpr std::int64_t kBlock = 64;

// ---- warp: bilinear ------------------------------------------------------------------------

struct RowGeometry {
  double m[6];       // pull affine applied after the displacement (identity if none)
  double wlim, hlim;  // interior: 0 <= sx < wlim, 0 <= sy < hlim (all 4 taps inside)
  double stride_d;
  bool identity;    // m is the identity (the coordinate loops skip it)
  std::int64_t pf;  // source prefetch offset (sampling.hpp, prefetch_offset)
};

// Prefetches the source lines that pixels a few output rows further down will read, assuming
// the field varies slowly (sampling.hpp, prefetch_offset).
template <class T, class Offset>
DEEPALIGN_ALWAYS_INLINE inline void prefetch_block(const T* src, const Offset* off, int n,
                                                   std::int64_t pf) {
  for (int k = 0; k < n; k += 16) prefetch(src, static_cast<std::int64_t>(off[k]) + pf);
}

// Offsets and weights of the n pixels of a block; returns how many have all four taps inside
// the source. Pixels outside get offset 0 and weight 0 (never used by the unchecked blend,
// since the block then takes the per-pixel path, which recomputes their coordinates: storing
// them for every pixel would cost more than recomputing them for the few border blocks).
// kIdentity: the affine is the identity, whose result is exactly q for finite q (skipped);
// for a non-finite q both forms are non-finite or NaN, hence outside.
template <bool kFixed, bool kIdentity = false, class Offset, class Weight>
DEEPALIGN_ALWAYS_INLINE inline int block_coords(const float* dx, const float* dy, double x0,
                                                double yd, int n, const RowGeometry& g,
                                                Offset* off, Weight* wx, Weight* wy) {
  const double m0 = g.m[0], m1 = g.m[1], m2 = g.m[2], m3 = g.m[3], m4 = g.m[4], m5 = g.m[5];
  int inside = 0;
  for (int k = 0; k < n; ++k) {
    const double qx = x0 + static_cast<double>(k) + static_cast<double>(dx[k]);
    const double qy = yd + static_cast<double>(dy[k]);
    // Same association as warp_affine (a x + (b y + tx)), so a zero field with an affine
    // reproduces its coordinates; with the identity the result is exactly q.
    const double sx = kIdentity ? qx : m0 * qx + (m1 * qy + m2);
    const double sy = kIdentity ? qy : m3 * qx + (m4 * qy + m5);
    // Bitwise & (not &&): no branches, so the loop vectorises. False for NaN.
    const bool in = (sx >= 0.0) & (sx < g.wlim) & (sy >= 0.0) & (sy < g.hlim);
    inside += static_cast<int>(in);
    const double cx = in ? sx : 0.0, cy = in ? sy : 0.0;
    // cx, cy >= 0, so truncation is floor; the offset is exact in float64.
    const double fx = static_cast<double>(static_cast<std::int32_t>(cx));
    const double fy = static_cast<double>(static_cast<std::int32_t>(cy));
    off[k] = static_cast<Offset>(fy * g.stride_d + fx);
    if constexpr (kFixed) {
      wx[k] = static_cast<std::int32_t>((cx - fx) * kOne + 0.5);
      wy[k] = static_cast<std::int32_t>((cy - fy) * kOne + 0.5);
    } else {
      wx[k] = static_cast<float>(cx - fx);
      wy[k] = static_cast<float>(cy - fy);
    }
  }
  return inside;
}

template <class T, class Offset, class Weight>
DEEPALIGN_ALWAYS_INLINE inline void blend(const T* src, std::int64_t stride, const Offset* off,
                                          const Weight* wx, const Weight* wy, int n, T* o) {
  if constexpr (std::is_same_v<T, std::uint8_t>) {
    blend_u8_scalar(src, stride, off, wx, wy, n, o);
  } else {
    blend_float(src, stride, off, wx, wy, n, o);
  }
}

// A block that touches the border (or has non-finite displacements): per pixel, the
// unchecked blend where all taps are inside, the checked sampler elsewhere.
template <class T, class Offset, class Weight>
inline void mixed_block(const ImageView<const T>& s, const RowGeometry& g, const float* dx,
                        const float* dy, double x0, double yd, const Offset* off,
                        const Weight* wx, const Weight* wy, int n, Border border, double fill_d,
                        T* o) {
  for (int k = 0; k < n; ++k) {
    // The expression of block_coords, so both paths agree on which pixels are inside.
    const double qx = x0 + static_cast<double>(k) + static_cast<double>(dx[k]);
    const double qy = yd + static_cast<double>(dy[k]);
    const double sx = g.m[0] * qx + (g.m[1] * qy + g.m[2]);
    const double sy = g.m[3] * qx + (g.m[4] * qy + g.m[5]);
    if (sx >= 0.0 && sx < g.wlim && sy >= 0.0 && sy < g.hlim) {
      blend(s.data, s.stride, off + k, wx + k, wy + k, 1, o + k);
    } else if (!(std::isfinite(sx) && std::isfinite(sy))) {
      o[k] = to_pixel<T>(fill_d);
    } else {
      o[k] = to_pixel<T>(sample_linear(s, sx, sy, border, fill_d));
    }
  }
}

template <class T, class Offset>
DEEPALIGN_ALWAYS_INLINE inline void linear_row_impl(const ImageView<const T>& s, T* out,
                                                    const float* dx, const float* dy,
                                                    std::int64_t width, double yd,
                                                    const RowGeometry& g, Border border,
                                                    double fill_d) {
  constexpr bool kFixed = std::is_same_v<T, std::uint8_t>;
  using Weight = std::conditional_t<kFixed, std::int32_t, float>;
  alignas(64) Offset off[kBlock];
  alignas(64) Weight wx[kBlock], wy[kBlock];
  for (std::int64_t xb = 0; xb < width; xb += kBlock) {
    const int n = static_cast<int>(std::min(kBlock, width - xb));
    const int inside = block_coords<kFixed>(dx + xb, dy + xb, static_cast<double>(xb), yd, n, g,
                                            off, wx, wy);
    prefetch_block(s.data, off, n, g.pf);
    if (inside == n) {
      blend(s.data, s.stride, off, wx, wy, n, out + xb);
    } else {
      mixed_block(s, g, dx + xb, dy + xb, static_cast<double>(xb), yd, off, wx, wy, n, border,
                  fill_d, out + xb);
    }
  }
}

// One non-template entry per (type, offset): on x86-64 the compiler clones it for AVX2 and
// picks the clone at load time (as in warp.cpp).
#define DEEPALIGN_DISP_ROW(NAME, T, OFFSET)                                                   \
  DEEPALIGN_TARGET_CLONES void NAME(const ImageView<const T>& s, T* out, const float* dx,     \
                                    const float* dy, std::int64_t width, double yd,          \
                                    const RowGeometry& g, Border border, double fill_d) {    \
    linear_row_impl<T, OFFSET>(s, out, dx, dy, width, yd, g, border, fill_d);                \
  }
DEEPALIGN_DISP_ROW(row_u8_32, std::uint8_t, std::int32_t)
DEEPALIGN_DISP_ROW(row_u8_64, std::uint8_t, std::int64_t)
DEEPALIGN_DISP_ROW(row_u16_32, std::uint16_t, std::int32_t)
DEEPALIGN_DISP_ROW(row_u16_64, std::uint16_t, std::int64_t)
DEEPALIGN_DISP_ROW(row_f32_32, float, std::int32_t)
DEEPALIGN_DISP_ROW(row_f32_64, float, std::int64_t)
#undef DEEPALIGN_DISP_ROW

#if DEEPALIGN_X86_DISPATCH
// Fused AVX2 rows (uint8, float32): 8 pixels per step with the coordinates in registers,
// computed with exactly the operations of block_coords as this file is compiled (no
// contraction), so the bits are those of the portable kernel. A group of 8 with a pixel
// outside the interior (or a non-finite displacement) goes through block_coords and
// mixed_block, as do the last < 8 pixels of a row.
// Bit k set when pixel k of 4 has all four taps inside (ordered compares: false for NaN).
__attribute__((target("arch=x86-64-v3"), always_inline)) inline int inside4(__m256d sx,
                                                                            __m256d sy,
                                                                            __m256d wlim,
                                                                            __m256d hlim) {
  const __m256d zero = _mm256_setzero_pd();
  return _mm256_movemask_pd(_mm256_and_pd(
      _mm256_and_pd(_mm256_cmp_pd(sx, zero, _CMP_GE_OQ), _mm256_cmp_pd(sx, wlim, _CMP_LT_OQ)),
      _mm256_and_pd(_mm256_cmp_pd(sy, zero, _CMP_GE_OQ), _mm256_cmp_pd(sy, hlim, _CMP_LT_OQ))));
}

// (frac * 2048 + 0.5) truncated for 8 pixels (frac * 2048 is exact).
__attribute__((target("arch=x86-64-v3"), always_inline)) inline __m256i fixed_weights8(
    __m256d lo, __m256d hi) {
  const __m256d one = _mm256_set1_pd(static_cast<double>(kOne)), half = _mm256_set1_pd(0.5);
  return _mm256_set_m128i(_mm256_cvttpd_epi32(_mm256_add_pd(_mm256_mul_pd(hi, one), half)),
                          _mm256_cvttpd_epi32(_mm256_add_pd(_mm256_mul_pd(lo, one), half)));
}

template <class T, bool kIdentity>
__attribute__((target("arch=x86-64-v3"), always_inline)) inline void fused_row(
    const ImageView<const T>& s, T* out, const float* dx, const float* dy, std::int64_t width,
    double yd, const RowGeometry& g, Border border, double fill_d) {
  constexpr bool kFixed = std::is_same_v<T, std::uint8_t>;
  using Weight = std::conditional_t<kFixed, std::int32_t, float>;
  alignas(32) std::int32_t off[8];
  alignas(32) Weight wxa[8], wya[8];
  const __m256d m0 = _mm256_set1_pd(g.m[0]), m1 = _mm256_set1_pd(g.m[1]);
  const __m256d m2 = _mm256_set1_pd(g.m[2]), m3 = _mm256_set1_pd(g.m[3]);
  const __m256d m4 = _mm256_set1_pd(g.m[4]), m5 = _mm256_set1_pd(g.m[5]);
  const __m256d wlim = _mm256_set1_pd(g.wlim);
  const __m256d hlim = _mm256_set1_pd(g.hlim), vyd = _mm256_set1_pd(yd);
  const __m256d eight = _mm256_set1_pd(8.0);
  const __m256i vstride = _mm256_set1_epi32(static_cast<std::int32_t>(s.stride));
  __m256d xl = _mm256_setr_pd(0.0, 1.0, 2.0, 3.0), xh = _mm256_setr_pd(4.0, 5.0, 6.0, 7.0);
  std::int64_t x = 0;
  for (; x + 8 <= width; x += 8, xl = _mm256_add_pd(xl, eight), xh = _mm256_add_pd(xh, eight)) {
    const __m256 ux = _mm256_loadu_ps(dx + x), uy = _mm256_loadu_ps(dy + x);
    const __m256d qxl = _mm256_add_pd(xl, _mm256_cvtps_pd(_mm256_castps256_ps128(ux)));
    const __m256d qxh = _mm256_add_pd(xh, _mm256_cvtps_pd(_mm256_extractf128_ps(ux, 1)));
    const __m256d qyl = _mm256_add_pd(vyd, _mm256_cvtps_pd(_mm256_castps256_ps128(uy)));
    const __m256d qyh = _mm256_add_pd(vyd, _mm256_cvtps_pd(_mm256_extractf128_ps(uy, 1)));
    __m256d sxl = qxl, sxh = qxh, syl = qyl, syh = qyh;
    if constexpr (!kIdentity) {  // m0 qx + (m1 qy + m2), m3 qx + (m4 qy + m5), unfused
      sxl = _mm256_add_pd(_mm256_mul_pd(m0, qxl), _mm256_add_pd(_mm256_mul_pd(m1, qyl), m2));
      sxh = _mm256_add_pd(_mm256_mul_pd(m0, qxh), _mm256_add_pd(_mm256_mul_pd(m1, qyh), m2));
      syl = _mm256_add_pd(_mm256_mul_pd(m3, qxl), _mm256_add_pd(_mm256_mul_pd(m4, qyl), m5));
      syh = _mm256_add_pd(_mm256_mul_pd(m3, qxh), _mm256_add_pd(_mm256_mul_pd(m4, qyh), m5));
    }
    if ((inside4(sxl, syl, wlim, hlim) & inside4(sxh, syh, wlim, hlim)) != 0xF) {
      const int n_in = block_coords<kFixed, kIdentity>(dx + x, dy + x, static_cast<double>(x), yd,
                                                       8, g, off, wxa, wya);
      if (n_in == 8) {
        blend(s.data, s.stride, off, wxa, wya, 8, out + x);
      } else {
        mixed_block(s, g, dx + x, dy + x, static_cast<double>(x), yd, off, wxa, wya, 8, border,
                    fill_d, out + x);
      }
      continue;
    }
    // Inside: x', y' >= 0, so truncation is floor.
    const __m128i ixl = _mm256_cvttpd_epi32(sxl), ixh = _mm256_cvttpd_epi32(sxh);
    const __m128i iyl = _mm256_cvttpd_epi32(syl), iyh = _mm256_cvttpd_epi32(syh);
    const __m256d fxl = _mm256_sub_pd(sxl, _mm256_cvtepi32_pd(ixl));
    const __m256d fxh = _mm256_sub_pd(sxh, _mm256_cvtepi32_pd(ixh));
    const __m256d fyl = _mm256_sub_pd(syl, _mm256_cvtepi32_pd(iyl));
    const __m256d fyh = _mm256_sub_pd(syh, _mm256_cvtepi32_pd(iyh));
    const __m256i ix = _mm256_set_m128i(ixh, ixl), iy = _mm256_set_m128i(iyh, iyl);
    const std::int32_t ix0 = _mm_cvtsi128_si32(ixl), iy0 = _mm_cvtsi128_si32(iyl);
    prefetch(s.data, static_cast<std::int64_t>(iy0) * s.stride + ix0 + g.pf);
    if constexpr (kFixed) {
      // (frac * 2048 + 0.5) truncated, frac * 2048 exact.
      __m256i g0, g1;
      if (!window_taps_u8(s.data, s.stride, s.width, ix, iy, ix0, _mm_extract_epi32(ixh, 3), iy0,
                          _mm_extract_epi32(iyh, 3), g0, g1)) {
        _mm256_store_si256(reinterpret_cast<__m256i*>(off),
                           _mm256_add_epi32(ix, _mm256_mullo_epi32(iy, vstride)));
        g0 = pair_taps_u8(s.data, off);
        g1 = pair_taps_u8(s.data + s.stride, off);
      }
      blend8_u8(g0, g1, fixed_weights8(fxl, fxh), fixed_weights8(fyl, fyh), out + x);
    } else {
      _mm256_store_si256(reinterpret_cast<__m256i*>(off),
                         _mm256_add_epi32(ix, _mm256_mullo_epi32(iy, vstride)));
      __m256 p00, p01, p10, p11;
      load_taps_f32(s.data, off, p00, p01);
      load_taps_f32(s.data + s.stride, off, p10, p11);
      const __m256 wx = _mm256_set_m128(_mm256_cvtpd_ps(fxh), _mm256_cvtpd_ps(fxl));
      const __m256 wy = _mm256_set_m128(_mm256_cvtpd_ps(fyh), _mm256_cvtpd_ps(fyl));
      const __m256 top = lerp8<false>(p00, p01, wx), bot = lerp8<false>(p10, p11, wx);
      _mm256_storeu_ps(out + x, lerp8<false>(top, bot, wy));
    }
  }
  if (x < width) {
    const int n = static_cast<int>(width - x);
    const int n_in = block_coords<kFixed, kIdentity>(dx + x, dy + x, static_cast<double>(x), yd, n,
                                                     g, off, wxa, wya);
    if (n_in == n) {
      blend(s.data, s.stride, off, wxa, wya, n, out + x);
    } else {
      mixed_block(s, g, dx + x, dy + x, static_cast<double>(x), yd, off, wxa, wya, n, border,
                  fill_d, out + x);
    }
  }
}

__attribute__((target("arch=x86-64-v3"))) void row_u8_avx2(
    const ImageView<const std::uint8_t>& s, std::uint8_t* out, const float* dx, const float* dy,
    std::int64_t width, double yd, const RowGeometry& g, Border border, double fill_d) {
  if (g.identity) {
    fused_row<std::uint8_t, true>(s, out, dx, dy, width, yd, g, border, fill_d);
  } else {
    fused_row<std::uint8_t, false>(s, out, dx, dy, width, yd, g, border, fill_d);
  }
}

__attribute__((target("arch=x86-64-v3"))) void row_f32_avx2(
    const ImageView<const float>& s, float* out, const float* dx, const float* dy,
    std::int64_t width, double yd, const RowGeometry& g, Border border, double fill_d) {
  if (g.identity) {
    fused_row<float, true>(s, out, dx, dy, width, yd, g, border, fill_d);
  } else {
    fused_row<float, false>(s, out, dx, dy, width, yd, g, border, fill_d);
  }
}
#endif

template <class T>
void linear_row(const ImageView<const T>& s, T* out, const float* dx, const float* dy,
                std::int64_t width, double yd, const RowGeometry& g, Border border,
                double fill_d) {
  const bool small = s.height * s.stride < (std::int64_t{1} << 31);
  if constexpr (std::is_same_v<T, std::uint8_t>) {
#if DEEPALIGN_X86_DISPATCH
    if (small && cpu_has_avx2()) {
      row_u8_avx2(s, out, dx, dy, width, yd, g, border, fill_d);
      return;
    }
#endif
    (small ? row_u8_32 : row_u8_64)(s, out, dx, dy, width, yd, g, border, fill_d);
  } else if constexpr (std::is_same_v<T, std::uint16_t>) {
    (small ? row_u16_32 : row_u16_64)(s, out, dx, dy, width, yd, g, border, fill_d);
  } else {
#if DEEPALIGN_X86_DISPATCH
    if (small && cpu_has_avx2()) {
      row_f32_avx2(s, out, dx, dy, width, yd, g, border, fill_d);
      return;
    }
#endif
    (small ? row_f32_32 : row_f32_64)(s, out, dx, dy, width, yd, g, border, fill_d);
  }
}

// ---- warp: nearest (labels) ------------------------------------------------------------------

template <class T>
void nearest_row(const ImageView<const T>& s, T* out, const float* dx, const float* dy,
                 std::int64_t width, double yd, const double* m, Border border, T fill) {
  const double w = static_cast<double>(s.width), h = static_cast<double>(s.height);
  for (std::int64_t x = 0; x < width; ++x) {
    const double qx = static_cast<double>(x) + static_cast<double>(dx[x]);
    const double qy = yd + static_cast<double>(dy[x]);
    // floor(x' + 0.5): round half up, as warp_affine.
    double sx = m[0] * qx + ((m[1] * qy + m[2]) + 0.5);
    double sy = m[3] * qx + ((m[4] * qy + m[5]) + 0.5);
    if (border == Border::Constant) {
      // >= 0 makes truncation equal floor; false for NaN.
      out[x] = (sx >= 0.0 && sx < w && sy >= 0.0 && sy < h)
                   ? s.row(static_cast<std::int64_t>(sy))[static_cast<std::int64_t>(sx)]
                   : fill;
    } else if (std::isfinite(sx) && std::isfinite(sy)) {
      sx = std::min(std::max(sx, 0.0), w - 1.0);
      sy = std::min(std::max(sy, 0.0), h - 1.0);
      out[x] = s.row(static_cast<std::int64_t>(sy))[static_cast<std::int64_t>(sx)];
    } else {
      out[x] = fill;
    }
  }
}

// ---- argument checks -------------------------------------------------------------------------

template <class A, class B>
void check_same_shape(const char* fn, const char* a_name, const ImageView<A>& a,
                      const char* b_name, const ImageView<B>& b) {
  if (a.height != b.height || a.width != b.width) {
    throw std::invalid_argument(std::string(fn) + ": " + a_name + " is " +
                                std::to_string(a.height) + " x " + std::to_string(a.width) +
                                " but " + b_name + " is " + std::to_string(b.height) + " x " +
                                std::to_string(b.width));
  }
}

template <class T>
void check_field(const char* fn, const char* name, const FieldView<T>& u) {
  const std::string nx = std::string(name) + ".x", ny = std::string(name) + ".y";
  check_view(fn, nx.c_str(), u.x.data, u.x.height, u.x.width, u.x.stride);
  check_view(fn, ny.c_str(), u.y.data, u.y.height, u.y.width, u.y.stride);
  check_same_shape(fn, nx.c_str(), u.x, ny.c_str(), u.y);
}

void check_affine(const char* fn, const double* m) {
  for (int i = 0; i < 6; ++i) {
    if (!std::isfinite(m[i])) {
      throw std::invalid_argument(std::string(fn) + ": affine entry " + std::to_string(i) +
                                  " is not finite");
    }
  }
}

// An output field may alias `in` exactly (pointwise, in place) but not overlap it otherwise.
template <class A>
bool bad_alias(const ImageView<float>& out, const ImageView<A>& in) {
  return views_overlap(out, in) &&
         !(static_cast<const void*>(out.data) == static_cast<const void*>(in.data) &&
           out.stride == in.stride);
}

// Output planes: must not overlap each other, and only alias `inplace_ok` exactly.
void check_output_field(const char* fn, const FieldView<float>& v,
                        const FieldView<const float>& inplace_ok) {
  check_field(fn, "v", v);
  check_same_shape(fn, "v", v.x, "the input field", inplace_ok.x);
  if (views_overlap(v.x, v.y)) {
    throw std::invalid_argument(std::string(fn) + ": v.x and v.y overlap in memory");
  }
  if (bad_alias(v.x, inplace_ok.x) || bad_alias(v.x, inplace_ok.y) ||
      bad_alias(v.y, inplace_ok.x) || bad_alias(v.y, inplace_ok.y) ||
      (v.x.data == inplace_ok.y.data) || (v.y.data == inplace_ok.x.data)) {
    throw std::invalid_argument(std::string(fn) +
                                ": the output overlaps the input other than exactly in place");
  }
}

std::int64_t min_rows_for(std::int64_t width) {
  // Keep at least ~64k pixels per thread: below that, starting threads costs more.
  return std::max<std::int64_t>(1, 65536 / std::max<std::int64_t>(1, width));
}

// ---- Jacobian ------------------------------------------------------------------------------

// det(I + grad u) of row y into out[0..w) (numpy.gradient differences, float64 arithmetic in
// numpy's order so that the bits match).
template <class T, class O>
void jacobian_row(const FieldView<const T>& u, std::int64_t y, O* out) {
  const std::int64_t h = u.x.height, w = u.x.width;
  const std::int64_t ya = y > 0 ? y - 1 : y, yb = y < h - 1 ? y + 1 : y;
  // Central differences are divided by 2 (exactly a multiplication by 0.5), one-sided by 1.
  const double ky = (y > 0 && y < h - 1) ? 0.5 : 1.0;
  const T* ux = u.x.row(y);
  const T* uy = u.y.row(y);
  const T* uxa = u.x.row(ya);
  const T* uxb = u.x.row(yb);
  const T* uya = u.y.row(ya);
  const T* uyb = u.y.row(yb);
  auto det = [](double dxx, double dxy, double dyx, double dyy) {
    return (1.0 + dxx) * (1.0 + dyy) - dxy * dyx;
  };
  auto d = [](T a, T b) { return static_cast<double>(a) - static_cast<double>(b); };
  out[0] = static_cast<O>(det(d(ux[1], ux[0]), d(uxb[0], uxa[0]) * ky, d(uy[1], uy[0]),
                              d(uyb[0], uya[0]) * ky));
  for (std::int64_t x = 1; x < w - 1; ++x) {
    out[x] = static_cast<O>(det(d(ux[x + 1], ux[x - 1]) * 0.5, d(uxb[x], uxa[x]) * ky,
                                d(uy[x + 1], uy[x - 1]) * 0.5, d(uyb[x], uya[x]) * ky));
  }
  out[w - 1] = static_cast<O>(det(d(ux[w - 1], ux[w - 2]), d(uxb[w - 1], uxa[w - 1]) * ky,
                                  d(uy[w - 1], uy[w - 2]), d(uyb[w - 1], uya[w - 1]) * ky));
}

template <class T>
void check_jacobian_field(const char* fn, const FieldView<const T>& u) {
  check_field(fn, "u", u);
  if (u.x.height < 2 || u.x.width < 2) {
    throw std::invalid_argument(std::string(fn) + ": the field must be at least 2 x 2, got " +
                                std::to_string(u.x.height) + " x " + std::to_string(u.x.width));
  }
}

}  // namespace

template <class T>
void warp_displacement(const ImageView<const T>& src, const ImageView<T>& dst,
                       const FieldView<const float>& u, const double* affine, Interpolation interp,
                       Border border, double fill, int num_threads) {
  constexpr const char* fn = "warp_displacement";
  check_view(fn, "src", src.data, src.height, src.width, src.stride);
  check_view(fn, "dst", dst.data, dst.height, dst.width, dst.stride);
  check_field(fn, "displacement", u);
  check_same_shape(fn, "displacement", u.x, "dst", dst);
  if (affine != nullptr) check_affine(fn, affine);
  if (interp != Interpolation::Nearest && interp != Interpolation::Linear) {
    throw std::invalid_argument(std::string(fn) + ": unknown interpolation " +
                                std::to_string(static_cast<int>(interp)));
  }
  if (border != Border::Constant && border != Border::Replicate) {
    throw std::invalid_argument(std::string(fn) + ": unknown border " +
                                std::to_string(static_cast<int>(border)));
  }
  if (!std::is_floating_point_v<T> && std::isnan(fill)) {
    throw std::invalid_argument(std::string(fn) +
                                ": fill is NaN, which an integer image cannot hold");
  }
  resolve_num_threads(num_threads);  // throws on negative values
  if (views_overlap(src, dst) || views_overlap(u.x, dst) || views_overlap(u.y, dst)) {
    throw std::invalid_argument(std::string(fn) + ": dst overlaps src or the displacement");
  }

  RowGeometry g;
  const double identity[6] = {1.0, 0.0, 0.0, 0.0, 1.0, 0.0};
  std::copy(affine ? affine : identity, (affine ? affine : identity) + 6, g.m);
  g.wlim = static_cast<double>(src.width) - 1.0;
  g.hlim = static_cast<double>(src.height) - 1.0;
  g.stride_d = static_cast<double>(src.stride);
  g.identity = std::equal(g.m, g.m + 6, identity);
  g.pf = prefetch_offset(g.m[1], g.m[4], src.stride);
  const T fill_t = fill_value<T>(fill);
  const double fill_d = static_cast<double>(fill_t);
  parallel_for_dynamic(
      0, dst.height, num_threads,
      [&](std::int64_t y0, std::int64_t y1) {
        for (std::int64_t y = y0; y < y1; ++y) {
          const double yd = static_cast<double>(y);
          if (interp == Interpolation::Nearest) {
            nearest_row(src, dst.row(y), u.x.row(y), u.y.row(y), dst.width, yd, g.m, border,
                        fill_t);
          } else {
            linear_row(src, dst.row(y), u.x.row(y), u.y.row(y), dst.width, yd, g, border,
                       fill_d);
          }
        }
      },
      row_chunk(dst.height, num_threads, min_rows_for(dst.width)));
}

void compose_affine_displacement(const double affine[6], const FieldView<const float>& u,
                                 const FieldView<float>& v, int num_threads) {
  constexpr const char* fn = "compose_affine_displacement";
  if (affine == nullptr) throw std::invalid_argument(std::string(fn) + ": affine is null");
  check_affine(fn, affine);
  check_field(fn, "u", u);
  check_output_field(fn, v, u);
  resolve_num_threads(num_threads);
  double m[6];
  std::copy(affine, affine + 6, m);
  parallel_for(
      0, u.x.height, num_threads,
      [&](std::int64_t y0, std::int64_t y1) {
        for (std::int64_t y = y0; y < y1; ++y) {
          const double yd = static_cast<double>(y);
          const float* ux = u.x.row(y);
          const float* uy = u.y.row(y);
          float* vx = v.x.row(y);
          float* vy = v.y.row(y);
          for (std::int64_t x = 0; x < u.x.width; ++x) {
            const double xd = static_cast<double>(x);
            const double qx = xd + static_cast<double>(ux[x]);
            const double qy = yd + static_cast<double>(uy[x]);
            // The warp's own coordinate expression (block_coords), minus p.
            vx[x] = static_cast<float>(m[0] * qx + (m[1] * qy + m[2]) - xd);
            vy[x] = static_cast<float>(m[3] * qx + (m[4] * qy + m[5]) - yd);
          }
        }
      },
      min_rows_for(u.x.width));
}

void compose_displacements(const FieldView<const float>& u1, const FieldView<const float>& u2,
                           const FieldView<float>& v, Border border, int num_threads) {
  constexpr const char* fn = "compose_displacements";
  check_field(fn, "u1", u1);
  check_field(fn, "u2", u2);
  check_output_field(fn, v, u2);
  if (views_overlap(v.x, u1.x) || views_overlap(v.x, u1.y) || views_overlap(v.y, u1.x) ||
      views_overlap(v.y, u1.y)) {
    throw std::invalid_argument(std::string(fn) + ": the output overlaps u1");
  }
  if (border != Border::Constant && border != Border::Replicate) {
    throw std::invalid_argument(std::string(fn) + ": unknown border " +
                                std::to_string(static_cast<int>(border)));
  }
  resolve_num_threads(num_threads);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  parallel_for(
      0, u2.x.height, num_threads,
      [&](std::int64_t y0, std::int64_t y1) {
        for (std::int64_t y = y0; y < y1; ++y) {
          const double yd = static_cast<double>(y);
          const float* ax = u2.x.row(y);
          const float* ay = u2.y.row(y);
          float* vx = v.x.row(y);
          float* vy = v.y.row(y);
          for (std::int64_t x = 0; x < u2.x.width; ++x) {
            const double dx2 = static_cast<double>(ax[x]), dy2 = static_cast<double>(ay[x]);
            const double qx = static_cast<double>(x) + dx2, qy = yd + dy2;
            if (!(std::isfinite(qx) && std::isfinite(qy))) {
              vx[x] = vy[x] = static_cast<float>(nan);
              continue;
            }
            vx[x] = static_cast<float>(dx2 + sample_linear(u1.x, qx, qy, border, 0.0));
            vy[x] = static_cast<float>(dy2 + sample_linear(u1.y, qx, qy, border, 0.0));
          }
        }
      },
      min_rows_for(u2.x.width));
}

template <class T>
void jacobian_determinant(const FieldView<const T>& u, const ImageView<T>& det, int num_threads) {
  constexpr const char* fn = "jacobian_determinant";
  check_jacobian_field(fn, u);
  check_view(fn, "det", det.data, det.height, det.width, det.stride);
  check_same_shape(fn, "det", det, "u", u.x);
  resolve_num_threads(num_threads);
  if (views_overlap(det, u.x) || views_overlap(det, u.y)) {
    throw std::invalid_argument(std::string(fn) + ": det overlaps the field");
  }
  parallel_for(
      0, u.x.height, num_threads,
      [&](std::int64_t y0, std::int64_t y1) {
        for (std::int64_t y = y0; y < y1; ++y) jacobian_row(u, y, det.row(y));
      },
      min_rows_for(u.x.width));
}

template <class T>
JacobianCount nonpositive_jacobian_count(const FieldView<const T>& u,
                                         const ImageView<const std::uint8_t>* mask,
                                         int num_threads) {
  constexpr const char* fn = "nonpositive_jacobian_count";
  check_jacobian_field(fn, u);
  if (mask != nullptr) {
    check_view(fn, "mask", mask->data, mask->height, mask->width, mask->stride);
    check_same_shape(fn, "mask", *mask, "u", u.x);
  }
  resolve_num_threads(num_threads);
  std::atomic<std::int64_t> nonpositive{0}, total{0};
  parallel_for(
      0, u.x.height, num_threads,
      [&](std::int64_t y0, std::int64_t y1) {
        std::vector<double> row(static_cast<std::size_t>(u.x.width));
        std::int64_t np = 0, tot = 0;
        for (std::int64_t y = y0; y < y1; ++y) {
          jacobian_row(u, y, row.data());
          if (mask == nullptr) {
            int row_np = 0;  // int, not int64: the compare-and-count loop vectorises
            for (std::int64_t x = 0; x < u.x.width; ++x) {
              row_np += static_cast<int>(row[x] <= 0.0);
            }
            np += row_np;
            tot += u.x.width;
          } else {
            const std::uint8_t* mr = mask->row(y);
            for (std::int64_t x = 0; x < u.x.width; ++x) {
              const bool in = mr[x] != 0;
              np += (in && row[x] <= 0.0) ? 1 : 0;
              tot += in ? 1 : 0;
            }
          }
        }
        nonpositive += np;  // integer sums: the result does not depend on the split
        total += tot;
      },
      min_rows_for(u.x.width));
  return {nonpositive.load(), total.load()};
}

template void warp_displacement<std::uint8_t>(const ImageView<const std::uint8_t>&,
                                              const ImageView<std::uint8_t>&,
                                              const FieldView<const float>&, const double*,
                                              Interpolation, Border, double, int);
template void warp_displacement<std::uint16_t>(const ImageView<const std::uint16_t>&,
                                               const ImageView<std::uint16_t>&,
                                               const FieldView<const float>&, const double*,
                                               Interpolation, Border, double, int);
template void warp_displacement<float>(const ImageView<const float>&, const ImageView<float>&,
                                       const FieldView<const float>&, const double*,
                                       Interpolation, Border, double, int);
template void jacobian_determinant<float>(const FieldView<const float>&, const ImageView<float>&,
                                          int);
template void jacobian_determinant<double>(const FieldView<const double>&,
                                           const ImageView<double>&, int);
template JacobianCount nonpositive_jacobian_count<float>(const FieldView<const float>&,
                                                         const ImageView<const std::uint8_t>*,
                                                         int);
template JacobianCount nonpositive_jacobian_count<double>(const FieldView<const double>&,
                                                          const ImageView<const std::uint8_t>*,
                                                          int);

}  // namespace deepalign
