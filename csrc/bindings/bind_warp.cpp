// Binding for the affine warp kernel (csrc/deepalign/warp.hpp). Thin on purpose: check the
// arrays (no silent copies), read every Python value, release the GIL, call the core.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "arrays.hpp"
#include "deepalign/warp.hpp"

namespace py = pybind11;

namespace deepalign::bindings {

namespace {

template <class T>
void warp_typed(py::array& src, py::array& dst, const double* matrix, Interpolation interp,
                Border border, double fill, int num_threads) {
  const ImageView<T> s = image_view<T>(src, "src");
  const ImageView<T> d = image_view<T>(dst, "dst", /*writeable=*/true);
  const ImageView<const T> cs{s.data, s.height, s.width, s.stride};
  // Safe without the GIL: the views point into numpy buffers that `src` and `dst` (held by
  // the caller's frame) keep alive, the core touches no Python object or refcount, and the
  // matrix was copied into a C array above.
  py::gil_scoped_release release;
  warp_affine<T>(cs, d, matrix, interp, border, fill, num_threads);
}

}  // namespace

void bind_warp(py::module_& m) {
  m.def(
      "warp_affine",
      [](py::array src, py::array dst, py::array matrix, Interpolation interp, Border bord,
         double fill, int num_threads) {
        require_array<double>(matrix, "matrix", 2);
        if (matrix.shape(0) != 2 || matrix.shape(1) != 3) {
          raise_value_error("matrix: expected shape (2, 3), got " + shape_str(matrix));
        }
        double mat[6];
        const auto* mp = static_cast<const double*>(matrix.data());
        for (int i = 0; i < 6; ++i) mat[i] = mp[i];
        const py::dtype dt = src.dtype();
        if (dt.equal(py::dtype::of<std::uint8_t>())) {
          warp_typed<std::uint8_t>(src, dst, mat, interp, bord, fill, num_threads);
        } else if (dt.equal(py::dtype::of<std::uint16_t>())) {
          warp_typed<std::uint16_t>(src, dst, mat, interp, bord, fill, num_threads);
        } else if (dt.equal(py::dtype::of<float>())) {
          warp_typed<float>(src, dst, mat, interp, bord, fill, num_threads);
        } else {
          raise_value_error("src: expected dtype uint8, uint16 or float32, got " + dtype_str(src));
        }
      },
      py::arg("src"), py::arg("dst"), py::arg("matrix"), py::arg("interpolation"),
      py::arg("border"), py::arg("fill"), py::arg("num_threads"),
      "Warp 2-D `src` into the preallocated C-contiguous `dst` (same dtype) with the 2x3 "
      "float64 pull map `matrix` (dst (x, y) -> src (x', y')). interpolation: Interpolation "
      "(or its name); border: Border (constant uses `fill`). Releases the GIL.");
}

}  // namespace deepalign::bindings
