#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <set>
#include <stdexcept>
#include <vector>

#include "check.hpp"
#include "image_fixture.hpp"
#include "deepalign/sampling.hpp"
#include "deepalign/warp.hpp"

using deepalign::Border;
using deepalign::ImageView;
using deepalign::Interpolation;
using deepalign::warp_affine;

namespace {

using test_fixture::Image;
using test_fixture::random_image;

template <class T>
Image<T> warp(const Image<T>& src, std::int64_t h, std::int64_t w, const double m[6],
              Interpolation i, Border b, double fill, int threads) {
  Image<T> dst(h, w);
  warp_affine<T>(src.cview(), dst.view(), m, i, b, fill, threads);
  return dst;
}

}  // namespace

TEST_CASE(identity_is_exact) {
  const double m[6] = {1, 0, 0, 0, 1, 0};
  auto u8 = random_image<std::uint8_t>(37, 53, 255, 1);
  auto f32 = random_image<float>(37, 53, 1000, 2);
  for (auto b : {Border::Constant, Border::Replicate}) {
    for (auto i : {Interpolation::Linear, Interpolation::Nearest}) {
      CHECK(warp(u8, 37, 53, m, i, b, 7, 1).px == u8.px);
      CHECK(warp(f32, 37, 53, m, i, b, 7, 1).px == f32.px);
    }
  }
}

TEST_CASE(integer_shift_is_exact_including_constant_border) {
  auto src = random_image<std::uint16_t>(40, 50, 65535, 3);
  const double m[6] = {1, 0, 3, 0, 1, -2};  // out(x, y) = src(x + 3, y - 2)
  for (auto i : {Interpolation::Linear, Interpolation::Nearest}) {
    auto out = warp(src, 40, 50, m, i, Border::Constant, 9, 2);
    for (std::int64_t y = 0; y < 40; ++y) {
      for (std::int64_t x = 0; x < 50; ++x) {
        const std::int64_t sx = x + 3, sy = y - 2;
        const bool in = sx >= 0 && sx < 50 && sy >= 0 && sy < 40;
        CHECK(out.at(y, x) == (in ? src.at(sy, sx) : 9));
      }
    }
  }
  // The same shift through the general (non axis-aligned) path: a tiny shear that moves
  // nothing by a full pixel would not be exact, so use a 90-degree rotation instead.
  const double rot[6] = {0, 1, 0, 1, 0, 0};  // out(x, y) = src(y, x): a transpose
  auto t = warp(src, 50, 40, rot, Interpolation::Linear, Border::Constant, 0, 2);
  for (std::int64_t y = 0; y < 50; ++y)
    for (std::int64_t x = 0; x < 40; ++x) CHECK(t.at(y, x) == src.at(x, y));
}

TEST_CASE(constant_border_blends_fill_like_opencv) {
  Image<float> src(4, 4, 10.0f);
  const double m[6] = {1, 0, -0.25, 0, 1, 0};  // x' = x - 0.25: column 0 sees 25% outside
  auto out = warp(src, 4, 4, m, Interpolation::Linear, Border::Constant, 2.0, 1);
  CHECK_NEAR(out.at(1, 0), 0.75 * 10 + 0.25 * 2, 1e-6);
  CHECK_NEAR(out.at(1, 1), 10.0, 1e-6);
  const double far[6] = {1, 0, 100, 0, 1, 0};
  auto all_fill = warp(src, 4, 4, far, Interpolation::Linear, Border::Constant, 2.0, 1);
  for (float v : all_fill.px) CHECK(v == 2.0f);
  // Same through the general path (rotation by 180 degrees about the centre, then shifted).
  const double g[6] = {-1, 1e-9, 3.25, 1e-9, -1, 3};
  auto gen = warp(src, 4, 4, g, Interpolation::Linear, Border::Constant, 2.0, 1);
  CHECK_NEAR(gen.at(1, 0), 0.75 * 10 + 0.25 * 2, 1e-5);  // x' = 3.25 at x = 0
}

TEST_CASE(replicate_border_clamps) {
  Image<float> src(3, 3);
  for (int y = 0; y < 3; ++y)
    for (int x = 0; x < 3; ++x) src.at(y, x) = float(10 * y + x);
  const double m[6] = {1, 0, -5.5, 0, 1, 7.25};  // far left, far below
  auto out = warp(src, 3, 3, m, Interpolation::Linear, Border::Replicate, 0, 1);
  CHECK(out.at(0, 0) == src.at(2, 0));
  const double g[6] = {0.9, 0.1, -4, -0.1, 0.9, 0};
  auto gen = warp(src, 3, 3, g, Interpolation::Linear, Border::Replicate, 0, 1);
  for (float v : gen.px) CHECK(v >= 0.0f && v <= 22.0f);
  CHECK(gen.at(0, 0) == src.at(0, 0));  // (x', y') = (-4, 0) clamps to (0, 0)
}

