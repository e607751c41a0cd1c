#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <stdexcept>
#include <vector>

#include "check.hpp"
#include "image_fixture.hpp"
#include "deepalign/displacement.hpp"
#include "deepalign/sampling.hpp"
#include "deepalign/warp.hpp"

using deepalign::Border;
using deepalign::FieldView;
using deepalign::ImageView;
using deepalign::Interpolation;

namespace {

using test_fixture::Image;
using test_fixture::random_image;

template <class T>
struct Field {
  Image<T> x, y;
  Field(std::int64_t h, std::int64_t w, T vx = T(0), T vy = T(0)) : x(h, w, vx), y(h, w, vy) {}
  FieldView<const T> cview() const { return {x.cview(), y.cview()}; }
  FieldView<T> view() { return {x.view(), y.view()}; }
};

Field<float> random_field(std::int64_t h, std::int64_t w, double amp, unsigned seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<double> u(-amp, amp);
  Field<float> f(h, w);
  for (auto& v : f.x.px) v = static_cast<float>(u(gen));
  for (auto& v : f.y.px) v = static_cast<float>(u(gen));
  return f;
}

template <class T>
Image<T> warp(const Image<T>& src, const Field<float>& u, const double* affine, Interpolation i,
              Border b, double fill, int threads) {
  Image<T> dst(u.x.h, u.x.w);
  deepalign::warp_displacement<T>(src.cview(), dst.view(), u.cview(), affine, i, b, fill,
                                  threads);
  return dst;
}

}  // namespace

TEST_CASE(zero_field_is_identity_exact) {
  auto u8 = random_image<std::uint8_t>(37, 203, 255, 1);
  auto u16 = random_image<std::uint16_t>(37, 203, 65535, 2);
  auto f32 = random_image<float>(37, 203, 1000, 3);
  const Field<float> zero(37, 203);
  for (auto b : {Border::Constant, Border::Replicate}) {
    for (auto i : {Interpolation::Linear, Interpolation::Nearest}) {
      CHECK(warp(u8, zero, nullptr, i, b, 7, 1).px == u8.px);
      CHECK(warp(u16, zero, nullptr, i, b, 7, 2).px == u16.px);
      CHECK(warp(f32, zero, nullptr, i, b, 7, 3).px == f32.px);
    }
  }
}

TEST_CASE(constant_integer_field_is_exact_shift) {
  auto img = random_image<std::uint8_t>(41, 150, 255, 4);
  auto f32 = random_image<float>(41, 150, 1.0, 5);
  for (int dx : {-3, 0, 5}) {
    for (int dy : {-2, 4}) {
      const Field<float> u(41, 150, static_cast<float>(dx), static_cast<float>(dy));
      for (auto i : {Interpolation::Linear, Interpolation::Nearest}) {
        auto out = warp(img, u, nullptr, i, Border::Constant, 9, 2);
        auto outf = warp(f32, u, nullptr, i, Border::Replicate, 9, 1);
        bool ok = true, okf = true;
        for (std::int64_t y = 0; y < 41; ++y) {
          for (std::int64_t x = 0; x < 150; ++x) {
            const std::int64_t sx = x + dx, sy = y + dy;
            const bool in = sx >= 0 && sx < 150 && sy >= 0 && sy < 41;
            ok &= out.at(y, x) == (in ? img.at(sy, sx) : 9);
            const std::int64_t cx = std::min<std::int64_t>(std::max<std::int64_t>(sx, 0), 149);
            const std::int64_t cy = std::min<std::int64_t>(std::max<std::int64_t>(sy, 0), 40);
            okf &= outf.at(y, x) == f32.at(cy, cx);
          }
        }
        CHECK(ok);
        CHECK(okf);
      }
    }
  }
}

TEST_CASE(threads_give_identical_results) {
  auto img = random_image<std::uint8_t>(300, 257, 255, 6);
  auto f32 = random_image<float>(300, 257, 1.0, 7);
  const Field<float> u = random_field(300, 257, 6.0, 8);
  const double a[6] = {1.01, 0.02, -3.5, -0.015, 0.99, 2.25};
  for (auto i : {Interpolation::Linear, Interpolation::Nearest}) {
    for (auto b : {Border::Constant, Border::Replicate}) {
      const auto r1 = warp(img, u, a, i, b, 3, 1);
      CHECK(warp(img, u, a, i, b, 3, 2).px == r1.px);
      CHECK(warp(img, u, a, i, b, 3, 5).px == r1.px);
      CHECK(warp(f32, u, nullptr, i, b, 0.5, 1).px == warp(f32, u, nullptr, i, b, 0.5, 3).px);
    }
  }
}

