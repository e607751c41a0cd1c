// Bindings for the expected-affine kernels (csrc/deepalign/expected_affine.hpp). Thin: check the
// arrays (no silent copies), read every Python value, release the GIL, call the core, wrap the
// result.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "arrays.hpp"
#include "deepalign/expected_affine.hpp"

namespace py = pybind11;

namespace deepalign::bindings {

namespace {

// Moves a core-owned vector into a numpy array (no copy; the capsule frees it).
template <class T>
py::array_t<T> to_numpy(std::vector<T>&& v, std::vector<py::ssize_t> shape) {
  auto* heap = new std::vector<T>(std::move(v));
  py::capsule owner(heap, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>(shape, heap->data(), owner);
}

const std::uint8_t* blocked_ptr(const std::optional<py::array>& blocked, std::int64_t rows,
                                std::int64_t cols) {
  if (!blocked) return nullptr;
  require_array<std::uint8_t>(*blocked, "blocked", 2);
  if (blocked->shape(0) != rows || blocked->shape(1) != cols) {
    raise_value_error("blocked: expected shape (" + std::to_string(rows) + ", " +
                      std::to_string(cols) + "), got " + shape_str(*blocked));
  }
  return static_cast<const std::uint8_t*>(blocked->data());
}

py::array coarsen_mask_binding(py::array mask, std::int64_t step, int num_threads) {
  const ImageView<std::uint8_t> m = image_view<std::uint8_t>(mask, "mask");
  const ImageView<const std::uint8_t> cm{m.data, m.height, m.width, m.stride};
  if (step < 1) raise_value_error("step must be >= 1");
  std::vector<std::uint8_t> out;
  {
    // Safe: reads only the numpy buffer kept alive by `mask`; no Python object is touched.
    py::gil_scoped_release release;
    out = coarsen_mask(cm, step, num_threads);
  }
  return to_numpy(std::move(out), {grid_size(m.height, step), grid_size(m.width, step)});
}

py::tuple knn_grid_binding(py::array points, std::int64_t rows, std::int64_t cols, double step,
                           int k, std::optional<py::array> blocked, int num_threads) {
  require_array<double>(points, "points", 2);
  if (points.shape(1) != 2) raise_value_error("points: expected shape (N, 2), got " + shape_str(points));
  const std::int64_t n = points.shape(0);
  const auto* pp = static_cast<const double*>(points.data());
  const std::uint8_t* bp = blocked_ptr(blocked, rows, cols);
  KnnGrid g;
  {
    // Safe: raw buffers kept alive by the argument references; no Python objects touched.
    py::gil_scoped_release release;
    g = knn_grid(pp, n, rows, cols, step, k, bp, num_threads);
  }
  return py::make_tuple(to_numpy(std::move(g.dist), {rows, cols, k}),
                        to_numpy(std::move(g.index), {rows, cols, k}),
                        to_numpy(std::move(g.used), {static_cast<py::ssize_t>(n)}));
}

py::tuple field_binding(py::array knn_index, double step, py::array labels, py::array affines,
                        py::array global_affine, std::optional<py::array> blocked,
                        std::int64_t out_rows, std::int64_t out_cols, double out_step,
                        int iterations, int num_threads) {
  require_array<std::int32_t>(knn_index, "knn_index", 3);
  require_array<std::int32_t>(labels, "labels", 1);
  require_array<double>(affines, "affines", 3);
  require_array<double>(global_affine, "global_affine", 2);
  if (affines.shape(1) != 2 || affines.shape(2) != 3) {
    raise_value_error("affines: expected shape (C, 2, 3), got " + shape_str(affines));
  }
  if (global_affine.shape(0) != 2 || global_affine.shape(1) != 3) {
    raise_value_error("global_affine: expected shape (2, 3), got " + shape_str(global_affine));
  }
  const std::int64_t rows = knn_index.shape(0), cols = knn_index.shape(1);
  // The index array is copied into the core's KnnGrid (rows * cols * k int32, small next to an
  // image) so that the core keeps one input type; distances are not needed here.
  KnnGrid g;
  g.rows = rows;
  g.cols = cols;
  g.k = static_cast<int>(knn_index.shape(2));
  const auto* ip = static_cast<const std::int32_t*>(knn_index.data());
  g.index.assign(ip, ip + rows * cols * g.k);
  ExpectedAffineInputs in;
  in.knn = &g;
  in.step = step;
  in.labels = static_cast<const std::int32_t*>(labels.data());
  in.num_points = labels.shape(0);
  in.affines = static_cast<const double*>(affines.data());
  in.num_clusters = static_cast<int>(affines.shape(0));
  in.global_affine = static_cast<const double*>(global_affine.data());
  in.blocked = blocked_ptr(blocked, rows, cols);
  ExpectedAffineField source, output;
  {
    // Safe: raw buffers kept alive by the argument references; no Python objects touched.
    py::gil_scoped_release release;
    expected_affine_field(in, out_rows, out_cols, out_step, iterations, num_threads, &source,
                          &output);
  }
  return py::make_tuple(to_numpy(std::move(source.affine), {rows, cols, 2, 3}),
                        to_numpy(std::move(output.affine), {out_rows, out_cols, 2, 3}));
}

template <class T>
void warp_field_typed(py::array& src, py::array& dst, const double* field, std::int64_t rows,
                      std::int64_t cols, double step, Interpolation interp, Border border,
                      double fill, int num_threads) {
  const ImageView<T> s = image_view<T>(src, "src");
  const ImageView<T> d = image_view<T>(dst, "dst", /*writeable=*/true);
  const ImageView<const T> cs{s.data, s.height, s.width, s.stride};
  // Safe: the views point into numpy buffers the caller keeps alive; no refcounts touched.
  py::gil_scoped_release release;
  warp_affine_field<T>(cs, d, field, rows, cols, step, interp, border, fill, num_threads);
}

void warp_field_binding(py::array src, py::array dst, py::array field, double step,
                        Interpolation interp, Border bord, double fill, int num_threads) {
  require_array<double>(field, "field", 4);
  if (field.shape(2) != 2 || field.shape(3) != 3) {
    raise_value_error("field: expected shape (rows, cols, 2, 3), got " + shape_str(field));
  }
  const auto* fp = static_cast<const double*>(field.data());
  const std::int64_t rows = field.shape(0), cols = field.shape(1);
  const py::dtype dt = src.dtype();
  if (dt.equal(py::dtype::of<std::uint8_t>())) {
    warp_field_typed<std::uint8_t>(src, dst, fp, rows, cols, step, interp, bord, fill, num_threads);
  } else if (dt.equal(py::dtype::of<std::uint16_t>())) {
    warp_field_typed<std::uint16_t>(src, dst, fp, rows, cols, step, interp, bord, fill, num_threads);
  } else if (dt.equal(py::dtype::of<float>())) {
    warp_field_typed<float>(src, dst, fp, rows, cols, step, interp, bord, fill, num_threads);
  } else {
    raise_value_error("src: expected dtype uint8, uint16 or float32, got " + dtype_str(src));
  }
}

}  // namespace

void bind_expected_affine(py::module_& m) {
  m.def("grid_size", &grid_size, py::arg("n"), py::arg("step"),
        "Nodes of a coarse grid with spacing `step` covering n pixels: ceil((n-1)/step)+1.");
  m.def("coarsen_mask", &coarsen_mask_binding, py::arg("mask").noconvert(), py::arg("step"),
        py::arg("num_threads"),
        "Blocked nodes (uint8 0/1) of the coarse grid of a uint8 damage mask (non-zero = damage).");
  m.def("knn_grid", &knn_grid_binding, py::arg("points").noconvert(), py::arg("rows"),
        py::arg("cols"), py::arg("step"), py::arg("k"), py::arg("blocked") = py::none(),
        py::arg("num_threads") = 0,
        "k nearest points of every grid node (Euclidean, or path distance avoiding `blocked`). "
        "Returns (dist float32 (rows, cols, k), index int32 (rows, cols, k), used uint8 (N,)).");
  m.def("expected_affine_field", &field_binding, py::arg("knn_index").noconvert(),
        py::arg("step"), py::arg("labels").noconvert(), py::arg("affines").noconvert(),
        py::arg("global_affine").noconvert(), py::arg("blocked"),
        py::arg("out_rows"), py::arg("out_cols"), py::arg("out_step"), py::arg("iterations"),
        py::arg("num_threads"),
        "Expected-affine fields: (source field on the moving grid, output pull field), each "
        "(rows, cols, 2, 3) float64.");
  m.def("warp_affine_field", &warp_field_binding, py::arg("src"), py::arg("dst"),
        py::arg("field").noconvert(), py::arg("step"), py::arg("interpolation"),
        py::arg("border"), py::arg("fill"), py::arg("num_threads"),
        "Warp `src` into `dst` with a per-pixel affine pull field (rows, cols, 2, 3) float64 "
        "on a grid of spacing `step`, interpolated bilinearly. Releases the GIL.");
}

}  // namespace deepalign::bindings
