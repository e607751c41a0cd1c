"""Exact-truth accuracy: every aligner scored against transforms known exactly.

    python -m benchmarks.bench_exact --quick                  # 3 small cases, a few minutes
    python -m benchmarks.bench_exact --cases xz-drift --ours default \\
        --ours "rigid:model=rigid" --peers all --write-results    # one full case
    python -m benchmarks.bench_exact --seed 2,3 --set jitter=1.5  # other seeds / magnitudes

Full list: ``--cases`` with any of ``CASES`` (the elastix peer takes minutes per case, so run
the cases one process at a time to stay within a few minutes each).

Stacks (all with an exact truth):

- reslices of the lucchi FIB-SEM volume (about 5 nm isotropic) into XZ planes (one ``(z, x)``
  image per ``y``) and YZ planes (one ``(z, y)`` image per ``x``): rows of every plane come
  from the same acquired slices, so neighbouring planes are exactly aligned (``--turn DEG``:
  the volume turned about z first, so the planes cut it obliquely; still exactly aligned);
- lucchi XY itself, isbi2012 (30 x 512^2) and drosophila (20 x 1024^2, upsampled to 2048^2),
  which are aligned already;
- on each, seeded misalignment on every slice, the first included
  (``deepalign_fast.qc.synth.drift_transforms``: random-walk drift, smooth stage drift, i.i.d.
  jitter, i.i.d. rotation/scale/shear), rendered from a larger frame so no border shows; the
  unchanged stack as a control (identity truth); and strong FIB-SEM artifacts (curtaining,
  charging, SNR 1.5) applied after the misalignment.

Scoring uses transforms only (``deepalign_fast.qc.metrics.exact_truth_score``): every tool
returns one 2x3 pull map per slice (output -> input); ``C_z = truth_z o estimate_z`` minus ONE
global affine fitted over all slices is the residual; ``TRE_z`` is its mean norm over a 16 x 16
grid. Reported: median and p95 of ``TRE_z`` over slices, its slope along z (px per 100
slices), the jitter error (TRE after forgiving the slow residual translation: the slice-mean
residual smoothed along z with a Gaussian of 8 slices), median and p95, and the median
neighbour-to-neighbour error (residual of slice z+1 relative to slice z). The JSON also holds
the per-slice errors and the residual drift rate (a per-pair bias, px per 100 slices).

Tools in the same run: ``nothing`` (identity), ours as named option sets
(``--ours NAME[:key=value,...]``, keywords of ``deepalign_fast.AlignOptions``; with
``lookahead=L`` the slices go through ``Aligner.stream`` with that look-ahead), and the peers
(``benchmarks.peers``: pystackreg, the OpenCV SIFT+RANSAC chain, itk-elastix when installed).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from deepalign_fast import Aligner, datasets
from deepalign_fast.geometry import compose
from deepalign_fast.qc.metrics import exact_truth_score
from deepalign_fast.qc.synth import (
    DRIFT_PROFILES,
    drift_transforms,
    fibsem_artifacts,
    misalign_stack,
    reslice,
)

from benchmarks._timing import RESULTS, markdown_table, metadata
from benchmarks.peers import PEERS, available

Tool = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Case:
    """One benchmark stack: where it comes from and how it is misaligned."""

    name: str
    source: str  # "lucchi", "isbi", "drosophila"
    plane: str = "xy"  # "xy", "xz", "yz" (reslice of the volume)
    planes: int | None = None  # number of contiguous planes (centred); None = all
    profile: str | None = None  # drift profile (synth.DRIFT_PROFILES); None = unchanged control
    artifacts: bool = False  # strong FIB-SEM artifacts after the misalignment
    upsample: int = 1  # integer upsampling of the clean slices (lengths of the profile too)
    model: str = "rigid"  # the peers' model where only one is run (elastix-auto)
    spacing: int = 1  # one plane in spacing: slices that far apart (thicker FIB slices)
    turn: float = 0.0  # degrees the volume is turned about z before the reslice (oblique planes)

    def describe(self) -> str:
        what = "unchanged (identity truth)" if self.profile is None else \
            f"profile {self.profile}" + (" + strong artifacts" if self.artifacts else "")
        src = f"{self.source} {self.plane.upper()}" + (
            f" upsampled x{self.upsample}" if self.upsample > 1 else "") + (
            f", one plane in {self.spacing}" if self.spacing > 1 else "") + (
            f", volume turned {self.turn:g} degrees about z" if self.turn else "")
        return f"{src}, {what}"


CASES: dict[str, Case] = {c.name: c for c in [
    Case("xz-drift", "lucchi", "xz", 192, "mild"),
    Case("yz-drift", "lucchi", "yz", 256, "strong"),
    Case("xy-drift", "lucchi", "xy", None, "strong"),
    Case("xz-control", "lucchi", "xz", 192),
    Case("yz-control", "lucchi", "yz", 256),
    Case("xy-control", "lucchi", "xy"),
    Case("isbi-drift", "isbi", profile="sstem", model="affine"),
    Case("isbi-control", "isbi", model="affine"),
    Case("drosophila2k-drift", "drosophila", profile="sstem", upsample=2, model="affine"),
    Case("drosophila2k-control", "drosophila", upsample=2, model="affine"),
    Case("xz-artifacts", "lucchi", "xz", 192, "mild", artifacts=True),
]}

QUICK: dict[str, Case] = {c.name: c for c in [
    Case("quick-xz-drift", "lucchi", "xz", 128, "mild"),
    Case("quick-yz-control", "lucchi", "yz", 128),
    Case("quick-xy-drift", "lucchi", "xy", None, "strong"),
]}

DEFAULT_PEERS = ["pystackreg-rigid", "pystackreg-affine", "sift-similarity", "sift-affine",
                 "elastix-auto"]


# --------------------------------------------------------------------------------------------
# stacks
# --------------------------------------------------------------------------------------------
def _load(source: str) -> np.ndarray:
    loader = {"lucchi": datasets.load_lucchi, "isbi": datasets.load_isbi2012,
              "drosophila": datasets.load_drosophila}[source]
    return np.asarray(loader())


def select_planes(stack: np.ndarray, planes: int | None, spacing: int = 1) -> np.ndarray:
    """Every ``spacing``-th plane of ``stack``, ``planes`` of them (None: as many as there
    are), from a centred run of contiguous planes."""
    span = len(stack) if planes is None else min(len(stack), planes * spacing)
    start = (len(stack) - span) // 2
    return stack[start:start + span:spacing]


def turn_volume(volume: np.ndarray, degrees: float) -> np.ndarray:
    """``volume`` ``(z, y, x)`` turned by ``degrees`` about its z axis, cropped to the largest
    centred frame of the same aspect ratio that the turned slices cover.

    Every z slice gets the same rotation (bilinear), so an XZ or YZ reslice of the result has
    planes at that angle to the acquired axes and its neighbouring planes are still exactly
    aligned."""
    if not degrees:
        return volume
    _, h, w = volume.shape
    c, s = abs(np.cos(np.radians(degrees))), abs(np.sin(np.radians(degrees)))
    k = min(w / (w * c + h * s), h / (w * s + h * c))
    ch, cw = int(h * k) - 2, int(w * k) - 2  # a pixel of bilinear support inside on each side
    if min(ch, cw) < 8:
        raise ValueError(f"turning a {h} x {w} frame by {degrees:g} degrees leaves "
                         f"{max(ch, 0)} x {max(cw, 0)} px inside it")
    m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), degrees, 1.0)
    m[:, 2] -= [(w - cw) / 2, (h - ch) / 2]  # output pixel (0, 0) at the crop's corner
    return np.stack([cv2.warpAffine(v, m, (cw, ch), flags=cv2.INTER_LINEAR) for v in volume])


def _draw(n: int, count: int, what: str, rng: np.random.Generator) -> list[int]:
    """``count`` distinct slices of ``n``, drawn by ``rng``, sorted."""
    if not 0 <= count <= n:
        raise ValueError(f"cannot {what} {count} of {n} slices")
    return sorted(int(z) for z in rng.choice(n, count, replace=False))


def damage(stack: np.ndarray, count: int, keep: float, rng: np.random.Generator
           ) -> tuple[np.ndarray, list[int]]:
    """``stack`` with ``count`` slices (drawn by ``rng``) damaged: only a vertical strip of
    ``keep`` of the width (at a random position) is left, the rest is the slice's median (a
    partly blank or torn section). Returns the new stack and the damaged slices."""
    n, _, w = stack.shape
    if not 0 < keep <= 1:
        raise ValueError(f"the kept fraction must be in (0, 1], got {keep}")
    slices = _draw(n, count, "damage", rng)
    out = stack.copy()
    width = max(1, int(round(w * keep)))
    for z in slices:
        x0 = int(rng.integers(0, w - width + 1))
        out[z] = np.median(stack[z])
        out[z][:, x0:x0 + width] = stack[z][:, x0:x0 + width]
    return out, slices


def invert_contrast(stack: np.ndarray, count: int, rng: np.random.Generator
                    ) -> tuple[np.ndarray, list[int]]:
    """``stack`` with the contrast of ``count`` slices (drawn by ``rng``) inverted
    (``min + max - value``, per slice: a detector or acquisition setting gone wrong). Returns
    the new stack and the inverted slices."""
    slices = _draw(len(stack), count, "invert", rng)
    out = stack.copy()
    for z in slices:
        lo, hi = stack[z].min(), stack[z].max()
        out[z] = (hi - stack[z]) + lo
    return out, slices


def glitch(transforms: np.ndarray, count: int, shift: float, rotation_deg: float,
           shape: tuple[int, int], rng: np.random.Generator, at: tuple[int, ...] = ()
           ) -> tuple[np.ndarray, list[int]]:
    """``transforms`` (n, 2, 3 pull maps misaligned -> clean) with ``count`` slices (drawn by
    ``rng``, or the slices ``at``) off alone: each moved by ``shift`` px in a random direction
    and rotated by ``rotation_deg`` degrees (random sign) about the frame centre, on top of
    its own misalignment (a beam glitch, one slice rotated). Returns the new transforms and
    the slices."""
    if at and (len(set(at)) != count or not all(0 <= z < len(transforms) for z in at)):
        raise ValueError(f"cannot glitch slices {list(at)} of {len(transforms)} as {count}")
    slices = sorted(set(at)) if at else _draw(len(transforms), count, "glitch", rng)
    out = transforms.copy()
    h, w = shape
    centre = np.array([(w - 1) / 2.0, (h - 1) / 2.0])
    for z in slices:
        angle = rng.uniform(0.0, 2.0 * np.pi)
        theta = np.deg2rad(rotation_deg) * rng.choice([-1.0, 1.0])
        lin = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
        move = shift * np.array([np.cos(angle), np.sin(angle)])
        extra = np.hstack([lin, (centre - lin @ centre + move)[:, None]])
        out[z] = compose(transforms[z][None], extra[None])[0]
    return out, slices


def build(case: Case, seed: int, overrides: dict[str, float] | None = None, *,
          snr: float = 1.5, artifact_strength: float = 1.5, damaged: int = 0,
          damaged_keep: float = 0.15, inverted: int = 0,
          glitched: tuple[int, float, float] = (0, 0.0, 0.0), glitch_at: tuple[int, ...] = (),
          ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The case's input stack, its truth (input -> clean pull maps) and a description.

    ``overrides`` replace drift-profile parameters (lengths in px of the clean slices before
    any upsampling); ``snr`` and ``artifact_strength`` set the artifacts of an artifacts case
    (``synth.fibsem_artifacts``); ``damaged`` slices keep only ``damaged_keep`` of their
    width (:func:`damage`) and ``inverted`` slices have their contrast inverted
    (:func:`invert_contrast`); ``glitched`` = (count, shift px, rotation degrees) slices are
    off alone (:func:`glitch`). Each is drawn from its own random stream: the misalignment is
    the same as without."""
    stack, truth, info = _build(case, seed, overrides, snr, artifact_strength, glitched,
                                glitch_at)
    if damaged:
        rng = np.random.default_rng([seed, zlib.crc32(case.name.encode()), 1])
        stack, slices = damage(stack, damaged, damaged_keep, rng)
        info["damaged"] = {"slices": slices, "keep": damaged_keep}
        info["description"] += f", {damaged} slices with {damaged_keep:g} of the width left"
    if inverted:
        rng = np.random.default_rng([seed, zlib.crc32(case.name.encode()), 2])
        stack, slices = invert_contrast(stack, inverted, rng)
        info["inverted"] = slices
        info["description"] += f", {inverted} slices with inverted contrast"
    return stack, truth, info


