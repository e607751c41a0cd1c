"""Command line interface: a thin layer over the Python API (no alignment logic lives here).

Each subcommand is registered by its own ``_add_<name>`` function, which sets ``func``.

Every command that writes builds an :class:`~deepalign_fast.outputs.OutputPlan` first: all its
outputs are checked against its inputs, each other, ``--overwrite`` and the file system before
any work, and locked while it runs. Errors are one line on stderr; exit status 2 is bad input,
1 an environment failure (full disk, read-only folder, permissions), 3 an alignment that
finished with more than half of its slices flagged, 130/143 an interruption (SIGINT/SIGTERM,
temporary files removed). ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from dataclasses import fields as dataclass_fields
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

from ._errors import DeepAlignError, EnvironmentFailure

if TYPE_CHECKING:
    from .alignment import AlignResult


_FLAG_NAMES = {"num_threads": "--threads"}


def _suffix(path: Path | None, suffixes: tuple[str, ...], flag: str, what: str) -> None:
    """Refuse an output whose name says another format than what is written there."""
    if path is not None and path.suffix.lower() not in suffixes:
        raise DeepAlignError(f"{path}: ({flag}) is written as {what}; name it "
                             f"{' or '.join('*' + s for s in suffixes)}")


def _flag(name: str) -> str:
    """The CLI flag of an API option name: ``max_folding`` -> ``--max-folding``."""
    return _FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


def options_from_args(args: argparse.Namespace) -> Any:
    """The :class:`AlignOptions` of the parsed ``align`` flags (one flag per field)."""
    from .alignment import AlignOptions

    try:
        return AlignOptions(**{f.name: getattr(args, f.name)
                               for f in dataclass_fields(AlignOptions)})
    except (ValueError, TypeError) as exc:
        names = "|".join(f.name for f in dataclass_fields(AlignOptions))
        msg = re.sub(rf"\b({names})\b", lambda m: _flag(m.group(1)), str(exc))
        raise DeepAlignError(msg) from None


def _finite(value: float, flag: str, *, positive: bool = True) -> None:
    if not math.isfinite(value) or (positive and value <= 0):
        raise DeepAlignError(f"{flag} must be a finite number{' > 0' if positive else ''}, "
                             f"got {value}")


def _lock(plan: Any) -> Any:
    from .outputs import output_lock

    return output_lock(plan.primary())


def _mostly_flagged(summary: dict[str, Any]) -> bool:
    return 2 * len(summary["flagged"]) > int(summary["slices"])


_NOTES_SHOWN = 5  # unrefined slices whose reason the summary prints
# The summary warns where the median slice has fewer consistent matches than this many times
# what a pair needs: 8 slices of unrelated noise (128^2) were "aligned" with 14 (12 needed),
# real serial sections have hundreds.
FEW_MATCHES = 2


def _print_flag_reasons(summary: dict[str, Any]) -> None:
    """One line per reason: the flagged slices it applies to (solve.FLAG_REASONS)."""
    from .alignment.solve import FLAG_REASONS

    by_reason: dict[str, list[int]] = {}
    for z, why in (summary.get("flag_reasons") or {}).items():
        by_reason.setdefault(why, []).append(int(z))
    for why, slices in by_reason.items():
        print(f"    {FLAG_REASONS.get(why, why)}: {sorted(slices)}")
    notes = summary.get("refine_notes") or {}
    unrefined = [z for z in sorted(by_reason.get("unrefined", [])) if str(z) in notes]
    for z in unrefined[:_NOTES_SHOWN]:
        print(f"      slice {z}: {notes[str(z)]}")
    if len(unrefined) > _NOTES_SHOWN:
        print(f"      ({len(unrefined) - _NOTES_SHOWN} more: --json lists every slice's)")


def _print_summary(summary: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, indent=1))
        return
    flagged = summary["flagged"]
    res = summary["residual_median_px"]
    rate = summary["slices_per_s"]
    print(f"aligned {summary['slices']} slices in {summary['time_s']:.1f} s"
          + (f" ({rate:.2f} slices/s)" if rate else ""))
    if summary.get("resumed_slices"):
        print(f"  resumed an interrupted run: the matching of {summary['resumed_slices']} of "
              f"{summary['slices']} slices was reused")
    if res is not None:
        print(f"  residual median {res:.3f} px, max {summary['residual_max_px']:.3f} px")
    elif int(summary["slices"]) <= 1:
        print("  no residuals (a single slice)")
    else:
        print("  no residuals: no slice could be matched to a neighbour"
              + (" (every slice was flagged)" if len(flagged) >= int(summary["slices"]) else ""))
    print(f"  median consistent matches per slice: {summary['matches_median']:.0f}")
    needed = summary.get("matches_needed")
    if isinstance(needed, int) and 0 < summary["matches_median"] < FEW_MATCHES * needed:
        print(f"  warning: few matches (a pair needs {needed}): do the slices share content? "
              "Check the output before trusting it")
    corr = summary.get("neighbour_correlation")
    if corr is not None:
        from .alignment.solve import SIMILAR_CONTENT, STAGE_STEP

        discounted = summary.get("neighbour_noise_discounted")
        print(f"  neighbour correlation {corr:.2f}"
              + (", noise discounted" if discounted is True else
                 ", noise included (too few slices with a second-nearest pair to discount it: "
                 "a short stack, --offsets without 2, or neighbours that hardly correlate)"
                 if discounted is False else "")
              + (f"; dissimilar slices: apparent walks beyond {STAGE_STEP:g} px per slice "
                 "are taken for the content's and kept" if corr < SIMILAR_CONTENT else ""))
    motion = summary.get("stage_motion")
    if motion is not None:
        from .alignment.solve import ANATOMY_SLOPE

        trend = motion["trend_px_per_slice"]
        spacing = motion["slice_spacing"]
        limit = ANATOMY_SLOPE * spacing
        if spacing > 1.05:
            print(f"  slices about {spacing:.1f} times as far apart as 5-nm FIB-SEM: the "
                  "anatomy's apparent motion allowed for that")
        print(f"  measured stage walk {motion['stage_walk_px']:.2f} px per slice, jitter "
              f"{motion['jitter_px']:.2f} px (corrected; the smooth motion beyond them is "
              "kept as the anatomy's)")
        print(f"  input's straight-line trend {trend:.2f} px per slice (the output keeps at "
              f"most {limit:.2g} px per slice of a trend, less where the stage walks)")
    spread = summary.get("per_slice_affine_pct")
    if spread is not None:
        print(f"  per-slice scale and shear measured: stretch {spread['stretch']:.2g} %, shear "
              f"{spread['shear']:.2g} %, scale {spread['scale']:.2g} % (they set how hard each "
              "slice is pulled toward rigid)")
    outliers = summary.get("outliers") or []
    if outliers:
        print(f"  slices off alone (a glitch?): {outliers}; each is corrected by its own "
              "estimate and left out of the slow trend")
    print(f"  flagged slices: {len(flagged)} of {summary['slices']}"
          + (f" {flagged}" if flagged else ""))
    _print_flag_reasons(summary)
    damaged = summary.get("damaged_slices")
    if damaged is not None:  # (expected-affine with --masks)
        print(f"  masks mark damage in {len(damaged)} slice(s) {damaged}" if damaged else
              "  warning: --masks marks no damage in any slice (non-zero = damage): no slice "
              "was moved the whole way onto its neighbours; check the masks")
    outside = summary.get("outside") or []
    if outside:
        print(f"  note: {len(outside)} slice(s) {outside} map wholly outside their input and "
              "are empty in the output (the drift followed or corrected moves them off the "
              "frame: --canvas union keeps every slice)")
    if _mostly_flagged(summary):
        print("  more than half of the slices were flagged: check the input and the options "
              "(exit status 3)")
    stages = ", ".join(f"{k} {v:.2f} s" for k, v in summary["timings_s"].items() if k != "total")
    print(f"  time per stage: {stages}")


def _add_compression(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compression", choices=("none", "zlib", "zstd"), default=None,
                   help="TIFF output compression: zlib stays an ImageJ hyperstack (Fiji opens "
                        "it natively), zstd needs Bio-Formats in Fiji (default none)")


def _compression(args: argparse.Namespace) -> str | None:
    """``--compression``, refused for OME-Zarr output (its chunks are always compressed)."""
    if args.compression is None:
        return None
    if Path(args.output).suffix.lower() == ".zarr":
        raise DeepAlignError("--compression applies to TIFF output; OME-Zarr chunks are "
                             "always compressed")
    return str(args.compression)


def _voxel_size(args: argparse.Namespace) -> tuple[float, float, float] | None:
    """``--pixel-size X[,Y[,Z]]`` as a ``(z, y, x)`` voxel size, checked."""
    if args.pixel_size is None:
        if args.unit is not None:
            raise DeepAlignError("--unit needs --pixel-size")
        return None
    try:
        values = [float(v) for v in str(args.pixel_size).split(",")]
    except ValueError:
        raise DeepAlignError(f"--pixel-size: expected X[,Y[,Z]] numbers, got "
                             f"{args.pixel_size!r}") from None
    if not 1 <= len(values) <= 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise DeepAlignError(f"--pixel-size: expected 1-3 positive numbers, got "
                             f"{args.pixel_size!r}")
    if args.unit is not None:
        from .io import ome_unit

        if ome_unit(args.unit) is None:
            raise DeepAlignError(f"--unit {args.unit!r}: not a length unit of OME-NGFF; use "
                                 "nm, um, mm, angstrom, or an NGFF name (nanometer, "
                                 "micrometer, meter, ...)")
    x = values[0]
    y = values[1] if len(values) > 1 else x
    z = values[2] if len(values) > 2 else y
    if args.unit is None:
        args.unit = "nm"
    if str(args.output).lower().endswith((".tif", ".tiff", ".btf")) and \
            not all(2.0 ** -31 < v < 2.0 ** 31 for v in (x, y)):
        # (TIFF stores pixels per unit as a ratio of 32-bit integers)
        raise DeepAlignError(f"--pixel-size {args.pixel_size}: a TIFF cannot record a pixel "
                             "size this far from 1; give it in another --unit")
    return (z, y, x)


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None


def _strength(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected "auto" or a number, got {text!r}') from None


def _add_align_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`AlignOptions` field (name, default, choices and help from the
    dataclass and its docstring), then the output flags that are not options."""
    import typing

    from .alignment import options as options_module
    from .alignment.options import AlignOptions, option_docs

    docs = option_docs()
    hints = typing.get_type_hints(AlignOptions, vars(options_module))
    names = "|".join(f.name for f in dataclass_fields(AlignOptions))
    underscored = "|".join(f.name for f in dataclass_fields(AlignOptions) if "_" in f.name)
    for f in dataclass_fields(AlignOptions):
        hint = hints[f.name]
        text = re.sub(rf"\b({names})=\"([\w-]+)\"", lambda m: f"{_flag(m.group(1))} {m.group(2)}",
                      docs[f.name])
        text = re.sub(rf"\b({underscored})\b", lambda m: _flag(m.group(1)), text)
        kw: dict[str, Any] = {"dest": f.name, "default": f.default,
                              "help": text.replace("%", "%%") + " (default: %(default)s)"}
        if typing.get_origin(hint) is typing.Literal:
            kw["choices"] = typing.get_args(hint)
        elif hint == tuple[int, ...]:
            kw.update(type=_int_tuple, metavar="N,N,...",
                      help=kw["help"].replace("%(default)s",
                                              ",".join(str(v) for v in kw["default"])))
        elif hint in (int, float):
            kw["type"] = hint
        elif hint == options_module.Strength:
            kw.update(type=_strength, metavar="auto|X")
        else:  # optional paths
            kw.update(type=str, metavar="PATH")
        flags = [_flag(f.name)] + (["--num-threads"] if f.name == "num_threads" else [])
        p.add_argument(*flags, **kw)
    _add_pixel_size(p, "to record in the output, overriding the input's metadata")


