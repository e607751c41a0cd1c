// Affine warp kernels. How it is fast (see warp.hpp for the semantics):
//
// - Per output row, the x-range whose 4 bilinear taps all lie inside the source is solved
//   analytically (the source coordinates are linear in x), so the inner loop has no bounds
//   checks; only the few pixels near the source edges take the general, checked sampler.
// - The interior is processed in blocks: a first loop computes source coordinates and
//   weights for a block (plain float64 arithmetic the compiler vectorises), a second loop
//   gathers the 4 taps and blends (uint8: exact 11-bit fixed-point integer arithmetic).
// - With AVX2 (runtime dispatch), uint8 and float32 take fused 8-pixel kernels that keep the
//   coordinates in registers; uint8 reads the taps of near-identity maps with one 16-byte
//   load and a byte shuffle per source row, float32 with one 64-bit load per tap pair.
//   uint8 positions are rounded to 1/2048 pixel by one multiply-add (tap = q >> 11, weight =
//   q & 2047) and the horizontal blend is one int16 multiply-add. With AVX-512 + VBMI, uint8
//   takes 16 pixels per step, with one 64-byte window and a byte permute per source row, and
//   the translation rows run 16 wide. Every SIMD kernel gives the portable kernel's bits.
// - The source line that the same output pixels will read a few output rows later is
//   prefetched (sampling.hpp, prefetch_offset): a rotated map reads each source row in runs
//   too short for the hardware prefetchers, and without it the kernel waited on memory for
//   half (uint8) to three quarters (float32) of its time at 2048^2.
// - Axis-aligned maps (translation, scale: m[1] == m[3] == 0), the common FIB-SEM case, are
//   separable: each output row blends two source rows once (contiguous, vectorised), then
//   interpolates along x from per-column tables computed once per call; a pure translation
//   (m[0] == 1) reads that blended row contiguously.
#include "deepalign/warp.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
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

// Interior ranges are solved this far (in source pixels) inside the exact limits, so that
// rounding in the solve can never let an unchecked tap fall outside the image; the endpoints
// are then re-checked with the very expression the inner loop uses.
constexpr double kMargin = 1e-6;
constexpr std::int64_t kBlock = 64;

// Integer x in [0, n) with lo <= a * x + r <= hi, as [first, last) (possibly empty).
void solve_range(double a, double r, double lo, double hi, std::int64_t n, std::int64_t& first,
                 std::int64_t& last) {
  if (a == 0.0) {
    first = 0;
    last = (r >= lo && r <= hi) ? n : 0;
    return;
  }
  double x_lo = (lo - r) / a, x_hi = (hi - r) / a;
  if (a < 0.0) std::swap(x_lo, x_hi);
  const double nd = static_cast<double>(n);
  x_lo = std::ceil(std::min(std::max(x_lo, 0.0), nd));
  x_hi = std::floor(std::min(std::max(x_hi, -1.0), nd - 1.0)) + 1.0;
  first = static_cast<std::int64_t>(x_lo);
  last = std::max(first, static_cast<std::int64_t>(x_hi));
}

// ---- general affine, bilinear --------------------------------------------------------------

// Source offsets and bilinear weights of n consecutive interior pixels starting at x0.
template <bool kFixed, class Offset, class Weight>
DEEPALIGN_ALWAYS_INLINE inline void block_coords(double x0, int n, double a, double rx, double c,
                                                 double ry, double stride_d, Offset* off,
                                                 Weight* wx, Weight* wy) {
  // Coordinates: sx, sy >= 0 in the interior, so truncation is floor. The offset is exact
  // in float64 (< 2^53).
  if constexpr (kFixed) {
    // The position in 1/2048 pixel, rounded half up: q = floor(2048 a x + (2048 rx + 0.5))
    // (one multiply-add, the scalings by 2048 are exact). q >> 11 is the tap, q & 2047 the
    // weight: a fraction that rounds up to a whole pixel moves the tap instead of giving the
    // right tap weight 2048 (the same value); linear_rows keeps such pixels inside the image.
    const double qa = a * kOne, qc = c * kOne, qrx = rx * kOne + 0.5, qry = ry * kOne + 0.5;
    for (int k = 0; k < n; ++k) {
      const double xd = x0 + k;
      const auto qx = static_cast<std::int64_t>(qa * xd + qrx);
      const auto qy = static_cast<std::int64_t>(qc * xd + qry);
      off[k] = static_cast<Offset>(static_cast<double>(qy >> kFracBits) * stride_d +
                                   static_cast<double>(qx >> kFracBits));
      wx[k] = static_cast<std::int32_t>(qx & (kOne - 1));
      wy[k] = static_cast<std::int32_t>(qy & (kOne - 1));
    }
  } else {
    for (int k = 0; k < n; ++k) {
      const double xd = x0 + k;
      const double sx = a * xd + rx, sy = c * xd + ry;
      const double fx = static_cast<double>(static_cast<std::int32_t>(sx));
      const double fy = static_cast<double>(static_cast<std::int32_t>(sy));
      off[k] = static_cast<Offset>(fy * stride_d + fx);
      wx[k] = static_cast<float>(sx - fx);
      wy[k] = static_cast<float>(sy - fy);
    }
  }
}

// Exact 11-bit fixed-point bilinear blend of n uint8 pixels.

