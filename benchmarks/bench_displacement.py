"""warp_displacement (C++ core) vs cv2.remap; Jacobian and folding fraction vs numpy.

Run: ``python -m benchmarks.bench_displacement [--repeats N] [--sizes 2048 4096]``

Warp cases: uint8 and float32 slices of 2048^2 and 4096^2, 1 and 2 threads (cv2.setNumThreads
to match), a smooth random displacement field (a few pixels, float32 (2, H, W)), bilinear,
constant border. cv2.remap gets the same pull map as absolute float32 maps ``x + u[0]``,
``y + u[1]``, timed with the maps given and with building them from ``u`` in numpy (what a
caller holding a displacement field pays). Reported: median ms, Mpx/s, speed ratio vs
cv2.remap with maps given (> 1: faster), and the max abs error of each method against
scipy.ndimage.map_coordinates (float64, order=1, mode="grid-constant") on a 256x256 crop.

Jacobian cases: determinant map and non-positive fraction of the same field (float32) vs the
numpy implementation (numpy.gradient in float64, as metrics used before it delegated here).
"""

from __future__ import annotations

import argparse
from typing import Any

import cv2
import numpy as np
from deepalign_fast import jacobian_determinant, nonpositive_jacobian_fraction, warp_displacement
from scipy import ndimage as ndi

from benchmarks._timing import (
    markdown_table,
    measure_interleaved,
    metadata,
    save_json,
    update_results,
)


def _field(n: int, rng: np.random.Generator) -> np.ndarray:
    # Smooth random field: coarse noise upsampled, amplitude ~4 px, with some folds.
    coarse = rng.normal(size=(2, 17, 17)) * 4.0
    return np.stack([cv2.resize(c, (n, n), interpolation=cv2.INTER_CUBIC)
                     for c in coarse]).astype(np.float32)