def _add_pixel_size(p: argparse.ArgumentParser, what: str) -> None:
    """``--pixel-size X[,Y[,Z]]`` and ``--unit`` (read by :func:`_voxel_size`)."""
    p.add_argument("--pixel-size", metavar="X[,Y[,Z]]", default=None,
                   help=f"physical pixel size (and slice spacing) {what}; Y defaults to X and "
                        "Z to Y")
    p.add_argument("--unit", default=None,
                   help="unit of --pixel-size, e.g. nm or um (only with --pixel-size; "
                        "default nm)")


def _add_align(sub: Any) -> None:
    p = sub.add_parser("align", help="align a stack (TIFF, folder of slices, Zarr)",
                       description="Align a stack and write the aligned stack, the transforms "
                                   "file and (optionally) a QC report.")
    p.add_argument("input", type=Path, help="multi-page TIFF, folder of slices, or (OME-)Zarr")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="aligned stack (.tif/.tiff or .zarr/.ome.zarr)")
    p.add_argument("--transforms", type=Path, default=None,
                   help="transforms file (default: NAME.transforms.json for NAME.tif, "
                        "OUTPUT.transforms.json for other outputs)")
    p.add_argument("--report", type=Path, default=None, help="write a QC report (HTML)")
    _add_align_arguments(p)
    p.add_argument("--scheduler", default=None, metavar="tcp://HOST:PORT|local:N",
                   help="run on a Dask cluster: an existing scheduler, or a local cluster of "
                        "N worker processes (needs the 'distributed' extra; output must be "
                        ".zarr/.ome.zarr; rerun the same command to resume)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="with --scheduler: pair cache and resume state, a new or empty folder "
                        "(default OUTPUT.work; the tool's files are deleted after success)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing outputs (once the new ones are complete)")
    _add_compression(p)
    p.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="take the align options from FILE (JSON or YAML; a transforms file "
                        "re-runs with that run's options); flags given here override it")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_align)


