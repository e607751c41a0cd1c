// Internal to the core (not a public header): the per-pixel sampling pieces shared by the warp
// kernels (warp.cpp: affine; displacement.cpp: dense displacement fields), so that every warp
// rounds, saturates, treats borders and blends uint8 pixels in exactly the same way.
//
// Semantics are documented in warp.hpp ("Interpolation", "Precision").
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "deepalign/image.hpp"
#include "deepalign/parallel.hpp"

#if defined(__GNUC__) || defined(__clang__)
#define DEEPALIGN_ALWAYS_INLINE __attribute__((always_inline))
#else
#define DEEPALIGN_ALWAYS_INLINE
#endif
// Runtime dispatch (GNU ifunc) of hot interior loops: an AVX2+FMA clone and a baseline one.
// Only those loops are cloned; no global -march flag is used.
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(DEEPALIGN_NO_CLONES)
#define DEEPALIGN_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#define DEEPALIGN_X86_DISPATCH 1
#include <immintrin.h>
#else
#define DEEPALIGN_X86_DISPATCH 0
#define DEEPALIGN_TARGET_CLONES
#endif

namespace deepalign::detail {

constexpr int kFracBits = 11;  // uint8 bilinear weights: 1/2048 pixel
constexpr std::int32_t kOne = 1 << kFracBits;

// Round to nearest (half up) and saturate for integer T; plain conversion for float.
template <class T, class V>
inline T to_pixel(V v) {
  if constexpr (std::is_floating_point_v<T>) {
    return static_cast<T>(v);
  } else {
    constexpr V hi = static_cast<V>(std::numeric_limits<T>::max());
    if (!(v > V(0))) return T(0);
    if (v >= hi) return std::numeric_limits<T>::max();
    return static_cast<T>(static_cast<std::int32_t>(v + V(0.5)));
  }
}

template <class T>
T fill_value(double fill) {
  if constexpr (std::is_floating_point_v<T>) {
    return static_cast<T>(fill);
  } else {
    return to_pixel<T>(fill);  // saturates +-inf; NaN was rejected by validate()
  }
}

// Bilinear sample with all checks, in float64: used for pixels near the source edges.
template <class T>
double sample_linear(const ImageView<const T>& s, double sx, double sy, Border border,
                     double fill) {
  const double w = static_cast<double>(s.width), h = static_cast<double>(s.height);
  if (border == Border::Replicate) {
    sx = std::min(std::max(sx, 0.0), w - 1.0);
    sy = std::min(std::max(sy, 0.0), h - 1.0);
  } else if (!(sx > -1.0 && sx < w && sy > -1.0 && sy < h)) {
    return fill;
  }
  const double fx = std::floor(sx), fy = std::floor(sy);
  const double wx = sx - fx, wy = sy - fy;
  const auto x0 = static_cast<std::int64_t>(fx), y0 = static_cast<std::int64_t>(fy);
  // A tap with weight exactly 0 is not read (identity warps stay exact at the last column).
  const std::int64_t x1 = wx > 0.0 ? x0 + 1 : x0, y1 = wy > 0.0 ? y0 + 1 : y0;
  auto tap = [&](std::int64_t x, std::int64_t y) -> double {
    if (x < 0 || x >= s.width || y < 0 || y >= s.height) return fill;
    return static_cast<double>(s.row(y)[x]);
  };
  const double top = (1.0 - wx) * tap(x0, y0) + wx * tap(x1, y0);
  const double bot = (1.0 - wx) * tap(x0, y1) + wx * tap(x1, y1);
  return (1.0 - wy) * top + wy * bot;
}

// Exact 11-bit fixed-point bilinear blend of n uint8 pixels: `off` is the offset of the
// top-left tap of each pixel, wx/wy its weights in 1/2048.
template <class Offset>
DEEPALIGN_ALWAYS_INLINE inline void blend_u8_scalar(const std::uint8_t* src, std::int64_t stride,
                                                    const Offset* off, const std::int32_t* wx,
                                                    const std::int32_t* wy, int n,
                                                    std::uint8_t* o) {
  for (int k = 0; k < n; ++k) {
    const std::uint8_t* p = src + off[k];
    const std::int32_t p00 = p[0], p01 = p[1], p10 = p[stride], p11 = p[stride + 1];
    const std::int32_t top = (p00 << kFracBits) + wx[k] * (p01 - p00);
    const std::int32_t bot = (p10 << kFracBits) + wx[k] * (p11 - p10);
    // A convex combination: 0 <= v <= 255 << 22, no saturation needed.
    const std::int32_t v = (top << kFracBits) + wy[k] * (bot - top);
    o[k] = static_cast<std::uint8_t>((v + (1 << (2 * kFracBits - 1))) >> (2 * kFracBits));
  }
}

// float32-weight bilinear blend of n pixels (uint16 and float32 images): `off` is the offset of
// the top-left tap of each pixel, wx/wy its weights.
template <class T, class Offset>
DEEPALIGN_ALWAYS_INLINE inline void blend_float(const T* src, std::int64_t stride,
                                                const Offset* off, const float* wx,
                                                const float* wy, int n, T* o) {
  for (int k = 0; k < n; ++k) {
    const T* p = src + off[k];
    const float p00 = p[0], p01 = p[1], p10 = p[stride], p11 = p[stride + 1];
    const float top = p00 + wx[k] * (p01 - p00);
    const float bot = p10 + wx[k] * (p11 - p10);
    o[k] = to_pixel<T>(top + wy[k] * (bot - top));
  }
}

#if DEEPALIGN_X86_DISPATCH
inline std::int32_t load_u16(const std::uint8_t* p) {
  std::uint16_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// The blend of blend_u8_scalar on 8 pixels at once, as 32-bit lanes (0..255) before packing:
// g0/g1 hold, per 32-bit lane, the two horizontal taps of the top/bottom source row as 16-bit
// integers (left tap in the low half, right tap in the high half). The horizontal step is
// one multiply-add of int16 pairs: p00 * (2048 - wx) + p01 * wx == (p00 << 11) +
// wx * (p01 - p00) exactly (products and sum fit in int32), so the bits are those of the
// scalar blend.
__attribute__((target("arch=x86-64-v3"), always_inline)) inline __m256i blend8_u8_values(
    __m256i g0, __m256i g1, __m256i vwx, __m256i vwy) {
  const __m256i half = _mm256_set1_epi32(1 << (2 * kFracBits - 1));
  const __m256i wpair =
      _mm256_or_si256(_mm256_sub_epi32(_mm256_set1_epi32(kOne), vwx), _mm256_slli_epi32(vwx, 16));
  const __m256i top = _mm256_madd_epi16(g0, wpair);
  const __m256i bot = _mm256_madd_epi16(g1, wpair);
  const __m256i v = _mm256_add_epi32(_mm256_slli_epi32(top, kFracBits),
                                     _mm256_mullo_epi32(vwy, _mm256_sub_epi32(bot, top)));
  return _mm256_srli_epi32(_mm256_add_epi32(v, half), 2 * kFracBits);
}

// blend8_u8_values stored as 8 bytes at o.
__attribute__((target("arch=x86-64-v3"), always_inline)) inline void blend8_u8(
    __m256i g0, __m256i g1, __m256i vwx, __m256i vwy, std::uint8_t* o) {
  const __m256i v = blend8_u8_values(g0, g1, vwx, vwy);
  const __m128i w16 = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(o), _mm_packus_epi16(w16, w16));
}

// 16 bytes at p in both 128-bit lanes.
__attribute__((target("arch=x86-64-v3"), always_inline)) inline __m256i row16_u8(
    const std::uint8_t* p) {
  return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Window loads for 8 pixels whose taps lie within 16 bytes of at most three consecutive
// source rows (near-identity maps: consecutive output pixels read neighbouring source
// pixels). One 16-byte load per row and one byte shuffle replace 16 scalar loads and inserts.
// vix/viy are the pixels' top-left taps and (xb, yb) the window's top-left corner; returns
// false (nothing loaded) when the taps do not fit, or when the window would leave [0, width)
// of the rows (never reads outside the image). (Allowing a fourth row for the steeper slopes
// of displacement fields measured slower: the extra load and blends cost more than the pair
// loads of the few groups that need it.)
__attribute__((target("arch=x86-64-v3"), always_inline)) inline bool window_taps_u8_at(
    const std::uint8_t* src, std::int64_t stride, std::int64_t width, __m256i vix, __m256i viy,
    std::int32_t xb, std::int32_t yb, __m256i& g0, __m256i& g1) {
  if (xb + 16 > width) return false;
  const __m256i dx = _mm256_sub_epi32(vix, _mm256_set1_epi32(xb));
  const __m256i dy = _mm256_sub_epi32(viy, _mm256_set1_epi32(yb));
  // 0 <= dx <= 14 (both taps in the 16 bytes) and 0 <= dy <= 1, as unsigned compares.
  const __m256i c14 = _mm256_set1_epi32(14), c1 = _mm256_set1_epi32(1);
  const __m256i ok = _mm256_and_si256(_mm256_cmpeq_epi32(_mm256_max_epu32(dx, c14), c14),
                                      _mm256_cmpeq_epi32(_mm256_max_epu32(dy, c1), c1));
  if (_mm256_movemask_epi8(ok) != -1) return false;
  // Shuffle control per lane (the 16-bit pairs of blend8_u8): byte 0 <- dx, byte 2 <- dx + 1,
  // bytes 1 and 3 <- zero (0x80).
  const __m256i ctrl = _mm256_or_si256(
      _mm256_or_si256(dx, _mm256_slli_epi32(_mm256_add_epi32(dx, c1), 16)),
      _mm256_set1_epi32(static_cast<std::int32_t>(0x80008000u)));
  const std::uint8_t* r = src + static_cast<std::int64_t>(yb) * stride + xb;
  const __m256i a0 = _mm256_shuffle_epi8(row16_u8(r), ctrl);
  const __m256i a1 = _mm256_shuffle_epi8(row16_u8(r + stride), ctrl);
  const __m256i lower = _mm256_cmpeq_epi32(dy, c1);  // pixels whose top row is yb + 1
  // Row yb + 2 is the bottom row of those pixels, so it lies inside the image when any
  // exists; otherwise row yb + 1 is read again. Branch-free, as whether a group straddles two
  // rows is not predictable: arithmetic, since GCC turns ?: into a branch around the load.
  const std::int64_t any = 1 - _mm256_testz_si256(lower, lower);
  const __m256i a2 = _mm256_shuffle_epi8(row16_u8(r + stride + (stride & -any)), ctrl);
  g0 = _mm256_blendv_epi8(a0, a1, lower);
  g1 = _mm256_blendv_epi8(a1, a2, lower);
  return true;
}

// window_taps_u8_at with the window placed from the taps of the first and last pixel
// (ix0/ix7/iy0/iy7), for maps that need not be monotone along the row.
__attribute__((target("arch=x86-64-v3"), always_inline)) inline bool window_taps_u8(
    const std::uint8_t* src, std::int64_t stride, std::int64_t width, __m256i vix, __m256i viy,
    std::int32_t ix0, std::int32_t ix7, std::int32_t iy0, std::int32_t iy7, __m256i& g0,
    __m256i& g1) {
  return window_taps_u8_at(src, stride, width, vix, viy, std::max(0, std::min(ix0, ix7) - 1),
                           std::min(iy0, iy7), g0, g1);
}

// Both horizontal taps of 8 pixels of one source row, one 16-bit load each (on AMD Zen cores
// this beats vpgatherdd, whose latency dominated the loop), widened to the 16-bit pairs of
// blend8_u8.
__attribute__((target("arch=x86-64-v3"), always_inline)) inline __m256i pair_taps_u8(
    const std::uint8_t* s, const std::int32_t* ok) {
  const __m256i packed =
      _mm256_setr_epi32(load_u16(s + ok[0]), load_u16(s + ok[1]), load_u16(s + ok[2]),
                        load_u16(s + ok[3]), load_u16(s + ok[4]), load_u16(s + ok[5]),
                        load_u16(s + ok[6]), load_u16(s + ok[7]));
  const __m256i widen = _mm256_setr_epi8(0, -1, 1, -1, 4, -1, 5, -1, 8, -1, 9, -1, 12, -1, 13, -1,
                                         0, -1, 1, -1, 4, -1, 5, -1, 8, -1, 9, -1, 12, -1, 13, -1);
  return _mm256_shuffle_epi8(packed, widen);
}

// The two horizontal taps (p[0], p[1]) of 8 pixels, p = base + off[k], one 64-bit load each,
// deinterleaved into left = p[0] and right = p[1] (pixel order). Pair loads beat 4 gathers.
__attribute__((target("arch=x86-64-v3"), always_inline)) inline __m128 load_2pairs_f32(
    const float* p, const float* q) {
  // _mm_loadl_epi64 / _mm_loadh_pi take may_alias pointer types: no strict-aliasing issue.
  const __m128 v = _mm_castsi128_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return _mm_loadh_pi(v, reinterpret_cast<const __m64*>(q));
}

__attribute__((target("arch=x86-64-v3"), always_inline)) inline void load_taps_f32(
    const float* base, const std::int32_t* off, __m256& left, __m256& right) {
  const __m256 u = _mm256_set_m128(load_2pairs_f32(base + off[4], base + off[5]),
                                   load_2pairs_f32(base + off[0], base + off[1]));
  const __m256 v = _mm256_set_m128(load_2pairs_f32(base + off[6], base + off[7]),
                                   load_2pairs_f32(base + off[2], base + off[3]));
  left = _mm256_shuffle_ps(u, v, _MM_SHUFFLE(2, 0, 2, 0));
  right = _mm256_shuffle_ps(u, v, _MM_SHUFFLE(3, 1, 3, 1));
}

// The float32 lerp of blend_float on 8 pixels, bit-identical to the scalar loop compiled the
// same way: kFma = true reproduces the contracted scalar code (fma(w, b - a, a), warp.cpp's
// AVX2 clone), kFma = false the uncontracted one (a + w * (b - a), displacement.cpp, built
// with -ffp-contract=off).
template <bool kFma>
__attribute__((target("arch=x86-64-v3"), always_inline)) inline __m256 lerp8(__m256 a, __m256 b,
                                                                             __m256 w) {
  if constexpr (kFma) {
    return _mm256_fmadd_ps(w, _mm256_sub_ps(b, a), a);
  } else {
    return _mm256_add_ps(a, _mm256_mul_ps(w, _mm256_sub_ps(b, a)));
  }
}

// Tests set this to run the portable kernels and compare them with the AVX2 ones; production
// code never sets it.
inline std::atomic<bool>& force_portable_kernels() {
  static std::atomic<bool> force{false};
  return force;
}

inline bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has && !force_portable_kernels().load(std::memory_order_relaxed);
}

// Tests set this to run the AVX2 kernels where AVX-512 ones exist, to compare both with the
// portable ones; production code never sets it.
inline std::atomic<bool>& force_no_avx512() {
  static std::atomic<bool> force{false};
  return force;
}

// AVX-512 F/BW/VL/DQ/CD (x86-64-v4) with VBMI (byte permutes): the uint8 affine interior.
inline bool cpu_has_avx512_vbmi() {
  static const bool has = __builtin_cpu_supports("x86-64-v4") &&
                          __builtin_cpu_supports("avx512vbmi");
  return has && cpu_has_avx2() && !force_no_avx512().load(std::memory_order_relaxed);
}
#endif

// Software prefetch of the source: a warp reads each source row in short runs (a rotated map
// crosses ~width * |sin| rows per output row), too short for the hardware prefetchers, so
// every new cache line was a demand miss (2048^2 uint8 rotation: half the time). The kernels
// prefetch, for each block of output pixels, the source line that the same pixels
// kPrefetchRows output rows further down will read: the source offset moves by
// (b, d) * kPrefetchRows for a pull map with x' = a x + b y + tx, y' = c x + d y + ty.
constexpr double kPrefetchRows = 4.0;

inline std::int64_t prefetch_offset(double b, double d, std::int64_t stride) {
  const double dx = std::nearbyint(b * kPrefetchRows), dy = std::nearbyint(d * kPrefetchRows);
  return static_cast<std::int64_t>(dy) * stride + static_cast<std::int64_t>(dx);
}

// A hint only: never faults, so the address may lie outside the image (it is formed as an
// integer, not as an out-of-range pointer).
template <class T>
DEEPALIGN_ALWAYS_INLINE inline void prefetch(const T* base, std::int64_t offset) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<std::uintptr_t>(base) +
                                                   static_cast<std::uintptr_t>(offset) * sizeof(T)));