TEST_CASE(zero_field_with_affine_matches_warp_affine) {
  auto f32 = random_image<float>(64, 90, 1.0, 9);
  const Field<float> zero(50, 70);
  const double a[6] = {0.98, 0.05, 4.25, -0.04, 1.02, -3.5};
  const auto out = warp(f32, zero, a, Interpolation::Linear, Border::Constant, 0.25, 1);
  Image<float> ref(50, 70);
  deepalign::warp_affine<float>(f32.cview(), ref.view(), a, Interpolation::Linear,
                                Border::Constant, 0.25, 1);
  double worst = 0.0;
  for (std::size_t k = 0; k < out.px.size(); ++k) {
    worst = std::max(worst, std::fabs(double(out.px[k]) - double(ref.px[k])));
  }
  CHECK_NEAR(worst, 0.0, 1e-6);
}

TEST_CASE(nonfinite_displacement_gives_fill) {
  auto img = random_image<std::uint8_t>(20, 80, 255, 10);
  Field<float> u(20, 80);
  u.x.at(3, 5) = std::numeric_limits<float>::quiet_NaN();
  u.y.at(7, 70) = std::numeric_limits<float>::infinity();
  for (auto i : {Interpolation::Linear, Interpolation::Nearest}) {
    for (auto b : {Border::Constant, Border::Replicate}) {
      auto out = warp(img, u, nullptr, i, b, 42, 1);
      CHECK(out.at(3, 5) == 42);
      CHECK(out.at(7, 70) == 42);
      CHECK(out.at(3, 6) == img.at(3, 6));
    }
  }
}

TEST_CASE(compose_affine_in_place_and_values) {
  Field<float> u = random_field(9, 13, 2.0, 11);
  const Field<float> orig = u;
  const double a[6] = {1.1, 0.2, -1.0, -0.1, 0.9, 2.0};
  deepalign::compose_affine_displacement(a, u.cview(), u.view(), 2);
  for (std::int64_t y = 0; y < 9; ++y) {
    for (std::int64_t x = 0; x < 13; ++x) {
      const double qx = x + double(orig.x.px[std::size_t(y * 13 + x)]);
      const double qy = y + double(orig.y.px[std::size_t(y * 13 + x)]);
      CHECK_NEAR(u.x.at(y, x), a[0] * qx + a[1] * qy + a[2] - x, 1e-5);
      CHECK_NEAR(u.y.at(y, x), a[3] * qx + a[4] * qy + a[5] - y, 1e-5);
    }
  }
}

TEST_CASE(compose_displacements_constant_fields_add) {
  const Field<float> u1(10, 12, 1.5f, -0.5f), u2(10, 12, -2.0f, 3.0f);
  Field<float> v(10, 12);
  deepalign::compose_displacements(u1.cview(), u2.cview(), v.view(), Border::Replicate, 1);
  for (float x : v.x.px) CHECK(x == -0.5f);
  for (float y : v.y.px) CHECK(y == 2.5f);
}

TEST_CASE(jacobian_of_affine_field_is_its_determinant) {
  Field<double> u(12, 17);
  for (std::int64_t y = 0; y < 12; ++y) {
    for (std::int64_t x = 0; x < 17; ++x) {
      u.x.at(y, x) = 0.2 * x + 0.3 * y + 5;  // A = [[1.2, 0.3], [-0.1, 0.8]]
      u.y.at(y, x) = -0.1 * x - 0.2 * y - 2;
    }
  }
  Image<double> det(12, 17);
  deepalign::jacobian_determinant<double>(u.cview(), det.view(), 2);
  for (double d : det.px) CHECK_NEAR(d, 1.2 * 0.8 + 0.3 * 0.1, 1e-12);
  const auto c = deepalign::nonpositive_jacobian_count<double>(u.cview(), nullptr, 1);
  CHECK(c.nonpositive == 0);
  CHECK(c.total == 12 * 17);
}

TEST_CASE(nonpositive_count_with_mask_matches_map) {
  Field<float> u = random_field(40, 33, 1.5, 12);
  Image<float> det(40, 33);
  deepalign::jacobian_determinant<float>(u.cview(), det.view(), 1);
  Image<std::uint8_t> mask(40, 33);
  std::int64_t np = 0, tot = 0, np_all = 0;
  for (std::size_t k = 0; k < mask.px.size(); ++k) {
    mask.px[k] = static_cast<std::uint8_t>(k % 3 == 0);
    np_all += det.px[k] <= 0.0f;
    if (mask.px[k]) {
      ++tot;
      np += det.px[k] <= 0.0f;
    }
  }
  CHECK(np_all > 0);
  const auto mv = mask.cview();
  for (int t : {1, 2, 4}) {
    const auto c = deepalign::nonpositive_jacobian_count<float>(u.cview(), &mv, t);
    CHECK(c.nonpositive == np);
    CHECK(c.total == tot);
    CHECK(deepalign::nonpositive_jacobian_count<float>(u.cview(), nullptr, t).nonpositive ==
          np_all);
  }
}