def _align_plan(args: argparse.Namespace, transforms_path: Path) -> Any:
    from .outputs import FIELDS_LEFT, OutputPlan, fields_path_for, partial_path_for, work_dir_for

    is_zarr = args.output.suffix.lower() == ".zarr"
    # Outputs an interrupted run of this command put in place are accepted: the rerun finishes
    # that run (the aligner checks that it is the same run).
    plan = OutputPlan(overwrite=args.overwrite, resumes=args.output)
    plan.input(args.input, "INPUT").input(args.masks, "--masks")
    plan.input(getattr(args, "config", None), "--config")  # read, never replaced
    plan.output(args.output, "-o", folder=is_zarr, store=is_zarr)
    plan.output(transforms_path, "--transforms")
    fields = fields_path_for(transforms_path)
    if args.mode != "affine":  # elastic and expected-affine keep their per-slice fields
        plan.output(fields, "fields", folder=True, store=True)
        plan.output(partial_path_for(fields), "unfinished fields", folder=True, may_exist=True,
                    store=True)
    else:
        plan.leftover(fields, FIELDS_LEFT)
    plan.output(args.report, "--report")
    if is_zarr:
        plan.output(partial_path_for(args.output), "unfinished -o", folder=True, may_exist=True,
                    store=True)
    if args.scheduler is not None:
        plan.output(args.work_dir or work_dir_for(args.output), "--work-dir", folder=True,
                    may_exist=True)
    return plan


def _cmd_align(args: argparse.Namespace, started: Callable[[], None] | None = None) -> int:
    """``align``; ``started()`` runs once every path has been checked (``demo``'s line)."""
    from .alignment import Aligner, AlignOptions

    _finite(args.threshold, "--threshold")
    if args.masks is not None and args.mode != "expected-affine":
        where = f" (set on the command line or in --config {args.config})" \
            if getattr(args, "config", None) is not None else ""
        raise DeepAlignError(f"--masks only applies with --mode expected-affine{where}")
    if args.work_dir is not None and args.scheduler is None:
        raise DeepAlignError("--work-dir only applies with --scheduler")
    if args.scheduler is not None:
        if args.mode != "affine":
            raise DeepAlignError(f"--scheduler renders one affine per slice; --mode {args.mode} "
                                 "runs on one machine only (drop --scheduler)")
        if args.output.suffix.lower() != ".zarr":
            raise DeepAlignError(f"{args.output}: (-o) with --scheduler the output must be "
                                 "(OME-)Zarr (.zarr/.ome.zarr)")
        from .alignment.distributed import check_scheduler

        check_scheduler(args.scheduler)  # the address's syntax, before anything is created
    from .io import open_writer  # noqa: F401 - fail early on a missing optional dependency

    suffix = args.output.suffix.lower()
    if suffix not in (".tif", ".tiff", ".btf", ".zarr"):
        raise DeepAlignError(f"{args.output}: (-o) cannot tell the output format from suffix "
                             f"{suffix!r}; use .tif/.tiff or .zarr/.ome.zarr")
    options = options_from_args(args)
    defaults = AlignOptions()
    for name, mode in (("refine_features", "expected-affine"), ("max_folding", "elastic"),
                       ("field_stride", "elastic")):
        if getattr(options, name) != getattr(defaults, name) and options.mode != mode:
            flag = "--" + name.replace("_", "-")
            raise DeepAlignError(f"{flag} only applies with --mode {mode}")
    if options.provider != defaults.provider and options.features != "learned" and \
            options.mode != "elastic":
        raise DeepAlignError(f"--provider {options.provider} only applies to the learned "
                             "models: --features learned, or --mode elastic")
    compression, voxel_size = _compression(args), _voxel_size(args)  # checked before any work
    transforms_path = args.transforms or _default_transforms_path(args.output)
    plan = _align_plan(args, transforms_path)
    plan.check()
    _suffix(args.transforms, (".json",), "--transforms", "a JSON file")
    _suffix(args.report, (".html", ".htm"), "--report", "an HTML page")
    if started is not None:
        started()
    progress = False if args.quiet else None
    result: AlignResult
    with plan.prepared(), _lock(plan):  # a failed run removes the (empty) folders it made
        plan.check()  # again under the lock: a run that just finished may have published
        # The report is part of the run: a rerun after a kill while writing it finishes it.
        report = [] if args.report is None else [
            (args.report, lambda r: _write_report(args.input, args.output, r, args.report))]
        if args.scheduler is not None:
            from .alignment.distributed import align_distributed

            result = align_distributed(args.input, args.output, scheduler=args.scheduler,
                                       options=options, transforms_path=transforms_path,
                                       work_dir=args.work_dir, progress=progress,
                                       overwrite=args.overwrite, side_outputs=report,
                                       voxel_size=voxel_size, unit=args.unit)
        else:
            result = Aligner(options).align_stack(
                args.input, args.output, transforms_path=transforms_path, progress=progress,
                overwrite=args.overwrite, voxel_size=voxel_size, unit=args.unit,
                compression=compression, side_outputs=report)
        summary = result.summary()
        summary["output"] = str(args.output)
        summary["transforms"] = str(transforms_path)
        if args.report is not None:
            summary["report"] = str(args.report)
    _print_summary(summary, as_json=args.json)
    return 3 if _mostly_flagged(summary) else 0