// The interior kernel. `Offset` is int32 when the source has < 2^31 elements (always in
// practice), so the tap addresses are computed in the vectorised coordinate loop.
template <class T, class Offset>
DEEPALIGN_ALWAYS_INLINE inline void linear_interior_impl(const T* src, std::int64_t stride, T* out,
                                                         std::int64_t x_begin, std::int64_t x_end,
                                                         double a, double rx, double c,
                                                         double ry, std::int64_t pf) {
  constexpr bool kFixed = std::is_same_v<T, std::uint8_t>;
  using Weight = std::conditional_t<kFixed, std::int32_t, float>;
  alignas(64) Offset off[kBlock];
  alignas(64) Weight wx[kBlock], wy[kBlock];
  const double stride_d = static_cast<double>(stride);
  for (std::int64_t xb = x_begin; xb < x_end; xb += kBlock) {
    const int n = static_cast<int>(std::min(kBlock, x_end - xb));
    const double x0 = static_cast<double>(xb);
    block_coords<kFixed>(x0, n, a, rx, c, ry, stride_d, off, wx, wy);
    for (int k = 0; k < n; k += 16) prefetch(src, static_cast<std::int64_t>(off[k]) + pf);
    T* o = out + xb;
    if constexpr (kFixed) {
      blend_u8_scalar(src, stride, off, wx, wy, n, o);
    } else {
      blend_float(src, stride, off, wx, wy, n, o);
    }
  }
}

// One non-template entry per (type, offset) so that on x86-64 the compiler can clone it for
// AVX2 and pick the clone at load time (ifunc); the baseline build stays plain x86-64.
#define DEEPALIGN_INTERIOR(NAME, T, OFFSET)                                                    \
  DEEPALIGN_TARGET_CLONES void NAME(const T* src, std::int64_t stride, T* out,                 \
                                    std::int64_t x_begin, std::int64_t x_end, double a,        \
                                    double rx, double c, double ry, std::int64_t pf) {         \
    linear_interior_impl<T, OFFSET>(src, stride, out, x_begin, x_end, a, rx, c, ry, pf);       \
  }
DEEPALIGN_INTERIOR(interior_u8_32, std::uint8_t, std::int32_t)
DEEPALIGN_INTERIOR(interior_u8_64, std::uint8_t, std::int64_t)
DEEPALIGN_INTERIOR(interior_u16_32, std::uint16_t, std::int32_t)
DEEPALIGN_INTERIOR(interior_u16_64, std::uint16_t, std::int64_t)
DEEPALIGN_INTERIOR(interior_f32_32, float, std::int32_t)
DEEPALIGN_INTERIOR(interior_f32_64, float, std::int64_t)
#undef DEEPALIGN_INTERIOR

#if DEEPALIGN_X86_DISPATCH
// Fused AVX2 interiors: 8 pixels per step with the coordinates kept in registers. The
// operations are exactly those of block_coords in the AVX2 clone of the portable kernel
// (x' = fma(a, x, rx), truncation, the difference to the truncation, 1/2048 rounding), so
// the bits are the same; the last < 8 pixels of a span go through that kernel.
struct Coords8 {
  __m256i ix, iy;    // top-left taps
  __m256d fxl, fxh;  // fractions, pixels 0-3 and 4-7
  __m256d fyl, fyh;
};

__attribute__((target("arch=x86-64-v3"), always_inline)) inline Coords8 coords8(
    __m256d xl, __m256d xh, __m256d va, __m256d vrx, __m256d vc, __m256d vry) {
  const __m256d sxl = _mm256_fmadd_pd(va, xl, vrx), sxh = _mm256_fmadd_pd(va, xh, vrx);
  const __m256d syl = _mm256_fmadd_pd(vc, xl, vry), syh = _mm256_fmadd_pd(vc, xh, vry);
  // x', y' >= 0 in the interior, so truncation is floor.
  const __m128i ixl = _mm256_cvttpd_epi32(sxl), ixh = _mm256_cvttpd_epi32(sxh);
  const __m128i iyl = _mm256_cvttpd_epi32(syl), iyh = _mm256_cvttpd_epi32(syh);
  Coords8 r;
  r.ix = _mm256_set_m128i(ixh, ixl);
  r.iy = _mm256_set_m128i(iyh, iyl);
  r.fxl = _mm256_sub_pd(sxl, _mm256_cvtepi32_pd(ixl));
  r.fxh = _mm256_sub_pd(sxh, _mm256_cvtepi32_pd(ixh));
  r.fyl = _mm256_sub_pd(syl, _mm256_cvtepi32_pd(iyl));
  r.fyh = _mm256_sub_pd(syh, _mm256_cvtepi32_pd(iyh));
  return r;
}

__attribute__((target("arch=x86-64-v3"), always_inline)) inline __m256 float_weights(
    __m256d lo, __m256d hi) {
  return _mm256_set_m128(_mm256_cvtpd_ps(hi), _mm256_cvtpd_ps(lo));
}

// floor(q) of 8 positions q = qa * x + qr >= 0 (block_coords<true>: truncation is floor).
__attribute__((target("arch=x86-64-v3"), always_inline)) inline __m256i fixed_positions(
    __m256d xl, __m256d xh, __m256d qa, __m256d qr) {
  return _mm256_set_m128i(_mm256_cvttpd_epi32(_mm256_fmadd_pd(qa, xh, qr)),
                          _mm256_cvttpd_epi32(_mm256_fmadd_pd(qa, xl, qr)));
}

// The uint8 interior, 8 pixels per step: positions in 1/2048 pixel as in block_coords<true>
// (tap = q >> 11, weight = q & 2047), taps from window loads (pair loads where a group does
// not fit a window), the blend of blend8_u8 before packing. An affine map is monotone along
// the row, so the window's left column and top row come from the first pixel of a group, or
// from the last where the map decreases (kXDown: a < 0; kYDown: c < 0).
template <bool kXDown, bool kYDown>
struct U8Interior {
  const std::uint8_t* src;
  std::int64_t stride, width;
  __m256d qa, qc, qrx, qry;
  __m256i vstride, frac;

