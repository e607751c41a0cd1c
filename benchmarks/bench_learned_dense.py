"""Dense block matching on learned-encoder feature images against raw intensities.

    PYTHONPATH=python:. python -m benchmarks.bench_learned_dense --seeds 1,2 --json out.json

(the shared EM data found as by every benchmark; results in RESULTS.md, "Dense matching on
learned features").

Each slice -> feature map (stride 4, C unit vectors) -> a single-channel image by a linear
projection fitted ONCE on the first non-blank slice's map (PCA), upsampled x4 with
cv2.resize(INTER_CUBIC) (exact x4 resize maps output pixel 4u+1.5 to input cell u, i.e. the
cell-centre convention of learned.py) and cropped to the slice size. Then the normal
BlockMatcher with BlockBackend's options (lk_block=24, lk_step=12), the normal StackMatcher
and Aligner.transform_set (same global solve as the default).

Variants
  default   : Aligner(**{}).estimate (raw blocks)
  pc1       : first principal component
  pc3       : mean of the first 3 PCs, each standardised (unit variance on slice 0) and
              sign-fixed so it correlates positively with the normalised raw slice 0
  pc1raw    : 0.5 * standardised PC1 + 0.5 * standardised raw slice (hybrid)
  reg       : ridge regression of the (4x4 cell-averaged, normalised) raw slice 0 on its
              features: the feature direction that best reproduces the tissue contrast
  raw-replica : raw slice through this same loop (sanity check: must equal default)
"""

from __future__ import annotations

import argparse
import json
import time

import cv2
import numpy as np
from deepalign_fast import Aligner
from deepalign_fast.alignment.matcher import StackMatcher, is_blank
from deepalign_fast.match.backends import BlockBackend
from deepalign_fast.match.learned import LearnedExtractor
from deepalign_fast.onnx.normalise import normalise_slice
from deepalign_fast.qc.metrics import exact_truth_score

from benchmarks.bench_exact import CASES, build

STRIDE = 4