TEST_CASE(integer_outputs_round_and_saturate) {
  Image<std::uint8_t> src(2, 2);
  src.at(0, 0) = 0;
  src.at(0, 1) = 255;
  src.at(1, 0) = 0;
  src.at(1, 1) = 255;
  const double half[6] = {1, 0, 0.5, 0, 1, 0};  // midway: 127.5 rounds half up to 128
  auto out = warp(src, 2, 1, half, Interpolation::Linear, Border::Constant, 0, 1);
  CHECK(out.at(0, 0) == 128);
  // fill saturates: 300 -> 255, -5 -> 0, +inf -> 255
  const double far[6] = {1, 0, 50, 0, 1, 0};
  CHECK(warp(src, 2, 2, far, Interpolation::Linear, Border::Constant, 300, 1).px[0] == 255);
  CHECK(warp(src, 2, 2, far, Interpolation::Nearest, Border::Constant, -5, 1).px[0] == 0);
  CHECK(warp(src, 2, 2, far, Interpolation::Nearest, Border::Constant,
             std::numeric_limits<double>::infinity(), 1)
            .px[0] == 255);
  Image<std::uint16_t> s16(1, 1, 1000);
  CHECK(warp(s16, 1, 1, far, Interpolation::Linear, Border::Constant, 1e9, 1).px[0] == 65535);
}

TEST_CASE(nearest_never_blends_and_rounds_half_up) {
  auto labels = random_image<std::uint16_t>(30, 30, 5, 4);
  std::set<std::uint16_t> present(labels.px.begin(), labels.px.end());
  const double m[6] = {0.93, 0.21, 1.7, -0.19, 1.04, -2.3};
  auto out = warp(labels, 33, 29, m, Interpolation::Nearest, Border::Constant, 4000, 2);
  for (auto v : out.px) CHECK(v == 4000 || present.count(v) == 1);
  Image<float> src(1, 3);
  src.at(0, 0) = 1;
  src.at(0, 1) = 2;
  src.at(0, 2) = 3;
  const double tie[6] = {1, 0, 0.5, 0, 1, 0};  // x' = 0.5 -> pixel 1, 1.5 -> pixel 2
  auto t = warp(src, 1, 2, tie, Interpolation::Nearest, Border::Constant, 0, 1);
  CHECK(t.at(0, 0) == 2.0f);
  CHECK(t.at(0, 1) == 3.0f);
}

TEST_CASE(threads_give_identical_output) {
  auto u8 = random_image<std::uint8_t>(301, 517, 255, 5);
  auto f32 = random_image<float>(301, 517, 1, 6);
  const double general[6] = {0.98, -0.05, 3.3, 0.06, 1.01, -4.1};
  const double axis[6] = {1.1, 0, 3.3, 0, 0.95, -4.1};
  for (const double* m : {general, axis}) {
    for (auto i : {Interpolation::Linear, Interpolation::Nearest}) {
      for (auto b : {Border::Constant, Border::Replicate}) {
        const auto a1 = warp(u8, 400, 600, m, i, b, 3, 1).px;
        CHECK(warp(u8, 400, 600, m, i, b, 3, 2).px == a1);
        CHECK(warp(u8, 400, 600, m, i, b, 3, 7).px == a1);
        const auto f1 = warp(f32, 400, 600, m, i, b, 3, 1).px;
        CHECK(warp(f32, 400, 600, m, i, b, 3, 3).px == f1);
      }
    }
  }
}

TEST_CASE(bad_arguments_throw) {
  Image<float> src(4, 4), dst(4, 4);
  const double ok[6] = {1, 0, 0, 0, 1, 0};
  const double nan[6] = {1, 0, std::nan(""), 0, 1, 0};
  const double inf[6] = {1, 0, 0, 0, std::numeric_limits<double>::infinity(), 0};
  auto I = Interpolation::Linear;
  auto B = Border::Constant;
  CHECK_THROWS(warp_affine<float>(src.cview(), dst.view(), nan, I, B, 0, 1), std::invalid_argument);
  CHECK_THROWS(warp_affine<float>(src.cview(), dst.view(), inf, I, B, 0, 1), std::invalid_argument);
  ImageView<const float> empty{src.px.data(), 0, 4, 4};
  CHECK_THROWS(warp_affine<float>(empty, dst.view(), ok, I, B, 0, 1), std::invalid_argument);
  ImageView<float> bad_stride{dst.px.data(), 4, 4, 3};
  CHECK_THROWS(warp_affine<float>(src.cview(), bad_stride, ok, I, B, 0, 1), std::invalid_argument);
  CHECK_THROWS(warp_affine<float>(src.cview(), dst.view(), ok, I, B, 0, -1), std::invalid_argument);
  CHECK_THROWS(warp_affine<float>(src.cview(), dst.view(), ok, static_cast<Interpolation>(7), B,
                                  0, 1),
               std::invalid_argument);
  CHECK_THROWS(warp_affine<float>(src.cview(), dst.view(), ok, I, static_cast<Border>(5), 0, 1),
               std::invalid_argument);
  ImageView<float> alias{src.px.data(), 4, 4, 4};
  CHECK_THROWS(warp_affine<float>(src.cview(), alias, ok, I, B, 0, 1), std::invalid_argument);
  Image<std::uint8_t> s8(4, 4), d8(4, 4);
  CHECK_THROWS(warp_affine<std::uint8_t>(s8.cview(), d8.view(), ok, I, B, std::nan(""), 1),
               std::invalid_argument);
  // NaN fill is fine for float images.
  warp_affine<float>(src.cview(), dst.view(), ok, I, B, std::nan(""), 1);
  CHECK(dst.px[0] == 0.0f);
}

