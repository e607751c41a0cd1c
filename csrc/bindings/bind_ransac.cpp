// Bindings for robust transform estimation (csrc/deepalign/ransac.hpp, transform_fit.hpp).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "arrays.hpp"
#include "deepalign/ransac.hpp"
#include "deepalign/transform_fit.hpp"

namespace py = pybind11;

namespace deepalign::bindings {
namespace {

// (N, 2) float64 C-contiguous point array; returns N.
std::int64_t require_points(const py::array& a, const char* name) {
  require_array<double>(a, name, 2);
  if (a.shape(1) != 2) {
    raise_value_error(std::string(name) + ": expected shape (N, 2) of (x, y) points, got " +
                      shape_str(a));
  }
  return static_cast<std::int64_t>(a.shape(0));
}

py::array_t<double> matrix_array(const double* m) {
  py::array_t<double> out({2, 3});
  std::copy(m, m + 6, out.mutable_data());
  return out;
}

RansacResult ransac_binding(const py::array& src, const py::array& dst,
                            const RansacOptions& options) {
  const std::int64_t n_src = require_points(src, "src");
  const std::int64_t n_dst = require_points(dst, "dst");
  const auto* ps = static_cast<const double*>(src.data());
  const auto* pd = static_cast<const double*>(dst.data());
  const RansacOptions opt = options;  // a copy: the caller's object may change meanwhile
  // Safe: the core reads only the two raw buffers, which `src`/`dst` keep alive for the
  // whole call, and touches no Python object or refcount.
  py::gil_scoped_release release;
  return ransac(ps, n_src, pd, n_dst, opt);
}

py::object fit_binding(const py::array& src, const py::array& dst, TransformModel model,
                       const std::optional<py::array>& weights) {
  const std::int64_t n = require_points(src, "src");
  if (require_points(dst, "dst") != n) {
    raise_value_error("src and dst must have the same number of points, got " + shape_str(src) +
                      " and " + shape_str(dst));
  }
  const double* pw = nullptr;
  if (weights) {
    require_array<double>(*weights, "weights", 1);
    if (weights->shape(0) != n) {
      raise_value_error("weights: expected shape (" + std::to_string(n) + ",), got " +
                        shape_str(*weights));
    }
    pw = static_cast<const double*>(weights->data());
  }
  const TransformModel m = model;
  const auto* ps = static_cast<const double*>(src.data());
  const auto* pd = static_cast<const double*>(dst.data());
  double out[6];
  bool ok;
  {
    // Safe: reads only raw buffers kept alive by the argument references; no Python objects.
    py::gil_scoped_release release;
    ok = fit_transform(ps, pd, n, m, pw, out);
  }
  if (!ok) return py::none();
  return matrix_array(out);
}

}  // namespace

void bind_ransac(py::module_& m) {
  m.def("ransac", &ransac_binding, py::arg("src").noconvert(), py::arg("dst").noconvert(),
        py::arg("options"),
        "LO-RANSAC estimate of the 2x3 matrix mapping src (N, 2) to dst (N, 2) float64 points "
        "with RansacOptions; returns a RansacResult. Releases the GIL.");
  m.def("fit_transform", &fit_binding, py::arg("src").noconvert(), py::arg("dst").noconvert(),
        py::arg("model"), py::arg("weights").noconvert() = py::none(),
        "Weighted least-squares 2x3 matrix mapping src to dst, or None when undetermined.");
}

}  // namespace deepalign::bindings
