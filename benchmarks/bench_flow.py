"""Deformable registration: learned flow (DeepSim loss, NCC loss) vs affine and optical flow.

    PYTHONPATH=python:. python -m benchmarks.bench_flow \\
        --deepsim python/deepalign_fast/models/flow.onnx --ncc runs/flow_ncc/flow.onnx

Protocol. Pairs come from the HELD-OUT part of each real labelled stack (the last 20 % of the
slices, which neither ``export.train_ssl`` nor ``export.train_flow`` train on): lucchi
(FIB-SEM, mitochondria mask), isbi (ssTEM, membrane label 0), drosophila (ssTEM, 8 non-
background labels of the merged label map; evaluation only, never trained on). Each moving
slice and its labels are deformed by a random smooth field ``d`` (``export.flow_data``:
control points every 64 px, peak magnitude 4 px; reflect border), with a seed per pair.

Scenarios:

* ``same``: fixed = clean slice z, moving = deformed slice z. The exact answer is known.
* ``neighbour``: fixed = clean slice z, moving = deformed slice z + 1 (the real case: anatomy
  changes between sections).
* ``neighbour+art``: as ``neighbour``, both slices also corrupted with synthetic EM artifacts
  (``deepalign_fast.qc.artifacts``, strength 1, independent seeds).

Scores, computed in the frame minus a 16 px border (mean over pairs):

* ``Dice``/``IoU``: moving labels (deformed like the moving slice), warped back with the
  estimated field (nearest), vs the moving slice's CLEAN labels: does the registration undo
  the synthetic deformation;
* ``Dice adj``: the same warped labels vs the FIXED slice's labels (neighbour scenarios: the
  DeepSim paper's adjacent-slice Dice, which also rewards aligning the real section-to-section
  change);
* ``EPE``: mean end-point error (px) of the estimated field vs the exact inverse of ``d``;
* ``%J<=0``: percentage of pixels whose Jacobian determinant is <= 0 (folding).

Methods: ``none`` (identity), ``affine`` (C++ RANSAC affine on ``blocks.BlockMatcher``
matches), ``flow-deepsim`` / ``flow-ncc`` (``deepalign_fast.refine.flow.FlowPredictor`` with the two
ONNX models, on the raw pair), ``affine+flow-*`` (the pipeline's order: the flow predicted on
the affinely aligned pair, composed with the affine), ``dis`` (``cv2.DISOpticalFlow``, preset
MEDIUM), ``farneback`` (``cv2.calcOpticalFlowFarneback``). Then inference time per 512^2
and 1024^2 slice pair.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from deepalign_fast import datasets, warp_affine
from deepalign_fast.fields import nonpositive_jacobian_fraction
from deepalign_fast.match.blocks import BlockMatcher
from deepalign_fast.match.keypoints import to_uint8
from deepalign_fast.qc.artifacts import apply_artifacts
from deepalign_fast.qc.metrics import dice, iou
from deepalign_fast.refine.flow import FlowPredictor
from deepalign_fast.warp import warp_displacement

from export.flow_data import invert_field, random_smooth_field, remap

BORDER = 16
SCENARIOS = ("same", "neighbour", "neighbour+art")


def load(name: str) -> tuple[np.ndarray, np.ndarray, list[int] | None, range]:
    """Stack, labels, label values to score (None = non-zero), held-out slice range."""
    if name == "lucchi":
        img, lab = datasets.load_lucchi(labels=True)
        labels = None
    elif name == "isbi":
        img, lab = datasets.load_isbi2012(labels=True)
        labels = [0]  # membranes: thin, so the most sensitive to misregistration
    elif name == "drosophila":
        img, lab = datasets.load_drosophila(labels=True)
        labels = [int(v) for v in np.unique(lab) if v != 255]
    else:
        raise SystemExit(f"unknown dataset {name}")
    n = img.shape[0]
    n_val = max(2, int(np.ceil(n * 0.2)))
    return np.asarray(img), np.asarray(lab), labels, range(n - n_val, n)


def affine_matrix(fixed: np.ndarray, moving: np.ndarray, matcher: BlockMatcher) -> np.ndarray:
    """Pull affine fixed -> moving coordinates (identity when the pair cannot be matched)."""
    m, _ = matcher.match(matcher.prepare(fixed), matcher.prepare(moving))
    return np.eye(3)[:2] if m is None else np.asarray(m, np.float64)


def affine_field(fixed: np.ndarray, moving: np.ndarray, matcher: BlockMatcher,
                 residual: np.ndarray | None = None) -> np.ndarray:
    """Field of ``A``, or of ``A o (id + residual)`` (flow applied after the affine)."""
    m = affine_matrix(fixed, moving, matcher)
    h, w = fixed.shape
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    if residual is not None:
        gx, gy = gx + residual[0], gy + residual[1]
    ox, oy = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    return np.stack([m[0, 0] * gx + m[0, 1] * gy + m[0, 2] - ox,
                     m[1, 0] * gx + m[1, 1] * gy + m[1, 2] - oy]).astype(np.float32)


def affine_then_flow(fixed: np.ndarray, moving: np.ndarray, matcher: BlockMatcher,
                     predictor: FlowPredictor) -> np.ndarray:
    """The pipeline's order: affine first, then the flow on the affinely aligned pair."""
    m = affine_matrix(fixed, moving, matcher)
    aligned = warp_affine(np.ascontiguousarray(moving, np.float32), m, border="replicate")
    return affine_field(fixed, moving, matcher, residual=predictor.predict(fixed, aligned))