TEST_CASE(bad_arguments_throw) {
  auto img = random_image<float>(10, 10, 1.0, 13);
  Image<float> dst(10, 10), small(5, 10);
  const Field<float> u(10, 10);
  const double bad[6] = {1, 0, std::nan(""), 0, 1, 0};
  using deepalign::warp_displacement;
  CHECK_THROWS(warp_displacement<float>(img.cview(), small.view(), u.cview(), nullptr,
                                        Interpolation::Linear, Border::Constant, 0, 1),
               std::invalid_argument);
  CHECK_THROWS(warp_displacement<float>(img.cview(), dst.view(), u.cview(), bad,
                                        Interpolation::Linear, Border::Constant, 0, 1),
               std::invalid_argument);
  CHECK_THROWS(warp_displacement<float>(img.cview(), dst.view(), u.cview(), nullptr,
                                        static_cast<Interpolation>(7), Border::Constant, 0, 1),
               std::invalid_argument);
  CHECK_THROWS(warp_displacement<float>(img.cview(), dst.view(), u.cview(), nullptr,
                                        Interpolation::Linear, static_cast<Border>(3), 0, 1),
               std::invalid_argument);
  CHECK_THROWS(warp_displacement<float>(img.cview(), dst.view(), u.cview(), nullptr,
                                        Interpolation::Linear, Border::Constant, 0, -1),
               std::invalid_argument);
  CHECK_THROWS(warp_displacement<float>(img.cview(), img.view(), u.cview(), nullptr,
                                        Interpolation::Linear, Border::Constant, 0, 1),
               std::invalid_argument);  // dst == src
  Image<std::uint8_t> u8(10, 10), u8d(10, 10);
  CHECK_THROWS(warp_displacement<std::uint8_t>(u8.cview(), u8d.view(), u.cview(), nullptr,
                                               Interpolation::Linear, Border::Constant,
                                               std::nan(""), 1),
               std::invalid_argument);
  Field<double> tiny(1, 5);
  Image<double> tdet(1, 5);
  CHECK_THROWS(deepalign::jacobian_determinant<double>(tiny.cview(), tdet.view(), 1),
               std::invalid_argument);
  Field<float> v(10, 10);
  Field<float> u2(10, 10);
  // Output overlapping u1 (= first) is rejected; in place on u2 is allowed.
  CHECK_THROWS(deepalign::compose_displacements(v.cview(), u2.cview(), v.view(),
                                                Border::Replicate, 1),
               std::invalid_argument);
  deepalign::compose_displacements(u.cview(), u2.cview(), u2.view(), Border::Replicate, 1);
  const double ok[6] = {1, 0, 0, 0, 1, 0};
  CHECK_THROWS(deepalign::compose_affine_displacement(bad, u.cview(), v.view(), 1),
               std::invalid_argument);
  // Swapped planes (v.x aliasing u.y) are not "in place".
  FieldView<float> swapped{v.y.view(), v.x.view()};
  CHECK_THROWS(deepalign::compose_affine_displacement(ok, v.cview(), swapped, 1),
               std::invalid_argument);
}

// The AVX2 kernels (where the CPU has them) must give exactly the portable kernels' output:
// random fields large enough to leave the source (both borders, blocks that mix inside and
// outside pixels), NaN displacements, with and without an affine, odd widths.
TEST_CASE(simd_kernels_match_portable_kernels) {
  const double rot[6] = {0.99, -0.05, 2.5, 0.06, 1.01, -1.5};
  const double ident[6] = {1.0, 0.0, 0.0, 0.0, 1.0, 0.0};
  for (int trial = 0; trial < 12; ++trial) {
    const std::int64_t h = 31 + 4 * trial, w = 67 + 9 * trial;
    Field<float> u = random_field(h, w, trial % 3 == 0 ? 0.9 : 6.0, 40u + trial);
    if (trial % 4 == 1) u.x.at(h / 2, w / 3) = std::numeric_limits<float>::quiet_NaN();
    const double* affine = trial % 3 == 2 ? rot : (trial % 3 == 1 ? ident : nullptr);
    const Border b = trial % 2 ? Border::Replicate : Border::Constant;
    auto u8 = random_image<std::uint8_t>(h + 3, w - 2, 255, 50u + trial);
    auto u16 = random_image<std::uint16_t>(h + 3, w - 2, 65535, 60u + trial);
    auto f32 = random_image<float>(h + 3, w - 2, 1000, 70u + trial);
    const auto s8 = warp(u8, u, affine, Interpolation::Linear, b, 9, 1);
    const auto s16 = warp(u16, u, affine, Interpolation::Linear, b, 9, 1);
    const auto s32 = warp(f32, u, affine, Interpolation::Linear, b, 9, 1);
    deepalign::detail::force_portable_kernels() = true;
    CHECK(warp(u8, u, affine, Interpolation::Linear, b, 9, 1).px == s8.px);
    CHECK(warp(u16, u, affine, Interpolation::Linear, b, 9, 1).px == s16.px);
    CHECK(warp(f32, u, affine, Interpolation::Linear, b, 9, 1).px == s32.px);
    deepalign::detail::force_portable_kernels() = false;
  }
}
