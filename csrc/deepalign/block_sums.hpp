// Block sums of the block-wise Lucas-Kanade refinement (python/deepalign_fast/match/blocks.py).
//
// One pass of the refinement needs, for every block of a grid over the reference slice, four
// sums over the block's pixels p:
//
//     out[i][0] = sum gx(p) * (ref(p) - mov(p))      (the Gauss-Newton right-hand side, x)
//     out[i][1] = sum gy(p) * (ref(p) - mov(p))      (the same, y)
//     out[i][2] = sum ref(p) * mov(p)                (the block's correlation: numerator)
//     out[i][3] = sum mov(p) * mov(p)                (and the moving block's energy)
//
// with `mov` the moving slice warped by the current estimate and `gx`, `gy` the reference's
// gradients. Done with numpy and OpenCV this is five full-image products and four float64
// integral images per pass; here every block reads its pixels once, in one pass over the
// blocks, with no temporary image.
//
// Block i covers columns x0[i] .. x0[i] + block - 1 and rows y0[i] .. y0[i] + block - 1, which
// must lie inside the images. Products are float32 (as numpy's on float32 images); each row of a
// block is summed in float32 over 8 independent lanes and the rows are added in float64, so a
// sum differs from the float64 sum of the float32 products by a few float32 roundings of a row
// sum (tests bound it against a float64 reference). Blocks are split over `num_threads`
// threads (0 = all cores); the result does not depend on the thread count.
//
// Errors: std::invalid_argument for images of different sizes, a stride smaller than the width,
// a block size below 1, a block outside the images, or a negative num_threads.
#pragma once

#include <cstdint>

#include "deepalign/image.hpp"

namespace deepalign {

void lk_block_sums(const ImageView<const float>& ref, const ImageView<const float>& mov,
                   const ImageView<const float>& gx, const ImageView<const float>& gy,
                   const std::int64_t* x0, const std::int64_t* y0, std::int64_t count,
                   std::int64_t block, double* out, int num_threads);

}  // namespace deepalign