def make_methods(args: argparse.Namespace) -> dict[str, Callable[[np.ndarray, np.ndarray],
                                                                  np.ndarray]]:
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    matcher = BlockMatcher(num_threads=args.threads)

    def cv_flow(fn: Callable[[np.ndarray, np.ndarray], np.ndarray]
                ) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        def run(f: np.ndarray, m: np.ndarray) -> np.ndarray:
            # both OpenCV flows: fixed(p) ~ moving(p + flow(p)), i.e. our pull convention
            return np.ascontiguousarray(fn(to_uint8(f), to_uint8(m)).transpose(2, 0, 1))
        return run

    methods: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
        "none": lambda f, m: np.zeros((2, *f.shape), np.float32),
        "affine": lambda f, m: affine_field(f, m, matcher),
    }
    for name, path in (("flow-deepsim", args.deepsim), ("flow-ncc", args.ncc)):
        if path:
            p = FlowPredictor(path, num_threads=args.threads)
            methods[name] = p.predict
            if not args.no_affine_flow:
                methods[f"affine+{name}"] = (
                    lambda f, m, p=p: affine_then_flow(f, m, matcher, p))
    methods["dis"] = cv_flow(lambda f, m: dis.calc(f, m, None))
    methods["farneback"] = cv_flow(lambda f, m: cv2.calcOpticalFlowFarneback(
        f, m, None, 0.5, 4, 21, 5, 7, 1.5, 0))
    return methods


def run_accuracy(args: argparse.Namespace) -> list[tuple[str, str, str, dict[str, float], int]]:
    methods = make_methods(args)
    rows = []
    for name in args.data.split(","):
        img, lab, labels, held = load(name)
        pairs = list(range(held.start, held.stop - 1))
        idx = np.unique(np.linspace(0, len(pairs) - 1, min(args.max_pairs, len(pairs))).round())
        zs = [pairs[int(i)] for i in idx]
        scores: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(
            lambda: defaultdict(list))
        for z in zs:
            rng = np.random.default_rng([args.seed, z, len(name)])
            h, w = img.shape[1:]
            d = random_smooth_field(rng, (h, w), amplitude=args.amplitude, spacing=args.spacing)
            truth = invert_field(d)
            for sc in SCENARIOS:
                src = z if sc == "same" else z + 1
                fixed = img[z].astype(np.float32)
                moving = remap(img[src].astype(np.float32), d)
                mlab = remap(lab[src], d, nearest=True)
                if sc == "neighbour+art":
                    fixed = apply_artifacts(fixed, np.random.default_rng([args.seed, z, 1]),
                                            strength=1.0)
                    moving = apply_artifacts(moving, np.random.default_rng([args.seed, z, 2]),
                                             strength=1.0)
                inner = (slice(BORDER, h - BORDER), slice(BORDER, w - BORDER))
                for meth, fn in methods.items():
                    u = fn(fixed, moving)
                    back = warp_displacement(mlab, u, interpolation="nearest")
                    s = scores[(sc, meth)]
                    s["dice"].append(dice(back[inner], lab[src][inner], labels=labels))
                    s["iou"].append(iou(back[inner], lab[src][inner], labels=labels))
                    s["dice_adj"].append(dice(back[inner], lab[z][inner], labels=labels))
                    s["epe"].append(float(np.sqrt(((u - truth) ** 2).sum(0))[inner].mean()))
                    s["fold_pct"].append(100 * nonpositive_jacobian_fraction(
                        u[:, BORDER:h - BORDER, BORDER:w - BORDER]))
            print(f"{name} z={z} done", flush=True)
        for (sc, meth), s in scores.items():
            rows.append((name, sc, meth, {k: float(np.mean(v)) for k, v in s.items()}, len(zs)))
    return rows


def run_timing(args: argparse.Namespace) -> list[tuple[str, int, float]]:
    img = datasets.load_drosophila()
    methods = make_methods(args)
    out = []
    for size in (512, 1024):
        f = np.ascontiguousarray(img[16, :size, :size])
        m = np.ascontiguousarray(img[17, :size, :size])
        for meth, fn in methods.items():
            if meth == "none" or meth.startswith("affine+"):
                continue
            fn(f, m)  # warm-up
            ts = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fn(f, m)
                ts.append(time.perf_counter() - t0)
            out.append((meth, size, 1000 * float(np.median(ts))))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_flow", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deepsim", type=Path, default=None, help="flow ONNX trained with deepsim")
    ap.add_argument("--ncc", type=Path, default=None, help="flow ONNX trained with NCC")
    ap.add_argument("--data", default="isbi,lucchi,drosophila")
    ap.add_argument("--max-pairs", type=int, default=8,
                    help="at most this many held-out pairs per stack (evenly spaced)")
    ap.add_argument("--amplitude", type=float, default=4.0, help="peak deformation (px)")
    ap.add_argument("--spacing", type=float, default=64.0, help="control-point spacing (px)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-affine-flow", action="store_true",
                    help="skip the affine-then-flow combinations")
    ap.add_argument("--skip", choices=("accuracy", "timing"), action="append", default=[])
    args = ap.parse_args(argv)
    print(f"load average at start: {os.getloadavg()[0]:.1f} ({os.cpu_count()} cores)")
    if "accuracy" not in args.skip:
        rows = run_accuracy(args)
        print("\n| stack | scenario | method | pairs | Dice | IoU | Dice adj | EPE px | %J<=0 |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name, sc, meth, s, n in rows:
            print(f"| {name} | {sc} | {meth} | {n} | {s['dice']:.3f} | {s['iou']:.3f} | "
                  f"{s['dice_adj']:.3f} | {s['epe']:.2f} | {s['fold_pct']:.3f} |")
    if "timing" not in args.skip:
        print(f"\n| method | slice | ms per pair (median of {args.repeats}, "
              f"{args.threads} threads) |")
        print("|---|---|---|")
        for meth, size, ms in run_timing(args):
            print(f"| {meth} | {size}^2 | {ms:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