def _default_transforms_path(output: Path) -> Path:
    from .outputs import transforms_path_for

    return transforms_path_for(output)


def _write_report(before: Path, after: Path, result: Any, path: Path) -> None:
    from .io import open_stack
    from .qc.report import write_report

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
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output (once the new one is complete)")
    _add_compression(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_apply)


def _cmd_apply(args: argparse.Namespace) -> int:
    from .alignment.applying import apply_transforms
    from .io import label_target
    from .outputs import OutputPlan, partial_path_for
    from .transforms import MAX_CANVAS_GROWTH, outside_slices

    _finite(args.scale, "--scale")
    if not 1 / MAX_CANVAS_GROWTH <= args.scale <= MAX_CANVAS_GROWTH:
        raise DeepAlignError(f"--scale must lie between 1/{MAX_CANVAS_GROWTH} and "
                             f"{MAX_CANVAS_GROWTH}, got {args.scale:g}")
    if args.threads < 0:
        raise DeepAlignError(f"--threads must be >= 0, got {args.threads}")
    compression = _compression(args)
    # Every path, in the command line's words, before any work (apply_transforms checks the
    # same again in its own)
    is_zarr = args.output.suffix.lower() == ".zarr" or label_target(args.output) is not None
    plan = OutputPlan(overwrite=args.overwrite, resumes=args.output)
    plan.input(args.transforms, "TRANSFORMS").input(args.input, "INPUT")
    plan.output(args.output, "-o", folder=is_zarr, store=is_zarr)
    if is_zarr:
        plan.output(partial_path_for(args.output), "unfinished -o", folder=True, may_exist=True,
                    store=True)
    plan.check()
    with plan.prepared(), _lock(plan):
        ts = apply_transforms(args.transforms, args.input, args.output, scale=args.scale,
                              interpolation=args.interpolation, overwrite=args.overwrite,
                              compression=compression, num_threads=args.threads,
                              progress=False if args.quiet else None)
    print(f"wrote {args.output} ({len(ts)} slices, {ts.output_shape[0]}x{ts.output_shape[1]})")
    if ts.flagged:  # the alignment could not place these: say so wherever they are used
        from .alignment.solve import FLAG_REASONS

        why = "; ".join(f"{z}: {FLAG_REASONS.get(ts.flag_reasons[z], ts.flag_reasons[z])}"
                        for z in ts.flagged if z in ts.flag_reasons)
        print(f"note: the alignment flagged {len(ts.flagged)} slice(s) {ts.flagged}"
              + (f" ({why})" if why else "") + "; check them in the output")
    empty = outside_slices(ts)
    if empty:  # (a strong drift followed on a frame fixed to the mean, or an edited file)
        print(f"note: {len(empty)} slice(s) {empty} map wholly outside their input and are "
              "empty in the output")
    return 0


def _add_demo(sub: Any) -> None:
    p = sub.add_parser("demo", help="align the bundled real FIB-SEM sample, write a QC report")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the outputs of an earlier demo in --out")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .datasets import sample_stack_path

    if args.out.exists() and not args.out.is_dir():
        raise DeepAlignError(f"{args.out}: (--out) exists and is not a folder; choose a folder")
    sample = sample_stack_path()
    argv = ["align", str(sample), "-o", str(args.out / "aligned.tif"),
            "--report", str(args.out / "report.html"), "--model", "rigid", "--quiet",
            *(["--overwrite"] if args.overwrite else [])]
    try:
        rc = _cmd_align(build_parser().parse_args(argv),
                        started=lambda: print(f"sample: {sample.name} (14 raw FIB-SEM slices "
                                              "of shale, MIT licence)"))
    except DeepAlignError as exc:  # name demo's own option, not the align flags it sets
        text = str(exc)
        for flag in ("(-o)", "(--report)", "(--transforms)"):
            text = text.replace(flag, "(--out)")
        raise type(exc)(text) from exc  # (an environment failure stays one: exit 1)
    print(f"outputs in {args.out}/: aligned.tif, aligned.transforms.json, report.html")
    return rc


def _add_bench(sub: Any) -> None:
    p = sub.add_parser("bench", help="throughput: slices/s, Mpx/s, time per stage, memory",
                       description="Align a synthetic (default) or given stack once per "
                                   "features/provider configuration, each in a fresh process.")
    p.add_argument("stack", nargs="?", type=Path, default=None,
                   help="stack to align (default: synthetic, from the bundled sample)")
    p.add_argument("--slices", type=int, default=None,
                   help="synthetic stack depth (default 16)")
    p.add_argument("--size", type=int, default=None,
                   help="synthetic slice size, square (default 2048)")
    p.add_argument("--features", nargs="+", default=["blocks"],
                   choices=("blocks", "sift", "learned"), help="matchers to time (default blocks)")
    p.add_argument("--providers", nargs="+", default=None, choices=("cpu", "cuda", "tensorrt"),
                   help="providers for learned features (default: all available)")
    from .estimate import MODELS

    p.add_argument("--model", default="affine", choices=MODELS)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON rows")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    from .qc.bench import STAGES, run_bench

    if args.stack is not None and (args.slices is not None or args.size is not None):
        raise DeepAlignError("--slices and --size shape the synthetic stack; with STACK "
                             "given they do not apply (crop the stack instead)")
    args.slices = 16 if args.slices is None else args.slices
    args.size = 2048 if args.size is None else args.size
    if args.stack is None and (args.slices < 2 or args.size < 64):
        raise DeepAlignError(f"--slices must be >= 2 and --size >= 64 (got {args.slices} and "
                             f"{args.size})")
    if args.threads < 0:
        raise DeepAlignError(f"--threads must be >= 0, got {args.threads}")

    rows = run_bench(args.stack, slices=args.slices, size=args.size,
                     features=tuple(args.features),
                     providers=tuple(args.providers) if args.providers else None,
                     model=args.model, threads=args.threads,
                     progress=False if args.quiet else None)
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