  __attribute__((target("arch=x86-64-v3"), always_inline)) inline __m256i group(
      __m256d xl, __m256d xh) const {
    const __m256i qx = fixed_positions(xl, xh, qa, qrx);
    const __m256i qy = fixed_positions(xl, xh, qc, qry);
    const __m256i ix = _mm256_srai_epi32(qx, kFracBits), iy = _mm256_srai_epi32(qy, kFracBits);
    const __m256i wx = _mm256_and_si256(qx, frac), wy = _mm256_and_si256(qy, frac);
    const std::int32_t xmin = kXDown ? _mm256_extract_epi32(ix, 7) : _mm256_extract_epi32(ix, 0);
    const std::int32_t ymin = kYDown ? _mm256_extract_epi32(iy, 7) : _mm256_extract_epi32(iy, 0);
    __m256i g0, g1;
    if (!window_taps_u8_at(src, stride, width, ix, iy, std::max(0, xmin - 1), ymin, g0, g1)) {
      // Offsets are exact in int32 (the source has < 2^31 elements).
      alignas(32) std::int32_t off[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(off),
                         _mm256_add_epi32(ix, _mm256_mullo_epi32(iy, vstride)));
      g0 = pair_taps_u8(src, off);
      g1 = pair_taps_u8(src + stride, off);
    }
    return blend8_u8_values(g0, g1, wx, wy);
  }
};

template <bool kXDown, bool kYDown>
__attribute__((target("arch=x86-64-v3"))) void interior_u8_avx2_dir(
    const std::uint8_t* src, std::int64_t stride, std::uint8_t* out, std::int64_t x_begin,
    std::int64_t x_end, double a, double rx, double c, double ry, std::int64_t width,
    std::int64_t pf) {
  // The scalars of block_coords<true>, computed the same way.
  const double qa = a * kOne, qc = c * kOne, qrx = rx * kOne + 0.5, qry = ry * kOne + 0.5;
  const U8Interior<kXDown, kYDown> k{src,
                                     stride,
                                     width,
                                     _mm256_set1_pd(qa),
                                     _mm256_set1_pd(qc),
                                     _mm256_set1_pd(qrx),
                                     _mm256_set1_pd(qry),
                                     _mm256_set1_epi32(static_cast<std::int32_t>(stride)),
                                     _mm256_set1_epi32(kOne - 1)};
  const __m256d eight = _mm256_set1_pd(8.0);
  const double x0 = static_cast<double>(x_begin);
  // x + k is an integer below 2^53: stepping by 8 is exact.
  __m256d xl = _mm256_setr_pd(x0, x0 + 1.0, x0 + 2.0, x0 + 3.0);
  __m256d xh = _mm256_setr_pd(x0 + 4.0, x0 + 5.0, x0 + 6.0, x0 + 7.0);
  std::int64_t x = x_begin;
  // 16 pixels per step: one prefetch (a source line holds 64 pixels) and one 16-byte store.
  for (; x + 16 <= x_end; x += 16) {
    const double xd = static_cast<double>(x);
    const auto px = static_cast<std::int64_t>(a * xd + rx);
    const auto py = static_cast<std::int64_t>(c * xd + ry);
    prefetch(src, py * stride + px + pf);
    const __m256i v0 = k.group(xl, xh);
    xl = _mm256_add_pd(xl, eight);
    xh = _mm256_add_pd(xh, eight);
    const __m256i v1 = k.group(xl, xh);
    xl = _mm256_add_pd(xl, eight);
    xh = _mm256_add_pd(xh, eight);
    // The in-lane pack gives the 16-bit pixels 0-3, 8-11 | 4-7, 12-15: reorder the 64-bit
    // quarters to 0-7 | 8-15, then pack the two halves to bytes.
    const __m256i w16 = _mm256_permute4x64_epi64(_mm256_packus_epi32(v0, v1), 0xD8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + x),
                     _mm_packus_epi16(_mm256_castsi256_si128(w16),
                                      _mm256_extracti128_si256(w16, 1)));
  }
  for (; x + 8 <= x_end; x += 8) {
    const __m256i v = k.group(xl, xh);
    xl = _mm256_add_pd(xl, eight);
    xh = _mm256_add_pd(xh, eight);
    const __m128i w16 =
        _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out + x), _mm_packus_epi16(w16, w16));
  }
  if (x < x_end) interior_u8_32(src, stride, out, x, x_end, a, rx, c, ry, pf);
}

// The uint8 interior with AVX-512 (x86-64-v4 + VBMI), 16 pixels per step: the positions,
// taps and blend of U8Interior (so the same bits), with the coordinates of 8 pixels per
// register, and the taps of 16 pixels from one 64-byte window per source row and one byte
// permute (vpermb): the 16 pixels' taps must lie within 64 bytes of at most three rows. Steps
// that do not fit (steep maps, the right edge of the image) take two U8Interior groups.
#define DEEPALIGN_AVX512 __attribute__((target("arch=x86-64-v4,avx512vbmi")))
// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own _mm512_undefined_*()
// operands (GCC bug 105593, fixed in 13).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

// Truncated int32 of 16 positions >= 0. (The zero-masked forms: GCC 12 warns about the
// undefined upper halves of the plain intrinsics.)
DEEPALIGN_AVX512 inline __m512i positions16(__m512d lo, __m512d hi) {
  return _mm512_maskz_inserti64x4(0xFF,
                                  _mm512_zextsi256_si512(_mm512_maskz_cvttpd_epi32(0xFF, lo)),
                                  _mm512_maskz_cvttpd_epi32(0xFF, hi), 1);
}

