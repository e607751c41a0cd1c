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
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


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
