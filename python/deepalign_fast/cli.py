"""Command line interface: a thin layer over the Python API (no alignment logic lives here)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__
from ._errors import DeepAlignError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepalign-fast",
        description="Fast, artifact-robust alignment of volume-EM image stacks.",
    )
    parser.add_argument("--version", action="version", version=f"deepalign-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_make_benchmark(sub)
    _add_eval(sub)
    _add_report(sub)
    return parser


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
    from .evaluate import TiffStack, load_transforms
    from .report import write_report

    transforms = None if args.transforms is None else load_transforms(args.transforms)
    before, after = TiffStack(args.before), TiffStack(args.after)
    try:
        out = write_report(args.output, before=before, after=after, transforms=transforms,
                           title=args.title, z_scale=args.z_scale)
    finally:
        before.close()
        after.close()
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
    except DeepAlignError as exc:
        print(f"deepalign-fast: error: {exc}", file=sys.stderr)
        return 2
