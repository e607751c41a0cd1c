"""RANSAC affine: deepalign-fast (1 and 2 threads) vs OpenCV estimateAffine2D (RANSAC, MAGSAC).

Synthetic matches in a 2048^2 frame: inliers follow a known affine with 0.5 px Gaussian noise
per axis, 50 % outliers are uniform over the frame. Every method gets the same threshold and
confidence. Reported per (method, N): median time over repeats and seeds, mean corner error of
the estimate vs the truth at the 4 corners of the frame, and inlier precision / recall against
the generated labels (means over seeds).

Run: ``python -m benchmarks.bench_ransac [--repeats R] [--seeds S]``.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np
from deepalign_fast import estimate_transform

from ._timing import markdown_table, measure, save_json

FRAME = 2048.0
CORNERS = np.array([[0.0, 0.0], [FRAME - 1, 0.0], [0.0, FRAME - 1], [FRAME - 1, FRAME - 1]])
THRESHOLD = 2.0
CONFIDENCE = 0.999
MAX_ITERS = 10_000


def make_problem(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    m = np.array([[1.0 + rng.normal(0, 0.02), rng.normal(0, 0.02), rng.uniform(-40, 40)],
                  [rng.normal(0, 0.02), 1.0 + rng.normal(0, 0.02), rng.uniform(-40, 40)]])
    src = rng.uniform(0, FRAME, (n, 2))
    dst = src @ m[:, :2].T + m[:, 2] + rng.normal(0, 0.5, (n, 2))
    outlier = rng.random(n) < 0.5
    dst[outlier] = rng.uniform(0, FRAME, (int(outlier.sum()), 2))
    return src, dst, m, ~outlier


def corner_error(a: np.ndarray | None, b: np.ndarray) -> float:
    if a is None:
        return float("inf")
    pa = CORNERS @ a[:, :2].T + a[:, 2]
    pb = CORNERS @ b[:, :2].T + b[:, 2]
    return float(np.linalg.norm(pa - pb, axis=1).mean())


Estimator = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray | None, np.ndarray]]


def ours(threads: int) -> Estimator:
    def run(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        r = estimate_transform(src, dst, "affine", threshold=THRESHOLD, confidence=CONFIDENCE,
                               max_iterations=MAX_ITERS, num_threads=threads)
        return (r.matrix if r else None), r.inliers
    return run


def opencv(method: int) -> Estimator:
    def run(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        m, mask = cv2.estimateAffine2D(src, dst, method=method, ransacReprojThreshold=THRESHOLD,
                                       confidence=CONFIDENCE, maxIters=MAX_ITERS)
        return m, (mask.ravel().astype(bool) if mask is not None else np.zeros(len(src), bool))
    return run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000])
    args = ap.parse_args(argv)

    cv2.setNumThreads(1)  # estimateAffine2D is sequential; keep OpenCV's pool out of the timing
    methods: dict[str, Estimator] = {
        "deepalign-fast (1 thread)": ours(1),
        "deepalign-fast (2 threads)": ours(2),
        "cv2 RANSAC": opencv(cv2.RANSAC),
        "cv2 USAC_MAGSAC": opencv(cv2.USAC_MAGSAC),
    }
    rows: list[dict[str, Any]] = []
    for n in args.sizes:
        problems = [make_problem(n, seed) for seed in range(args.seeds)]
        per_method: dict[str, dict[str, list[float]]] = {
            k: {"t": [], "err": [], "prec": [], "rec": []} for k in methods
        }
        # Methods are interleaved per seed so machine load hits them alike.
        for src, dst, m, truth in problems:
            for name, fn in methods.items():
                t = measure(lambda fn=fn, src=src, dst=dst: fn(src, dst), repeats=args.repeats,
                            warmup=1)
                est, mask = fn(src, dst)
                tp = float((mask & truth).sum())
                acc = per_method[name]
                acc["t"].append(t.median_s)
                acc["err"].append(corner_error(est, m))
                acc["prec"].append(tp / max(mask.sum(), 1))
                acc["rec"].append(tp / truth.sum())
        base = statistics.median(per_method["cv2 RANSAC"]["t"])
        for name, acc in per_method.items():
            med = statistics.median(acc["t"])
            rows.append({
                "method": name, "N": n,
                "time_ms": med * 1e3,
                "speedup_vs_cv2_ransac": base / med,
                "corner_err_px": statistics.mean(acc["err"]),
                "corner_err_max_px": max(acc["err"]),
                "precision": statistics.mean(acc["prec"]),
                "recall": statistics.mean(acc["rec"]),
                "times_ms_per_seed": [x * 1e3 for x in acc["t"]],
            })
    path = save_json("ransac", rows, {"config": {
        "threshold": THRESHOLD, "confidence": CONFIDENCE, "max_iters": MAX_ITERS,
        "outlier_ratio": 0.5, "noise_px": 0.5, "frame": FRAME, "seeds": args.seeds,
        "repeats": args.repeats}})
    print(markdown_table(rows, ["method", "N", "time_ms", "speedup_vs_cv2_ransac",
                                "corner_err_px", "corner_err_max_px", "precision", "recall"]))
    print(f"\nJSON: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