def load_config(path: Path) -> dict[str, Any]:
    """AlignOptions fields from a config file (:func:`~deepalign_fast.alignment.options.
    load_options_file`)."""
    from .alignment.options import load_options_file

    return load_options_file(path)


def _add_export(sub: Any) -> None:
    p = sub.add_parser("export-transforms", help="write the transforms for another tool",
                       description="One ITK transform file per slice (FOLDER/slice_0000.tfm, "
                                   "...), re-appliable with ITK/SimpleITK, 3D Slicer or ANTs.")
    p.add_argument("transforms", type=Path, help="transforms file written by `align`")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="FOLDER")
    p.add_argument("--format", choices=("itk",), default="itk")
    p.add_argument("--pixel-size", type=float, default=1.0, metavar="S",
                   help="ITK applies transforms in physical units: the images' pixel spacing "
                        "(square pixels, origin 0), which scales the translations; default 1 "
                        "(pixel units)")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from .outputs import OutputPlan, output_lock, remove_stale_temps
    from .transforms import TransformSet, export_itk, holds_text, itk_files

    _finite(args.pixel_size, "--pixel-size")
    ts = TransformSet.load(args.transforms)
    if ts.fields is not None:
        raise DeepAlignError(f"{args.transforms}: holds per-slice fields (--mode elastic or "
                             "expected-affine); an affine per slice cannot carry them")
    files = itk_files(ts, pixel_size=args.pixel_size)
    plan = OutputPlan(overwrite=args.overwrite)
    plan.input(args.transforms, "TRANSFORMS")
    for name, text in sorted(files.items()):
        # a file that already holds its text is this export's (a killed run's, rerun)
        plan.output(args.output / name, "-o", may_exist=holds_text(args.output / name, text))
    plan.check()
    if args.output.is_dir():  # an earlier export's other slices would be taken for this one's
        other = sorted(p.name for p in args.output.iterdir()
                       if re.fullmatch(r"slice_\d+\.tfm", p.name) and p.name not in files)
        if other:
            raise DeepAlignError(
                f"{args.output / other[0]}: (-o) {len(other)} slice file(s) of an earlier "
                f"export that this one ({len(ts)} slices) does not replace would stay beside "
                "it; remove them or choose another folder.")
    with plan.prepared(), output_lock([args.output]):
        remove_stale_temps(*(args.output / name for name in files))  # a killed export's
        if args.overwrite:  # the files replaced go first: a killed export leaves no mix
            for name, text in files.items():
                if os.path.lexists(args.output / name) and \
                        not holds_text(args.output / name, text):
                    (args.output / name).unlink()
        written = export_itk(ts, args.output, pixel_size=args.pixel_size)
    print(f"wrote {len(written)} ITK transform files to {args.output}")
    if args.pixel_size == 1.0:  # (ITK applies them in physical units: say which were used)
        known = "" if ts.voxel_size is None else (
            f"; the aligned stack's pixels are {ts.voxel_size[2]:g} {ts.unit}, so for images "
            f"spaced in {ts.unit} that is --pixel-size {ts.voxel_size[2]:g}")
        print("note: translations in pixels (a spacing of 1); for images with a physical "
              "spacing, export again with --pixel-size in their unit" + (
                  known or " (e.g. 5 for 5-nm pixels in nm, 0.005 in um)"))
    return 0


def _add_watch(sub: Any) -> None:
    p = sub.add_parser("watch", help="align slices as they appear in a folder (acquisition)",
                       description="Poll FOLDER for slice files, align each once LOOKAHEAD "
                                   "later slices have arrived, append it to an OME-Zarr; stop "
                                   "on FOLDER/STOP or after --idle-timeout. Rerun to continue "
                                   "after a kill.")
    p.add_argument("folder", type=Path, metavar="FOLDER")
    p.add_argument("-o", "--output", type=Path, required=True, help=".zarr/.ome.zarr")
    p.add_argument("--lookahead", type=int, default=8,
                   help="slices after z awaited before z is aligned (default %(default)s)")
    p.add_argument("--poll", type=float, default=1.0,
                   help="seconds between looks (default %(default)s)")
    p.add_argument("--idle-timeout", type=float, default=600.0,
                   help="stop after this many seconds without a new slice (default %(default)s)")
    p.add_argument("--stop-file", default="STOP",
                   help="stop when FOLDER/NAME appears (default %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="threads, 0 = all cores")
    p.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="the align options (JSON or YAML, as `config --defaults` prints, or "
                        "an earlier run's transforms file); --mode affine only")
    _add_pixel_size(p, "the store records (default: none, pixels)")
    p.add_argument("--quiet", action="store_true", help="no per-slice messages")
    p.set_defaults(func=_cmd_watch)


