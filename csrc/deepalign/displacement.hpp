// Dense displacement fields: warping with a field (optionally followed by an affine),
// composing fields with fields and with affines, and the Jacobian determinant (folding).
//
// Conventions (image.hpp, warp.hpp): a point is (x, y) in pixels with the origin at the centre
// of the top-left pixel. A displacement field u is two (H, W) float32 planes, ux (dx) then uy
// (dy), in pixels. It is a PULL map, like every transform here: it maps output (reference)
// coordinates to input (moving) coordinates,
//
//     phi_u(p) = p + u(p)                    out(p) = src(phi_u(p)).
//
// An affine A (2x3 float64, [[a, b, tx], [c, d, ty]]) acts as A(x, y) = (a x + b y + tx,
// c x + d y + ty). Composition "f o g" means "apply g first": (f o g)(p) = f(g(p)). For pull
// maps this is the reverse of the order in which the warps are applied to an image: warping
// by g and then warping the result by f gives out(p) = src(g(f(p))), i.e. the pull map g o f.
//
// - warp_displacement(src, u, A):  out(p) = src(A(p + u(p)))   (pull map A o phi_u; A = identity
//   when null). A residual flow measured after an affine pre-alignment (flow on the output
//   grid, affine into the moving slice) is thus rendered in one pass with one interpolation.
// - compose_affine_displacement(A, u) = v with phi_v = A o phi_u:  v(p) = A(p + u(p)) - p.
//   warp_displacement(src, v) == warp_displacement(src, u, A) up to the float32 rounding of v.
// - compose_displacements(u1, u2) = v with phi_v = phi_u1 o phi_u2:
//   v(p) = u2(p) + u1(p + u2(p)), u1 sampled bilinearly (u1 may have another size than u2).
//   Warping by u1 and then warping the result by u2 equals one warp by v (with one
//   interpolation instead of two).
// - jacobian_determinant(u) = det(I + grad u) = (1 + dux/dx)(1 + duy/dy) - dux/dy * duy/dx,
//   derivatives by central differences inside and one-sided differences at the borders
//   (numpy.gradient, edge_order=1, unit spacing), evaluated in float64. det <= 0 means the
//   map folds there.
//
// Errors: std::invalid_argument for empty views, mismatched shapes, a stride smaller than the
// width, non-finite affine entries, unknown interpolation/border values, a NaN fill for an
// integer dtype, outputs overlapping inputs (except the documented in-place cases), fields
// smaller than 2 x 2 for the Jacobian, or a negative num_threads.
#pragma once

#include <cstdint>

#include "deepalign/image.hpp"

namespace deepalign {

// A displacement field as two planes of the same shape (dx, dy). From numpy (2, H, W):
// x = data, y = data + H * W.
template <class T>
struct FieldView {
  ImageView<T> x;
  ImageView<T> y;
};

// out(p) = src(A(p + u(p))) for every pixel p of dst; u must have dst's shape. `affine` is a
// 2x3 row-major matrix or nullptr (identity). Interpolation, border, fill, precision and
// rounding are exactly those of warp_affine (warp.hpp); a pixel whose displacement is NaN or
// infinite gets `fill` whatever the border. Rows are split over `num_threads` threads (0 = all
// cores); the result does not depend on the thread count. No temporaries beyond a few
// 64-pixel blocks per thread.
template <class T>
void warp_displacement(const ImageView<const T>& src, const ImageView<T>& dst,
                       const FieldView<const float>& u, const double* affine, Interpolation interp,
                       Border border, double fill, int num_threads);

// v(p) = A(p + u(p)) - p (see above). `v` may be `u` itself (in place); any other overlap is
// an error.
void compose_affine_displacement(const double affine[6], const FieldView<const float>& u,
                                 const FieldView<float>& v, int num_threads);

// v(p) = u2(p) + u1(p + u2(p)) (see above); u1 is sampled bilinearly with `border`:
// Replicate extends u1 by its edge values, Constant treats u1 as 0 (identity) outside, with
// taps outside contributing 0. Where p + u2(p) is not finite, v(p) is NaN. `v` may be `u2`
// itself (in place) but must not overlap `u1`.
void compose_displacements(const FieldView<const float>& u1, const FieldView<const float>& u2,
                           const FieldView<float>& v, Border border, int num_threads);

// det(I + grad u) per pixel (see above) into `det` (u's shape), rounded once to T.
template <class T>
void jacobian_determinant(const FieldView<const T>& u, const ImageView<T>& det, int num_threads);

struct JacobianCount {
  std::int64_t nonpositive = 0;  // pixels (inside the mask) with det <= 0 (NaN is not counted)
  std::int64_t total = 0;        // pixels considered (inside the mask)
};

// Counts det(I + grad u) <= 0 (evaluated in float64, as jacobian_determinant) without
// materialising the determinant map: one row buffer per thread. `mask` (u's shape, or
// nullptr for all pixels) selects the pixels whose byte is non-zero (numpy bool or uint8).
template <class T>
JacobianCount nonpositive_jacobian_count(const FieldView<const T>& u,
                                         const ImageView<const std::uint8_t>* mask,
                                         int num_threads);

extern template void warp_displacement<std::uint8_t>(const ImageView<const std::uint8_t>&,
                                                     const ImageView<std::uint8_t>&,
                                                     const FieldView<const float>&, const double*,
                                                     Interpolation, Border, double, int);
extern template void warp_displacement<std::uint16_t>(const ImageView<const std::uint16_t>&,
                                                      const ImageView<std::uint16_t>&,
                                                      const FieldView<const float>&, const double*,
                                                      Interpolation, Border, double, int);
extern template void warp_displacement<float>(const ImageView<const float>&,
                                              const ImageView<float>&,
                                              const FieldView<const float>&, const double*,
                                              Interpolation, Border, double, int);
extern template void jacobian_determinant<float>(const FieldView<const float>&,
                                                 const ImageView<float>&, int);
extern template void jacobian_determinant<double>(const FieldView<const double>&,
                                                  const ImageView<double>&, int);
extern template JacobianCount nonpositive_jacobian_count<float>(
    const FieldView<const float>&, const ImageView<const std::uint8_t>*, int);
extern template JacobianCount nonpositive_jacobian_count<double>(
    const FieldView<const double>&, const ImageView<const std::uint8_t>*, int);

}  // namespace deepalign
