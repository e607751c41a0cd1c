"""numpy/scipy reference of the expected-affine kernels (test oracle and benchmark peer).

Same computation as ``csrc/deepalign/expected_affine.cpp``, written the plain way: KNN with
``scipy.spatial.cKDTree`` (Euclidean) or ``scipy.sparse.csgraph.dijkstra`` on the node graph
(path distance), the expected affine as a mean of neighbour affines, and the warp with
``scipy.ndimage.map_coordinates`` on a full-resolution interpolated parameter field. Private:
the public API is :mod:`deepalign_fast.refine.expected_affine`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage, sparse
from scipy.sparse import csgraph
from scipy.spatial import cKDTree

__all__ = ["knn_grid_ref", "expected_affine_field_ref", "warp_affine_field_ref"]


def _grid_graph(blocked: npt.NDArray[np.uint8], step: float) -> sparse.csr_matrix:
    rows, cols = blocked.shape
    free = blocked == 0
    ids = np.arange(rows * cols).reshape(rows, cols)
    src, dst, w = [], [], []
    for dy, dx, length in ((0, 1, step), (1, 0, step), (1, 1, step * np.sqrt(2.0)),
                           (1, -1, step * np.sqrt(2.0))):
        ys, xs = np.mgrid[0:rows, 0:cols]
        ok = (ys + dy < rows) & (xs + dx >= 0) & (xs + dx < cols)
        ys, xs = ys[ok], xs[ok]
        uy, ux = ys + dy, xs + dx
        good = free[ys, xs] & free[uy, ux]
        if dy and dx:  # diagonal: both orthogonal neighbours must be free (no corner cutting)
            good &= free[ys, ux] & free[uy, xs]
        src.append(ids[ys[good], xs[good]])
        dst.append(ids[uy[good], ux[good]])
        w.append(np.full(int(good.sum()), length))
    s, d, ww = np.concatenate(src), np.concatenate(dst), np.concatenate(w)
    n = rows * cols
    return sparse.csr_matrix((np.r_[ww, ww], (np.r_[s, d], np.r_[d, s])), shape=(n, n))


def _entry_nodes(points: npt.NDArray[np.float64], rows: int, cols: int, step: float,
                 blocked: npt.NDArray[np.uint8]) -> tuple[np.ndarray, np.ndarray]:
    """Node and entry distance of every point (-1 when its 4 surrounding nodes are blocked)."""
    node = np.full(len(points), -1, np.int64)
    dist = np.full(len(points), np.inf)
    fx = np.floor(points[:, 0] / step).astype(np.int64)
    fy = np.floor(points[:, 1] / step).astype(np.int64)
    for oy in (0, 1):
        for ox in (0, 1):
            cx = np.clip(fx + ox, 0, cols - 1)
            cy = np.clip(fy + oy, 0, rows - 1)
            d = np.hypot(points[:, 0] - cx * step, points[:, 1] - cy * step)
            better = (blocked[cy, cx] == 0) & (d < dist)
            node[better] = (cy * cols + cx)[better]
            dist[better] = d[better]
    return node, dist


def knn_grid_ref(points: npt.ArrayLike, rows: int, cols: int, step: float, k: int,
                 blocked: npt.NDArray[np.uint8] | None = None, *, chunk: int = 64
                 ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """k nearest points of every node: ``(dist (rows, cols, k), index (rows, cols, k))``."""
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    n = len(pts)
    nodes = np.stack(np.meshgrid(np.arange(cols) * step, np.arange(rows) * step), -1)
    nodes = nodes.reshape(-1, 2)
    out_d = np.full((rows * cols, k), np.inf)
    out_i = np.full((rows * cols, k), -1, np.int64)
    if n == 0:
        return out_d.reshape(rows, cols, k), out_i.reshape(rows, cols, k)
    if blocked is None:
        kk = min(k, n)
        d, i = cKDTree(pts).query(nodes, k=kk)
        out_d[:, :kk] = np.asarray(d).reshape(-1, kk)
        out_i[:, :kk] = np.asarray(i).reshape(-1, kk)
        return out_d.reshape(rows, cols, k), out_i.reshape(rows, cols, k)
    graph = _grid_graph(blocked, step)
    entry, entry_d = _entry_nodes(pts, rows, cols, step, blocked)
    valid = np.flatnonzero(entry >= 0)
    # Running k smallest over chunks of sources (a full (sources, nodes) matrix is too big).
    best_d = np.full((rows * cols, 0), np.inf)
    best_i = np.full((rows * cols, 0), -1, np.int64)
    for c0 in range(0, len(valid), chunk):
        idx = valid[c0:c0 + chunk]
        dm = csgraph.dijkstra(graph, directed=False, indices=entry[idx])
        dm = dm + entry_d[idx][:, None]
        dm[:, blocked.reshape(-1) != 0] = np.inf
        cand_d = np.concatenate([best_d, dm.T], axis=1)
        cand_i = np.concatenate([best_i, np.broadcast_to(idx, (rows * cols, len(idx)))], axis=1)
        order = np.lexsort((cand_i, cand_d), axis=1)[:, :k]
        best_d = np.take_along_axis(cand_d, order, 1)
        best_i = np.take_along_axis(cand_i, order, 1)
    kk = best_d.shape[1]
    out_d[:, :kk] = best_d
    out_i[:, :kk] = np.where(np.isfinite(best_d), best_i, -1)
    return out_d.reshape(rows, cols, k), out_i.reshape(rows, cols, k)


def _bilerp(field: npt.NDArray[np.float64], gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    rows, cols = field.shape[:2]
    gx = np.clip(gx, 0, cols - 1)
    gy = np.clip(gy, 0, rows - 1)
    x0 = np.minimum(gx.astype(np.int64), cols - 1)
    y0 = np.minimum(gy.astype(np.int64), rows - 1)
    x1, y1 = np.minimum(x0 + 1, cols - 1), np.minimum(y0 + 1, rows - 1)
    wx, wy = (gx - x0)[..., None], (gy - y0)[..., None]
    f = field.reshape(rows, cols, 6)
    return ((1 - wy) * ((1 - wx) * f[y0, x0] + wx * f[y0, x1])
            + wy * ((1 - wx) * f[y1, x0] + wx * f[y1, x1]))


def expected_affine_field_ref(index: npt.NDArray[np.integer], step: float,
                              labels: npt.ArrayLike, affines: npt.ArrayLike,
                              global_affine: npt.ArrayLike,
                              blocked: npt.NDArray[np.uint8] | None, out_rows: int,
                              out_cols: int, out_step: float, iterations: int
                              ) -> tuple[np.ndarray, np.ndarray]:
    """``(source field, output field)``, each ``(rows, cols, 2, 3)`` (see the C++ header)."""
    rows, cols, _ = index.shape
    lab = np.asarray(labels, np.int64)
    aff = np.asarray(affines, np.float64).reshape(-1, 6)
    glob = np.asarray(global_affine, np.float64).reshape(6)
    idx = np.asarray(index, np.int64)
    nb_lab = np.where(idx >= 0, lab[np.clip(idx, 0, None)] if len(lab) else -1, -1)
    ok = nb_lab >= 0
    m = ok.sum(-1)
    acc = np.where(ok[..., None], aff[np.clip(nb_lab, 0, None)] if len(aff) else 0.0, 0.0).sum(2)
    src = np.where((m > 0)[..., None], acc / np.maximum(m, 1)[..., None], glob)
    if blocked is not None:
        b = blocked != 0
        if b.all():
            src[:] = glob
        elif b.any():
            # Nearest unblocked node; BFS order in the core breaks ties between equally near
            # nodes differently, which only matters inside the damage.
            _, (iy, ix) = ndimage.distance_transform_cdt(b, metric="chessboard",
                                                         return_indices=True)
            src = src[iy, ix]
    ys, xs = np.mgrid[0:out_rows, 0:out_cols].astype(np.float64) * out_step
    a = np.broadcast_to(glob, (out_rows, out_cols, 6)).copy()
    for _ in range(iterations):
        qx = a[..., 0] * xs + a[..., 1] * ys + a[..., 2]
        qy = a[..., 3] * xs + a[..., 4] * ys + a[..., 5]
        a = _bilerp(src, qx / step, qy / step)
    return src.reshape(rows, cols, 2, 3), a.reshape(out_rows, out_cols, 2, 3)


def warp_affine_field_ref(image: npt.NDArray[Any], field: npt.NDArray[np.float64], step: float,
                          output_shape: tuple[int, int], *, order: int = 1,
                          fill: float = 0.0) -> np.ndarray:
    """Per-pixel affine warp (full-resolution parameter field + ``map_coordinates``)."""
    h, w = output_shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    a = _bilerp(field, xs / step, ys / step)
    sx = a[..., 0] * xs + a[..., 1] * ys + a[..., 2]
    sy = a[..., 3] * xs + a[..., 4] * ys + a[..., 5]
    out = ndimage.map_coordinates(np.asarray(image, np.float64), [sy, sx], order=order,
                                  mode="grid-constant", cval=fill, prefilter=False)
    return out
