"""warp_affine (C++ core) vs cv2.warpAffine and cv2.remap.

Run: ``python -m benchmarks.bench_warp [--repeats N] [--sizes 2048 4096]``

Cases: uint8 and float32 slices of 2048^2 and 4096^2, 1 and 2 threads (cv2.setNumThreads to
match), a general affine (1.5 degree rotation, 1 % scale, sub-pixel shift) and a pure
sub-pixel translation. Bilinear, constant border, pull map (WARP_INVERSE_MAP). Reported:
median ms, Mpx/s, speed ratio vs cv2.warpAffine (> 1: faster than cv2), and the max abs error
of each method against scipy.ndimage.map_coordinates (float64, order=1, mode="grid-constant")
on a 256x256 crop of the output.
"""

from __future__ import annotations

import argparse

import cv2
import numpy as np
from deepalign_fast import warp_affine
from scipy import ndimage as ndi

from benchmarks._timing import markdown_table, measure, save_json

FLAGS = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP


def _transforms(n: int) -> dict[str, np.ndarray]:
    th, s = np.deg2rad(1.5), 1.01
    c = (n - 1) / 2
    a = s * np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    t = np.array([c, c]) - a @ np.array([c, c]) + np.array([3.3, -2.7])
    return {
        "affine": np.hstack([a, t[:, None]]),
        "translation": np.array([[1.0, 0.0, 3.3], [0.0, 1.0, -2.7]]),
    }


def _maps(m: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.arange(n, dtype=np.float32)[None, :]
    y = np.arange(n, dtype=np.float32)[:, None]
    mf = m.astype(np.float32)
    return mf[0, 0] * x + mf[0, 1] * y + mf[0, 2], mf[1, 0] * x + mf[1, 1] * y + mf[1, 2]


def _crop_error(out: np.ndarray, img: np.ndarray, m: np.ndarray) -> float:
    n = img.shape[0]
    y0 = x0 = n // 2 - 128
    yy, xx = np.mgrid[y0 : y0 + 256, x0 : x0 + 256].astype(np.float64)
    sx = m[0, 0] * xx + m[0, 1] * yy + m[0, 2]
    sy = m[1, 0] * xx + m[1, 1] * yy + m[1, 2]
    ref = ndi.map_coordinates(img.astype(np.float64), [sy, sx], order=1, mode="grid-constant")
    return float(np.abs(out[y0 : y0 + 256, x0 : x0 + 256].astype(np.float64) - ref).max())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = []
    for n in args.sizes:
        base = cv2.GaussianBlur((rng.random((n, n)) * 255).astype(np.float32), (0, 0), 1.0)
        for dtype in (np.uint8, np.float32):
            img = base.astype(dtype)
            for tname, m in _transforms(n).items():
                mx, my = _maps(m, n)
                out = np.empty_like(img)
                methods = {
                    "ours": lambda nt: warp_affine(img, m, num_threads=nt, out=out),
                    "cv2.warpAffine": lambda nt: cv2.warpAffine(img, m, (n, n), flags=FLAGS),
                    "cv2.remap (maps given)": lambda nt: cv2.remap(img, mx, my, cv2.INTER_LINEAR),
                    "cv2.remap (+maps)": lambda nt: cv2.remap(img, *_maps(m, n), cv2.INTER_LINEAR),
                }
                errors = {k: _crop_error(f(1), img, m) for k, f in methods.items()}
                for nt in (1, 2):
                    cv2.setNumThreads(nt)
                    times = {k: measure(lambda f=f: f(nt), repeats=args.repeats, warmup=1)
                             for k, f in methods.items()}
                    ref_ms = times["cv2.warpAffine"].median_ms
                    for k, t in times.items():
                        rows.append({
                            "size": n, "dtype": np.dtype(dtype).name, "transform": tname,
                            "threads": nt, "method": k, "median_ms": t.median_ms,
                            "iqr_ms": t.iqr_s * 1e3, "Mpx/s": n * n / t.median_s / 1e6,
                            "speedup_vs_cv2": ref_ms / t.median_ms,
                            "max_abs_err": errors[k],
                        })
                    print(f"{n} {np.dtype(dtype).name} {tname} threads={nt}: ours "
                          f"{times['ours'].median_ms:.1f} ms, cv2 {ref_ms:.1f} ms", flush=True)
    cv2.setNumThreads(-1)
    path = save_json("bench_warp", rows, {"repeats": args.repeats})
    print(markdown_table(rows, ["size", "dtype", "transform", "threads", "method", "median_ms",
                                "Mpx/s", "speedup_vs_cv2", "max_abs_err"]))
    print(f"\nJSON: {path}")


if __name__ == "__main__":
    main()
