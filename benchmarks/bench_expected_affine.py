"""Expected affine on damaged serial sections: accuracy against a single global affine and a
dense optical-flow baseline, and kernel speed against the numpy/scipy reference.

Accuracy (damaged_sections_ssem, DOLW7 and ZW7L18): SSIM, NCC, NMI, PSNR and MSE between the
reference and the registered damaged section, in the *undamaged region*: output pixels whose
source under the global affine is neither in the fold mask (dilated by 10 px) nor outside the
moving image. The same region is used for every method. Methods: global affine (RANSAC on the
SIFT matches), expected affine (same matches, fold mask, path distances), and OpenCV DIS
optical flow (preset MEDIUM) from the reference to the globally aligned section.

Speed: a 2048 x 2048 crop of ZW7L18: the KNN / expected-affine field and its warp, C++ core
(2 threads) against the numpy/scipy reference
(``tests/python/oracles/expected_affine_oracle.py``: cKDTree or csgraph
Dijkstra, numpy field, ``map_coordinates`` warp), Euclidean and path distances; and the whole
``register_pair`` (SIFT extraction and matching included).

    PYTHONPATH=python:. python -m benchmarks.bench_expected_affine [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import cv2
import numpy as np
from deepalign_fast import _core
from deepalign_fast.datasets import load_damaged_pair
from deepalign_fast.qc.metrics import ncc, ssim
from deepalign_fast.refine.expected_affine import register_pair
from deepalign_fast.warp import warp_affine, warp_affine_field

from tests.python.oracles.expected_affine_oracle import (
    expected_affine_field_ref,
    knn_grid_ref,
    warp_affine_field_ref,
)

from ._timing import markdown_table, measure, save_json


def nmi(a: np.ndarray, b: np.ndarray, bins: int = 64) -> float:
    """Normalised mutual information (H(A) + H(B)) / H(A, B) (1 = independent, 2 = identical)."""
    h, _, _ = np.histogram2d(a.ravel(), b.ravel(), bins=bins)
    p = h / h.sum()
    px, py = p.sum(1), p.sum(0)

    def ent(q: np.ndarray) -> float:
        q = q[q > 0]
        return float(-(q * np.log(q)).sum())

    return (ent(px) + ent(py)) / ent(p.ravel())


def scores(ref: np.ndarray, out: np.ndarray, region: np.ndarray) -> dict[str, float]:
    r, o = ref.astype(np.float64), out.astype(np.float64)
    _, smap = ssim(r, o, data_range=255.0, full=True)
    mse = float(np.mean((r[region] - o[region]) ** 2))
    return {"SSIM": float(np.mean(np.asarray(smap)[region])), "NCC": ncc(r, o, region),
            "NMI": nmi(r[region], o[region]), "PSNR": 10 * np.log10(255.0**2 / mse), "MSE": mse}


def accuracy(num_threads: int, features: tuple[str, ...]) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    cols = ["pair", "method", "SSIM", "NCC", "NMI", "PSNR", "MSE", "time_s"]
    for name in ("DOLW7", "ZW7L18"):
        ref, mov, mask = load_damaged_pair(name)
        results = {}
        for feat in features:
            t0 = time.perf_counter()
            res = register_pair(ref, mov, mask=mask, features=feat,  # type: ignore[arg-type]
                                num_threads=num_threads)
            results[feat] = (res, time.perf_counter() - t0)
        # One region for every method: output pixels whose source under the first matcher's
        # global affine is inside the section and more than 10 px from the fold.
        g0 = results[features[0]][0].global_affine
        dil = cv2.dilate((mask > 0).astype(np.uint8), np.ones((21, 21), np.uint8))
        region = ~(warp_affine(dil, g0, ref.shape, interpolation="nearest", fill=1,
                               num_threads=num_threads) > 0)
        glob = warp_affine(mov, g0, ref.shape, num_threads=num_threads)
        t0 = time.perf_counter()
        dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
        flow = dis.calc(ref, glob, None)
        hh, ww = ref.shape
        xs, ys = np.meshgrid(np.arange(ww, dtype=np.float32), np.arange(hh, dtype=np.float32))
        flowed = cv2.remap(glob, xs + flow[..., 0], ys + flow[..., 1], cv2.INTER_LINEAR)
        t_dis = time.perf_counter() - t0
        before = warp_affine(mov, np.eye(2, 3), ref.shape)
        methods: list[tuple[str, np.ndarray, float, str]] = [
            ("unregistered", before, 0.0, ""),
            (f"DIS optical flow (after global, {features[0]})", flowed, t_dis, "")]
        for feat in features:
            res, t = results[feat]
            if np.all(np.isfinite(res.global_affine)):
                methods.append((f"global affine ({feat})",
                                warp_affine(mov, res.global_affine, ref.shape,
                                            num_threads=num_threads), 0.0, ""))
            note = (f"{len(res.cluster_affines)} clusters, {len(res.points_moving)} kp"
                    + ("; fallback: " + res.reason if res.fallback else "")
                    + "".join("; " + n for n in res.notes))
            methods.append((f"expected affine ({feat})", res.warp(mov), t, note))
        first = len(rows)
        for method, out, t, note in methods:
            row: dict[str, object] = {"pair": name, "method": method}
            row.update(scores(ref, out, region))
            row["time_s"] = t
            if note:
                row["note"] = note
            rows.append(row)
        print(markdown_table(rows[first:], cols))
        for row in rows[first:]:
            if "note" in row:
                print(f"  {row['method']}: {row['note']}")
    return rows


def speed(repeats: int, num_threads: int) -> list[dict[str, object]]:
    ref, mov, mask = load_damaged_pair("ZW7L18")
    ref, mov, mask = (a[:2048, :2048].copy() for a in (ref, mov, mask))
    t0 = time.perf_counter()
    # SIFT keypoints: the same 1079 clustered points as the earlier runs in RESULTS.md.
    res = register_pair(ref, mov, mask=mask, features="sift", num_threads=num_threads)
    t_pair = time.perf_counter() - t0
    pts, lab, aff = res.points_moving, res.labels, res.cluster_affines
    g = np.ascontiguousarray(res.global_affine)
    step, k, it = 8, 20, 3
    rows_n, cols_n = _core.grid_size(2048, step), _core.grid_size(2048, step)
    blocked = _core.coarsen_mask((mask > 0).astype(np.uint8), step, num_threads)
    out_rows: list[dict[str, object]] = []
    for metric, blk in (("euclidean", None), ("path", blocked)):
        def ours() -> np.ndarray:
            _, idx, _ = _core.knn_grid(pts, rows_n, cols_n, float(step), k, blk, num_threads)
            _, fld = _core.expected_affine_field(idx, float(step), lab, aff, g, blk, rows_n,
                                                 cols_n, float(step), it, num_threads)
            return warp_affine_field(mov, fld, step, (2048, 2048), num_threads=num_threads)

        def field_only() -> None:
            _, idx, _ = _core.knn_grid(pts, rows_n, cols_n, float(step), k, blk, num_threads)
            _core.expected_affine_field(idx, float(step), lab, aff, g, blk, rows_n, cols_n,
                                        float(step), it, num_threads)

        def reference() -> np.ndarray:
            _, idx = knn_grid_ref(pts, rows_n, cols_n, step, k, blk)
            _, fld = expected_affine_field_ref(idx, step, lab, aff, g, blk, rows_n, cols_n,
                                               step, it)
            return warp_affine_field_ref(mov, fld, step, (2048, 2048))

        t_ours = measure(ours, repeats=repeats, warmup=1)
        t_field = measure(field_only, repeats=repeats, warmup=1)
        t0 = time.perf_counter()
        ref_out = reference()
        t_ref = time.perf_counter() - t0
        diff = np.abs(ours().astype(np.float64) - ref_out)
        out_rows.append({"distance": metric, "points": len(pts), "k": k, "grid_step": step,
                         "ours_field_s": t_field.median_s, "ours_field+warp_s": t_ours.median_s,
                         "numpy_scipy_s": t_ref, "speedup": t_ref / t_ours.median_s,
                         "max_abs_diff": float(np.max(diff)),
                         "frac_diff_gt_1": float(np.mean(diff > 1.0))})
    print(markdown_table(out_rows, list(out_rows[0].keys())))
    print(f"register_pair (SIFT + matching + everything), 2048x2048: {t_pair:.2f} s")
    out_rows.append({"distance": "register_pair total", "ours_field+warp_s": t_pair})
    return out_rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", choices=("accuracy", "speed"), default=None)
    ap.add_argument("--features", nargs="+", default=["sift", "blocks", "learned"],
                    choices=("sift", "blocks", "learned"),
                    help="matchers of the accuracy section (the first defines the region)")
    args = ap.parse_args()
    rows: list[dict[str, object]] = []
    if args.skip != "accuracy":
        rows += accuracy(args.threads, tuple(args.features))
    if args.skip != "speed":
        rows += speed(args.repeats, args.threads)
    print(save_json("expected_affine", rows))


if __name__ == "__main__":
    main()