def upsample(fimg: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(Hf, Wf) map at stride 4 -> (H, W) image, cell (i, j) at pixel (4j+1.5, 4i+1.5)."""
    hf, wf = fimg.shape
    up = cv2.resize(fimg.astype(np.float32), (wf * STRIDE, hf * STRIDE),
                    interpolation=cv2.INTER_CUBIC)
    return up[: shape[0], : shape[1]]


class Projector:
    """Linear projection of the C-dim feature map, fitted on the first slice it sees."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.mean: np.ndarray | None = None
        self.w: np.ndarray | None = None  # (C, k)
        self.scale: np.ndarray | None = None  # (k,)

    def fit(self, fmap: np.ndarray, image: np.ndarray) -> None:
        x = fmap.reshape(-1, fmap.shape[2]).astype(np.float64)
        self.mean = x.mean(axis=0)
        xc = x - self.mean
        cov = xc.T @ xc / len(xc)
        evals, evecs = np.linalg.eigh(cov)
        order = np.argsort(evals)[::-1]
        evals, evecs = evals[order], evecs[:, order]
        k = 1 if self.kind in ("pc1", "pc1raw", "reg") else 3
        w = evecs[:, :k].copy()
        # Sign: each component correlates positively with the (cell-averaged) raw slice.
        raw = normalise_slice(image)
        h, wd = raw.shape
        hp, wp = -(-h // 4) * 4, -(-wd // 4) * 4
        raw = cv2.copyMakeBorder(raw, 0, hp - h, 0, wp - wd, cv2.BORDER_REFLECT_101)
        raw_c = raw.reshape(hp // 4, 4, wp // 4, 4).mean(axis=(1, 3)).ravel()
        if self.kind == "reg":
            y = raw_c - raw_c.mean()
            w = np.linalg.solve(cov + 1e-3 * np.trace(cov) / len(cov) * np.eye(len(cov)),
                                xc.T @ y / len(xc))[:, None]
            pv = float(np.var(xc @ w[:, 0]))
            self.w, self.scale = w, np.array([np.sqrt(pv)])
            self.explained = np.array([pv / np.var(y)])  # R^2 of the fit
            return
        proj = xc @ w
        for c in range(k):
            if np.corrcoef(proj[:, c], raw_c)[0, 1] < 0:
                w[:, c] *= -1
        self.w = w
        self.scale = np.sqrt(evals[:k])
        self.explained = evals[:k] / evals.sum()

    def __call__(self, fmap: np.ndarray) -> np.ndarray:
        assert self.w is not None and self.mean is not None and self.scale is not None
        hf, wf, c = fmap.shape
        p = (fmap.reshape(-1, c).astype(np.float64) - self.mean) @ self.w / self.scale
        return p.mean(axis=1).reshape(hf, wf).astype(np.float32)


def run_variant(stack: np.ndarray, variant: str, enc: LearnedExtractor | None,
                timing: dict[str, float]) -> np.ndarray:
    n, h, w = stack.shape
    aligner = Aligner()
    opts = aligner.options
    backend = BlockBackend(model=opts.model, threshold=opts.threshold,
                           num_threads=opts.num_threads)
    matcher = StackMatcher(opts, match=lambda _zr, r, _zm, m, init: backend.match(r, m, init),
                           shape=(h, w))
    proj = Projector(variant) if variant != "raw-replica" else None
    t_enc = 0.0
    for z in range(n):
        img = stack[z]
        if is_blank(img):
            matcher.add(z, None)
            continue
        if proj is None:
            image = img
        else:
            assert enc is not None
            t0 = time.perf_counter()
            fmap = enc.feature_map(img)
            if proj.w is None:
                proj.fit(fmap, img)
            fimg = upsample(proj(fmap), (h, w))
            if variant == "pc1raw":
                raw = normalise_slice(img)
                raw = cv2.GaussianBlur(raw, (0, 0), 1.5)
                raw = (raw - raw.mean()) / (raw.std() + 1e-6)
                fimg = 0.5 * fimg + 0.5 * raw
            image = fimg
            t_enc += time.perf_counter() - t0
        matcher.add(z, backend.prepare(image))
    timing["encode_s"] = round(t_enc, 2)
    if proj is not None:
        timing["explained"] = [round(float(v), 3) for v in proj.explained]
    ts = aligner.transform_set(matcher, stack.shape)
    timing["failed"] = len(matcher.failed)
    timing["flagged"] = len(ts.flagged)
    return np.asarray(ts.affines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="1")
    ap.add_argument("--conds", default="art,hard,drift")
    ap.add_argument("--variants", default="default,pc1,pc3,reg,pc1raw")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cv2.setNumThreads(2)
    conds = {"art": ("xz-artifacts", {}), "hard": ("xz-artifacts",
                                                    {"snr": 0.7, "artifact_strength": 3.0}),
             "drift": ("xz-drift", {})}
    enc = LearnedExtractor(num_threads=2)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for cname in args.conds.split(","):
            case, kw = conds[cname]
            stack, truth, info = build(CASES[case], seed, None, **kw)
            for variant in args.variants.split(","):
                t0 = time.perf_counter()
                extra: dict = {}
                if variant == "default":
                    est = np.asarray(Aligner().estimate(stack, progress=False)
                                     .transforms.affines)
                else:
                    est = run_variant(stack, variant, enc, extra)
                dt = time.perf_counter() - t0
                sc = exact_truth_score(est, truth, (int(stack.shape[1]), int(stack.shape[2])))
                row = {"seed": seed, "cond": cname, "variant": variant,
                       "tre_median": round(sc.tre_median, 3),
                       "jitter_median": round(sc.jitter_median, 3),
                       "tre_p95": round(sc.tre_p95, 3), "seconds": round(dt, 1), **extra}
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