template <bool kXDown, bool kYDown>
DEEPALIGN_AVX512 void interior_u8_avx512_dir(const std::uint8_t* src, std::int64_t stride,
                                             std::uint8_t* out, std::int64_t x_begin,
                                             std::int64_t x_end, double a, double rx, double c,
                                             double ry, std::int64_t width, std::int64_t pf) {
  const double qa = a * kOne, qc = c * kOne, qrx = rx * kOne + 0.5, qry = ry * kOne + 0.5;
  const U8Interior<kXDown, kYDown> k2{src,
                                      stride,
                                      width,
                                      _mm256_set1_pd(qa),
                                      _mm256_set1_pd(qc),
                                      _mm256_set1_pd(qrx),
                                      _mm256_set1_pd(qry),
                                      _mm256_set1_epi32(static_cast<std::int32_t>(stride)),
                                      _mm256_set1_epi32(kOne - 1)};
  const __m512d vqa = _mm512_set1_pd(qa), vqc = _mm512_set1_pd(qc);
  const __m512d vqrx = _mm512_set1_pd(qrx), vqry = _mm512_set1_pd(qry);
  const __m512d sixteen = _mm512_set1_pd(16.0);
  const __m512i frac = _mm512_set1_epi32(kOne - 1), one = _mm512_set1_epi32(1);
  const __m512i c62 = _mm512_set1_epi32(62), wone = _mm512_set1_epi32(kOne);
  const __m512i half = _mm512_set1_epi32(1 << (2 * kFracBits - 1));
  // vpermb writes bytes 0 and 2 of each 32-bit lane (left and right tap), zeroes 1 and 3.
  const __mmask64 taps = 0x5555555555555555ULL;
  const double xd0 = static_cast<double>(x_begin);
  // x + k is an integer below 2^53: stepping by 16 is exact.
  __m512d x0 = _mm512_add_pd(_mm512_set1_pd(xd0), _mm512_setr_pd(0, 1, 2, 3, 4, 5, 6, 7));
  __m512d x1 = _mm512_add_pd(_mm512_set1_pd(xd0), _mm512_setr_pd(8, 9, 10, 11, 12, 13, 14, 15));
  std::int64_t x = x_begin;
  for (; x + 16 <= x_end; x += 16) {
    const double xd = static_cast<double>(x);
    prefetch(src, static_cast<std::int64_t>(c * xd + ry) * stride +
                      static_cast<std::int64_t>(a * xd + rx) + pf);
    const __m512i qx = positions16(_mm512_fmadd_pd(vqa, x0, vqrx), _mm512_fmadd_pd(vqa, x1, vqrx));
    const __m512i qy = positions16(_mm512_fmadd_pd(vqc, x0, vqry), _mm512_fmadd_pd(vqc, x1, vqry));
    const __m512i ix = _mm512_srai_epi32(qx, kFracBits), iy = _mm512_srai_epi32(qy, kFracBits);
    const std::int32_t xmin =
        kXDown ? _mm_extract_epi32(_mm512_extracti32x4_epi32(ix, 3), 3)
               : _mm_cvtsi128_si32(_mm512_castsi512_si128(ix));
    const std::int32_t ymin =
        kYDown ? _mm_extract_epi32(_mm512_extracti32x4_epi32(iy, 3), 3)
               : _mm_cvtsi128_si32(_mm512_castsi512_si128(iy));
    const std::int32_t xb = std::max(0, xmin - 1), yb = ymin;
    const __m512i dx = _mm512_sub_epi32(ix, _mm512_set1_epi32(xb));
    const __m512i dy = _mm512_sub_epi32(iy, _mm512_set1_epi32(yb));
    // 0 <= dx <= 62 (both taps in the 64 bytes), 0 <= dy <= 1; the window inside the row.
    const __mmask16 fit =
        _mm512_cmple_epu32_mask(dx, c62) & _mm512_cmple_epu32_mask(dy, one);
    if (fit == 0xFFFF && xb + 64 <= width) {
      const __m512i idx = _mm512_or_si512(dx, _mm512_slli_epi32(_mm512_add_epi32(dx, one), 16));
      const std::uint8_t* r = src + static_cast<std::int64_t>(yb) * stride + xb;
      const __mmask16 lower = _mm512_cmpeq_epi32_mask(dy, one);  // top row yb + 1
      // Row yb + 2 only where some pixel's bottom row is there (so it is inside the image).
      const std::int64_t any = lower != 0;
      const __m512i a0 = _mm512_maskz_permutexvar_epi8(taps, idx, _mm512_loadu_si512(r));
      const __m512i a1 = _mm512_maskz_permutexvar_epi8(taps, idx, _mm512_loadu_si512(r + stride));
      const __m512i a2 = _mm512_maskz_permutexvar_epi8(
          taps, idx, _mm512_loadu_si512(r + stride + (stride & -any)));
      const __m512i g0 = _mm512_mask_blend_epi32(lower, a0, a1);
      const __m512i g1 = _mm512_mask_blend_epi32(lower, a1, a2);
      // blend8_u8_values on 16 pixels.
      const __m512i wx = _mm512_and_si512(qx, frac), wy = _mm512_and_si512(qy, frac);
      const __m512i wpair =
          _mm512_or_si512(_mm512_sub_epi32(wone, wx), _mm512_slli_epi32(wx, 16));
      const __m512i top = _mm512_madd_epi16(g0, wpair);
      const __m512i bot = _mm512_madd_epi16(g1, wpair);
      __m512i v = _mm512_add_epi32(_mm512_slli_epi32(top, kFracBits),
                                   _mm512_mullo_epi32(wy, _mm512_sub_epi32(bot, top)));
      v = _mm512_srli_epi32(_mm512_add_epi32(v, half), 2 * kFracBits);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + x), _mm512_cvtusepi32_epi8(v));
    } else {
      const __m256i v0 = k2.group(_mm512_castpd512_pd256(x0), _mm512_extractf64x4_pd(x0, 1));
      const __m256i v1 = k2.group(_mm512_castpd512_pd256(x1), _mm512_extractf64x4_pd(x1, 1));
      const __m256i w16 = _mm256_permute4x64_epi64(_mm256_packus_epi32(v0, v1), 0xD8);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + x),
                       _mm_packus_epi16(_mm256_castsi256_si128(w16),
                                        _mm256_extracti128_si256(w16, 1)));
    }
    x0 = _mm512_add_pd(x0, sixteen);
    x1 = _mm512_add_pd(x1, sixteen);
  }
  if (x < x_end) interior_u8_avx2_dir<kXDown, kYDown>(src, stride, out, x, x_end, a, rx, c, ry,
                                                       width, pf);
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

