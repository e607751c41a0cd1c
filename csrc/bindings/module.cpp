// deepalign_fast._core: thin pybind11 bindings over the C++ core (csrc/deepalign). Each
// bind_<area>.cpp registers one area; this file only wires them together.
#include <pybind11/pybind11.h>

#include <thread>

namespace py = pybind11;

namespace deepalign::bindings {
void bind_types(py::module_& m);  // bind_types.cpp: enums, RansacOptions/RansacResult
void bind_warp(py::module_& m);    // bind_warp.cpp
void bind_ransac(py::module_& m);  // bind_ransac.cpp
void bind_displacement(py::module_& m);  // bind_displacement.cpp
void bind_expected_affine(py::module_& m);  // bind_expected_affine.cpp
void bind_block_sums(py::module_& m);  // bind_block_sums.cpp
}  // namespace deepalign::bindings

PYBIND11_MODULE(_core, m) {
  m.doc() = "deepalign-fast C++ core (warping, RANSAC, ...). Use the wrappers in deepalign_fast.";
  m.def("hardware_threads", [] { return std::thread::hardware_concurrency(); },
        "Number of hardware threads num_threads=0 resolves to.");
  deepalign::bindings::bind_types(m);  // first: the other areas take these types
  deepalign::bindings::bind_warp(m);
  deepalign::bindings::bind_ransac(m);
  deepalign::bindings::bind_displacement(m);
  deepalign::bindings::bind_expected_affine(m);
  deepalign::bindings::bind_block_sums(m);
}
