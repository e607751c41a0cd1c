// Checks that turn numpy arrays into core views without copying. A wrong dtype, shape or
// memory layout raises ValueError naming the argument; nothing is ever converted silently.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <sstream>
#include <string>

#include "deepalign/image.hpp"

namespace deepalign::bindings {

namespace py = pybind11;

inline std::string shape_str(const py::array& a) {
  std::ostringstream os;
  os << "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) os << (i ? ", " : "") << a.shape(i);
  os << (a.ndim() == 1 ? ",)" : ")");
  return os.str();
}

inline std::string dtype_str(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

[[noreturn]] inline void raise_value_error(const std::string& msg) { throw py::value_error(msg); }

// Require ndim, exact dtype T and C-contiguity (the zero-copy contract).
template <class T>
void require_array(const py::array& a, const char* name, int ndim, bool writeable = false) {
  if (a.ndim() != ndim) {
    raise_value_error(std::string(name) + ": expected a " + std::to_string(ndim) +
                      "-D array, got shape " + shape_str(a));
  }
  if (!py::dtype::of<T>().is(a.dtype()) && !a.dtype().equal(py::dtype::of<T>())) {
    raise_value_error(std::string(name) + ": expected dtype " +
                      py::str(py::dtype::of<T>()).cast<std::string>() + ", got " + dtype_str(a));
  }
  if (!(a.flags() & py::array::c_style)) {
    raise_value_error(std::string(name) +
                      ": array is not C-contiguous; pass numpy.ascontiguousarray(...)");
  }
  if (writeable && !a.writeable()) {
    raise_value_error(std::string(name) + ": array is read-only");
  }
}

template <class T>
ImageView<T> image_view(py::array& a, const char* name, bool writeable = false) {
  require_array<T>(a, name, 2, writeable);
  ImageView<T> v;
  v.data = static_cast<T*>(writeable ? a.mutable_data() : const_cast<void*>(a.data()));
  v.height = a.shape(0);
  v.width = a.shape(1);
  v.stride = a.shape(1);
  return v;
}

}  // namespace deepalign::bindings