def _cmd_watch(args: argparse.Namespace) -> int:
    from .alignment import AlignOptions
    from .watch import watch_folder

    for value, flag in ((args.poll, "--poll"), (args.idle_timeout, "--idle-timeout")):
        _finite(value, flag)
    if args.lookahead < 0:
        raise DeepAlignError(f"--lookahead must be >= 0, got {args.lookahead}")
    if args.threads < 0:
        raise DeepAlignError(f"--threads must be >= 0, got {args.threads}")
    if Path(args.stop_file).name != args.stop_file or args.stop_file in ("", ".", ".."):
        raise DeepAlignError(f"{args.stop_file}: (--stop-file) must be a file name inside "
                             f"FOLDER (e.g. STOP), not a path")

    def report(z: int) -> None:
        if not args.quiet:
            print(f"slice {z} written", file=sys.stderr, flush=True)  # flags: the summary

    if args.config is not None:  # read, never replaced (the watch's own files are outputs)
        from .outputs import transforms_path_for

        for own in (transforms_path_for(args.output),
                    args.output.with_name(args.output.name + ".watch.json")):
            if own.resolve() == args.config.resolve():
                raise DeepAlignError(f"{args.config}: (--config) is a file this watch writes "
                                     f"({own.name}); copy it elsewhere first")
    config = {} if args.config is None else load_config(args.config)
    try:
        options = AlignOptions(**{**config, "num_threads": args.threads})
    except (ValueError, TypeError) as exc:
        raise DeepAlignError(f"{args.config}: (--config) {exc}") from None
    voxel = _voxel_size(args)
    result = watch_folder(args.folder, args.output, options=options,
                          voxel_size=voxel, unit=args.unit or "nm",
                          lookahead=args.lookahead, poll=args.poll,
                          idle_timeout=args.idle_timeout, stop_file=args.stop_file,
                          on_slice=report)
    if not result.written:
        print(f"no slice arrived in {args.folder}: nothing written")
        return 0
    print(f"wrote {result.written} slices to {args.output} (transforms: {result.transforms}); "
          f"flagged: {len(result.flagged)} {result.flagged}")
    _print_flag_reasons({"flag_reasons": result.flag_reasons})
    return 0


def _add_config(sub: Any) -> None:
    p = sub.add_parser("config", help="print align options as a config file",
                       description="Print the align options as JSON, for `align --config`.")
    p.add_argument("--defaults", action="store_true", required=True,
                   help="the default options")
    p.set_defaults(func=_cmd_config)


def _cmd_config(args: argparse.Namespace) -> int:
    from .alignment import AlignOptions

    print(json.dumps(asdict(AlignOptions()), indent=1))
    return 0


class _Parser(argparse.ArgumentParser):
    """A usage error is one line and a pointer to ``--help``, not the usage block (the
    subcommands' parsers are of this class too)."""

    def error(self, message: str, prog: str | None = None) -> NoReturn:
        prog = prog or self.prog
        self.exit(2, f"{prog}: error: {message} (see: {prog} --help)\n")

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:
        """As argparse's, but a flag the command does not know points to the command's
        ``--help`` (argparse leaves unknown flags to the top-level parser)."""
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            command = getattr(parsed, "command", None)
            self.error(f"unrecognized arguments: {' '.join(extra)}",
                       f"{self.prog} {command}" if command else None)
        return parsed


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser: argparse.ArgumentParser = _Parser(  # its subcommands get _Parser too
        prog="deepalign-fast",
        description="Fast, artifact-robust alignment of volume-EM image stacks.",
    )
    parser.add_argument("--version", action="version", version=f"deepalign-fast {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_align(sub)
    _add_apply(sub)
    _add_demo(sub)
    _add_make_benchmark(sub)
    _add_eval(sub)
    _add_report(sub)
    _add_bench(sub)
    _add_register(sub)
    _add_config(sub)
    _add_export(sub)
    _add_watch(sub)
    for command in sub.choices.values():  # --debug also after the command name
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the Python traceback of an error")
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
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=_cmd_register)


def _write_image_atomic(path: Path, image: Any) -> None:
    """Encode ``image`` by ``path``'s suffix and publish it with an exclusive temp + rename."""
    import cv2

    from .outputs import write_atomic

    try:
        ok, data = cv2.imencode(path.suffix.lower(), image)
    except cv2.error:
        ok = False
    if not ok:
        raise DeepAlignError(f"{path}: (-o) cannot write this image as {path.suffix!r}; use "
                             ".tif or .png")
    write_atomic(path, data.tobytes(), doing="cannot write the image")


def _cmd_register(args: argparse.Namespace) -> int:
    from .io import read_image
    from .outputs import OutputPlan
    from .refine.expected_affine import register_pair

    if args.output.suffix.lower() not in (".tif", ".tiff", ".png"):
        raise DeepAlignError(f"{args.output}: (-o) unsupported image suffix "
                             f"{args.output.suffix!r}; use .tif, .tiff or .png")
    for value, flag in ((args.clusters, "--clusters"), (args.k, "--k")):
        if value < 1:
            raise DeepAlignError(f"{flag} must be >= 1, got {value}")
    plan = OutputPlan(overwrite=args.overwrite)
    plan.input(args.fixed, "FIXED").input(args.moving, "MOVING").input(args.mask, "--mask")
    plan.output(args.output, "-o")
    plan.check()
    fixed, moving = read_image(args.fixed), read_image(args.moving)
    try:
        mask = None if args.mask is None else read_image(args.mask)
    except DeepAlignError as exc:  # "MASK: holds 8 slices ...": say which input it is
        text = str(exc)
        raise DeepAlignError(text.replace(f"{args.mask}: ", f"{args.mask}: (--mask) ", 1)) \
            from None
    if args.output.suffix.lower() == ".png" and moving.dtype.name not in ("uint8", "uint16"):
        # (OpenCV would write it as 8-bit, its values truncated)
        raise DeepAlignError(f"{args.output}: (-o) PNG holds 8- or 16-bit integers, but "
                             f"{args.moving} (MOVING) is {moving.dtype}; write a .tif")

    def size(image: Any) -> str:
        return f"{image.shape[1]} x {image.shape[0]} px"

    if args.features == "blocks" and fixed.shape != moving.shape:
        raise DeepAlignError(f"{args.moving}: (MOVING) is {size(moving)} but {args.fixed} "
                             f"(FIXED) is {size(fixed)}; --features blocks matches images of "
                             "one size: crop or pad one, or use --features sift or learned")
    if mask is not None and mask.shape != moving.shape:
        raise DeepAlignError(f"{args.mask}: (--mask) is {size(mask)} but {args.moving} "
                             f"(MOVING) is {size(moving)}; the mask marks damage in the moving "
                             "image's pixels")
    try:
        res = register_pair(fixed, moving, mask=mask, features=args.features,
                            n_clusters=args.clusters, k=args.k, num_threads=args.threads)
    except DeepAlignError as exc:  # what is wrong with the mask: name the file
        if mask is None or "mask" not in str(exc):
            raise
        raise DeepAlignError(f"{args.mask}: (--mask) {exc}") from None
    if not res:
        raise DeepAlignError(f"{args.moving}: registration failed: {res.reason}")
    out = res.warp(moving, mask_damage=args.blank_damage)
    with plan.prepared(), _lock(plan):
        plan.check()
        _write_image_atomic(args.output, out)
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
    p.add_argument("clean_stack", metavar="CLEAN_STACK",
                   help="aligned stack: TIFF, folder, Zarr or MRC")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--profile", default="sstem",
                   choices=["sstem", "fibsem", "jitter", "drift-mild", "drift-strong",
                            "drift-sstem"],
                   help="misalignment: drift-* add random-walk and smooth stage drift, jitter "
                        "and per-slice rotation/scale/shear to every slice (default %(default)s)")
    p.add_argument("--reslice", choices=["xy", "xz", "yz"], default="xy",
                   help="misalign the XZ or YZ reslice of an isotropic volume: neighbouring "
                        "planes are exactly aligned, so the truth is exact (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--labels", metavar="LABELS", help="label stack of CLEAN_STACK")
    p.add_argument("--artifacts", action="store_true",
                   help="add curtaining, brightness drift and noise")
    p.add_argument("--overwrite", action="store_true", help="replace files of an earlier run")
    p.set_defaults(func=_run_make_benchmark)


