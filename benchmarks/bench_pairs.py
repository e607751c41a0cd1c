"""Pair estimates against the exact truth: every nearest pair matched from scratch.

    python -m benchmarks.bench_pairs --cases xz-drift,yz-drift --seed 22 \\
        --set rotation_deg=0.5,scale=0.02,shear=0.02

The stacks are those of ``bench_exact`` (same cases, seeds and ``--set`` overrides). Each
slice is matched with the next by the block back-end the aligner uses, from scratch (no
prediction), once with the Lucas-Kanade refinement limited to its first three passes and
once as released (passes go on while the map still moves and its blocks still gain
correlation). A pair's error is the mean distance, over a 12 x 12 grid spanning the frame,
between the estimated map and the exact one, ``truth[z + 1]^-1 o truth[z]``. Exactly
aligned neighbours still differ by the content's own apparent motion (about 0.1-0.15 px per
slice on the lucchi reslices), so the error of a good pair is not zero.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
from deepalign_fast.geometry import apply_affine, compose, invert
from deepalign_fast.match.backends import make_backend

from benchmarks import bench_exact

VARIANTS = {"three passes": 3, "until still": None}


def pair_errors(stack: np.ndarray, truth: np.ndarray, most: int | None) -> dict[str, Any]:
    """Match every nearest pair of ``stack`` from scratch; errors against ``truth``.

    ``most``: the refinement's ``lk_max_iterations`` (None: the back-end's default)."""
    backend = make_backend("blocks", model="affine", threshold=2.0)
    if most is not None:
        backend.matcher.lk_max_iterations = most
    h, w = stack.shape[1:]
    gx, gy = np.meshgrid(np.linspace(0, w - 1, 12), np.linspace(0, h - 1, 12))
    grid = np.stack([gx.ravel(), gy.ravel()], 1)
    prepared = [backend.prepare(s) for s in stack]
    errors, scores = [], []
    t0 = time.perf_counter()
    for z in range(len(stack) - 1):
        m, corr = backend.match(prepared[z], prepared[z + 1], None)
        if m is None:
            errors.append(np.inf)
            scores.append(0.0)
            continue
        exact = compose(invert(truth[z + 1]), truth[z])
        errors.append(float(np.linalg.norm(apply_affine(m, grid) - apply_affine(exact, grid),
                                           axis=1).mean()))
        scores.append(corr.correlation)
    e, s = np.asarray(errors), np.asarray(scores)
    # what the aligner would leave out: no map, or blocks correlating at less than half the
    # stack's usual (StackMatcher._unlike)
    lost = ~np.isfinite(e) | (s < 0.5 * np.median(s))
    return {"pairs": len(e), "lost": int(lost.sum()), "median": float(np.median(e)),
            "mean_kept": float(e[~lost].mean()) if (~lost).any() else float("nan"),
            "p99": float(np.percentile(e, 99)), "max": float(e.max()),
            "seconds": round(time.perf_counter() - t0, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="xz-drift,yz-drift",
                    help="comma-separated bench_exact case names")
    ap.add_argument("--seed", default="1", help="seed, or several comma-separated")
    ap.add_argument("--set", default="", metavar="k=v,...",
                    help="drift-profile overrides, as bench_exact --set")
    args = ap.parse_args(argv)
    overrides = bench_exact.parse_overrides(args.set) or None
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in bench_exact.CASES]
    if unknown:
        raise SystemExit(f"--cases: unknown {', '.join(unknown)}; known: "
                         f"{', '.join(bench_exact.CASES)}")
    seeds = bench_exact.parse_seeds(args.seed)
    print("| case | seed | refinement | pairs | lost | median error (px) | mean of the kept "
          "(px) | p99 (px) | max (px) | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        for seed in seeds:
            stack, truth, _ = bench_exact.build(bench_exact.CASES[name], seed, overrides)
            for variant, most in VARIANTS.items():
                r = pair_errors(stack, truth, most)
                print(f"| {name} | {seed} | {variant} | {r['pairs']} | {r['lost']} | "
                      f"{r['median']:.3f} | {r['mean_kept']:.3f} | {r['p99']:.2f} | "
                      f"{r['max']:.2f} | {r['seconds']} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
