#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "check.hpp"
#include "image_fixture.hpp"
#include "deepalign/block_sums.hpp"
#include "deepalign/sampling.hpp"  // force_portable_kernels

using deepalign::lk_block_sums;
using test_fixture::Image;
using test_fixture::random_image;

namespace {

struct Case {
  Image<float> ref, mov, gx, gy;
  std::vector<std::int64_t> x0, y0;
};

// Images of signed values (the locally normalised slices and their gradients) and every block
// of side `block` on a grid of `step`, plus one at the far corner.
Case make_case(std::int64_t h, std::int64_t w, std::int64_t block, std::int64_t step) {
  Case c{random_image<float>(h, w, 4.0, 1), random_image<float>(h, w, 4.0, 2),
         random_image<float>(h, w, 2.0, 3), random_image<float>(h, w, 2.0, 4), {}, {}};
  for (auto* img : {&c.ref, &c.mov, &c.gx, &c.gy})
    for (auto& v : img->px) v -= 1.5f;
  for (std::int64_t y = 0; y + block <= h; y += step)
    for (std::int64_t x = 0; x + block <= w; x += step) {
      c.x0.push_back(x);
      c.y0.push_back(y);
    }
  c.x0.push_back(w - block);
  c.y0.push_back(h - block);
  return c;
}

std::vector<double> run(const Case& c, std::int64_t block, int threads) {
  std::vector<double> out(4 * c.x0.size());
  lk_block_sums(c.ref.cview(), c.mov.cview(), c.gx.cview(), c.gy.cview(), c.x0.data(),
                c.y0.data(), static_cast<std::int64_t>(c.x0.size()), block, out.data(), threads);
  return out;
}

}  // namespace

TEST_CASE(sums_match_a_float64_reference) {
  // Block sizes with and without a tail past the last group of 8 columns.
  for (std::int64_t block : {1, 5, 8, 13, 24, 32}) {
    Case c = make_case(61, 83, block, 7);
    const auto out = run(c, block, 1);
    for (std::size_t i = 0; i < c.x0.size(); ++i) {
      double ref[4] = {0, 0, 0, 0}, mag[4] = {0, 0, 0, 0};
      for (std::int64_t y = c.y0[i]; y < c.y0[i] + block; ++y) {
        for (std::int64_t x = c.x0[i]; x < c.x0[i] + block; ++x) {
          const double r = c.ref.at(y, x), m = c.mov.at(y, x);
          const double p[4] = {c.gx.at(y, x) * (r - m), c.gy.at(y, x) * (r - m), r * m, m * m};
          for (int k = 0; k < 4; ++k) {
            ref[k] += p[k];
            mag[k] += std::fabs(p[k]);
          }
        }
      }
      // float32 products and row lanes: a few float32 roundings of the block's magnitude
      for (int k = 0; k < 4; ++k) CHECK_NEAR(out[4 * i + k], ref[k], 1e-6 * (mag[k] + 1.0));
    }
  }
}

TEST_CASE(result_does_not_depend_on_threads_or_kernel) {
  Case c = make_case(200, 333, 24, 12);
  const auto one = run(c, 24, 1);
  CHECK(run(c, 24, 3) == one);
  CHECK(run(c, 24, 0) == one);
#if DEEPALIGN_X86_DISPATCH
  deepalign::detail::force_portable_kernels() = true;
  const auto portable = run(c, 24, 1);
  const auto portable_tail = run(c, 21, 1);
  deepalign::detail::force_portable_kernels() = false;
  CHECK(portable == one);  // the AVX2 kernel gives the portable kernel's bits
  CHECK(run(c, 21, 1) == portable_tail);
#endif
}

TEST_CASE(bad_arguments_are_rejected) {
  Case c = make_case(40, 50, 8, 8);
  std::vector<double> out(4);
  const std::int64_t inside = 0, past = 43, neg = -1;
  CHECK_THROWS(lk_block_sums(c.ref.cview(), c.mov.cview(), c.gx.cview(), c.gy.cview(), &past,
                             &inside, 1, 8, out.data(), 1),
               std::invalid_argument);  // beyond the right edge
  CHECK_THROWS(lk_block_sums(c.ref.cview(), c.mov.cview(), c.gx.cview(), c.gy.cview(), &inside,
                             &neg, 1, 8, out.data(), 1),
               std::invalid_argument);  // above the top
  CHECK_THROWS(lk_block_sums(c.ref.cview(), c.mov.cview(), c.gx.cview(), c.gy.cview(), &inside,
                             &inside, 1, 0, out.data(), 1),
               std::invalid_argument);  // empty block
  const std::int64_t huge = std::int64_t{1} << 62, far = huge + (std::int64_t{1} << 40);
  CHECK_THROWS(lk_block_sums(c.ref.cview(), c.mov.cview(), c.gx.cview(), c.gy.cview(), &far,
                             &far, 1, huge, out.data(), 1),
               std::invalid_argument);  // x0 + block would overflow
  const std::int64_t edge = INT64_MAX - 4;
  CHECK_THROWS(lk_block_sums(c.ref.cview(), c.mov.cview(), c.gx.cview(), c.gy.cview(), &edge,
                             &inside, 1, 8, out.data(), 1),
               std::invalid_argument);
  Image<float> small(39, 50);
  CHECK_THROWS(lk_block_sums(c.ref.cview(), small.cview(), c.gx.cview(), c.gy.cview(), &inside,
                             &inside, 1, 8, out.data(), 1),
               std::invalid_argument);  // sizes differ
  CHECK_THROWS(lk_block_sums(c.ref.cview(), c.mov.cview(), c.gx.cview(), c.gy.cview(), &inside,
                             &inside, 1, 8, out.data(), -1),
               std::invalid_argument);  // negative thread count
  lk_block_sums(c.ref.cview(), c.mov.cview(), c.gx.cview(), c.gy.cview(), &inside, &inside, 0,
                8, out.data(), 1);  // no blocks: nothing to do
}
