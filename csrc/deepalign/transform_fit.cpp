#include "deepalign/transform_fit.hpp"

#include <cmath>
#include <stdexcept>

namespace deepalign {

int min_samples(TransformModel model) {
  switch (model) {
    case TransformModel::translation: return 1;
    case TransformModel::rigid: return 2;
    case TransformModel::similarity: return 2;
    case TransformModel::affine: return 3;
  }
  return 3;
}

TransformModel parse_model(const std::string& name) {
  if (name == "translation") return TransformModel::translation;
  if (name == "rigid") return TransformModel::rigid;
  if (name == "similarity") return TransformModel::similarity;
  if (name == "affine") return TransformModel::affine;
  throw std::invalid_argument("model must be one of 'translation', 'rigid', 'similarity', "
                              "'affine'; got '" + name + "'");
}

const char* model_name(TransformModel model) {
  switch (model) {
    case TransformModel::translation: return "translation";
    case TransformModel::rigid: return "rigid";
    case TransformModel::similarity: return "similarity";
    case TransformModel::affine: return "affine";
  }
  return "?";
}

bool fit_transform(const double* src, const double* dst, std::int64_t n, TransformModel model,
                   const double* weights, double out_matrix[6]) {
  if (n < 0) throw std::invalid_argument("fit_transform: n must be >= 0");
  if (weights != nullptr) {
    for (std::int64_t i = 0; i < n; ++i) {
      if (!(weights[i] >= 0.0) || !std::isfinite(weights[i])) {
        throw std::invalid_argument("fit_transform: weights must be finite and >= 0");
      }
    }
  }
  if (n < min_samples(model)) return false;

  // Weighted means. Everything below works on centred coordinates, which keeps the sums well
  // conditioned for points far from the origin (a 8k frame has coordinates ~1e4).
  double sw = 0, msx = 0, msy = 0, mdx = 0, mdy = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    const double w = weights ? weights[i] : 1.0;
    sw += w;
    msx += w * src[2 * i];
    msy += w * src[2 * i + 1];
    mdx += w * dst[2 * i];
    mdy += w * dst[2 * i + 1];
  }
  if (!(sw > 0.0)) return false;
  msx /= sw; msy /= sw; mdx /= sw; mdy /= sw;
  if (!std::isfinite(msx + msy + mdx + mdy)) return false;  // NaN/inf among the points

  if (model == TransformModel::translation) {
    out_matrix[0] = 1; out_matrix[1] = 0; out_matrix[2] = mdx - msx;
    out_matrix[3] = 0; out_matrix[4] = 1; out_matrix[5] = mdy - msy;
    return true;
  }

  // Centred second moments: C = sum w s s^T (src), X = sum w s d^T (cross).
  double cxx = 0, cxy = 0, cyy = 0, xx = 0, xy = 0, yx = 0, yy = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    const double w = weights ? weights[i] : 1.0;
    const double sx = src[2 * i] - msx, sy = src[2 * i + 1] - msy;
    const double dx = dst[2 * i] - mdx, dy = dst[2 * i + 1] - mdy;
    cxx += w * sx * sx; cxy += w * sx * sy; cyy += w * sy * sy;
    xx += w * sx * dx; xy += w * sx * dy; yx += w * sy * dx; yy += w * sy * dy;
  }
  const double trace = cxx + cyy;
  // Relative tolerance: spread that is pure rounding noise of the centring counts as none.
  const double scale2 = msx * msx + msy * msy + 1.0;
  if (!(trace > 1e-24 * scale2 * sw)) return false;  // all src points coincident

  double a, b, c, d;
  if (model == TransformModel::affine) {
    const double det = cxx * cyy - cxy * cxy;
    if (!(det > 1e-12 * trace * trace)) return false;  // collinear src points
    // [a b] = [sum w dx sx, sum w dx sy] C^-1, [c d] likewise with dy.
    const double i00 = cyy / det, i01 = -cxy / det, i11 = cxx / det;
    a = xx * i00 + yx * i01;
    b = xx * i01 + yx * i11;
    c = xy * i00 + yy * i01;
    d = xy * i01 + yy * i11;
  } else {
    // 2D Umeyama: with p = sum w (s . d) and q = sum w (s x d), the best rotation angle is
    // atan2(q, p); the best similarity is [[p, -q], [q, p]] / sum w |s|^2.
    const double p = xx + yy, q = xy - yx;
    const double norm = std::hypot(p, q);
    if (!(norm > 0.0)) return false;
    if (model == TransformModel::rigid) {
      a = p / norm; c = q / norm;
    } else {
      a = p / trace; c = q / trace;
    }
    b = -c; d = a;
  }
  const double m[6] = {a, b, mdx - (a * msx + b * msy), c, d, mdy - (c * msx + d * msy)};
  for (double v : m) {
    if (!std::isfinite(v)) return false;
  }
  for (int k = 0; k < 6; ++k) out_matrix[k] = m[k];
  return true;
}

}  // namespace deepalign