def _build(case: Case, seed: int, overrides: dict[str, float] | None, snr: float,
           artifact_strength: float, glitched: tuple[int, float, float] = (0, 0.0, 0.0),
           glitch_at: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    clean = select_planes(reslice(turn_volume(_load(case.source), case.turn), case.plane),
                          case.planes, case.spacing)
    if case.planes is not None and len(clean) < case.planes:
        print(f"note: {case.name}: {len(clean)} planes, not {case.planes} (the reslice has too "
              f"few for one in {case.spacing})", flush=True)
    if case.upsample > 1:
        f = case.upsample
        clean = np.stack([cv2.resize(s, (s.shape[1] * f, s.shape[0] * f),
                                     interpolation=cv2.INTER_CUBIC) for s in clean])
    n, h, w = clean.shape
    info: dict[str, Any] = {"case": case.name, "description": case.describe(), "seed": seed,
                            "slices": n, "clean_shape": [h, w]}
    if case.profile is None and not glitched[0]:
        return clean, np.tile(np.eye(2, 3), (n, 1, 1)), {**info, "shape": [h, w], "margin": 0}
    rng = np.random.default_rng([seed, zlib.crc32(case.name.encode())])
    if case.profile is None:
        full = np.tile(np.eye(2, 3), (n, 1, 1))
    else:
        params = {**DRIFT_PROFILES[case.profile], **(overrides or {})}
        params = {k: v * case.upsample if k in ("walk", "smooth", "jitter") else v
                  for k, v in params.items()}
        info["params"] = params
        full = drift_transforms(n, (h, w), rng, profile=case.profile, **params)
    if glitched[0]:
        count, shift, rotation = glitched
        full, slices = glitch(full, count, shift * case.upsample, rotation, (h, w),
                              np.random.default_rng([seed, zlib.crc32(case.name.encode()), 3]),
                              glitch_at)
        info["glitched"] = slices
        info["description"] += (f", {count} slices off alone by {shift:g} px and "
                                f"{rotation:g} degrees")
    mis, truth = misalign_stack(clean, full)
    if case.artifacts:
        mis = fibsem_artifacts(mis, int(rng.integers(2**31)), snr=snr,
                               strength=artifact_strength)
        info["artifacts"] = {"snr": snr, "strength": artifact_strength}
    return mis, truth.transforms, {**info, "shape": list(mis.shape[1:]), "margin": truth.margin}


# --------------------------------------------------------------------------------------------
# tools
# --------------------------------------------------------------------------------------------
def _value(text: str) -> Any:
    """int, float, a tuple of them when ``/``-separated (``offsets=1/2/4/8``), else str."""
    if "/" in text:
        return tuple(_value(v) for v in text.split("/") if v)
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_ours(spec: str) -> tuple[str, dict[str, Any]]:
    """``"NAME:key=value,key=value"`` (or ``"default"``) -> (name, Aligner keywords).

    Values are int, float, ``/``-separated tuples (``offsets=1/2/4``) or strings."""
    name, _, opts = spec.partition(":")
    if not opts and "=" in name:
        name, opts = spec, spec
    kw: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in opts.split(","))):
        key, eq, val = item.partition("=")
        if not eq or not key.strip():
            raise SystemExit(f"--ours {spec!r}: {item!r} is not key=value")
        kw[key.strip()] = _value(val.strip())
    return name.strip(), kw