void interior_u8_avx2(const std::uint8_t* src, std::int64_t stride, std::uint8_t* out,
                      std::int64_t x_begin, std::int64_t x_end, double a, double rx, double c,
                      double ry, std::int64_t width, std::int64_t pf) {
  using Fn = void (*)(const std::uint8_t*, std::int64_t, std::uint8_t*, std::int64_t,
                      std::int64_t, double, double, double, double, std::int64_t, std::int64_t);
  Fn fn;
  if (cpu_has_avx512_vbmi()) {
    fn = a < 0.0 ? (c < 0.0 ? interior_u8_avx512_dir<true, true>
                            : interior_u8_avx512_dir<true, false>)
                 : (c < 0.0 ? interior_u8_avx512_dir<false, true>
                            : interior_u8_avx512_dir<false, false>);
  } else {
    fn = a < 0.0 ? (c < 0.0 ? interior_u8_avx2_dir<true, true>
                            : interior_u8_avx2_dir<true, false>)
                 : (c < 0.0 ? interior_u8_avx2_dir<false, true>
                            : interior_u8_avx2_dir<false, false>);
  }
  fn(src, stride, out, x_begin, x_end, a, rx, c, ry, width, pf);
}

// float32: the same coordinates, pair loads (load_taps_f32) and a blend bit-identical to the
// contracted scalar loop (blend_f32_avx2<true>).
__attribute__((target("arch=x86-64-v3"))) void interior_f32_avx2(
    const float* src, std::int64_t stride, float* out, std::int64_t x_begin, std::int64_t x_end,
    double a, double rx, double c, double ry, std::int64_t pf) {
  const __m256d va = _mm256_set1_pd(a), vrx = _mm256_set1_pd(rx);
  const __m256d vc = _mm256_set1_pd(c), vry = _mm256_set1_pd(ry);
  const __m256d eight = _mm256_set1_pd(8.0);
  const __m256i vstride = _mm256_set1_epi32(static_cast<std::int32_t>(stride));
  const double x0 = static_cast<double>(x_begin);
  __m256d xl = _mm256_setr_pd(x0, x0 + 1.0, x0 + 2.0, x0 + 3.0);
  __m256d xh = _mm256_setr_pd(x0 + 4.0, x0 + 5.0, x0 + 6.0, x0 + 7.0);
  alignas(32) std::int32_t off[8];
  std::int64_t x = x_begin;
  for (; x + 8 <= x_end; x += 8) {
    const Coords8 q = coords8(xl, xh, va, vrx, vc, vry);
    xl = _mm256_add_pd(xl, eight);
    xh = _mm256_add_pd(xh, eight);
    _mm256_store_si256(reinterpret_cast<__m256i*>(off),
                       _mm256_add_epi32(q.ix, _mm256_mullo_epi32(q.iy, vstride)));
    prefetch(src, off[0] + pf);
    __m256 p00, p01, p10, p11;
    load_taps_f32(src, off, p00, p01);
    load_taps_f32(src + stride, off, p10, p11);
    const __m256 wx = float_weights(q.fxl, q.fxh);
    const __m256 top = lerp8<true>(p00, p01, wx);
    const __m256 bot = lerp8<true>(p10, p11, wx);
    _mm256_storeu_ps(out + x, lerp8<true>(top, bot, float_weights(q.fyl, q.fyh)));
  }
  if (x < x_end) interior_f32_32(src, stride, out, x, x_end, a, rx, c, ry, pf);
}
#endif

template <class T>
void linear_interior(const ImageView<const T>& s, T* out, std::int64_t x_begin, std::int64_t x_end,
                     double a, double rx, double c, double ry, std::int64_t pf) {
  const bool small = s.height * s.stride < (std::int64_t{1} << 31);
  if constexpr (std::is_same_v<T, std::uint8_t>) {
#if DEEPALIGN_X86_DISPATCH
    // (int32 positions in 1/2048 pixel need sides below 2^20.)
    const bool fits = s.width < (std::int64_t{1} << 20) && s.height < (std::int64_t{1} << 20);
    if (small && fits && cpu_has_avx2()) {
      interior_u8_avx2(s.data, s.stride, out, x_begin, x_end, a, rx, c, ry, s.width, pf);
      return;
    }
#endif
    (small ? interior_u8_32 : interior_u8_64)(s.data, s.stride, out, x_begin, x_end, a, rx, c, ry,
                                              pf);
  } else if constexpr (std::is_same_v<T, std::uint16_t>) {
    (small ? interior_u16_32 : interior_u16_64)(s.data, s.stride, out, x_begin, x_end, a, rx, c,
                                                ry, pf);
  } else {
#if DEEPALIGN_X86_DISPATCH
    if (small && cpu_has_avx2()) {
      interior_f32_avx2(s.data, s.stride, out, x_begin, x_end, a, rx, c, ry, pf);
      return;
    }
#endif
    (small ? interior_f32_32 : interior_f32_64)(s.data, s.stride, out, x_begin, x_end, a, rx, c,
                                                ry, pf);
  }
}

