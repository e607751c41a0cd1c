// Binding for the Lucas-Kanade block sums (csrc/deepalign/block_sums.hpp). Thin on purpose:
// check the arrays (no silent copies), release the GIL, call the core.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "arrays.hpp"
#include "deepalign/block_sums.hpp"

namespace py = pybind11;

namespace deepalign::bindings {

namespace {

ImageView<const float> const_view(py::array& a, const char* name) {
  const ImageView<float> v = image_view<float>(a, name);
  return {v.data, v.height, v.width, v.stride};
}

}  // namespace

void bind_block_sums(py::module_& m) {
  m.def(
      "lk_block_sums",
      [](py::array ref, py::array mov, py::array gx, py::array gy, py::array x0, py::array y0,
         std::int64_t block, int num_threads) {
        const ImageView<const float> r = const_view(ref, "ref");
        const ImageView<const float> mv = const_view(mov, "mov");
        const ImageView<const float> u = const_view(gx, "gx");
        const ImageView<const float> v = const_view(gy, "gy");
        require_array<std::int64_t>(x0, "x0", 1);
        require_array<std::int64_t>(y0, "y0", 1);
        if (x0.shape(0) != y0.shape(0)) {
          raise_value_error("x0 and y0: expected the same length, got " + shape_str(x0) +
                            " and " + shape_str(y0));
        }
        const std::int64_t n = x0.shape(0);
        py::array_t<double> out({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(4)});
        const auto* px = static_cast<const std::int64_t*>(x0.data());
        const auto* py_ = static_cast<const std::int64_t*>(y0.data());
        double* po = out.mutable_data();
        {
          // Safe without the GIL: the views point into numpy buffers the caller's frame keeps
          // alive, and the core touches no Python object.
          py::gil_scoped_release release;
          lk_block_sums(r, mv, u, v, px, py_, n, block, po, num_threads);
        }
        return out;
      },
      py::arg("ref"), py::arg("mov"), py::arg("gx"), py::arg("gy"), py::arg("x0"), py::arg("y0"),
      py::arg("block"), py::arg("num_threads"),
      "For each block (top-left x0[i], y0[i], side `block`) of the C-contiguous float32 images, "
      "the sums gx (ref - mov), gy (ref - mov), ref mov and mov mov as an (n, 4) float64 array "
      "(x0, y0: int64). Releases the GIL.");
}

}  // namespace deepalign::bindings
