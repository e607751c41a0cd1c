"""The rendering modes on stacks with and without local deformation.

    python -m benchmarks.bench_modes [--modes affine,elastic,expected-affine]

- **lucchi crops** (16 x 192 x 192 from three regions): each crop as it is (aligned:
  nothing to correct) and with an independent smooth deformation on every slice but the
  first (a 5 x 5 grid of random control vectors, cubic, 3 px peak). Reported: how far each
  mode moves the aligned crop (median over slices of the median local shift between input
  and output: OpenCV Farneback flow, 16-px border left out; about 0.3 px is the measure's
  floor on this content) and how far the deformed crop's output is from the clean slices
  (the same flow less its median: the non-rigid residual).
- **a cracked slice** (lucchi crops, 16 x 320 x 320, aligned): slice 8 torn along a
  slanted line, its two sides moved about 20 px apart by two affines, the crack marked in a
  damage mask (given to ``expected-affine`` as ``masks``). Reported, exactly from the
  transforms (where each slice's map samples its input): the cracked slice's error on each
  side of the crack (the larger of the two medians of the distance to the true position,
  24 px from the crack and the border left out), and how far the other slices are moved
  (median over slices of the median distance from where they were; max over slices).
- **a partly cracked slice** (the same crops): the crack runs from the top edge to a tip
  inside the frame; the right side is moved by 12-15 px, the left not at all, and below the
  tip the tissue turns continuously between the two. Reported exactly, as above: the torn
  slice's median error left and right of the crack and beyond its tip.
- **real folds** (`damaged_sections_ssem`: DOLW7, 1000 x 1000, and a 1024 x 1024 crop of
  ZW7L18 about its fold): the stack [reference, folded section, reference shifted by a few
  px], the fold mask given to ``expected-affine``. Reported: the folded slice's correlation
  with the reference slice on each side of the fold (NCC over the parts more than 40 px
  from the fold, in the affine mode's frame), the side the affine mode misses first.
- **isbi sections** (30 x 512^2, aligned): the adjacent sections' membrane Dice after the
  transforms are applied to the membrane labels (16-px border left out), and the seconds
  `align_stack` takes.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import tifffile
from deepalign_fast import Aligner, TransformSet, datasets
from deepalign_fast.qc.metrics import ncc
from deepalign_fast.render import render_slice
from deepalign_fast.warp import warp_displacement

#: (z, y, x) corners of the 16 x 192 x 192 lucchi crops
REGIONS = {"A": (0, 100, 150), "B": (60, 40, 250), "C": (120, 180, 40)}


def local_shift(a: np.ndarray, b: np.ndarray, *, centred: bool) -> float:
    """Median length of the Farneback flow from ``a`` to ``b`` (16-px border left out),
    less its median (``centred``: only what no translation explains)."""
    f = cv2.calcOpticalFlowFarneback(a.astype(np.uint8), b.astype(np.uint8), None, 0.5, 3,
                                     21, 3, 5, 1.1, 0)[16:-16, 16:-16]
    if centred:
        f = f - np.median(f.reshape(-1, 2), axis=0)
    return float(np.median(np.linalg.norm(f, axis=-1)))


def deformed(clean: np.ndarray, seed: int, peak: float = 3.0) -> np.ndarray:
    """``clean`` with an independent smooth deformation on every slice but the first."""
    rng = np.random.default_rng(seed)
    n, h, w = clean.shape
    out = clean.astype(np.float32).copy()
    for z in range(1, n):
        grid = rng.normal(0.0, 1.0, (2, 5, 5)).astype(np.float32)
        u = np.stack([cv2.resize(c, (w, h), interpolation=cv2.INTER_CUBIC) for c in grid])
        u = np.ascontiguousarray(u / np.abs(u).max() * peak)
        out[z] = warp_displacement(clean[z].astype(np.float32), u)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def crop_rows(modes: list[str], work: Path) -> list[dict[str, object]]:
    vol = np.asarray(datasets.load_lucchi())
    rows: list[dict[str, object]] = []
    for region, (z0, y0, x0) in REGIONS.items():
        clean = np.ascontiguousarray(vol[z0:z0 + 16, y0:y0 + 192, x0:x0 + 192])
        bent = deformed(clean, seed=z0)
        tifffile.imwrite(work / "aligned.tif", clean)
        tifffile.imwrite(work / "deformed.tif", bent)
        n = len(clean)
        before = np.median([local_shift(clean[z], bent[z], centred=True) for z in range(1, n)])
        for mode in modes:
            kept, fixed = work / f"{region}_a_{mode}.tif", work / f"{region}_d_{mode}.tif"
            Aligner(mode=mode).align_stack(work / "aligned.tif", kept, progress=False)
            out = tifffile.imread(kept)
            moved = [local_shift(clean[z], out[z], centred=False) for z in range(n)]
            result = Aligner(mode=mode).align_stack(work / "deformed.tif", fixed,
                                                    progress=False)
            out = tifffile.imread(fixed)
            left = [local_shift(clean[z], out[z], centred=True) for z in range(1, n)]
            rows.append({"region": region, "mode": mode, "deformed_input": float(before),
                         "aligned_moved_median": float(np.median(moved)),
                         "aligned_moved_max": float(np.max(moved)),
                         "deformed_residual": float(np.median(left)),
                         "flagged": len(result.flagged)})
    return rows


CRACK_REGIONS = {"D": (20, 32, 40), "E": (100, 50, 180)}
CRACK_SIDES = (np.array([[1.0, 0.01, -9.0], [-0.01, 1.0, 4.0]]),
               np.array([[1.0, -0.01, 11.0], [0.01, 1.0, -6.0]]))


def cracked(clean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``clean`` (h, w) torn along a slanted line: each side moved by its affine of
    ``CRACK_SIDES`` (pull maps, clean -> torn), the 10-px crack left dark; and the damage
    mask (255 on the crack)."""
    h, w = clean.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    line = w / 2 + 0.15 * (ys - h / 2)
    torn = np.zeros_like(clean)
    for a, side in zip(CRACK_SIDES, (xs < line - 5, xs > line + 5), strict=True):
        warped = cv2.warpAffine(clean, a, (w, h), flags=cv2.INTER_LINEAR)  # at a(q): clean(q)
        torn[side] = warped[side]
    return torn, ((xs >= line - 5) & (xs <= line + 5)).astype(np.uint8) * 255