def _run_make_benchmark(args: argparse.Namespace) -> int:
    from .outputs import Checkpoint, OutputPlan
    from .qc.evaluate import misalign_benchmark

    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise DeepAlignError(f"{out}: (OUT_DIR) exists and is not a folder")
    if args.seed < 0:  # (numpy's own message names no option)
        raise DeepAlignError(f"--seed must be >= 0, got {args.seed}")
    names = ["misaligned.tif", "ground_truth.json"]
    if args.labels:
        names += ["misaligned_labels.tif", "clean_labels.tif"]
    primary = out / names[0]
    # The files of a benchmark are one unit: a killed run's are accepted by the same command
    # (its record notes each as it is put in place), and it writes them all again.
    plan = OutputPlan(overwrite=args.overwrite, resumes=primary)
    plan.input(args.clean_stack, "CLEAN_STACK").input(args.labels, "--labels")
    for name in names:
        plan.output(out / name, "OUT_DIR")
    plan.check()
    if not args.labels:  # an earlier benchmark's labels would not match the new stack
        for name in ("misaligned_labels.tif", "clean_labels.tif"):
            if os.path.lexists(out / name):
                raise DeepAlignError(
                    f"{out / name}: (OUT_DIR) holds the labels of an earlier benchmark; this "
                    "run writes none, so they would sit beside a stack they do not match. "
                    "Remove them, pass --labels, or choose another folder.")
    # Everything is read, checked and computed before OUT_DIR is created.
    bench = misalign_benchmark(args.clean_stack, profile=args.profile, seed=args.seed,
                               labels=args.labels, artifacts=args.artifacts,
                               reslice=args.reslice)
    labels = None if args.labels is None else str(Path(args.labels).resolve())
    ckpt = Checkpoint.for_run(Path(args.clean_stack), primary, bench.misaligned.shape, {
        "command": "make-benchmark", "profile": args.profile, "seed": args.seed,
        "labels": labels, "artifacts": args.artifacts, "reslice": args.reslice})
    assert ckpt is not None
    with plan.prepared(), _lock(plan):
        plan.check()
        # (what this run put in place before it was killed is written again, as all the rest)
        ckpt.begin([out / name for name in names], "OUT_DIR", overwrite=args.overwrite)
        with ckpt.recording():
            truth = bench.write(out)
        ckpt.remove()
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
    p.add_argument("aligned", metavar="ALIGNED",
                   help="aligned stack: TIFF, folder, Zarr or MRC")
    p.add_argument("ground_truth_dir", metavar="GROUND_TRUTH_DIR")
    p.add_argument("--labels", metavar="ALIGNED_LABELS",
                   help="misaligned_labels.tif carried through the same alignment")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    import json

    from .qc.evaluate import evaluate_alignment, summarize

    result = evaluate_alignment(args.aligned, args.ground_truth_dir, aligned_labels=args.labels,
                                progress=False if args.quiet else None)
    print(json.dumps(result, indent=1) if args.json else summarize(result))
    return 0


