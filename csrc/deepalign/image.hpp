// Non-owning image views and the options shared by the warp kernels.
//
// Conventions (see README "Conventions"): arrays are row-major (y, x); a point is (x, y) in
// pixels with the origin at the centre of the top-left pixel; a transform maps OUTPUT
// (reference) coordinates to INPUT (moving) coordinates.
#pragma once

#include <cstddef>
#include <cstdint>

namespace deepalign {

// A 2D image the core reads or writes but never owns (the memory belongs to numpy, or to the
// caller in C++). `stride` is in elements, so a view can address a crop of a larger buffer.
template <class T>
struct ImageView {
  T* data = nullptr;
  std::int64_t height = 0;
  std::int64_t width = 0;
  std::int64_t stride = 0;  // elements between the starts of two rows

  T* row(std::int64_t y) const { return data + y * stride; }
};

enum class Interpolation { Nearest = 0, Linear = 1 };
enum class Border { Constant = 0, Replicate = 1 };

}  // namespace deepalign
