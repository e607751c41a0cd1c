"""Learned (ONNX encoder) vs raw SIFT features for pairwise affine alignment.

    python -m benchmarks.bench_features [--pairs-per-stack 8] [--trials 2]

Protocol (only the features differ; both go through ``match_features`` and the same
``cv2.estimateAffine2D`` RANSAC):

* pairs of NEIGHBOURING slices ``(z, z+1)`` from the held-out part of each real stack (the last
  20 % of slices, which ``export.train_ssl`` never trains on): lucchi (FIB-SEM, 5 nm),
  isbi (ssTEM, 50 nm sections), drosophila (ssTEM, 50 nm sections);
* the stacks are already aligned, so the true transform between ``z`` and ``z+1`` is about the
  identity; on top of it a known random affine (rotation +-3 deg, scale +-3 %, shear +-0.02,
  shift +-12 px) is applied to slice ``z+1``; reference and moving are central crops (48 px
  margin) so no padding enters the frame;
* condition ``artifacts``: synthetic artifacts applied AFTER the misalignment, to both slices
  with different seeds, using parameter ranges (``BENCH_PARAMS``) and seeds different from
  training; condition ``clean``: misalignment only;
* control condition ``artifacts-same-slice``: the moving image is the reference slice itself
  (warped + corrupted), so the true transform is known exactly and only artifact robustness
  is measured, without section-to-section change;
* success = estimated affine within 1 px of the truth at all four crop corners; TRE = RMS error
  over a 9x9 grid of points covering the crop (pixels), median over trials (failed estimates
  count as failures and enter the TRE median as inf).

Feature sets: ``sift`` (raw-image SIFT, RootSIFT descriptors), ``learned`` (DoG keypoints on
the raw slice + learned descriptors, the default ``LearnedExtractor``), ``learned-response``
(keypoints from the learned feature response too: nothing from raw intensities).

Also times feature extraction per 512^2 and 1024^2 slice on the CPU.
"""

from __future__ import annotations

import argparse
import math
import time

import cv2
import numpy as np
from deepalign_fast import datasets
from deepalign_fast.match.keypoints import FeatureExtractor, SiftExtractor, match_features
from deepalign_fast.match.learned import LearnedExtractor
from deepalign_fast.qc.artifacts import ArtifactParams, apply_artifacts

from ._timing import markdown_table, measure, save_json

#: Benchmark artifact ranges: deliberately stronger / shifted relative to the training
#: defaults (``ArtifactParams()``), so the benchmark is not the training distribution.
BENCH_PARAMS = ArtifactParams(
    inhomogeneity_amplitude=(0.2, 0.45),
    charging_blobs=(2, 5),
    charging_amplitude=(0.3, 0.8),
    curtain_count=(10, 50),
    curtain_amplitude=(0.1, 0.4),
    brightness=(-0.3, 0.3),
    contrast=(0.5, 1.7),
    blur_sigma_px=(0.8, 2.0),
    scanline_fraction=(0.01, 0.03),
    poisson_peak=(10.0, 80.0),
    gaussian_sigma=(0.05, 0.15),
)
MARGIN = 48
STACKS = {"lucchi": datasets.load_lucchi, "isbi": datasets.load_isbi2012,
          "drosophila": datasets.load_drosophila}


def held_out(n: int, fraction: float = 0.2) -> range:
    """Same split as ``export.train_ssl.split_slices``: the last ``fraction`` (>= 2 slices)."""
    n_val = max(2, int(math.ceil(n * fraction)))
    return range(n - n_val, n)


def random_affine(rng: np.random.Generator, centre: tuple[float, float]) -> np.ndarray:
    """Pull map reference-crop coords -> moving-crop coords (2x3 float64)."""
    rot = np.deg2rad(rng.uniform(-3, 3))
    s = math.exp(rng.uniform(-0.03, 0.03))
    sh = rng.uniform(-0.02, 0.02)
    lin = s * np.array([[math.cos(rot), -math.sin(rot)], [math.sin(rot), math.cos(rot)]])
    lin = lin @ np.array([[1.0, sh], [0.0, 1.0]])
    c = np.asarray(centre)
    t = rng.uniform(-12, 12, 2)
    return np.hstack([lin, (c + t - lin @ c)[:, None]])


def make_pair(stack: np.ndarray, z: int, truth: np.ndarray, rng: np.random.Generator,
              artifacts: bool, same_slice: bool = False) -> tuple[np.ndarray, np.ndarray]:
    _, h, w = stack.shape
    ch, cw = h - 2 * MARGIN, w - 2 * MARGIN
    ref = stack[z, MARGIN:MARGIN + ch, MARGIN:MARGIN + cw].astype(np.float32)
    # moving(q) = slice z+1 at full-frame point T^-1(q) + MARGIN: the tissue that sits at
    # reference point p appears at moving point T(p).
    inv = cv2.invertAffineTransform(truth)
    inv[:, 2] += MARGIN
    moving = cv2.warpAffine(stack[z if same_slice else z + 1].astype(np.float32), inv, (cw, ch),
                            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                            borderMode=cv2.BORDER_REFLECT)
    if artifacts:
        seeds = rng.integers(0, 2**31, 2)
        ref = apply_artifacts(ref, np.random.default_rng(seeds[0]), params=BENCH_PARAMS)
        moving = apply_artifacts(moving, np.random.default_rng(seeds[1]), params=BENCH_PARAMS)
    return ref, moving