template <class T>
void linear_rows(const ImageView<const T>& s, const ImageView<T>& d, const double* m,
                 Border border, T fill, std::int64_t y_begin, std::int64_t y_end) {
  const double w = static_cast<double>(s.width), h = static_cast<double>(s.height);
  const double fill_d = static_cast<double>(fill);
  const std::int64_t pf = prefetch_offset(m[1], m[4], s.stride);
  // uint8 rounds positions to 1/2048 pixel (block_coords<true>): a position within 1/4096 of
  // the last column or row would move its tap onto it and read one past it (with weight 0).
  // Such pixels take the checked sampler (a wider 1/2048 margin absorbs the last-bit
  // differences between this unfused expression and the kernels' fused one).
  const double edge = std::is_same_v<T, std::uint8_t> ? 1.0 / kOne : 0.0;
  for (std::int64_t y = y_begin; y < y_end; ++y) {
    const double yd = static_cast<double>(y);
    const double rx = m[1] * yd + m[2], ry = m[4] * yd + m[5];
    T* out = d.row(y);
    std::int64_t a0, a1, b0, b1;
    solve_range(m[0], rx, kMargin, w - 1.0 - edge - kMargin, d.width, a0, a1);
    solve_range(m[3], ry, kMargin, h - 1.0 - edge - kMargin, d.width, b0, b1);
    std::int64_t first = std::max(a0, b0), last = std::min(a1, b1);
    auto inside = [&](std::int64_t x) {
      const double xd = static_cast<double>(x);
      const double sx = m[0] * xd + rx, sy = m[3] * xd + ry;
      return sx >= 0.0 && sx < w - 1.0 - edge && sy >= 0.0 && sy < h - 1.0 - edge;
    };
    while (first < last && !inside(first)) ++first;
    while (last > first && !inside(last - 1)) --last;
    if (last <= first) first = last = 0;
    for (std::int64_t x = 0; x < d.width; ++x) {
      if (x == first && last > first) {
        linear_interior(s, out, first, last, m[0], rx, m[3], ry, pf);
        x = last - 1;
        continue;
      }
      const double xd = static_cast<double>(x);
      out[x] = to_pixel<T>(sample_linear(s, m[0] * xd + rx, m[3] * xd + ry, border, fill_d));
    }
  }
}

// ---- axis-aligned (m[1] == m[3] == 0): separable bilinear ------------------------------------

struct ColumnTable {
  std::vector<std::int32_t> ix;  // floor(x') per output column (interior columns only)
  std::vector<float> wx;         // x' - floor(x')
  std::int64_t first = 0, last = 0;  // interior output columns [first, last)
  std::int64_t j_min = 0, j_max = 0;  // source columns read by the interior: [j_min, j_max]
  bool translation = false;           // m[0] == 1: ix[x] = x + ix[first] - first
};

ColumnTable column_table(double a, double tx, std::int64_t src_width, std::int64_t dst_width) {
  ColumnTable t;
  t.ix.assign(static_cast<std::size_t>(dst_width), 0);
  t.wx.assign(static_cast<std::size_t>(dst_width), 0.0f);
  const double w = static_cast<double>(src_width);
  t.translation = (a == 1.0);
  const double k0 = std::floor(tx);
  bool any = false;
  for (std::int64_t x = 0; x < dst_width; ++x) {
    const double xd = static_cast<double>(x);
    double fx, frac;
    if (t.translation) {  // exact: x' = x + tx, so floor(x') = x + floor(tx)
      fx = xd + k0;
      frac = tx - k0;
    } else {
      const double sx = a * xd + tx;
      fx = std::floor(sx);
      frac = sx - fx;
    }
    // Interior: both taps inside (the second one is only read if its weight is non-zero).
    const bool inside = fx >= 0.0 && (frac > 0.0 ? fx + 1.0 <= w - 1.0 : fx <= w - 1.0);
    if (!inside) continue;
    // A monotone map makes the interior contiguous.
    if (!any) t.first = x;
    any = true;
    t.last = x + 1;
    t.ix[static_cast<std::size_t>(x)] = static_cast<std::int32_t>(fx);
    t.wx[static_cast<std::size_t>(x)] = static_cast<float>(frac);
  }
  if (any) {
    const auto i0 = t.ix[static_cast<std::size_t>(t.first)];
    const auto i1 = t.ix[static_cast<std::size_t>(t.last - 1)];
    t.j_min = std::min(i0, i1);
    // +1 for the second tap, but never past the image (weight-0 taps at the last column).
    t.j_max = std::min<std::int64_t>(std::max(i0, i1) + 1, src_width - 1);
  }
  return t;
}

#if DEEPALIGN_X86_DISPATCH
// uint8 rows of the separable path with AVX2. The portable loops are compiled for baseline
// x86-64, hence without FMA: a + w * (b - a) rounds the product. GCC would contract the
// vector (and scalar) product and sum here (this file keeps the default -ffp-contract=fast),
// so the product goes through an empty asm statement, which it cannot see through.
__attribute__((target("arch=x86-64-v3"), always_inline)) inline __m256 lerp8_unfused(
    __m256 a, __m256 b, __m256 w) {
  __m256 p = _mm256_mul_ps(w, _mm256_sub_ps(b, a));
  __asm__("" : "+x"(p));
  return _mm256_add_ps(a, p);
}

__attribute__((target("arch=x86-64-v3"), always_inline)) inline float lerp1_unfused(float a,
                                                                                   float b,
                                                                                   float w) {
  float p = w * (b - a);
  __asm__("" : "+x"(p));
  return a + p;
}

// tmp[j] = r0[j] + wy * (r1[j] - r0[j]) for j < span.
__attribute__((target("arch=x86-64-v3"))) void vertical_u8_avx2(const std::uint8_t* r0,
                                                                const std::uint8_t* r1,
                                                                std::int64_t span, float wy,
                                                                float* tmp) {
  const __m256 w = _mm256_set1_ps(wy);
  std::int64_t j = 0;
  for (; j + 8 <= span; j += 8) {
    const __m256 v0 = _mm256_cvtepi32_ps(
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(r0 + j))));
    const __m256 v1 = _mm256_cvtepi32_ps(
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(r1 + j))));
    _mm256_storeu_ps(tmp + j, lerp8_unfused(v0, v1, w));
  }
  for (; j < span; ++j) {
    tmp[j] = lerp1_unfused(static_cast<float>(r0[j]), static_cast<float>(r1[j]), wy);
  }
}