#: The far side's shift (px) of the partial cracks (:func:`partial_crack`)
PARTIAL_SHIFTS = ((10.0, -6.0), (-14.0, 4.0))


def partial_crack(clean: np.ndarray, shift: tuple[float, float], *, tip: float = 0.55
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``clean`` (h, w) torn along the slanted line of :func:`cracked` from the top edge
    down to a tip at ``tip`` of the height: the right side moved by ``shift`` (its content
    ``shift`` px to the left and up of where it was, for a positive shift), the left side
    not at all, and below the tip a fan between them, continuous everywhere but across the
    crack (the displacement turns with the angle about the tip: ``shift`` times a ramp
    from 0 to 1 over the half-turn below the tip). The 10-px crack is dark. Returns the
    torn slice, the damage mask (255 on the crack) and the exact pull map (2, h, w): where
    each clean pixel's content lies in the torn slice."""
    h, w = clean.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    tip_xy = np.array([w / 2 + 0.15 * (tip * h - h / 2), tip * h])
    down = np.array([0.15, 1.0]) / np.hypot(0.15, 1.0)  # the crack runs up from the tip
    along = (xs - tip_xy[0]) * down[0] + (ys - tip_xy[1]) * down[1]
    across = (xs - tip_xy[0]) * down[1] - (ys - tip_xy[1]) * down[0]
    ramp = np.clip((np.arctan2(across, along) + np.pi / 2) / np.pi, 0.0, 1.0)
    u = np.stack([shift[0] * ramp, shift[1] * ramp]).astype(np.float32)
    # torn(q) = clean(q + u(q)); the pull map T is its inverse: T(p) + u(T(p)) = p
    torn = cv2.remap(clean, (xs + u[0]).astype(np.float32), (ys + u[1]).astype(np.float32),
                     cv2.INTER_LINEAR)
    pull = np.stack([xs - u[0], ys - u[1]])
    for _ in range(40):  # a contraction away from the crack: |du/dq| < 1
        at = [cv2.remap(c, *pull.astype(np.float32), cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_REPLICATE) for c in u]
        pull = np.stack([xs - at[0], ys - at[1]])
    line = w / 2 + 0.15 * (ys - h / 2)
    crack = (np.abs(xs - line) <= 5) & (ys <= tip_xy[1])
    torn[crack] = 0
    return torn, crack.astype(np.uint8) * 255, pull


def pull_positions(ts: TransformSet, z: int) -> np.ndarray:
    """Where slice ``z``'s map samples its input for each output pixel, (2, h, w) x and y:
    the coordinate images rendered with the map (exact: bilinear interpolation of a linear
    function); NaN where it samples outside the input."""
    h, w = ts.output_shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    x, y, inside = (render_slice(c, ts.slice_map(z), (h, w)) for c in (xs, ys, np.ones_like(xs)))
    out = np.stack([x, y]).astype(np.float64)
    out[:, inside < 1 - 1e-6] = np.nan  # (sampled outside the input: filled with 0)
    return out


def crack_rows(modes: list[str], work: Path) -> list[dict[str, object]]:
    vol = np.asarray(datasets.load_lucchi())
    rows: list[dict[str, object]] = []
    for region, (z0, y0, x0) in CRACK_REGIONS.items():
        clean = np.ascontiguousarray(vol[z0:z0 + 16, y0:y0 + 320, x0:x0 + 320])
        n, h, w = clean.shape
        stack, masks = clean.copy(), np.zeros_like(clean)
        stack[8], masks[8] = cracked(clean[8])
        tifffile.imwrite(work / "cracked.tif", stack)
        tifffile.imwrite(work / "masks.tif", masks)
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
        truth = [np.stack([a[0, 0] * xs + a[0, 1] * ys + a[0, 2],
                           a[1, 0] * xs + a[1, 1] * ys + a[1, 2]]) for a in CRACK_SIDES]
        for mode in modes:
            extra = {"masks": str(work / "masks.tif")} if mode == "expected-affine" else {}
            tf = work / f"{region}_c_{mode}.json"
            result = Aligner(mode=mode, **extra).align_stack(
                work / "cracked.tif", work / f"{region}_c_{mode}.tif", transforms_path=tf,
                progress=False)
            ts = TransformSet.load(tf)
            got = pull_positions(ts, 8)
            errors = []
            for k, src in enumerate(truth):  # the output pixels whose source is on side k
                line = w / 2 + 0.15 * (src[1] - h / 2)
                away = src[0] < line - 24 if k == 0 else src[0] > line + 24
                away &= (src[0] >= 24) & (src[0] < w - 24) & (src[1] >= 24) & (src[1] < h - 24)
                errors.append(float(np.nanmedian(np.hypot(*(got - src))[away])))
            grid = np.stack([xs, ys])
            moved = [float(np.nanmedian(np.hypot(*(pull_positions(ts, z) - grid))[24:-24, 24:-24]))
                     for z in range(n) if z != 8]
            rows.append({"region": region, "mode": mode, "crack_error": max(errors),
                         "others_moved_median": float(np.median(moved)),
                         "others_moved_max": float(np.max(moved)),
                         "flagged": len(result.flagged)})
    return rows


def partial_rows(modes: list[str], work: Path) -> list[dict[str, object]]:
    """The cracked crops torn by :func:`partial_crack` instead (each far-side shift): the
    torn slice's median error left and right of the crack and beyond its tip (24 px from
    the crack, the tip and the border left out)."""
    vol = np.asarray(datasets.load_lucchi())
    rows: list[dict[str, object]] = []
    for region, (z0, y0, x0) in CRACK_REGIONS.items():
        clean = np.ascontiguousarray(vol[z0:z0 + 16, y0:y0 + 320, x0:x0 + 320])
        n, h, w = clean.shape
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
        line = w / 2 + 0.15 * (ys - h / 2)
        inner = (xs >= 24) & (xs < w - 24) & (ys >= 24) & (ys < h - 24)
        above = inner & (ys < 0.55 * h) & (np.abs(xs - line) > 24)
        parts = (above & (xs < line), above & (xs > line), inner & (ys > 0.55 * h + 24))
        for shift in PARTIAL_SHIFTS:
            stack, masks = clean.copy(), np.zeros_like(clean)
            stack[8], masks[8], truth = partial_crack(clean[8], shift)
            tifffile.imwrite(work / "partial.tif", stack)
            tifffile.imwrite(work / "masks.tif", masks)
            for mode in modes:
                extra = {"masks": str(work / "masks.tif")} if mode == "expected-affine" else {}
                tf = work / f"{region}_p_{mode}.json"
                result = Aligner(mode=mode, **extra).align_stack(
                    work / "partial.tif", work / f"{region}_p_{mode}.tif", transforms_path=tf,
                    progress=False, overwrite=True)
                error = np.hypot(*(pull_positions(TransformSet.load(tf), 8) - truth))
                rows.append({"region": region, "shift": shift, "mode": mode,
                             "errors": [float(np.nanmedian(error[p])) for p in parts],
                             "flagged": len(result.flagged)})
    return rows


FOLDS = {"DOLW7": None, "ZW7L18": (858, 638, 1024)}  # crop: y0, x0, side


def fold_rows(modes: list[str], work: Path) -> list[dict[str, object]]:
    from scipy import ndimage

    rows: list[dict[str, object]] = []
    for name, crop in FOLDS.items():
        ref, folded, mask = datasets.load_damaged_pair(name)
        if crop is not None:
            y0, x0, side = crop
            ref, folded, mask = (np.ascontiguousarray(a[y0:y0 + side, x0:x0 + side])
                                 for a in (ref, folded, mask))
        shifted = cv2.warpAffine(ref, np.float32([[1, 0, 2.5], [0, 1, -1.5]]),
                                 ref.shape[::-1], flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_REFLECT)
        tifffile.imwrite(work / "fold.tif", np.stack([ref, folded, shifted]),
                         photometric="minisblack")
        none = np.zeros_like(mask)
        tifffile.imwrite(work / "fold_m.tif", np.stack([none, mask, none]),
                         photometric="minisblack")
        sides = None
        for mode in modes:
            extra = {"masks": str(work / "fold_m.tif")} if mode == "expected-affine" else {}
            tf = work / f"{name}_{mode}.json"
            t0 = time.perf_counter()
            Aligner(mode=mode, **extra).align_stack(work / "fold.tif",
                                                    work / f"{name}_{mode}.tif",
                                                    transforms_path=tf, progress=False)
            seconds = time.perf_counter() - t0
            out = tifffile.imread(work / f"{name}_{mode}.tif").astype(np.float64)
            if sides is None:  # the affine mode's frame (the first mode run)
                ts = TransformSet.load(tf)
                fold = render_slice((mask > 0).astype(np.uint8), ts.slice_map(1),
                                    ts.output_shape, interpolation="nearest") > 0
                far = ~ndimage.binary_dilation(fold, iterations=40)
                labels, count = ndimage.label(far)
                sizes = ndimage.sum(far, labels, range(1, count + 1))
                sides = [labels == k + 1 for k in np.argsort(sizes)[::-1][:2]]
            nccs = [ncc(out[1], out[0], part & (out[0] > 0) & (out[1] > 0)) for part in sides]
            rows.append({"pair": name, "mode": mode, "ncc": nccs, "seconds": seconds})
        order = np.argsort([rows[-len(modes)]["ncc"]])[0]  # the affine's worse side first
        for r in rows[-len(modes):]:
            r["ncc"] = [r["ncc"][k] for k in order]  # type: ignore[index]
    return rows


def isbi_rows(modes: list[str], work: Path) -> list[dict[str, object]]:
    image, labels = datasets.load_isbi2012(labels=True)
    membranes = (np.asarray(labels) == 0).astype(np.uint8)
    tifffile.imwrite(work / "isbi.tif", np.asarray(image))
    rows: list[dict[str, object]] = []
    for mode in modes:
        t0 = time.perf_counter()
        result = Aligner(mode=mode).align_stack(work / "isbi.tif", work / f"i_{mode}.tif",
                                                transforms_path=work / f"i_{mode}.json",
                                                progress=False)
        seconds = time.perf_counter() - t0
        ts = TransformSet.load(work / f"i_{mode}.json")
        m = 16
        warped = [render_slice(lab, ts.slice_map(z), ts.output_shape,
                               interpolation="nearest")[m:-m, m:-m] > 0
                  for z, lab in enumerate(membranes)]
        dice = [2 * (a & b).sum() / max(a.sum() + b.sum(), 1)
                for a, b in zip(warped[:-1], warped[1:], strict=True)]
        rows.append({"mode": mode, "dice_median": float(np.median(dice)),
                     "dice_mean": float(np.mean(dice)), "seconds": seconds,
                     "flagged": len(result.flagged)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default="affine,elastic",
                    help="comma-separated: affine, elastic, expected-affine")
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        try:
            crops = crop_rows(modes, work)
            cracks = crack_rows(modes, work)
            partials = partial_rows(modes, work)
            folds = fold_rows(modes, work)
            sections = isbi_rows(modes, work)
        except datasets.DataUnavailable as exc:
            print(f"skipped: {exc}")
            return 0
    print("| lucchi crop | mode | aligned: moved, median / max (px) | deformed: input -> "
          "output residual (px) | flagged |\n|---|---|---|---|---|")
    for r in crops:
        print(f"| {r['region']} | {r['mode']} | {r['aligned_moved_median']:.2f} / "
              f"{r['aligned_moved_max']:.2f} | {r['deformed_input']:.2f} -> "
              f"{r['deformed_residual']:.2f} | {r['flagged']} |")
    print("\n| cracked crop | mode | cracked slice: error beside the crack (px) | other slices "
          "moved, median / max (px) | flagged |\n|---|---|---|---|---|")
    for r in cracks:
        print(f"| {r['region']} | {r['mode']} | {r['crack_error']:.2f} | "
              f"{r['others_moved_median']:.2f} / {r['others_moved_max']:.2f} | "
              f"{r['flagged']} |")
    print("\n| partly cracked crop | far side's shift (px) | mode | torn slice's error: left / "
          "right of the crack / beyond its tip (px) | flagged |\n|---|---|---|---|---|")
    for r in partials:
        print(f"| {r['region']} | {r['shift']} | {r['mode']} | "
              + " / ".join(f"{e:.2f}" for e in r["errors"])  # type: ignore[attr-defined]
              + f" | {r['flagged']} |")
    print("\n| real fold | mode | folded slice's NCC with the reference: side the affine misses / "
          "other side | seconds |\n|---|---|---|---|")
    for r in folds:
        a, b = r["ncc"]  # type: ignore[misc]
        print(f"| {r['pair']} | {r['mode']} | {a:.3f} / {b:.3f} | {r['seconds']:.1f} |")
    print("\n| isbi | adjacent membrane Dice, median / mean | seconds | flagged |\n"
          "|---|---|---|---|")
    for r in sections:
        print(f"| {r['mode']} | {r['dice_median']:.3f} / {r['dice_mean']:.3f} | "
              f"{r['seconds']:.1f} | {r['flagged']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