def _aligner_options(kw: dict[str, Any]) -> dict[str, Any]:
    """``kw`` without ``lookahead`` (a stream setting, not an AlignOptions field)."""
    return {k: v for k, v in kw.items() if k != "lookahead"}


def parse_seeds(text: str) -> list[int]:
    """``--seed 1,2,...`` (SystemExit where one is not an integer)."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"--seed {text!r}: give integers, comma-separated") from None


def parse_overrides(text: str) -> dict[str, float]:
    """``--set k=v,...``: drift-profile overrides (SystemExit naming a bad item)."""
    overrides: dict[str, float] = {}
    for item in filter(None, (v.strip() for v in text.split(","))):
        key, eq, val = item.partition("=")
        if not eq or key not in DRIFT_PROFILES["mild"]:
            raise SystemExit(f"--set {item!r}: expected k=v with k one of "
                             f"{', '.join(DRIFT_PROFILES['mild'])}")
        try:
            overrides[key] = float(val)
        except ValueError:
            raise SystemExit(f"--set {item!r}: {val!r} is not a number") from None
    return overrides


def ours(kw: dict[str, Any]) -> Tool:
    """Our aligner with the option set ``kw``; ``lookahead`` (not an option) streams."""
    options = _aligner_options(kw)

    def run(stack: np.ndarray) -> np.ndarray:
        aligner = Aligner(**options)
        if "lookahead" not in kw:
            return np.asarray(aligner.estimate(stack, progress=False).transforms.affines)
        stream = aligner.stream(iter(stack), lookahead=int(kw["lookahead"]))
        for _ in stream:
            pass
        return np.stack(stream.transforms)
    return run


def nothing(stack: np.ndarray) -> np.ndarray:
    return np.tile(np.eye(2, 3), (len(stack), 1, 1))


def tools_for(case: Case, ours_specs: list[tuple[str, dict[str, Any]]],
              peers: list[str]) -> dict[str, Tool]:
    tools: dict[str, Tool] = {"nothing": nothing}
    for name, kw in ours_specs:
        tools[f"ours:{name}"] = ours(kw)
    for peer in peers:
        real = f"elastix-{case.model}" if peer == "elastix-auto" else peer
        tools[real] = PEERS[real][1]
    return tools


# --------------------------------------------------------------------------------------------
# running and reporting
# --------------------------------------------------------------------------------------------
COLUMNS = ["tool", "tre_median", "tre_p95", "slope_per_100", "jitter_median", "jitter_p95",
           "linear_median", "pair_median", "seconds"]
HEADERS = ["tool", "median TRE (px)", "p95 TRE (px)", "slope (px/100 slices)",
           "median jitter (px)", "p95 jitter (px)", "median linear part (px)",
           "median neighbour error (px)", "seconds"]


def run_case(case: Case, seed: int, ours_specs: list[tuple[str, dict[str, Any]]],
             peers: list[str], overrides: dict[str, float] | None = None,
             **options: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    t0 = time.perf_counter()
    stack, truth, info = build(case, seed, overrides, **options)
    info["build_s"] = time.perf_counter() - t0
    print(f"\n== {case.name}: {info['description']}, {info['slices']} slices of "
          f"{info['shape'][0]}x{info['shape'][1]}, seed {seed}", flush=True)
    rows = []
    for tool, fn in tools_for(case, ours_specs, peers).items():
        t0 = time.perf_counter()
        try:
            est = np.asarray(fn(stack), np.float64)
        except Exception as exc:  # a failing tool is a result, not the end of the run
            print(f"   {tool:28s} FAILED: {type(exc).__name__}: {exc}", flush=True)
            rows.append({"case": case.name, "seed": seed, "tool": tool,
                         "error": f"{type(exc).__name__}: {exc}"})
            continue
        dt = round(time.perf_counter() - t0, 2)
        row: dict[str, Any] = {"case": case.name, "seed": seed, "tool": tool, "seconds": dt}
        bad = ~np.isfinite(est).all(axis=(1, 2))
        if bad.any():  # a diverged peer: score its non-finite slices as "not moved"
            est[bad] = np.eye(2, 3)
            row["nonfinite_slices"] = int(bad.sum())
        score = exact_truth_score(est, truth, (int(stack.shape[1]), int(stack.shape[2])))
        row.update(score.to_dict())
        if info.get("glitched"):  # what the slices off alone do to the others
            rest = np.setdiff1d(np.arange(len(est)), info["glitched"])
            row["jitter_max_rest"] = float(score.per_slice_jitter[rest].max())
            row["jitter_glitched"] = [float(v) for v in score.per_slice_jitter[info["glitched"]]]
        rows.append(row)
        print(f"   {tool:28s} TRE median {score.tre_median:7.3f} p95 {score.tre_p95:7.3f} "
              f"slope {score.slope_per_100:7.3f}  jitter median {score.jitter_median:6.3f} "
              f"p95 {score.jitter_p95:6.3f}  linear {score.linear_median:6.3f}  {dt:7.1f} s" + (
                  f"  jitter max of the rest {row['jitter_max_rest']:6.3f}"
                  if "jitter_max_rest" in row else ""), flush=True)
    return info, rows


def case_markdown(info: dict[str, Any], rows: list[dict[str, Any]], command: str,
                  code: str) -> str:
    table = markdown_table(
        [{**r, "tool": r["tool"] + (f" (FAILED: {r['error']})" if "error" in r else "")
          + (f" ({r['nonfinite_slices']} non-finite slices)" if "nonfinite_slices" in r else "")}
         for r in rows], COLUMNS)
    head, _, body = table.partition("\n")
    head = "| " + " | ".join(HEADERS) + " |"
    return (f"**{info['case']}**: {info['description']}; {info['slices']} slices of "
            f"{info['shape'][0]}x{info['shape'][1]} (clean {info['clean_shape'][0]}x"
            f"{info['clean_shape'][1]}, margin {info['margin']}), seed {info['seed']}"
            + (", " + ", ".join(f"{k} {v:g}" for k, v in info["params"].items())
               if "params" in info else "")
            + (f"; artifacts SNR {info['artifacts']['snr']:g}, strength "
               f"{info['artifacts']['strength']:g}" if "artifacts" in info else "") + ".\n"
            f"Command: `{command}` ({time.strftime('%Y-%m-%d')}, code {code}).\n\n"
            f"{head}\n{body}")


def _drop_label(argv: list[str]) -> list[str]:
    """The arguments without ``--label`` and ``--json`` (a local output path), for the
    command recorded with the results."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--label", "--json"):
            skip = True
        elif not a.startswith(("--label=", "--json=")):
            out.append(a)
    return out