// o[k] = to_pixel<uint8_t>(src[k] + wx * (src[k + 1] - src[k])) for k < n. to_pixel: NaN and
// v <= 0 give 0, v >= 255 gives 255, else (int)(v + 0.5f); clamping first (max_ps returns
// its second operand, 0, for NaN) and then rounding gives the same.
__attribute__((target("arch=x86-64-v3"))) void horizontal_u8_avx2(const float* src,
                                                                  std::int64_t n, float wx,
                                                                  std::uint8_t* o) {
  const __m256 w = _mm256_set1_ps(wx), zero = _mm256_setzero_ps();
  const __m256 hi = _mm256_set1_ps(255.0f), half = _mm256_set1_ps(0.5f);
  std::int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m256 v =
        lerp8_unfused(_mm256_loadu_ps(src + k), _mm256_loadu_ps(src + k + 1), w);
    const __m256 c = _mm256_min_ps(_mm256_max_ps(v, zero), hi);
    const __m256i q = _mm256_cvttps_epi32(_mm256_add_ps(c, half));
    const __m128i w16 =
        _mm_packus_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(o + k), _mm_packus_epi16(w16, w16));
  }
  for (; k < n; ++k) o[k] = to_pixel<std::uint8_t>(lerp1_unfused(src[k], src[k + 1], wx));
}

// The same two loops with AVX-512, 16 pixels per step (the same unfused float operations,
// so the same bits). (GCC 12 header warnings: see interior_u8_avx512_dir.)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
__attribute__((target("arch=x86-64-v4"), always_inline)) inline __m512 lerp16_unfused(
    __m512 a, __m512 b, __m512 w) {
  __m512 p = _mm512_mul_ps(w, _mm512_sub_ps(b, a));
  __asm__("" : "+v"(p));
  return _mm512_add_ps(a, p);
}

__attribute__((target("arch=x86-64-v4"))) void vertical_u8_avx512(const std::uint8_t* r0,
                                                                  const std::uint8_t* r1,
                                                                  std::int64_t span, float wy,
                                                                  float* tmp) {
  const __m512 w = _mm512_set1_ps(wy);
  std::int64_t j = 0;
  for (; j + 16 <= span; j += 16) {
    const __m512 v0 = _mm512_cvtepi32_ps(
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r0 + j))));
    const __m512 v1 = _mm512_cvtepi32_ps(
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r1 + j))));
    _mm512_storeu_ps(tmp + j, lerp16_unfused(v0, v1, w));
  }
  if (j < span) vertical_u8_avx2(r0 + j, r1 + j, span - j, wy, tmp + j);
}

__attribute__((target("arch=x86-64-v4"))) void horizontal_u8_avx512(const float* src,
                                                                    std::int64_t n, float wx,
                                                                    std::uint8_t* o) {
  const __m512 w = _mm512_set1_ps(wx), zero = _mm512_setzero_ps();
  const __m512 hi = _mm512_set1_ps(255.0f), half = _mm512_set1_ps(0.5f);
  std::int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    const __m512 v =
        lerp16_unfused(_mm512_loadu_ps(src + k), _mm512_loadu_ps(src + k + 1), w);
    const __m512 c = _mm512_min_ps(_mm512_max_ps(v, zero), hi);
    const __m512i q = _mm512_cvttps_epi32(_mm512_add_ps(c, half));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + k), _mm512_cvtusepi32_epi8(q));
  }
  if (k < n) horizontal_u8_avx2(src + k, n - k, wx, o + k);
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

template <class T>
void separable_rows(const ImageView<const T>& s, const ImageView<T>& d, const double* m,
                    Border border, T fill, const ColumnTable& t, std::int64_t y_begin,
                    std::int64_t y_end) {
  const double h = static_cast<double>(s.height);
  const double fill_d = static_cast<double>(fill);
  std::vector<float> tmp_buf(static_cast<std::size_t>(t.j_max - t.j_min + 2), 0.0f);
  float* tmp = tmp_buf.data();
  const std::int64_t span = t.j_max - t.j_min + 1;
  for (std::int64_t y = y_begin; y < y_end; ++y) {
    const double sy = m[4] * static_cast<double>(y) + m[5];
    T* out = d.row(y);
    const double fy = std::floor(sy);
    const double wyd = sy - fy;
    const bool row_inside = t.last > t.first && fy >= 0.0 &&
                            (wyd > 0.0 ? fy + 1.0 <= h - 1.0 : fy <= h - 1.0);
    std::int64_t first = row_inside ? t.first : 0, last = row_inside ? t.last : 0;
    if (row_inside) {
      const auto yi = static_cast<std::int64_t>(fy);
      const T* r0 = s.row(yi) + t.j_min;
      const T* r1 = wyd > 0.0 ? s.row(yi + 1) + t.j_min : r0;
      const float wy = static_cast<float>(wyd);
      bool done = false;
#if DEEPALIGN_X86_DISPATCH
      if constexpr (std::is_same_v<T, std::uint8_t>) {
        if (cpu_has_avx512_vbmi()) {
          vertical_u8_avx512(r0, r1, span, wy, tmp);
          done = true;
        } else if (cpu_has_avx2()) {
          vertical_u8_avx2(r0, r1, span, wy, tmp);
          done = true;
        }
      }
#endif
      if (!done) {  // (a separate test: a flag in the loop condition stops vectorisation)
        for (std::int64_t j = 0; j < span; ++j) {
          const float v0 = static_cast<float>(r0[j]), v1 = static_cast<float>(r1[j]);
          tmp[j] = v0 + wy * (v1 - v0);
        }
      }
      tmp[span] = tmp[span - 1];  // read with weight 0 only (last source column)
      if (t.translation) {
        const float wx = t.wx[static_cast<std::size_t>(first)];
        const float* src = tmp + (t.ix[static_cast<std::size_t>(first)] - t.j_min);
        T* o = out + first;
        std::int64_t n = last - first;
#if DEEPALIGN_X86_DISPATCH
        if constexpr (std::is_same_v<T, std::uint8_t>) {
          if (cpu_has_avx512_vbmi()) {
            horizontal_u8_avx512(src, n, wx, o);
            n = 0;
          } else if (cpu_has_avx2()) {
            horizontal_u8_avx2(src, n, wx, o);
            n = 0;
          }
        }
#endif
        for (std::int64_t k = 0; k < n; ++k) {
          o[k] = to_pixel<T>(src[k] + wx * (src[k + 1] - src[k]));
        }
      } else {
        const std::int32_t* ix = t.ix.data();
        const float* wx = t.wx.data();
        for (std::int64_t x = first; x < last; ++x) {
          const float* p = tmp + (ix[x] - t.j_min);
          out[x] = to_pixel<T>(p[0] + wx[x] * (p[1] - p[0]));
        }
      }
    }
    for (std::int64_t x = 0; x < d.width; ++x) {
      if (x == first && last > first) {
        x = last - 1;
        continue;
      }
      out[x] = to_pixel<T>(
          sample_linear(s, m[0] * static_cast<double>(x) + m[2], sy, border, fill_d));
    }
  }
}

