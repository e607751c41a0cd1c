"""Command line interface: a thin layer over the Python API (no alignment logic lives here).

Each subcommand is registered by its own ``_add_<name>`` function, which sets ``func``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from ._errors import DeepAlignError

if TYPE_CHECKING:
    from .pipeline import AlignResult


def _align_options(args: argparse.Namespace) -> Any:
    from .pipeline import AlignOptions

    return AlignOptions(features=args.features, model=args.model, neighbours=args.neighbours,
                        threshold=args.threshold, drift=args.drift,
                        drift_window=args.drift_window, canvas=args.canvas,
                        num_threads=args.threads, provider=args.provider, mode=args.mode,
                        masks=None if args.masks is None else str(args.masks),
                        max_folding=args.max_folding)


def _make_parent(path: Path) -> None:
    """Outputs may go into a folder that does not exist yet (never touches the input)."""
    path.parent.mkdir(parents=True, exist_ok=True)


def _default_transforms_path(output: Path) -> Path:
    name = output.name
    for suffix in (".ome.zarr", ".zarr", ".tiff", ".tif"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return output.with_name(name + ".transforms.json")


def _print_summary(summary: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, indent=1))
        return
    flagged = summary["flagged"]
    res = summary["residual_median_px"]
    rate = summary["slices_per_s"]
    print(f"aligned {summary['slices']} slices in {summary['time_s']:.1f} s"
          + (f" ({rate:.2f} slices/s)" if rate else ""))
    print(f"  residual median {res:.3f} px, max {summary['residual_max_px']:.3f} px"
          if res is not None else "  no residuals (single slice?)")
    print(f"  median consistent matches per slice: {summary['matches_median']:.0f}")
    print(f"  flagged slices ({len(flagged)}): {flagged if flagged else 'none'}")
    stages = ", ".join(f"{k} {v:.2f} s" for k, v in summary["timings_s"].items() if k != "total")
    print(f"  time per stage: {stages}")


def _add_align_arguments(p: argparse.ArgumentParser) -> None:
    from .estimate import MODELS
    from .pipeline import CANVAS, DRIFT, FEATURES, MODES, AlignOptions

    d = AlignOptions()
    p.add_argument("--features", choices=FEATURES, default=d.features,
                   help="matching: dense NCC blocks, raw SIFT, or learned features "
                        "(default %(default)s)")
    p.add_argument("--model", choices=MODELS, default=d.model,
                   help="transform model per slice (default %(default)s)")
    p.add_argument("--neighbours", type=int, default=d.neighbours,
                   help="match each slice to this many predecessors (default %(default)s)")
    p.add_argument("--threshold", type=float, default=d.threshold,
                   help="inlier threshold in pixels (default %(default)s)")
    p.add_argument("--drift", choices=DRIFT, default=d.drift,
                   help="drift model: remove the low-frequency trend of rotation/scale/shear "
                        "(linear), of everything (all), or nothing (default %(default)s)")
    p.add_argument("--drift-window", type=int, default=d.drift_window,
                   help="slices over which the drift trend is fitted (default %(default)s)")
    p.add_argument("--canvas", choices=CANVAS, default=d.canvas,
                   help="output frame: first slice's, or union of all (default %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="threads, 0 = all cores")
    p.add_argument("--provider", choices=("cpu", "cuda", "tensorrt"), default="cpu",
                   help="onnxruntime execution provider for --features learned "
                        "(default %(default)s)")
    p.add_argument("--mode", choices=MODES, default=d.mode,
                   help="render with one affine per slice, refine damaged sections with the "
                        "expected affine, or refine every slice with the learned flow (elastic) "
                        "(default %(default)s)")
    p.add_argument("--max-folding", type=float, default=d.max_folding,
                   help="--mode elastic: largest accepted fraction of non-positive Jacobian "
                        "determinants per slice (default %(default)s = 0.1 %%)")
    p.add_argument("--masks", type=Path, default=None,
                   help="damage masks for --mode expected-affine (stack or folder, "
                        "non-zero = fold/crack)")


def _add_align(sub: Any) -> None:
    p = sub.add_parser("align", help="align a stack (TIFF, folder of slices, Zarr)",
                       description="Align a stack and write the aligned stack, the transforms "
                                   "file and (optionally) a QC report.")
    p.add_argument("input", type=Path, help="multi-page TIFF, folder of slices, or (OME-)Zarr")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="aligned stack (.tif/.tiff or .zarr/.ome.zarr)")
    p.add_argument("--transforms", type=Path, default=None,
                   help="transforms file (default: OUTPUT with .transforms.json)")
    p.add_argument("--report", type=Path, default=None, help="write a QC report (HTML)")
    _add_align_arguments(p)
    p.add_argument("--scheduler", default=None, metavar="tcp://HOST:PORT|local:N",
                   help="run on a Dask cluster: an existing scheduler, or a local cluster of "
                        "N worker processes (needs the 'distributed' extra; output must be "
                        ".zarr/.ome.zarr; rerun the same command to resume)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="with --scheduler: pair cache and resume state "
                        "(default OUTPUT.work, deleted after success)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_align)


def _cmd_align(args: argparse.Namespace) -> int:
    from .io import check_distinct
    from .pipeline import Aligner

    check_distinct(args.input, args.output)
    _make_parent(args.output)
    transforms_path = args.transforms or _default_transforms_path(args.output)
    progress = False if args.quiet else None
    result: AlignResult
    if args.scheduler is not None:
        from .distributed import align_distributed

        result = align_distributed(args.input, args.output, scheduler=args.scheduler,
                                   options=_align_options(args),
                                   transforms_path=transforms_path, work_dir=args.work_dir,
                                   progress=progress)
    else:
        if args.work_dir is not None:
            raise DeepAlignError("--work-dir only applies with --scheduler")
        result = Aligner(_align_options(args)).align_stack(
            args.input, args.output, transforms_path=transforms_path, progress=progress)
    summary = result.summary()
    summary["output"] = str(args.output)
    summary["transforms"] = str(transforms_path)
    if args.report is not None:
        _write_report(args.input, args.output, result, args.report)
        summary["report"] = str(args.report)
    _print_summary(summary, as_json=args.json)
    return 0


def _write_report(before: Path, after: Path, result: Any, path: Path) -> None:
    from .io import open_stack
    from .report import write_report

    ts = result.transforms
    maps = None
    if ts.fields is not None:  # elastic: Jacobian maps of the slices that fold most
        from .fields import jacobian_determinant

        ranked = sorted((f, z) for z, f in enumerate(ts.folding) if f is not None)
        maps = {}
        for _, z in ranked[-8:]:
            u = ts.fields.get(z)
            if u is not None:
                maps[z] = jacobian_determinant(u)
    with open_stack(before) as b, open_stack(after) as a:
        # Short stacks would give reslices a few pixels tall: stretch z for display (the
        # report prints the z scale it used).
        write_report(path, before=b, after=a, transforms=ts.affines,
                     residuals=ts.residuals, flagged=result.flagged,
                     timings=result.timings, jacobian_maps=maps,
                     title=f"deepalign-fast: {before.name}",
                     z_scale=max(1.0, 96.0 / max(1, len(b))))


def _add_apply(sub: Any) -> None:
    p = sub.add_parser("apply", help="apply a transforms file to another stack (e.g. labels)",
                       description="Warp a stack with the transforms of an earlier alignment: "
                                   "label stacks (nearest), or other channels / copies.")
    p.add_argument("transforms", type=Path, help="transforms file written by `align`")
    p.add_argument("input", type=Path, help="stack to warp (same number of slices)")
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--interpolation", choices=("nearest", "linear"), default="nearest",
                   help="nearest for labels (default), linear for images")
    p.add_argument("--scale", type=float, default=1.0,
                   help="INPUT has pixels this many times finer than the aligned stack "
                        "(apply binned transforms to full resolution)")
    p.add_argument("--threads", type=int, default=0, help="threads, 0 = all cores")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_apply)


def _cmd_apply(args: argparse.Namespace) -> int:
    from .pipeline import Aligner
    from .transforms import TransformSet

    ts = TransformSet.load(args.transforms)
    _make_parent(args.output)
    if args.scale != 1.0:
        ts = ts.rescaled(args.scale)
    Aligner(num_threads=args.threads).render(args.input, ts, args.output,
                                              interpolation=args.interpolation,
                                              progress=False if args.quiet else None)
    print(f"wrote {args.output} ({len(ts)} slices, {ts.output_shape[0]}x{ts.output_shape[1]})")
    return 0


def _add_demo(sub: Any) -> None:
    p = sub.add_parser("demo", help="align the bundled real FIB-SEM sample, write a QC report")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .datasets import sample_stack_path

    args.out.mkdir(parents=True, exist_ok=True)
    sample = sample_stack_path()
    print(f"sample: {sample.name} (14 raw FIB-SEM slices of shale, MIT licence)")
    argv = ["align", str(sample), "-o", str(args.out / "aligned.tif"),
            "--report", str(args.out / "report.html"), "--model", "rigid", "--quiet"]
    rc = main(argv)
    print(f"outputs in {args.out}/: aligned.tif, aligned.transforms.json, report.html")
    return rc


def _add_bench(sub: Any) -> None:
    p = sub.add_parser("bench", help="throughput: slices/s, Mpx/s, time per stage, memory",
                       description="Align a synthetic (default) or given stack once per "
                                   "features/provider configuration, each in a fresh process.")
    p.add_argument("stack", nargs="?", type=Path, default=None,
                   help="stack to align (default: synthetic, from the bundled sample)")
    p.add_argument("--slices", type=int, default=16, help="synthetic stack depth")
    p.add_argument("--size", type=int, default=2048, help="synthetic slice size (square)")
    p.add_argument("--features", nargs="+", default=["blocks"],
                   choices=("blocks", "sift", "learned"))
    p.add_argument("--providers", nargs="+", default=None, choices=("cpu", "cuda", "tensorrt"),
                   help="providers for learned features (default: all available)")
    p.add_argument("--model", default="rigid")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON rows")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import STAGES, run_bench

    rows = run_bench(args.stack, slices=args.slices, size=args.size,
                     features=tuple(args.features),
                     providers=tuple(args.providers) if args.providers else None,
                     model=args.model, threads=args.threads)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    cols = ["features", "provider", "slices", "shape", "slices_per_s", "mpx_per_s",
            *[f"{s}_s" for s in STAGES], "peak_memory_mb"]
    print("  ".join(f"{c:>14s}" for c in cols))
    for r in rows:
        print("  ".join(f"{r[c]:>14.3f}" if isinstance(r[c], float) else f"{r[c]!s:>14s}"
                        for c in cols))
    print("stage seconds are summed over the threads that ran them (stages overlap)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepalign-fast",
        description="Fast, artifact-robust alignment of volume-EM image stacks.",
    )
    parser.add_argument("--version", action="version", version=f"deepalign-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_align(sub)
    _add_apply(sub)
    _add_demo(sub)
    _add_make_benchmark(sub)
    _add_eval(sub)
    _add_report(sub)
    _add_bench(sub)
    _add_register(sub)
    return parser


def _add_register(sub: Any) -> None:
    p = sub.add_parser("register", help="register a damaged section onto a reference "
                                        "(expected affine)",
                       description="Expected-affine registration of one (reference, damaged "
                                   "moving) pair; writes the moving image warped onto the "
                                   "reference.")
    p.add_argument("fixed", type=Path, help="reference image")
    p.add_argument("moving", type=Path, help="damaged moving image")
    p.add_argument("--mask", type=Path, default=None,
                   help="damage mask of the moving image (non-zero = fold/crack)")
    p.add_argument("-o", "--output", type=Path, required=True, help="warped moving image")
    p.add_argument("--features", choices=("sift", "learned", "blocks"), default="learned",
                   help="matcher (default %(default)s; see RESULTS.md, expected affine)")
    p.add_argument("--clusters", type=int, default=4, help="K-means clusters (default 4)")
    p.add_argument("--k", type=int, default=20, help="KNN neighbours (default 20)")
    p.add_argument("--blank-damage", action="store_true",
                   help="set output pixels whose source lies in the damage to 0")
    p.add_argument("--threads", type=int, default=0, help="threads, 0 = all cores")
    p.set_defaults(func=_cmd_register)


def _cmd_register(args: argparse.Namespace) -> int:
    import cv2

    from .expected_affine import register_pair
    from .io import read_image

    fixed, moving = read_image(args.fixed), read_image(args.moving)
    mask = None if args.mask is None else read_image(args.mask)
    res = register_pair(fixed, moving, mask=mask, features=args.features,
                        n_clusters=args.clusters, k=args.k, num_threads=args.threads)
    if not res:
        raise DeepAlignError(f"{args.moving}: registration failed: {res.reason}")
    out = res.warp(moving, mask_damage=args.blank_damage)
    _make_parent(args.output)
    if not cv2.imwrite(str(args.output), out):
        raise DeepAlignError(f"{args.output}: could not write the image")
    status = f"fallback to the global affine ({res.reason})" if res.fallback else \
        f"{len(res.cluster_affines)} local affines, {len(res.points_moving)} keypoints"
    print(f"registered {args.moving} -> {args.output}: {status}")
    for note in res.notes:
        print(f"  note: {note}")
    return 0


# --- QC subcommands: parse, call the API, print ---------------------------------------------
def _add_make_benchmark(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "make-benchmark",
        help="misalign an aligned stack with known transforms (synthetic ground truth)",
        description="Write OUT_DIR/misaligned.tif and ground_truth.json (and, with --labels, "
        "misaligned_labels.tif and clean_labels.tif).",
    )
    p.add_argument("clean_stack", metavar="CLEAN_STACK", help="aligned stack: TIFF or folder")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--profile", choices=["sstem", "fibsem", "jitter"], default="sstem")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--labels", metavar="LABELS", help="label stack of CLEAN_STACK")
    p.add_argument("--artifacts", action="store_true",
                   help="add curtaining, brightness drift and noise")
    p.set_defaults(func=_run_make_benchmark)


def _run_make_benchmark(args: argparse.Namespace) -> int:
    from .evaluate import make_benchmark

    truth = make_benchmark(args.clean_stack, args.out_dir, profile=args.profile, seed=args.seed,
                           labels=args.labels, artifacts=args.artifacts)
    print(f"wrote {len(truth)} slices of {truth.shape[0]}x{truth.shape[1]} (margin "
          f"{truth.margin} px, profile {truth.profile}) to {args.out_dir}")
    return 0


def _add_eval(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "eval", help="score an aligned stack against a make-benchmark folder",
        description="Tool-agnostic: registers each aligned slice to its misaligned original "
        "(SIFT + RANSAC), then reports TRE with the common frame removed, neighbour NCC/SSIM "
        "before/after, N_SSIM and, with --labels, Dice/IoU.",
    )
    p.add_argument("aligned", metavar="ALIGNED", help="aligned stack: TIFF or folder")
    p.add_argument("ground_truth_dir", metavar="GROUND_TRUTH_DIR")
    p.add_argument("--labels", metavar="ALIGNED_LABELS",
                   help="misaligned_labels.tif carried through the same alignment")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    import json

    from .evaluate import evaluate_alignment, summarize

    result = evaluate_alignment(args.aligned, args.ground_truth_dir, aligned_labels=args.labels)
    print(json.dumps(result, indent=1) if args.json else summarize(result))
    return 0


def _add_report(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("report", help="write an HTML QC report (reslices, plots)")
    p.add_argument("before", metavar="BEFORE", help="stack before alignment: TIFF or folder")
    p.add_argument("after", metavar="AFTER", help="stack after alignment: TIFF or folder")
    p.add_argument("-o", "--output", required=True, metavar="REPORT_HTML")
    p.add_argument("--transforms", metavar="TRANSFORMS_JSON")
    p.add_argument("--title", default="")
    p.add_argument("--z-scale", type=float, default=1.0,
                   help="slice spacing / pixel size, for true reslice proportions")
    p.set_defaults(func=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from .evaluate import load_transforms
    from .io import open_stack
    from .report import write_report

    transforms = None if args.transforms is None else load_transforms(args.transforms)
    with open_stack(args.before) as before, open_stack(args.after) as after:
        out = write_report(args.output, before=before, after=after, transforms=transforms,
                           title=args.title, z_scale=args.z_scale)
    print(f"wrote {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args))
    except (DeepAlignError, ValueError) as exc:
        print(f"deepalign-fast: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deepalign-fast: interrupted; no partial output was left under the final name",
              file=sys.stderr)
        return 130