def _add_report(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("report", help="write an HTML QC report (reslices, plots)")
    p.add_argument("before", metavar="BEFORE",
                   help="stack before alignment: TIFF, folder, Zarr or MRC")
    p.add_argument("after", metavar="AFTER",
                   help="stack after alignment: TIFF, folder, Zarr or MRC")
    p.add_argument("-o", "--output", required=True, metavar="REPORT_HTML")
    p.add_argument("--transforms", metavar="TRANSFORMS_JSON")
    p.add_argument("--title", default="")
    p.add_argument("--z-scale", type=float, default=None,
                   help="slice spacing / pixel size, for true reslice proportions (default: "
                        "from BEFORE's metadata; if unknown, short stacks get a labelled "
                        "display stretch)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_report)


def _report_plan(args: argparse.Namespace) -> Any:
    from .outputs import OutputPlan

    if args.z_scale is not None:
        _finite(args.z_scale, "--z-scale")
    plan = OutputPlan(overwrite=args.overwrite)
    plan.input(args.before, "BEFORE").input(args.after, "AFTER")
    plan.input(args.transforms, "--transforms").output(Path(args.output), "-o")
    plan.check()
    _suffix(Path(args.output), (".html", ".htm"), "-o", "an HTML page")
    return plan


def _check_report_frames(path: Path, before: tuple[int, ...], after: tuple[int, ...]) -> None:
    """A deepalign-fast transforms file maps the AFTER frame onto the BEFORE slices: their
    sizes must be those it was made for (a binned copy's transforms are refused)."""
    from .transforms import SCHEMA, TransformSet

    try:
        if json.loads(path.read_text(encoding="utf-8")).get("schema") != SCHEMA:
            return  # another tool's list of affines: no frames to check
    except (OSError, ValueError, AttributeError):
        return  # (read and checked by load_transforms already)
    ts = TransformSet.load(path)
    for flag, shape, made in (("BEFORE", before, ts.input_shape[1:]),
                              ("AFTER", after, ts.output_shape)):
        if tuple(shape[1:]) != tuple(made):
            raise DeepAlignError(
                f"{path}: (--transforms) is for {flag} slices of {made[0]} x {made[1]} (y, x), "
                f"but they are {shape[1]} x {shape[2]}; pass the stacks and the transforms "
                "file of one alignment")


def _run_report(args: argparse.Namespace) -> int:
    from .io import open_stack
    from .qc.evaluate import load_options, load_transforms
    from .qc.report import write_report

    plan = _report_plan(args)
    transforms = None if args.transforms is None else load_transforms(args.transforms)
    options = None if args.transforms is None else load_options(args.transforms)
    # --z-scale is the true ratio slice spacing / pixel size, in pixels.
    voxel = None if args.z_scale is None else (args.z_scale, 1.0, 1.0)
    with open_stack(args.before) as before, open_stack(args.after) as after, \
            plan.prepared(), _lock(plan):
        plan.check()
        if len(after) != len(before):
            raise DeepAlignError(f"{args.after}: (AFTER) has {len(after)} slices, but "
                                 f"{args.before} (BEFORE) has {len(before)}; pass the stacks "
                                 "before and after one alignment")
        if transforms is not None and len(transforms) != len(before):
            raise DeepAlignError(f"{args.transforms}: (--transforms) holds {len(transforms)} "
                                 f"slices' transforms, but {args.before} (BEFORE) has "
                                 f"{len(before)} slices; pass the transforms file of this "
                                 "alignment")
        if transforms is not None:  # this tool's file says which frames it maps between
            _check_report_frames(Path(args.transforms), before.shape, after.shape)
        out = write_report(args.output, before=before, after=after, transforms=transforms,
                           title=args.title, voxel_size=voxel, unit="px", options=options,
                           progress=False if args.quiet else None)
    print(f"wrote {out}")
    return 0


class _Terminated(KeyboardInterrupt):
    """SIGTERM (SLURM, Kubernetes, kill): unwinds like Ctrl-C, so temporary files are removed."""


# Python drops an exception raised where it cannot propagate (a weakref or import-lock
# callback): a SIGTERM landing there was lost, and a watch hung with its lock held (seen
# with a Zarr compression thread waiting on the import lock). So the process also exits
# this many seconds after the signal, as after `kill -9` (whose leftovers the next run on
# the output removes), unless the command has unwound by then.
TERM_GRACE_S = 30.0
_TERM_TIMERS: list[threading.Timer] = []


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    timer = threading.Timer(TERM_GRACE_S, os._exit, args=(143,))
    timer.daemon = True
    timer.start()
    _TERM_TIMERS.append(timer)
    raise _Terminated


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    try:
        old = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
        while _TERM_TIMERS:  # unwound: no forced exit
            _TERM_TIMERS.pop().cancel()


@contextmanager
def _quiet_libraries(debug: bool) -> Iterator[None]:
    """tifffile logs what it finds wrong in a file (``invalid page offset``) before our
    readers raise the one-line error that says the same for the user: keep its log quiet
    (``--debug`` shows it)."""
    logger = logging.getLogger("tifffile")
    level = logger.level
    if not debug:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _api_words_to_flags(msg: str) -> str:
    """API wording in messages raised below the CLI -> the CLI's flags."""
    msg = re.sub(r"\s*\(API: [^)]*\)", "", msg)
    msg = re.sub(r"\boverwrite=True\b", "--overwrite", msg)
    msg = re.sub(r"\bprovider='?(\w+)'?", r"--provider \1", msg)
    return msg.replace("pass resume=True", "rerun the same command")


def _error(msg: str) -> None:
    line = " ".join(_api_words_to_flags(str(msg)).split())
    print(f"deepalign-fast: error: {line}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()  # (imports numpy, OpenCV and the rest: a Ctrl-C is one line)
    except KeyboardInterrupt:
        print("deepalign-fast: interrupted", file=sys.stderr)
        return 130
    args = parser.parse_args(argv)
    if getattr(args, "config", None) is not None:
        try:
            config = load_config(args.config)
        except DeepAlignError as exc:
            _error(str(exc))
            return 2
        if args.command == "align":
            align = next(a for a in parser._actions
                         if isinstance(a, argparse._SubParsersAction)).choices["align"]
            align.set_defaults(**config)  # the file's values; flags on the command line win
            args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    debug = bool(getattr(args, "debug", False))
    try:
        with _sigterm_unwinds(), _quiet_libraries(debug):
            return int(args.func(args))
    except _Terminated:
        if debug:
            traceback.print_exc()
        resumes = args.command in ("align", "apply", "make-benchmark", "watch")
        print("deepalign-fast: terminated (SIGTERM); temporary files were removed" +
              (", and rerunning the same command resumes" if resumes else ""),
              file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("deepalign-fast: interrupted; " + (
            "the slices written so far are in the output (with their transforms file), and "
            "rerunning the same command continues" if args.command == "watch" else
            "no partial output was left under the final name"), file=sys.stderr)
        return 130
    except EnvironmentFailure as exc:
        if debug:
            traceback.print_exc()
        _error(str(exc))
        return 1
    except (DeepAlignError, ValueError) as exc:
        if debug:
            traceback.print_exc()
        _error(str(exc))
        return 2
    except BrokenPipeError:  # the reader of the output went away (`... | head`): no error
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:
        from .outputs import os_error

        if debug:
            traceback.print_exc()
        err = os_error(exc, None)
        _error(str(err))
        return 1 if isinstance(err, EnvironmentFailure) else 2
    except MemoryError:
        if debug:
            traceback.print_exc()
        _error("out of memory; align a cropped or binned stack, or use a larger machine")
        return 1
    except Exception as exc:  # noqa: BLE001 - the CLI's promise: one line, no raw traceback
        if debug:
            traceback.print_exc()
        _error(f"unexpected {type(exc).__name__}: {exc} (rerun with --debug for the "
               "traceback and report it)")
        return 1
