"""Stack alignment: accuracy (TRE on real EM with known synthetic misalignment) and speed,
deepalign-fast side by side with pystackreg and the seed's OpenCV SIFT+RANSAC chained loop.

    python -m benchmarks.bench_align                 # accuracy cases + throughput + memory
    python -m benchmarks.bench_align --quick         # short stacks only

Every method returns per-slice pull maps (output -> slice), scored by the same
`metrics.target_registration_error` (one global affine frame removed).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from deepalign_fast import Aligner, datasets
from deepalign_fast.qc.metrics import target_registration_error
from deepalign_fast.qc.synth import misalign_stack

from benchmarks._timing import markdown_table, save_json, update_results
from benchmarks.peers import elastix_chain, pystackreg_chain, sift_chain


def _have(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def ours(stack: np.ndarray, features: str, slow_drift: str) -> np.ndarray:
    r = Aligner(features=features, slow_drift=slow_drift).estimate(stack, progress=False)
    return r.transforms.affines


CASES = {
    # name: (loader, n slices, profile, model)
    "lucchi FIB-SEM, jitter": (datasets.load_lucchi, 165, "jitter", "rigid"),
    "lucchi FIB-SEM, fibsem (jitter + drift)": (datasets.load_lucchi, 165, "fibsem", "rigid"),
    "isbi ssTEM, sstem": (datasets.load_isbi2012, 30, "sstem", "affine"),
    "drosophila ssTEM, sstem": (datasets.load_drosophila, 20, "sstem", "affine"),
}


def accuracy(quick: bool) -> list[dict[str, Any]]:
    rows = []
    for name, (load, n, profile, model) in CASES.items():
        try:
            stack = load()
        except datasets.DataUnavailable as exc:
            print(f"skip {name}: {exc}")
            continue
        stack = stack[: (min(n, 40) if quick else n)]
        mis, truth = misalign_stack(stack, 0, profile=profile)
        methods = {
            "deepalign-fast (default)": lambda s: ours(s, "blocks", "keep"),
            "deepalign-fast --slow-drift follow": lambda s: ours(s, "blocks", "follow"),
            "deepalign-fast --features sift": lambda s: ours(s, "sift", "keep"),
            f"SIFT+RANSAC chained ({model})": lambda s: sift_chain(s, model),
            f"pystackreg {model} previous": lambda s: pystackreg_chain(s, model),
        }
        if _have("itk"):
            methods[f"itk-elastix {model} chained"] = lambda s: elastix_chain(s, model)
        for mname, fn in methods.items():
            t0 = time.perf_counter()
            affines = fn(mis)
            dt = time.perf_counter() - t0
            tre = target_registration_error(affines, truth.transforms, mis.shape[1:])
            row = {"case": name, "slices": len(mis), "shape": f"{mis.shape[1]}x{mis.shape[2]}",
                   "method": mname, "tre_median_px": tre.median, "tre_p95_px": tre.p95,
                   "tre_max_px": tre.max, "time_s": dt, "slices_per_s": len(mis) / dt}
            rows.append(row)
            print(f"{name:42s} {mname:44s} TRE median {tre.median:7.3f} p95 {tre.p95:7.3f} "
                  f"{dt:6.1f} s", flush=True)
    return rows


def _big_stack(n: int, size: int = 2048) -> np.ndarray:
    """n slices of real EM (drosophila ssTEM, upsampled to size^2) with 3 px jitter."""
    try:
        base = datasets.load_drosophila()
    except datasets.DataUnavailable:
        base = datasets.load_lucchi()
    rng = np.random.default_rng(0)
    out = np.empty((n, size, size), np.uint8)
    for z in range(n):
        img = cv2.resize(base[z % len(base)], (size + 16, size + 16), interpolation=cv2.INTER_CUBIC)
        dx, dy = rng.integers(0, 16, 2)
        out[z] = img[dy:dy + size, dx:dx + size]
    return out


def throughput(n: int) -> list[dict[str, Any]]:
    import tifffile

    stack = _big_stack(n)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "big.tif"
        tifffile.imwrite(src, stack, photometric="minisblack")
        runs = {
            "deepalign-fast align (file -> file, default options)": lambda: Aligner(
                ).align_stack(src, Path(tmp) / "out.tif", progress=False),
            "SIFT+RANSAC chained, 8000 keypoints (estimate only)": lambda: sift_chain(
                stack, "rigid", max_features=8000),
            "pystackreg rigid (estimate only)": lambda: pystackreg_chain(stack, "rigid"),
        }
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            (Path(tmp) / "out.tif").unlink(missing_ok=True)
            mpx = n * stack.shape[1] * stack.shape[2] / 1e6
            rows.append({"method": name, "slices": n, "shape": "2048x2048", "time_s": dt,
                         "slices_per_s": n / dt, "mpx_per_s": mpx / dt})
            print(f"{name:48s} {n / dt:6.2f} slices/s {mpx / dt:7.1f} Mpx/s", flush=True)
    return rows


# Peak memory from VmHWM (per address space, reset by exec); ru_maxrss would carry over the
# parent's high-water mark through fork + exec.
_MEM_SCRIPT = """
import sys
from deepalign_fast import Aligner
Aligner().align_stack(sys.argv[1], sys.argv[2], progress=False)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(int(hwm.split()[1]))
"""


def memory(depths: list[int]) -> list[dict[str, Any]]:
    import tifffile

    rows = []
    base = _big_stack(8, size=1024)
    with tempfile.TemporaryDirectory() as tmp:
        for n in depths:
            src = Path(tmp) / f"d{n}.tif"
            stack = np.stack([base[z % len(base)] for z in range(n)])
            tifffile.imwrite(src, stack, photometric="minisblack", compression="zlib")
            out = subprocess.run([sys.executable, "-c", _MEM_SCRIPT, str(src),
                                  str(Path(tmp) / f"o{n}.tif")], check=True, capture_output=True,
                                 text=True, env=dict(os.environ))
            rss_mb = int(out.stdout.strip().splitlines()[-1]) / 1024
            rows.append({"depth": n, "shape": "1024x1024", "stack_mb": stack.nbytes / 2**20,
                         "peak_rss_mb": rss_mb})
            print(f"depth {n:4d}: stack {stack.nbytes / 2**20:7.1f} MiB, "
                  f"peak RSS {rss_mb:7.1f} MiB",
                  flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip", nargs="*", default=[], choices=["accuracy", "throughput", "memory"])
    ap.add_argument("--write-results", action="store_true",
                    help="replace the generated tables in benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    cv2.setNumThreads(2)
    result: dict[str, Any] = {}
    if "accuracy" not in args.skip:
        result["accuracy"] = accuracy(args.quick)
        print(markdown_table(result["accuracy"], ["case", "slices", "method", "tre_median_px",
                                                  "tre_p95_px", "time_s", "slices_per_s"]))
    if "throughput" not in args.skip:
        result["throughput"] = throughput(6 if args.quick else 12)
        print(markdown_table(result["throughput"], ["method", "slices", "shape", "time_s",
                                                    "slices_per_s", "mpx_per_s"]))
    if "memory" not in args.skip:
        result["memory"] = memory([20, 80] if args.quick else [20, 80, 320])
        print(markdown_table(result["memory"], ["depth", "shape", "stack_mb", "peak_rss_mb"]))
    save_json("align", [r for v in result.values() for r in v])
    if args.write_results:
        cmd = "python -m benchmarks.bench_align" + (" --quick" if args.quick else "") + \
            "".join(f" --skip {k}" for k in args.skip)
        parts = [f"Generated by `PYTHONPATH=python:. {cmd} --write-results` on "
                 f"{time.strftime('%Y-%m-%d')} (peers: pystackreg, OpenCV SIFT+RANSAC chain"
                 + (", itk-elastix" if _have("itk") else "") + ")."]
        cols = {"accuracy": ["case", "slices", "method", "tre_median_px", "tre_p95_px", "time_s",
                             "slices_per_s"],
                "throughput": ["method", "slices", "shape", "time_s", "slices_per_s", "mpx_per_s"],
                "memory": ["depth", "shape", "stack_mb", "peak_rss_mb"]}
        for key, rows in result.items():
            parts.append(f"**{key}**\n\n" + markdown_table(rows, cols[key]))
        update_results("bench_align" + ("_quick" if args.quick else ""), "\n\n".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
