// Bindings for the displacement-field kernels (csrc/deepalign/displacement.hpp). Thin on
// purpose: check the arrays (no silent copies), read every Python value, release the GIL, call
// the core. Fields are (2, H, W) C-contiguous arrays: plane 0 is dx, plane 1 is dy.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>  // std::optional arguments

#include <cstdint>
#include <optional>
#include <string>
#include <utility>

#include "arrays.hpp"
#include "deepalign/displacement.hpp"

namespace py = pybind11;

namespace deepalign::bindings {

namespace {

// (2, H, W) C-contiguous array of exact dtype T -> two plane views (no copy).
template <class T>
FieldView<T> field_view(py::array& a, const char* name, bool writeable = false) {
  require_array<T>(a, name, 3, writeable);
  if (a.shape(0) != 2) {
    raise_value_error(std::string(name) + ": expected shape (2, H, W) (dx, dy), got " +
                      shape_str(a));
  }
  const std::int64_t h = a.shape(1), w = a.shape(2);
  if (h <= 0 || w <= 0) raise_value_error(std::string(name) + ": is empty " + shape_str(a));
  T* p = static_cast<T*>(writeable ? a.mutable_data() : const_cast<void*>(a.data()));
  return {ImageView<T>{p, h, w, w}, ImageView<T>{p + h * w, h, w, w}};
}

template <class T>
FieldView<const T> as_const(const FieldView<T>& f) {
  return {ImageView<const T>{f.x.data, f.x.height, f.x.width, f.x.stride},
          ImageView<const T>{f.y.data, f.y.height, f.y.width, f.y.stride}};
}

void read_affine(const py::array& a, const char* name, double* m) {
  require_array<double>(a, name, 2);
  if (a.shape(0) != 2 || a.shape(1) != 3) {
    raise_value_error(std::string(name) + ": expected shape (2, 3), got " + shape_str(a));
  }
  const auto* p = static_cast<const double*>(a.data());
  for (int i = 0; i < 6; ++i) m[i] = p[i];
}

template <class T>
void warp_typed(py::array& src, py::array& dst, const FieldView<const float>& u,
                const double* affine, Interpolation interp, Border border, double fill,
                int num_threads) {
  const ImageView<T> s = image_view<T>(src, "src");
  const ImageView<T> d = image_view<T>(dst, "dst", /*writeable=*/true);
  const ImageView<const T> cs{s.data, s.height, s.width, s.stride};
  // Safe without the GIL: the views point into numpy buffers that the argument references
  // keep alive for the whole call, the core touches no Python object or refcount, and the
  // affine was copied into a C array.
  py::gil_scoped_release release;
  warp_displacement<T>(cs, d, u, affine, interp, border, fill, num_threads);
}

template <class T>
void jacobian_typed(py::array& u, py::array& out, int num_threads) {
  const FieldView<const T> f = as_const(field_view<T>(u, "displacement"));
  const ImageView<T> d = image_view<T>(out, "out", /*writeable=*/true);
  py::gil_scoped_release release;  // safe: raw buffers kept alive by the arguments
  jacobian_determinant<T>(f, d, num_threads);
}

template <class T>
std::pair<std::int64_t, std::int64_t> count_typed(py::array& u, const ImageView<const std::uint8_t>* mask,
                                                  int num_threads) {
  const FieldView<const T> f = as_const(field_view<T>(u, "displacement"));
  JacobianCount c;
  {
    py::gil_scoped_release release;  // safe: raw buffers kept alive by the arguments
    c = nonpositive_jacobian_count<T>(f, mask, num_threads);
  }
  return {c.nonpositive, c.total};
}

bool is_dtype(const py::array& a, const py::dtype& dt) { return a.dtype().equal(dt); }

}  // namespace

void bind_displacement(py::module_& m) {
  m.def(
      "warp_displacement",
      [](py::array src, py::array dst, py::array displacement, std::optional<py::array> affine,
         Interpolation interp, Border bord, double fill, int num_threads) {
        const FieldView<const float> u = as_const(field_view<float>(displacement, "displacement"));
        double mat[6];
        const double* mp = nullptr;
        if (affine) {
          read_affine(*affine, "affine", mat);
          mp = mat;
        }
        if (is_dtype(src, py::dtype::of<std::uint8_t>())) {
          warp_typed<std::uint8_t>(src, dst, u, mp, interp, bord, fill, num_threads);
        } else if (is_dtype(src, py::dtype::of<std::uint16_t>())) {
          warp_typed<std::uint16_t>(src, dst, u, mp, interp, bord, fill, num_threads);
        } else if (is_dtype(src, py::dtype::of<float>())) {
          warp_typed<float>(src, dst, u, mp, interp, bord, fill, num_threads);
        } else {
          raise_value_error("src: expected dtype uint8, uint16 or float32, got " + dtype_str(src));
        }
      },
      py::arg("src"), py::arg("dst"), py::arg("displacement"), py::arg("affine"),
      py::arg("interpolation"), py::arg("border"), py::arg("fill"), py::arg("num_threads"),
      "dst(p) = src(A(p + u(p))) into the preallocated C-contiguous `dst` (same dtype as `src`, "
      "shape of u); u is (2, H, W) float32 (dx, dy), `affine` a (2, 3) float64 pull map or "
      "None. interpolation: Interpolation; border: Border (constant uses `fill`); names accepted. "
      "Releases the GIL.");

  m.def(
      "compose_affine_displacement",
      [](py::array affine, py::array displacement, py::array out, int num_threads) {
        double mat[6];
        read_affine(affine, "affine", mat);
        const FieldView<const float> u = as_const(field_view<float>(displacement, "displacement"));
        const FieldView<float> v = field_view<float>(out, "out", /*writeable=*/true);
        py::gil_scoped_release release;  // safe: raw buffers kept alive by the arguments
        compose_affine_displacement(mat, u, v, num_threads);
      },
      py::arg("affine"), py::arg("displacement"), py::arg("out"), py::arg("num_threads"),
      "out(p) = A(p + u(p)) - p: the field of the pull map A o (id + u). `out` may be "
      "`displacement` (in place). Releases the GIL.");

  m.def(
      "compose_displacements",
      [](py::array first, py::array second, py::array out, Border bord, int num_threads) {
        const FieldView<const float> u1 = as_const(field_view<float>(first, "first"));
        const FieldView<const float> u2 = as_const(field_view<float>(second, "second"));
        const FieldView<float> v = field_view<float>(out, "out", /*writeable=*/true);
        py::gil_scoped_release release;  // safe: raw buffers kept alive by the arguments
        compose_displacements(u1, u2, v, bord, num_threads);
      },
      py::arg("first"), py::arg("second"), py::arg("out"), py::arg("border"),
      py::arg("num_threads"),
      "out(p) = u2(p) + u1(p + u2(p)) (u1 = first sampled bilinearly): the field of "
      "(id + u1) o (id + u2), i.e. warping by `first` then by `second`. Releases the GIL.");

  m.def(
      "jacobian_determinant",
      [](py::array displacement, py::array out, int num_threads) {
        if (is_dtype(displacement, py::dtype::of<float>())) {
          jacobian_typed<float>(displacement, out, num_threads);
        } else if (is_dtype(displacement, py::dtype::of<double>())) {
          jacobian_typed<double>(displacement, out, num_threads);
        } else {
          raise_value_error("displacement: expected dtype float32 or float64, got " +
                            dtype_str(displacement));
        }
      },
      py::arg("displacement").noconvert(), py::arg("out").noconvert(), py::arg("num_threads"),
      "det(I + grad u) of a (2, H, W) float32/float64 field into `out` (H, W) of the same dtype "
      "(numpy.gradient differences, float64 arithmetic). Releases the GIL.");

  m.def(
      "nonpositive_jacobian_count",
      [](py::array displacement, std::optional<py::array> mask, int num_threads) {
        ImageView<const std::uint8_t> mv;
        const ImageView<const std::uint8_t>* mp = nullptr;
        if (mask) {
          if (!is_dtype(*mask, py::dtype("bool")) &&
              !is_dtype(*mask, py::dtype::of<std::uint8_t>())) {
            raise_value_error("mask: expected dtype bool or uint8, got " + dtype_str(*mask));
          }
          if (mask->ndim() != 2) {
            raise_value_error("mask: expected a 2-D array, got shape " + shape_str(*mask));
          }
          if (!(mask->flags() & py::array::c_style)) {
            raise_value_error("mask: array is not C-contiguous; pass numpy.ascontiguousarray(...)");
          }
          mv = {static_cast<const std::uint8_t*>(mask->data()), mask->shape(0), mask->shape(1),
                mask->shape(1)};
          mp = &mv;
        }
        if (is_dtype(displacement, py::dtype::of<float>())) {
          return count_typed<float>(displacement, mp, num_threads);
        }
        if (is_dtype(displacement, py::dtype::of<double>())) {
          return count_typed<double>(displacement, mp, num_threads);
        }
        raise_value_error("displacement: expected dtype float32 or float64, got " +
                          dtype_str(displacement));
      },
      py::arg("displacement").noconvert(), py::arg("mask").noconvert() = py::none(),
      py::arg("num_threads") = 0,
      "(nonpositive, total): pixels (inside the non-zero mask) whose det(I + grad u) <= 0, "
      "without materialising the determinant map. Releases the GIL.");
}

}  // namespace deepalign::bindings
