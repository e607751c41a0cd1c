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
from typing import Any

import cv2
import numpy as np
from deepalign_fast import warp_affine
from scipy import ndimage as ndi

from benchmarks._timing import (
    markdown_table,
    measure_interleaved,
    metadata,
    save_json,
    update_results,
)

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


def summary(rows: list[dict[str, Any]]) -> str:
    """One line per case: ours and cv2.warpAffine on 1 and 2 threads, their ratio, errors."""
    by = {(r["size"], r["dtype"], r["transform"], r["threads"], r["method"]): r for r in rows}
    cases = sorted({(r["size"], r["dtype"], r["transform"]) for r in rows},
                   key=lambda c: (c[0], c[1] != "uint8", c[2]))
    lines = ["| size | dtype | transform | ours 1 thr ms | cv2 1 thr ms | x | ours 2 thr ms "
             "| cv2 2 thr ms | x | max error ours / cv2 |", "|" + "---|" * 10]
    for size, dtype, tname in cases:
        cells = [str(size), dtype, tname]
        for nt in (1, 2):
            ours = by.get((size, dtype, tname, nt, "ours"))
            cv = by.get((size, dtype, tname, nt, "cv2.warpAffine"))
            if ours is None or cv is None:
                cells += ["", "", ""]
                continue
            ratio = cv["median_ms"] / ours["median_ms"]
            cells += [f"{ours['median_ms']:.2f}", f"{cv['median_ms']:.2f}",
                      f"**{ratio:.2f}**" if ratio < 1 else f"{ratio:.2f}"]
        ours1 = by[(size, dtype, tname, 1, "ours")]
        cv1 = by[(size, dtype, tname, 1, "cv2.warpAffine")]
        cells.append(f"{ours1['max_abs_err']:.3g} / {cv1['max_abs_err']:.3g}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--write-results", action="store_true",
                   help="replace the generated bench_warp table in benchmarks/RESULTS.md")
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
                    # Round-robin: load changes on a shared machine hit every method alike.
                    times = measure_interleaved(
                        {k: (lambda f=f, nt=nt: f(nt)) for k, f in methods.items()},
                        repeats=args.repeats, warmup=1)
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
                          f"{times['ours'].median_ms:.2f} ms, cv2 {ref_ms:.2f} ms", flush=True)
    cv2.setNumThreads(-1)
    meta = metadata()
    path = save_json("bench_warp", rows, {"repeats": args.repeats})
    print(markdown_table(rows, ["size", "dtype", "transform", "threads", "method", "median_ms",
                                "Mpx/s", "speedup_vs_cv2", "max_abs_err"]))
    table = summary(rows)
    print("\n" + table)
    print(f"\nJSON: {path}")
    if args.write_results:
        sizes = " ".join(str(n) for n in args.sizes)
        update_results("bench_warp", (
            f"Command: `PYTHONPATH=python:. python -m benchmarks.bench_warp --repeats "
            f"{args.repeats} --sizes {sizes} --write-results` ({meta['time'][:10]}, OpenCV "
            f"{meta.get('opencv')}, numpy {meta['numpy']}, load average "
            f"{meta['loadavg_1min']:.1f} at the end). Medians of {args.repeats} round-robin "
            "repeats; x = cv2 ms / ours ms at the same thread count (> 1: ours faster, bold: "
            "ours slower). Error: max abs difference from the float64 `map_coordinates` "
            "reference on a 256x256 crop (uint8 in LSB, float32 image in 0..255).\n\n" + table))


if __name__ == "__main__":
    main()