def _maps(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n_y, n_x = u.shape[1:]
    x = np.arange(n_x, dtype=np.float32)[None, :]
    y = np.arange(n_y, dtype=np.float32)[:, None]
    return x + u[0], y + u[1]


def _crop_error(out: np.ndarray, img: np.ndarray, u: np.ndarray) -> float:
    n = img.shape[0]
    y0 = x0 = n // 2 - 128
    yy, xx = np.mgrid[y0 : y0 + 256, x0 : x0 + 256].astype(np.float64)
    sx = xx + u[0, y0 : y0 + 256, x0 : x0 + 256]
    sy = yy + u[1, y0 : y0 + 256, x0 : x0 + 256]
    ref = ndi.map_coordinates(img.astype(np.float64), [sy, sx], order=1, mode="grid-constant")
    return float(np.abs(out[y0 : y0 + 256, x0 : x0 + 256].astype(np.float64) - ref).max())


def _numpy_jacobian(u: np.ndarray) -> np.ndarray:
    v = u.astype(np.float64)
    dux_dy, dux_dx = np.gradient(v[0])
    duy_dy, duy_dx = np.gradient(v[1])
    return (1.0 + dux_dx) * (1.0 + duy_dy) - dux_dy * duy_dx


def _ratio(other_ms: float, ours_ms: float) -> str:
    r = other_ms / ours_ms
    return f"**{r:.2f}**" if r < 1 else f"{r:.2f}"


def summary(rows: list[dict[str, Any]], jac_rows: list[dict[str, Any]]) -> str:
    """Compact tables: the warp against cv2.remap, the Jacobian kernels against numpy."""
    by = {(r["size"], r["dtype"], r["threads"], r["method"]): r for r in rows}
    lines = ["| size | dtype | threads | ours ms | remap ms | x | remap +maps ms | x "
             "| max error ours / remap |", "|" + "---|" * 9]
    for r in rows:
        if r["method"] != "ours":
            continue
        key = (r["size"], r["dtype"], r["threads"])
        remap = by[(*key, "cv2.remap (maps given)")]
        plus = by[(*key, "cv2.remap (+maps)")]
        lines.append(
            f"| {r['size']} | {r['dtype']} | {r['threads']} | {r['median_ms']:.2f} | "
            f"{remap['median_ms']:.2f} | {_ratio(remap['median_ms'], r['median_ms'])} | "
            f"{plus['median_ms']:.2f} | {_ratio(plus['median_ms'], r['median_ms'])} | "
            f"{r['max_abs_err']:.3g} / {remap['max_abs_err']:.3g} |")
    jby = {(r["size"], r["what"], r["threads"], r["method"]): r for r in jac_rows}
    lines += ["", "| size | Jacobian | threads | ours ms | numpy ms | x |", "|" + "---|" * 6]
    for r in jac_rows:
        if r["method"] != "ours":
            continue
        ref = jby[(r["size"], r["what"], r["threads"], "numpy (np.gradient, float64)")]
        lines.append(f"| {r['size']} | {r['what']} | {r['threads']} | {r['median_ms']:.2f} | "
                     f"{ref['median_ms']:.1f} | {_ratio(ref['median_ms'], r['median_ms'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--write-results", action="store_true",
                   help="replace the generated bench_displacement tables in benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = []
    jac_rows = []
    for n in args.sizes:
        base = cv2.GaussianBlur((rng.random((n, n)) * 255).astype(np.float32), (0, 0), 1.0)
        u = _field(n, rng)
        mx, my = _maps(u)
        for dtype in (np.uint8, np.float32):
            img = base.astype(dtype)
            out = np.empty_like(img)
            methods = {
                "ours": lambda nt: warp_displacement(img, u, num_threads=nt, out=out),
                "cv2.remap (maps given)": lambda nt: cv2.remap(img, mx, my, cv2.INTER_LINEAR),
                "cv2.remap (+maps)": lambda nt: cv2.remap(img, *_maps(u), cv2.INTER_LINEAR),
            }
            errors = {k: _crop_error(f(1), img, u) for k, f in methods.items()}
            for nt in (1, 2):
                cv2.setNumThreads(nt)
                # Round-robin: load changes on a shared machine hit every method alike.
                times = measure_interleaved(
                    {k: (lambda f=f, nt=nt: f(nt)) for k, f in methods.items()},
                    repeats=args.repeats, warmup=1)
                ref_ms = times["cv2.remap (maps given)"].median_ms
                for k, t in times.items():
                    rows.append({
                        "size": n, "dtype": np.dtype(dtype).name, "threads": nt, "method": k,
                        "median_ms": t.median_ms, "iqr_ms": t.iqr_s * 1e3,
                        "Mpx/s": n * n / t.median_s / 1e6,
                        "speedup_vs_remap": ref_ms / t.median_ms, "max_abs_err": errors[k],
                    })
                print(f"{n} {np.dtype(dtype).name} threads={nt}: ours "
                      f"{times['ours'].median_ms:.1f} ms, remap {ref_ms:.1f} ms, remap+maps "
                      f"{times['cv2.remap (+maps)'].median_ms:.1f} ms", flush=True)
        # Jacobian: same answer first, then time.
        ref = _numpy_jacobian(u)
        assert np.array_equal(jacobian_determinant(u), ref.astype(np.float32))
        frac_ref = float(np.count_nonzero(ref <= 0)) / ref.size
        assert nonpositive_jacobian_fraction(u) == frac_ref
        det_out = np.empty((n, n), np.float32)
        jac = {
            ("determinant", "numpy (np.gradient, float64)"): lambda nt: _numpy_jacobian(u),
            ("determinant", "ours"): lambda nt: jacobian_determinant(u, num_threads=nt,
                                                                     out=det_out),
            ("fraction", "numpy (np.gradient, float64)"):
                lambda nt: np.count_nonzero(_numpy_jacobian(u) <= 0) / (n * n),
            ("fraction", "ours"): lambda nt: nonpositive_jacobian_fraction(u, num_threads=nt),
        }
        for nt in (1, 2):
            times = measure_interleaved({k: (lambda f=f, nt=nt: f(nt)) for k, f in jac.items()},
                                        repeats=args.repeats, warmup=1)
            for (what, method), t in times.items():
                base_ms = times[(what, "numpy (np.gradient, float64)")].median_ms
                jac_rows.append({
                    "size": n, "what": what, "threads": nt, "method": method,
                    "median_ms": t.median_ms, "iqr_ms": t.iqr_s * 1e3,
                    "speedup_vs_numpy": base_ms / t.median_ms,
                })
            print(f"{n} jacobian threads={nt}: ours "
                  f"{times[('determinant', 'ours')].median_ms:.1f} ms, numpy "
                  f"{times[('determinant', 'numpy (np.gradient, float64)')].median_ms:.1f} ms; "
                  f"fraction ours {times[('fraction', 'ours')].median_ms:.1f} ms "
                  f"(folded {100 * frac_ref:.2f} %)", flush=True)
    cv2.setNumThreads(-1)
    meta = metadata()
    path = save_json("bench_displacement", rows + jac_rows, {"repeats": args.repeats})
    print(markdown_table(rows, ["size", "dtype", "threads", "method", "median_ms", "Mpx/s",
                                "speedup_vs_remap", "max_abs_err"]))
    print()
    print(markdown_table(jac_rows, ["size", "what", "threads", "method", "median_ms",
                                    "speedup_vs_numpy"]))
    print("\n(numpy has no thread knob: its 'threads' rows repeat the single-threaded run.)")
    table = summary(rows, jac_rows)
    print("\n" + table)
    print(f"\nJSON: {path}")
    if args.write_results:
        sizes = " ".join(str(n) for n in args.sizes)
        update_results("bench_displacement", (
            f"Command: `PYTHONPATH=python:. python -m benchmarks.bench_displacement --repeats "
            f"{args.repeats} --sizes {sizes} --write-results` ({meta['time'][:10]}, OpenCV "
            f"{meta.get('opencv')}, numpy {meta['numpy']}, load average "
            f"{meta['loadavg_1min']:.1f} at the end). Medians of {args.repeats} round-robin "
            "repeats; x = other ms / ours ms at the same thread count (> 1: ours faster, bold: "
            "ours slower). `remap` is cv2.remap with the absolute float32 maps already built "
            "(the hardest comparison); `+maps` also builds them from the field in numpy. "
            "Error: max abs difference from the float64 `map_coordinates` reference on a "
            "256x256 crop.\n\n" + table))


if __name__ == "__main__":
    main()
