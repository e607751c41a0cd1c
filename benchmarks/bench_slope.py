"""The anatomy's slope limit (``solve.ANATOMY_SLOPE``) on held-out parts of the lucchi volume.

    python -m benchmarks.bench_slope --planes 12,32,64,128,192,256 --limits 0.2,0.3,0.4

Stacks: lucchi XZ and YZ reslices (exactly aligned neighbours), ``--planes`` planes from the
start, middle and end of the volume, full width or a 256-px wide part of the frame at two
positions; unchanged (controls) and with ``synth.drift_transforms`` misalignment (profiles
``mild`` and ``strong``, seeds other than ``bench_exact``'s). Each stack is matched once
(``Aligner.estimate``); the global solve is then re-run with each limit on the same pairs, so
the limits are compared on identical matches. Reported per plane count and limit: controls
whose median TRE exceeds 0.5 px and the largest one, and the drift stacks' mean median TRE
against doing nothing and how many end worse than doing nothing (``--json`` keeps every
stack).
"""

from __future__ import annotations

import argparse
import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from deepalign_fast import Aligner, datasets
from deepalign_fast.alignment import solve
from deepalign_fast.alignment.matcher import StackMatcher
from deepalign_fast.qc.metrics import exact_truth_score
from deepalign_fast.qc.synth import drift_transforms, misalign_stack, reslice

# (plane, first plane, planes, first column, columns (0: all), profile or "none", seed)
Spec = tuple[str, int, int, int, int, str, int]


def specs_for(planes: int, n_planes: dict[str, int]) -> list[Spec]:
    """Controls and drift stacks of ``planes`` planes from both reslices."""
    out: list[Spec] = []
    for plane, cols in (("xz", (0, 256)), ("yz", (0, 128))):
        total = n_planes[plane]
        if planes > total:
            continue
        for z0 in sorted({0, (total - planes) // 2, total - planes}):
            for c0, cw in ((cols[0], 256), (cols[1], 256), (0, 0)):
                out.append((plane, z0, planes, c0, cw, "none", 0))
            for profile, seed in (("mild", 5), ("strong", 6)):
                out.append((plane, z0, planes, 0, 0, profile, seed))
                out.append((plane, z0, planes, cols[1], 256, profile, seed + 2))
    return out


class _Capturing(Aligner):
    """An aligner that keeps the matcher of its last estimate, so that its solve can be run
    again on the same pairs (:meth:`solve_again`)."""

    matcher: StackMatcher | None = None

    def _solve(self, matcher: StackMatcher, shape: tuple[int, int, int]) -> Any:
        self.matcher = matcher
        return super()._solve(matcher, shape)

    def solve_again(self, shape: tuple[int, int, int]) -> Any:
        assert self.matcher is not None
        return super()._solve(self.matcher, shape)


def build(spec: Spec, volume: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The stack of ``spec`` and its truth (input -> clean pull maps)."""
    plane, z0, planes, c0, cw, profile, seed = spec
    clean = reslice(volume, plane)[z0:z0 + planes]
    clean = np.ascontiguousarray(clean[:, :, c0:c0 + cw] if cw else clean)
    n, h, w = clean.shape
    if profile == "none":
        return clean, np.tile(np.eye(2, 3), (n, 1, 1))
    rng = np.random.default_rng([seed, zlib.crc32(repr(spec).encode())])
    mis, truth = misalign_stack(clean, drift_transforms(n, (h, w), rng, profile=profile))
    return mis, truth.transforms


def run(spec: Spec, volume: np.ndarray, limits: list[float]) -> dict[str, Any]:
    """Median TRE (and doing nothing's) of one stack for each limit, and its input's slope."""
    stack, truth = build(spec, volume)
    aligner = _Capturing()
    aligner.estimate(stack, progress=False)
    shape = stack.shape[1:]
    nothing = exact_truth_score(np.tile(np.eye(2, 3), (len(stack), 1, 1)), truth, shape)
    row: dict[str, Any] = {"spec": list(spec), "nothing": nothing.tre_median, "tre": {}}
    default = solve.ANATOMY_SLOPE
    try:
        for limit in limits:
            solve.ANATOMY_SLOPE = limit
            res = aligner.solve_again(stack.shape)
            row["tre"][str(limit)] = exact_truth_score(res.affines, truth, shape).tre_median
            if res.motion is not None:
                row["trend"] = res.motion["trend_px_per_slice"]
    finally:
        solve.ANATOMY_SLOPE = default
    return row


def table(rows: list[dict[str, Any]], limits: list[float]) -> str:
    """One markdown row per plane count: controls and drift stacks per limit."""
    head = ["planes"] + [f"{lim:g}: {what}" for lim in limits for what in ("controls", "drift")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for planes in sorted({r["spec"][2] for r in rows}):
        cells = [str(planes)]
        group = [r for r in rows if r["spec"][2] == planes]
        for lim in limits:
            ctl = np.array([r["tre"][str(lim)] for r in group if r["spec"][5] == "none"])
            dr = np.array([(r["tre"][str(lim)], r["nothing"]) for r in group
                           if r["spec"][5] != "none"])
            cells.append(f"{int((ctl > 0.5).sum())} of {len(ctl)} over 0.5, max {ctl.max():.2f}"
                         if ctl.size else "-")
            cells.append(f"{dr[:, 0].mean():.2f} / {dr[:, 1].mean():.2f}, "
                         f"{int((dr[:, 0] > dr[:, 1]).sum())} of {len(dr)} worse"
                         if dr.size else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--planes", default="32,128", help="plane counts, comma-separated")
    ap.add_argument("--limits", default="0.2,0.3,0.4", help="slope limits (px per slice)")
    ap.add_argument("--json", type=Path, default=None, help="write every stack's row here")
    args = ap.parse_args(argv)
    try:
        planes = [int(v) for v in args.planes.split(",") if v.strip()]
        limits = [float(v) for v in args.limits.split(",") if v.strip()]
    except ValueError:
        raise SystemExit("--planes takes integers, --limits numbers, comma-separated") from None
    if not planes or not limits or min(planes) < 3 or min(limits) <= 0:
        raise SystemExit("give plane counts >= 3 and limits > 0")
    volume = np.asarray(datasets.load_lucchi())
    n_planes = {"xz": volume.shape[1], "yz": volume.shape[2]}
    rows = []
    for spec in (s for p in planes for s in specs_for(p, n_planes)):
        row = run(spec, volume, limits)
        rows.append(row)
        print(" ".join(map(str, spec)), f"nothing {row['nothing']:.2f}",
              " ".join(f"{k}: {v:.2f}" for k, v in row["tre"].items()), flush=True)
    print(table(rows, limits))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