// ---- nearest (labels) ------------------------------------------------------------------------

template <class T>
void nearest_rows(const ImageView<const T>& s, const ImageView<T>& d, const double* m,
                  Border border, T fill, std::int64_t y_begin, std::int64_t y_end) {
  const double w = static_cast<double>(s.width), h = static_cast<double>(s.height);
  for (std::int64_t y = y_begin; y < y_end; ++y) {
    const double yd = static_cast<double>(y);
    // floor(x' + 0.5): round half up. Folding 0.5 into the row offset keeps it one add.
    const double rx = m[1] * yd + m[2] + 0.5, ry = m[4] * yd + m[5] + 0.5;
    T* out = d.row(y);
    if (border == Border::Constant) {
      for (std::int64_t x = 0; x < d.width; ++x) {
        const double xd = static_cast<double>(x);
        const double sx = m[0] * xd + rx, sy = m[3] * xd + ry;
        // >= 0 makes truncation equal floor below.
        out[x] = (sx >= 0.0 && sx < w && sy >= 0.0 && sy < h)
                     ? s.row(static_cast<std::int64_t>(sy))[static_cast<std::int64_t>(sx)]
                     : fill;
      }
    } else {
      for (std::int64_t x = 0; x < d.width; ++x) {
        const double xd = static_cast<double>(x);
        const double sx = std::min(std::max(m[0] * xd + rx, 0.0), w - 1.0);
        const double sy = std::min(std::max(m[3] * xd + ry, 0.0), h - 1.0);
        out[x] = s.row(static_cast<std::int64_t>(sy))[static_cast<std::int64_t>(sx)];
      }
    }
  }
}

// ---- argument checks -------------------------------------------------------------------------

template <class T>
void validate(const ImageView<const T>& src, const ImageView<T>& dst, const double* matrix,
              Interpolation interp, Border border, double fill, int num_threads) {
  check_view("warp_affine", "src", src.data, src.height, src.width, src.stride);
  check_view("warp_affine", "dst", dst.data, dst.height, dst.width, dst.stride);
  if (matrix == nullptr) throw std::invalid_argument("warp_affine: matrix is null");
  for (int i = 0; i < 6; ++i) {
    if (!std::isfinite(matrix[i])) {
      throw std::invalid_argument("warp_affine: matrix entry " + std::to_string(i) +
                                  " is not finite");
    }
  }
  if (interp != Interpolation::Nearest && interp != Interpolation::Linear) {
    throw std::invalid_argument("warp_affine: unknown interpolation " +
                                std::to_string(static_cast<int>(interp)));
  }
  if (border != Border::Constant && border != Border::Replicate) {
    throw std::invalid_argument("warp_affine: unknown border " +
                                std::to_string(static_cast<int>(border)));
  }
  if (!std::is_floating_point_v<T> && std::isnan(fill)) {
    throw std::invalid_argument("warp_affine: fill is NaN, which an integer image cannot hold");
  }
  resolve_num_threads(num_threads);  // throws on negative values
  // Writing while reading the same memory would use already-warped pixels as input.
  if (views_overlap(src, dst)) {
    throw std::invalid_argument("warp_affine: src and dst overlap in memory");
  }
}

}  // namespace

template <class T>
void warp_affine(const ImageView<const T>& src, const ImageView<T>& dst, const double matrix[6],
                 Interpolation interp, Border border, double fill, int num_threads) {
  validate(src, dst, matrix, interp, border, fill, num_threads);
  double m[6];
  std::copy(matrix, matrix + 6, m);
  const T fill_t = fill_value<T>(fill);
  // Keep at least ~64k output pixels per chunk: below that, starting threads costs more.
  const std::int64_t min_rows = std::max<std::int64_t>(1, 65536 / dst.width);
  const std::int64_t chunk = row_chunk(dst.height, num_threads, min_rows);

  if (interp == Interpolation::Nearest) {
    parallel_for_dynamic(
        0, dst.height, num_threads,
        [&](std::int64_t y0, std::int64_t y1) { nearest_rows(src, dst, m, border, fill_t, y0, y1); },
        chunk);
    return;
  }
  if (m[1] == 0.0 && m[3] == 0.0) {
    const ColumnTable table = column_table(m[0], m[2], src.width, dst.width);
    parallel_for_dynamic(
        0, dst.height, num_threads,
        [&](std::int64_t y0, std::int64_t y1) {
          separable_rows(src, dst, m, border, fill_t, table, y0, y1);
        },
        chunk);
    return;
  }
  parallel_for_dynamic(
      0, dst.height, num_threads,
      [&](std::int64_t y0, std::int64_t y1) { linear_rows(src, dst, m, border, fill_t, y0, y1); },
      chunk);
}

template void warp_affine<std::uint8_t>(const ImageView<const std::uint8_t>&,
                                        const ImageView<std::uint8_t>&, const double[6],
                                        Interpolation, Border, double, int);
template void warp_affine<std::uint16_t>(const ImageView<const std::uint16_t>&,
                                         const ImageView<std::uint16_t>&, const double[6],
                                         Interpolation, Border, double, int);
template void warp_affine<float>(const ImageView<const float>&, const ImageView<float>&,
                                 const double[6], Interpolation, Border, double, int);

}  // namespace deepalign