def code_version() -> str:
    """Git commit of the imported deepalign_fast (``+changes`` if its sources differ)."""
    import deepalign_fast

    where = str(Path(deepalign_fast.__file__).resolve().parent)
    try:
        rev = subprocess.run(["git", "-C", where, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", where, "diff", "--quiet", "HEAD", "--", ":/python",
                                ":/csrc"],
                               capture_output=True).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return rev + ("+changes" if dirty else "")


SECTION_END = "<!-- exact-truth:section-end -->"


def write_results(name: str, markdown: str) -> None:
    """Replace block ``exact:NAME`` of RESULTS.md, or add it at the end of the exact-truth
    section (before its end marker)."""
    start, end = f"<!-- exact:{name}:start -->", f"<!-- exact:{name}:end -->"
    text = RESULTS.read_text()
    block = f"{start}\n{markdown.strip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    elif SECTION_END in text:
        text = text.replace(SECTION_END, block + "\n\n" + SECTION_END, 1)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    if "error" in row:
        return "failed"
    return f"{row['tre_median']:.2f} / {row['jitter_median']:.2f}"


def summary_markdown(cases: list[dict[str, Any]]) -> str:
    """One line per case: median TRE / median jitter of nothing, each option set of ours,
    and the best peer (lowest median TRE) with its name."""
    ours_names: list[str] = []
    for c in cases:
        ours_names += [r["tool"] for r in c["rows"]
                       if r["tool"].startswith("ours:") and r["tool"] not in ours_names]
    head = ["case", "slices", "nothing", *ours_names, "best peer"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cases:
        by_tool = {r["tool"]: r for r in c["rows"]}
        peers = [r for r in c["rows"] if r["tool"] != "nothing"
                 and not r["tool"].startswith("ours:") and "error" not in r]
        best = min(peers, key=lambda r: float(r["tre_median"])) if peers else None
        name = c["case"] + (f" (seed {c['seed']})" if c.get("seed", 1) != 1 else "")
        cells = [name, str(c["slices"]), _cell(by_tool.get("nothing")),
                 *(_cell(by_tool.get(t)) for t in ours_names),
                 f"{_cell(best)} ({best['tool']})" if best else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarize(paths: list[Path], write: bool) -> int:
    """Print (and with ``write`` store in RESULTS.md) the summary of ``--json`` outputs."""
    cases: list[dict[str, Any]] = []
    commands: list[str] = []
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SystemExit(f"{path}: not a bench_exact --json file ({exc})") from None
        cases += data.get("cases", [])
        command = re.sub(r" --json(=| )\S+", "", str(data.get("command", "?")))
        command = re.sub(r"--cases(=| )\S+", "--cases CASE", command)
        commands.append(f"`{command}` (code {data.get('code', '?')})")
    order = [*CASES, *QUICK]
    cases.sort(key=lambda c: (order.index(c["case"]) if c["case"] in order else len(order),
                              c.get("seed", 1)))
    md = ("Median TRE / median jitter error (px) per case; best peer = lowest median TRE. "
          "From the per-case runs (CASE = each case):\n"
          + "\n".join(f"- {c}" for c in dict.fromkeys(commands)) + "\n\n"
          + summary_markdown(cases))
    print(md)
    if write:
        write_results("summary", md)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help=f"the quick cases ({', '.join(QUICK)}); peers default to "
                         "pystackreg-rigid")
    ap.add_argument("--cases", default=None,
                    help=f"comma-separated case names (default all): {', '.join(CASES)}")
    ap.add_argument("--ours", action="append", default=None, metavar="NAME[:k=v,...]",
                    help="an option set of ours (repeatable; default: 'default')")
    ap.add_argument("--peers", default=None,
                    help="comma-separated, 'all' or 'none'; default "
                         f"{','.join(DEFAULT_PEERS)} ('elastix-auto' = the case's model); "
                         f"known: {', '.join(PEERS)}")
    ap.add_argument("--seed", default="1",
                    help="misalignment seed, or several comma-separated (default 1)")
    ap.add_argument("--profile", choices=sorted(DRIFT_PROFILES), default=None,
                    help="use this drift profile for every misaligned case")
    ap.add_argument("--set", default=None, metavar="k=v,...",
                    help="override drift-profile parameters of every misaligned case, in px of "
                         f"the clean slices (keys: {', '.join(DRIFT_PROFILES['mild'])})")
    ap.add_argument("--snr", type=float, default=1.5,
                    help="signal-to-noise ratio of the artifacts cases (default 1.5)")
    ap.add_argument("--artifact-strength", type=float, default=1.5,
                    help="curtaining/charging amplitude multiplier of the artifacts cases "
                         "(default 1.5)")
    ap.add_argument("--damaged", type=int, default=0, metavar="N",
                    help="damage N slices of every case (drawn by the seed): only a strip of "
                         "--damaged-keep of the width is left, the rest is flat (default 0)")
    ap.add_argument("--damaged-keep", type=float, default=0.15, metavar="F",
                    help="the fraction of the width a damaged slice keeps (default 0.15)")
    ap.add_argument("--inverted", type=int, default=0, metavar="N",
                    help="invert the contrast of N slices of every case (drawn by the seed; "
                         "default 0)")
    ap.add_argument("--glitched", type=int, default=0, metavar="N",
                    help="put N slices of every case off alone (drawn by the seed): moved by "
                         "--glitch-shift px and rotated by --glitch-rotation degrees on top of "
                         "their misalignment, controls included (default 0)")
    ap.add_argument("--glitch-at", default=None, metavar="Z,...",
                    help="put these slices off alone instead of drawn ones (sets --glitched "
                         "to their number), e.g. 0 or 1,2: a glitch among the first slices")
    ap.add_argument("--glitch-shift", type=float, default=15.0, metavar="PX",
                    help="how far a glitched slice is moved, px of the clean slices (default 15)")
    ap.add_argument("--glitch-rotation", type=float, default=0.0, metavar="DEG",
                    help="how far a glitched slice is rotated, degrees (default 0)")
    ap.add_argument("--planes", type=int, default=None,
                    help="number of planes of the XZ/YZ reslice cases (from a centred run of "
                         "contiguous planes; with --spacing K, every K-th of K times as many; "
                         "fewer, with a note, where the reslice is too short)")
    ap.add_argument("--spacing", type=int, default=1,
                    help="take every K-th plane of every lucchi case (slices K times as far "
                         "apart, as thicker FIB-SEM slices); default 1")
    ap.add_argument("--turn", type=float, default=0.0, metavar="DEG",
                    help="turn the lucchi volume by DEG degrees about z before the reslice "
                         "(XZ/YZ planes oblique to the acquired axes, still exactly aligned; "
                         "the frame is cropped to what the turned slices cover); default 0")
    ap.add_argument("--json", type=Path, default=None, help="write all rows and per-slice "
                                                            "errors here")
    ap.add_argument("--label", default=None,
                    help="what code was measured, for the results (default: the git commit of "
                         "the imported deepalign_fast, '+changes' when its tree differs)")
    ap.add_argument("--write-results", action="store_true",
                    help="replace each case's table in benchmarks/RESULTS.md")
    ap.add_argument("--summarize", nargs="+", type=Path, default=None, metavar="JSON",
                    help="only summarise earlier --json outputs in one table (with "
                         "--write-results: into RESULTS.md)")
    args = ap.parse_args(argv)
    if args.summarize:
        return summarize(args.summarize, args.write_results)
    cv2.setNumThreads(2)

    pool = QUICK if args.quick else CASES
    names = list(pool) if args.cases is None else [c.strip() for c in args.cases.split(",")]
    unknown = [c for c in names if c not in pool]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {', '.join(pool)}")
    cases = [pool[c] for c in names]
    if args.profile is not None:
        cases = [replace(c, profile=args.profile) if c.profile else c for c in cases]
    if args.planes is not None:
        cases = [replace(c, planes=args.planes) if c.plane != "xy" else c for c in cases]
    if args.spacing < 1:
        raise SystemExit(f"--spacing {args.spacing}: give an integer >= 1")
    if args.inverted < 0:
        raise SystemExit(f"--inverted {args.inverted}: give a count >= 0")
    glitch_at: tuple[int, ...] = ()
    if args.glitch_at is not None:
        try:
            glitch_at = tuple(sorted({int(v) for v in args.glitch_at.split(",")}))
        except ValueError:
            raise SystemExit(f"--glitch-at {args.glitch_at}: give slice numbers, e.g. 0,1"
                             ) from None
        if min(glitch_at) < 0 or args.glitched not in (0, len(glitch_at)):
            raise SystemExit(f"--glitch-at {args.glitch_at}: give slice numbers >= 0 (and "
                             "--glitched, if given, as many)")
        args.glitched = len(glitch_at)
    if args.glitched < 0 or not (np.isfinite(args.glitch_shift)
                                 and np.isfinite(args.glitch_rotation)):
        raise SystemExit(f"--glitched {args.glitched} --glitch-shift {args.glitch_shift} "
                         f"--glitch-rotation {args.glitch_rotation}: give a count >= 0 and "
                         "finite numbers")
    if args.damaged < 0 or not 0 < args.damaged_keep <= 1:
        raise SystemExit(f"--damaged {args.damaged} --damaged-keep {args.damaged_keep}: give "
                         "a count >= 0 and a fraction in (0, 1]")
    if args.spacing > 1:
        cases = [replace(c, spacing=args.spacing) if c.source == "lucchi" else c for c in cases]
    if not np.isfinite(args.turn):
        raise SystemExit(f"--turn {args.turn}: give a finite angle in degrees")
    if args.turn:
        cases = [replace(c, turn=args.turn) if c.source == "lucchi" else c for c in cases]
    seeds = parse_seeds(str(args.seed))
    overrides = parse_overrides(args.set or "")
    ours_specs = [parse_ours(s) for s in (args.ours or ["default"])]
    for name, kw in ours_specs:  # bad options fail here, before any stack is built
        try:
            Aligner(**_aligner_options(kw))
            if not isinstance(kw.get("lookahead", 0), int) or kw.get("lookahead", 0) < 0:
                raise ValueError(f"lookahead must be an integer >= 0, got {kw['lookahead']!r}")
        except (TypeError, ValueError) as exc:
            raise SystemExit(f"--ours {name}: {exc}") from None
    if args.peers is None:
        peers = ["pystackreg-rigid"] if args.quick else list(DEFAULT_PEERS)
    elif args.peers == "none":
        peers = []
    elif args.peers == "all":
        peers = list(DEFAULT_PEERS)
    else:
        peers = [p.strip() for p in args.peers.split(",")]
    bad = [p for p in peers if p != "elastix-auto" and p not in PEERS]
    if bad:
        raise SystemExit(f"unknown peer(s) {bad}; known: {', '.join(PEERS)}, elastix-auto")
    usable = []
    for p in peers:
        if available("elastix-rigid" if p == "elastix-auto" else p):
            usable.append(p)
        else:
            print(f"skip peer {p}: its package is not installed", flush=True)

    command = "PYTHONPATH=python:. python -m benchmarks.bench_exact " + shlex.join(
        _drop_label(argv))
    code = args.label or code_version()
    out: dict[str, Any] = {"meta": metadata(), "command": command, "code": code, "cases": []}
    for case, seed in [(c, s) for s in seeds for c in cases]:
        try:
            info, rows = run_case(case, seed, ours_specs, usable, overrides, snr=args.snr,
                                  artifact_strength=args.artifact_strength,
                                  damaged=args.damaged, damaged_keep=args.damaged_keep,
                                  inverted=args.inverted,
                                  glitched=(args.glitched, args.glitch_shift,
                                            args.glitch_rotation), glitch_at=glitch_at)
        except datasets.DataUnavailable as exc:
            print(f"skip {case.name}: {exc}", flush=True)
            continue
        md = case_markdown(info, rows, command, code)
        print("\n" + md, flush=True)
        out["cases"].append({**info, "rows": rows})
        if args.write_results:  # other seeds and magnitudes get their own tables
            artifacts = (args.snr, args.artifact_strength) != (1.5, 1.5) and case.artifacts
            write_results(case.name + (f"@seed{seed}" if seed != 1 else "")
                          + (f"@spacing{case.spacing}" if case.spacing > 1 else "")
                          + (f"@turn{case.turn:g}" if case.turn else "")
                          + (f"@{args.set}" if overrides else "")
                          + (f"@damaged{args.damaged},keep{args.damaged_keep:g}"
                             if args.damaged else "")
                          + (f"@inverted{args.inverted}" if args.inverted else "")
                          + (f"@glitched{args.glitched},shift{args.glitch_shift:g},"
                             f"rotation{args.glitch_rotation:g}" if args.glitched else "")
                          + (f"@at{','.join(map(str, glitch_at))}" if glitch_at else "")
                          + (f"@snr{args.snr:g},strength{args.artifact_strength:g}"
                             if artifacts else ""), md)
        if args.json is not None:  # rewritten after every case: a long run keeps what it has
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
