// Owning test images over the core's non-owning ImageView, shared by the warp tests.
#pragma once

#include <cstddef>
#include <cstdint>
#include <random>
#include <vector>

#include "deepalign/image.hpp"

namespace test_fixture {

template <class T>
struct Image {
  std::int64_t h, w;
  std::vector<T> px;
  Image(std::int64_t h_, std::int64_t w_, T v = T(0)) : h(h_), w(w_), px(std::size_t(h_ * w_), v) {}
  deepalign::ImageView<const T> cview() const { return {px.data(), h, w, w}; }
  deepalign::ImageView<T> view() { return {px.data(), h, w, w}; }
  T& at(std::int64_t y, std::int64_t x) { return px[std::size_t(y * w + x)]; }
};

// Uniform random pixels in [0, hi), reproducible for a seed.
template <class T>
Image<T> random_image(std::int64_t h, std::int64_t w, double hi, unsigned seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<double> u(0.0, hi);
  Image<T> img(h, w);
  for (auto& v : img.px) v = static_cast<T>(u(gen));
  return img;
}

}  // namespace test_fixture