// The AVX-512 and AVX2 kernels (where the CPU has them) must give exactly the portable kernels'
// output:
// random images and affines (rotations, shears, flips, scales), odd sizes so that blocks end
// in partial vectors, maps that leave the source (constant and replicate borders), and a
// source view with a stride larger than its width.
TEST_CASE(simd_kernels_match_portable_kernels) {
  std::mt19937 gen(11);
  std::uniform_real_distribution<double> ang(-0.6, 0.6), sc(0.6, 1.6), sh(-0.2, 0.2),
      tr(-30.0, 30.0);
  auto compare = [&](auto tag, const double m[6], Border b, std::int64_t sh_, std::int64_t sw,
                     std::int64_t dh, std::int64_t dw, unsigned seed) {
    using T = decltype(tag);
    const std::int64_t stride = sw + 5;
    Image<T> buf = random_image<T>(sh_, stride, 255.0, seed);
    const ImageView<const T> src{buf.px.data(), sh_, sw, stride};
    Image<T> simd(dh, dw), avx2(dh, dw), portable(dh, dw);
    warp_affine<T>(src, simd.view(), m, Interpolation::Linear, b, 17.0, 1);
    deepalign::detail::force_no_avx512() = true;  // the AVX2 kernels where AVX-512 ones exist
    warp_affine<T>(src, avx2.view(), m, Interpolation::Linear, b, 17.0, 1);
    deepalign::detail::force_no_avx512() = false;
    deepalign::detail::force_portable_kernels() = true;
    warp_affine<T>(src, portable.view(), m, Interpolation::Linear, b, 17.0, 1);
    deepalign::detail::force_portable_kernels() = false;
    CHECK(simd.px == portable.px);
    CHECK(avx2.px == portable.px);
  };
  for (int trial = 0; trial < 24; ++trial) {
    const double th = ang(gen), s = sc(gen), flip = (trial % 5 == 4) ? -1.0 : 1.0;
    const double m[6] = {flip * s * std::cos(th), -s * std::sin(th) + sh(gen), tr(gen),
                         s * std::sin(th), s * std::cos(th), tr(gen)};
    const Border b = (trial % 2) ? Border::Replicate : Border::Constant;
    const std::int64_t sh_ = 40 + trial * 3, sw = 37 + trial * 5;
    const std::int64_t dh = 33 + trial, dw = 45 + trial * 7;
    compare(std::uint8_t{}, m, b, sh_, sw, dh, dw, 100u + trial);
    compare(std::uint16_t{}, m, b, sh_, sw, dh, dw, 200u + trial);
    compare(float{}, m, b, sh_, sw, dh, dw, 300u + trial);
  }
  // Translations (separable path), sub-pixel and integer, partly outside the source; the
  // saturating rounding of uint8 is exercised by the random data near 0 and 255.
  for (int trial = 0; trial < 12; ++trial) {
    const double tx = tr(gen) * (trial % 3 == 0 ? 0.1 : 1.0), ty = tr(gen) * 0.5;
    const double m[6] = {1.0, 0.0, trial == 5 ? 3.0 : tx, 0.0, 1.0, ty};
    const Border b = (trial % 2) ? Border::Replicate : Border::Constant;
    compare(std::uint8_t{}, m, b, 41 + trial, 29 + 13 * trial, 37, 23 + 11 * trial, 400u + trial);
    compare(float{}, m, b, 41 + trial, 29 + 13 * trial, 37, 23 + 11 * trial, 500u + trial);
  }
  // Near-identity (the EM case) on a larger image, in all four directions of the monotone
  // window placement (a < 0 and/or c < 0), and a steep map that does not fit the windows.
  const double near[6] = {1.0001, -0.026, 3.3, 0.026, 1.0001, -2.7};
  compare(std::uint8_t{}, near, Border::Constant, 300, 301, 299, 333, 7);
  compare(float{}, near, Border::Constant, 300, 301, 299, 333, 8);
  const double flip_x[6] = {-1.0001, -0.026, 310.3, 0.026, 1.0001, -2.7};
  const double flip_y[6] = {1.0001, 0.026, 3.3, -0.026, -1.0001, 297.7};
  const double flip_xy[6] = {-1.0001, 0.026, 310.3, -0.026, -1.0001, 297.7};
  const double steep[6] = {3.7, 0.4, 5.0, 1.9, 0.3, 2.0};
  for (const double* mm : {flip_x, flip_y, flip_xy, steep}) {
    compare(std::uint8_t{}, mm, Border::Constant, 300, 301, 299, 333, 9);
    compare(std::uint8_t{}, mm, Border::Replicate, 300, 301, 299, 333, 10);
  }
}