def errors(est: np.ndarray | None, truth: np.ndarray, shape: tuple[int, int]
           ) -> tuple[float, float]:
    """(max corner error, RMS error over a 9x9 grid) in pixels; inf when no estimate."""
    if est is None:
        return math.inf, math.inf
    h, w = shape
    corners = np.array([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]], float)
    gx, gy = np.meshgrid(np.linspace(0, w - 1, 9), np.linspace(0, h - 1, 9))
    grid = np.stack([gx.ravel(), gy.ravel()], 1)

    def err(p: np.ndarray) -> np.ndarray:
        ph = np.hstack([p, np.ones((len(p), 1))])
        return np.linalg.norm(ph @ est.T - ph @ truth.T, axis=1)

    return float(err(corners).max()), float(np.sqrt((err(grid) ** 2).mean()))


def estimate(ex: FeatureExtractor, ref: np.ndarray, moving: np.ndarray
             ) -> tuple[np.ndarray | None, int, int]:
    fr, fm = ex.extract(ref), ex.extract(moving)
    ia, ib = match_features(fr, fm)
    if ia.size < 3:
        return None, int(ia.size), 0
    est, inl = cv2.estimateAffine2D(fr.keypoints[ia], fm.keypoints[ib], method=cv2.RANSAC,
                                    ransacReprojThreshold=3.0, maxIters=5000,
                                    confidence=0.999, refineIters=10)
    return est, int(ia.size), int(inl.sum()) if inl is not None else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_features", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs-per-stack", type=int, default=8)
    ap.add_argument("--trials", type=int, default=2, help="random transforms per pair")
    ap.add_argument("--stacks", default="lucchi,isbi,drosophila")
    ap.add_argument("--num-threads", type=int, default=2, help="onnxruntime intra-op threads")
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--timing-repeats", type=int, default=5)
    args = ap.parse_args(argv)

    extractors: dict[str, FeatureExtractor] = {
        "sift": SiftExtractor(),
        "learned": LearnedExtractor(num_threads=args.num_threads),
        "learned-response": LearnedExtractor(num_threads=args.num_threads,
                                             keypoints="response"),
    }
    rows: list[dict[str, object]] = []
    trials: list[dict[str, object]] = []
    for name in [s for s in args.stacks.split(",") if s]:
        stack = np.asarray(STACKS[name]())
        zs = list(held_out(stack.shape[0]))[:-1]  # need z+1 inside the held-out range
        step = max(1, len(zs) // args.pairs_per_stack)
        zs = zs[::step][: args.pairs_per_stack]
        rng = np.random.default_rng([args.seed, len(name)])
        shape = (stack.shape[1] - 2 * MARGIN, stack.shape[2] - 2 * MARGIN)
        cases = []
        for z in zs:
            for _ in range(args.trials):
                truth = random_affine(rng, ((shape[1] - 1) / 2, (shape[0] - 1) / 2))
                pair_seed = int(rng.integers(0, 2**31))
                cases.append((z, truth, pair_seed))
        for cond in ("clean", "artifacts", "artifacts-same-slice"):
            for ex_name, ex in extractors.items():
                corner, tre, inl = [], [], []
                for z, truth, pair_seed in cases:
                    ref, mov = make_pair(stack, z, truth, np.random.default_rng(pair_seed),
                                         cond != "clean", cond == "artifacts-same-slice")
                    est, n_match, n_inl = estimate(ex, ref, mov)
                    c, t = errors(est, truth, shape)
                    corner.append(c)
                    tre.append(t)
                    inl.append(n_inl)
                    trials.append({"stack": name, "z": z, "condition": cond,
                                   "features": ex_name, "corner_err_px": c, "tre_px": t,
                                   "matches": n_match, "inliers": n_inl})
                corner_a = np.array(corner)
                row = {"stack": name, "condition": cond, "features": ex_name,
                       "pairs": len(cases),
                       "success@1px": float(np.mean(corner_a < 1.0)),
                       "success@2px": float(np.mean(corner_a < 2.0)),
                       "median TRE px": float(np.median(tre)),
                       "median inliers": float(np.median(inl))}
                rows.append(row)
                print(row, flush=True)

    timing_rows: list[dict[str, object]] = []
    src = np.asarray(datasets.load_drosophila())[-1]
    for side in (512, 1024):
        img = np.ascontiguousarray(src[:side, :side])
        for ex_name, ex in extractors.items():
            t = measure(lambda ex=ex, img=img: ex.extract(img), repeats=args.timing_repeats,
                        warmup=1)
            timing_rows.append({"features": ex_name, "slice": f"{side}x{side}",
                                "median ms": t.median_ms, "IQR ms": t.iqr_s * 1e3})
            print(timing_rows[-1], flush=True)
    cols = ["stack", "condition", "features", "pairs", "success@1px", "success@2px",
            "median TRE px", "median inliers"]
    print(markdown_table(rows, cols))
    print()
    print(markdown_table(timing_rows, ["features", "slice", "median ms", "IQR ms"]))
    path = save_json("bench_features", rows,
                     {"trials": trials, "timing": timing_rows, "args": vars(args),
                      "cv2_threads": cv2.getNumThreads(), "time": time.time(),
                      "bench_params": BENCH_PARAMS.__dict__})
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
