#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace deepalign::bindings {

void bind_warp(py::module_& m) {
  (void)m;  // filled in by the warp kernel
}

}  // namespace deepalign::bindings
