"""Run the benchmark suite: the C++ kernels against OpenCV/numpy, measured in the same run.

    python -m benchmarks.run                 # kernels at 2048^2, 5 repeats (a few minutes)
    python -m benchmarks.run --full          # the scripts' own defaults (2048^2 and 4096^2)
    python -m benchmarks.run --only warp ransac
    python -m benchmarks.run --write-results # also replace the generated tables in RESULTS.md

Each benchmark writes its JSON (rows + run metadata) to ``benchmarks/out/`` and prints its
tables. The end-to-end benchmarks (``bench_align``, ``bench_exact``, ``bench_dask``, ...) need
the shared EM data and run for many minutes; run them directly, as RESULTS.md says.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from benchmarks import bench_displacement, bench_ransac, bench_warp

# name -> (main, arguments for the default quick run, extra arguments for --full)
BENCHMARKS: dict[str, tuple[Callable[[list[str]], object], list[str], list[str]]] = {
    "warp": (bench_warp.main, ["--sizes", "2048", "--repeats", "5"], []),
    "displacement": (bench_displacement.main, ["--sizes", "2048", "--repeats", "5"], []),
    "ransac": (bench_ransac.main, ["--repeats", "5", "--seeds", "3"], []),
}
# Benchmarks that can rewrite their own RESULTS.md block.
WRITES_RESULTS = {"warp", "displacement"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), default=None,
                   help="run only these benchmarks")
    p.add_argument("--full", action="store_true",
                   help="each script's default sizes and repeats instead of the quick set")
    p.add_argument("--write-results", action="store_true",
                   help="replace the generated warp/displacement tables in benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    names = args.only or list(BENCHMARKS)
    for name in names:
        fn, quick, full = BENCHMARKS[name]
        bench_args = list(full if args.full else quick)
        if args.write_results and name in WRITES_RESULTS:
            bench_args.append("--write-results")
        print(f"\n=== {name}: python -m benchmarks.bench_{name} {' '.join(bench_args)}",
              flush=True)
        t0 = time.perf_counter()
        fn(bench_args)
        print(f"=== {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