#else
  (void)base;
  (void)offset;
#endif
}

// Rows per chunk for parallel_for_dynamic: about 8 chunks per thread (so that a descheduled
// thread's share is taken over), never fewer than `min_rows`; one chunk for one thread.
inline std::int64_t row_chunk(std::int64_t rows, int num_threads, std::int64_t min_rows) {
  const std::int64_t threads = resolve_num_threads(num_threads);
  if (threads <= 1) return std::max<std::int64_t>(1, rows);
  return std::max(min_rows, (rows + 8 * threads - 1) / (8 * threads));
}

// Argument checks shared by the kernels; `fn` prefixes the message (std::invalid_argument).
inline void check_view(const char* fn, const char* name, const void* data, std::int64_t h,
                       std::int64_t w, std::int64_t stride) {
  constexpr std::int64_t kMaxDim = std::numeric_limits<std::int32_t>::max() - 1;
  const std::string p = std::string(fn) + ": " + name;
  if (data == nullptr) throw std::invalid_argument(p + " has no data");
  if (h <= 0 || w <= 0) {
    throw std::invalid_argument(p + " is empty (" + std::to_string(h) + " x " +
                                std::to_string(w) + ")");
  }
  if (h > kMaxDim || w > kMaxDim) {
    throw std::invalid_argument(p + " is too large (max 2^31-2 per side)");
  }
  if (stride < w) {
    throw std::invalid_argument(p + " stride " + std::to_string(stride) +
                                " is smaller than its width " + std::to_string(w));
  }
}

// Whether the memory spans of two views intersect (writing while reading the same memory
// would use already-written pixels as input).
template <class A, class B>
bool views_overlap(const ImageView<A>& a, const ImageView<B>& b) {
  const auto* a0 = reinterpret_cast<const char*>(a.data);
  const auto* a1 = reinterpret_cast<const char*>(a.row(a.height - 1) + a.width);
  const auto* b0 = reinterpret_cast<const char*>(b.data);
  const auto* b1 = reinterpret_cast<const char*>(b.row(b.height - 1) + b.width);
  return std::less<const char*>()(b0, a1) && std::less<const char*>()(a0, b1);
}

}  // namespace deepalign::detail
