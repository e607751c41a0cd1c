"""Is an "aligned" stack aligned? Its per-slice motion measured on two halves of the frame.

    python -m benchmarks.bench_halves --cases xy,xz,yz,isbi,drosophila

Each half of the frame (left / right, top / bottom) is solved on its own (``Aligner`` with
``slow_drift="none"``: the raw solve, nothing kept or corrected). The fast part of each
half's per-slice translation (minus its Gaussian trend of 8 slices, as the jitter error of
``bench_exact`` forgives) is then compared between the halves:

- a slice misaligned as a whole (stage jitter, or a residual of the stack's own alignment)
  moves both halves alike: their fast parts correlate near 1;
- the apparent motion of the content between exactly aligned slices (oblique structures,
  noise) differs from region to region: near 0.

The lucchi XZ and YZ reslices are exactly aligned by construction (the controls of this
measurement); the lucchi XY stack and the isbi and drosophila serial sections are as their
authors aligned them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from deepalign_fast import Aligner, datasets
from deepalign_fast.qc.metrics import slow_translation
from deepalign_fast.qc.synth import reslice

#: planes of each lucchi case (the centred run bench_exact uses for XZ / YZ)
PLANES = {"xy": None, "xz": 192, "yz": 256}
#: the serial-section stacks, at their native resolution
SECTIONS = {"isbi": datasets.load_isbi2012, "drosophila": datasets.load_drosophila}
CASES = [*PLANES, *SECTIONS]


def centre_motion(stack: np.ndarray) -> np.ndarray:
    """Per-slice displacement (n, 2) of the frame centre in the raw solve of ``stack``."""
    est = Aligner(slow_drift="none").estimate(stack, progress=False)
    a = np.asarray(est.transforms.affines)
    h, w = stack.shape[1:]
    c = np.array([(w - 1) / 2.0, (h - 1) / 2.0])
    return np.asarray(a[:, :, :2] @ c + a[:, :, 2] - c)


def compare(stack: np.ndarray, split: str) -> dict[str, Any]:
    """The fast per-slice motion of the two halves of ``stack`` (``split``: "left/right" or
    "top/bottom"): rms per half and axis, and their correlation per axis."""
    h, w = stack.shape[1:]
    if split == "left/right":
        halves = stack[:, :, : w // 2], stack[:, :, w // 2:]
    elif split == "top/bottom":
        halves = stack[:, : h // 2], stack[:, h // 2:]
    else:
        raise ValueError(f"unknown split {split!r}")
    fast = []
    for half in halves:
        motion = centre_motion(np.ascontiguousarray(half))
        fast.append(motion - slow_translation(motion, 8.0))
    a, b = fast
    return {"split": split,
            "rms": [[float(v) for v in a.std(axis=0)], [float(v) for v in b.std(axis=0)]],
            "correlation": [float(np.corrcoef(a[:, k], b[:, k])[0, 1]) for k in range(2)]}


def load_case(name: str) -> np.ndarray:
    if name in SECTIONS:
        return np.ascontiguousarray(SECTIONS[name]())
    vol = np.asarray(datasets.load_lucchi())
    stack = vol if name == "xy" else reslice(vol, name)
    planes = PLANES[name]
    if planes is not None and planes < len(stack):
        start = (len(stack) - planes) // 2
        stack = stack[start:start + planes]
    return np.ascontiguousarray(stack)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=",".join(CASES),
                    help="comma-separated: lucchi planes xy, xz, yz; serial sections isbi, "
                         "drosophila (default all)")
    ap.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = ap.parse_args(argv)
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    rows = []
    print("| stack | split | fast rms x / y, first half (px) | second half (px) "
          "| correlation x / y |\n|---|---|---|---|---|")
    for name in names:
        try:
            stack = load_case(name)
        except datasets.DataUnavailable as exc:
            print(f"skip {name}: {exc}")
            continue
        for split in ("left/right", "top/bottom"):
            row = {"case": name, "shape": list(stack.shape), **compare(stack, split)}
            rows.append(row)
            (ax, ay), (bx, by) = row["rms"]
            cx, cy = row["correlation"]
            label = f"lucchi {name.upper()}" if name in PLANES else name
            print(f"| {label} {stack.shape[0]} x {stack.shape[1]} x {stack.shape[2]} "
                  f"| {split} | {ax:.3f} / {ay:.3f} | {bx:.3f} / {by:.3f} "
                  f"| {cx:.2f} / {cy:.2f} |", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
