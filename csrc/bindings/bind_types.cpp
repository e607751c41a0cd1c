// Options, results and enums shared by the bindings: Interpolation, Border and TransformModel
// as Python enums (their lower-case names are accepted wherever one is expected), and
// RansacOptions / RansacResult as classes. Registered first, so every other area can take them.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "deepalign/image.hpp"
#include "deepalign/ransac.hpp"
#include "deepalign/transform_fit.hpp"

namespace py = pybind11;

namespace deepalign::bindings {

void bind_types(py::module_& m) {
  py::enum_<Interpolation> interp(m, "Interpolation",
                                  "How a warp samples between pixels (a name is accepted too).");
  interp.value("nearest", Interpolation::Nearest).value("linear", Interpolation::Linear);
  interp.def(py::init([](const std::string& name) {
    if (name == "nearest") return Interpolation::Nearest;
    if (name == "linear") return Interpolation::Linear;
    throw py::value_error("interpolation: expected 'nearest' or 'linear', got '" + name + "'");
  }));
  py::implicitly_convertible<py::str, Interpolation>();

  py::enum_<Border> border(m, "Border",
                           "What a warp reads outside the source (a name is accepted too).");
  border.value("constant", Border::Constant).value("replicate", Border::Replicate);
  border.def(py::init([](const std::string& name) {
    if (name == "constant") return Border::Constant;
    if (name == "replicate") return Border::Replicate;
    throw py::value_error("border: expected 'constant' or 'replicate', got '" + name + "'");
  }));
  py::implicitly_convertible<py::str, Border>();

  py::enum_<TransformModel> model(m, "TransformModel",
                                  "Transform model of a fit (a name is accepted too).");
  model.value("translation", TransformModel::translation)
      .value("rigid", TransformModel::rigid)
      .value("similarity", TransformModel::similarity)
      .value("affine", TransformModel::affine);
  model.def(py::init([](const std::string& name) {
    try {
      return parse_model(name);
    } catch (const std::invalid_argument&) {
      throw py::value_error("model: expected 'translation', 'rigid', 'similarity' or 'affine', "
                            "got '" + name + "'");
    }
  }));
  py::implicitly_convertible<py::str, TransformModel>();

  py::class_<RansacOptions>(m, "RansacOptions", "Options of ransac (csrc/deepalign/ransac.hpp).")
      .def(py::init<>())
      .def_readwrite("model", &RansacOptions::model)
      .def_readwrite("threshold", &RansacOptions::threshold,
                     "inlier if |M src - dst| < threshold (px)")
      .def_readwrite("confidence", &RansacOptions::confidence,
                     "in (0, 1]: stop once a better model is this unlikely")
      .def_readwrite("max_iterations", &RansacOptions::max_iterations)
      .def_readwrite("seed", &RansacOptions::seed)
      .def_readwrite("num_threads", &RansacOptions::num_threads, "0 = all cores")
      .def_readwrite("refine", &RansacOptions::refine,
                     "local least-squares refits (LO) and a final refit on the inliers");

  py::class_<RansacResult>(m, "RansacResult",
                           "Outcome of a robust fit; falsy when no transform could be "
                           "estimated (see `reason`).")
      .def_readonly("success", &RansacResult::success, "whether a transform was estimated")
      .def_readonly("reason", &RansacResult::reason, "why success is False; empty otherwise")
      .def_readonly("num_inliers", &RansacResult::num_inliers)
      .def_readonly("iterations", &RansacResult::iterations, "hypotheses drawn")
      .def_readonly("rms", &RansacResult::rms,
                    "RMS reprojection distance of the inliers, px (NaN on failure)")
      .def_property_readonly(
          "matrix",
          [](const RansacResult& r) {
            py::array_t<double> out({2, 3});
            std::copy(r.matrix.begin(), r.matrix.end(), out.mutable_data());
            return out;
          },
          "(2, 3) float64 matrix mapping src to dst (NaN when unsuccessful)")
      .def_property_readonly(
          "inliers",
          [](const RansacResult& r) {
            py::array out(py::dtype("bool"),
                          std::vector<py::ssize_t>{static_cast<py::ssize_t>(r.inliers.size())});
            std::copy(r.inliers.begin(), r.inliers.end(),
                      static_cast<std::uint8_t*>(out.mutable_data()));
            return out;
          },
          "(N,) bool mask of the matches within threshold of the final model")
      .def("__bool__", [](const RansacResult& r) { return r.success; })
      .def("__repr__", [](const RansacResult& r) {
        return "RansacResult(success=" + std::string(r.success ? "True" : "False") +
               ", num_inliers=" + std::to_string(r.num_inliers) +
               ", iterations=" + std::to_string(r.iterations) + ", rms=" + std::to_string(r.rms) +
               (r.reason.empty() ? std::string() : ", reason='" + r.reason + "'") + ")";
      });
}

}  // namespace deepalign::bindings
