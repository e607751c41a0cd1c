// Affine warping of a 2D image (one slice of a stack).
//
// Conventions (image.hpp): a point is (x, y) in pixels with the origin at the centre of the
// top-left pixel, so pixel centres sit at integer coordinates. The matrix is the PULL map
// from output (reference) to input (moving) coordinates:
//
//     x' = m[0] * x + m[1] * y + m[2]
//     y' = m[3] * x + m[4] * y + m[5]        dst(y, x) = src(y', x')
//
// Interpolation
// - Linear: bilinear over the 4 pixels around (x', y'). With Border::Constant, taps that fall
//   outside the source contribute `fill` (exactly like cv2.warpAffine with BORDER_CONSTANT and
//   scipy.ndimage.map_coordinates with mode="grid-constant"); a tap whose weight is exactly 0 is
//   never read, so an identity or integer-shift warp reproduces pixels exactly at the edges too.
//   With Border::Replicate the coordinates are clamped to the image (mode="nearest").
// - Nearest: the pixel floor(x' + 0.5), floor(y' + 0.5) (round half UP: an exact tie goes to
//   the larger index). Values are copied, never blended, so it is safe for label images.
//
// Precision: source coordinates are computed in float64 per pixel (OpenCV up to 5.0 rounded
// them to 1/32 pixel). Bilinear weights are float32 for float32/uint16 images; uint8 images
// round the position to 1/2048 pixel (11-bit fixed-point weights) and blend with exact
// integer arithmetic. Tests bound the error against the exact float64 bilinear value.
// Integer outputs are rounded to nearest and saturated to the dtype; `fill` is saturated
// (and rounded) to the dtype as well.
//
// Errors: std::invalid_argument for empty images, non-finite matrix entries, a NaN fill for an
// integer dtype, overlapping src/dst buffers, a stride smaller than the width, a negative
// num_threads, or an unknown interpolation/border value.
#pragma once

#include <cstdint>

#include "deepalign/image.hpp"

namespace deepalign {

// Warps `src` into every pixel of `dst` (dst's size is the output size). Rows of dst are split
// over `num_threads` threads (0 = all cores); the result does not depend on the thread count.
template <class T>
void warp_affine(const ImageView<const T>& src, const ImageView<T>& dst, const double matrix[6],
                 Interpolation interp, Border border, double fill, int num_threads);

extern template void warp_affine<std::uint8_t>(const ImageView<const std::uint8_t>&,
                                               const ImageView<std::uint8_t>&, const double[6],
                                               Interpolation, Border, double, int);
extern template void warp_affine<std::uint16_t>(const ImageView<const std::uint16_t>&,
                                                const ImageView<std::uint16_t>&, const double[6],
                                                Interpolation, Border, double, int);
extern template void warp_affine<float>(const ImageView<const float>&, const ImageView<float>&,
                                        const double[6], Interpolation, Border, double, int);

}  // namespace deepalign
