"""The command-line front end shared by the ONNX export scripts."""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Callable
from pathlib import Path


def export_main(prog: str, description: str | None, trainer: str,
                export: Callable[[Path, Path], Path], argv: list[str] | None) -> int:
    """Parse ``CKPT OUT``, export, and print the file's size and sha256 (for the model card)."""
    ap = argparse.ArgumentParser(prog=prog, description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", type=Path, help=f"checkpoint written by {trainer}")
    ap.add_argument("out", type=Path, help="output .onnx path")
    args = ap.parse_args(argv)
    path = export(args.ckpt, args.out)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB) sha256 {digest}")
    return 0
