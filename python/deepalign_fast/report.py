"""Self-contained HTML quality-control report of an alignment.

The report is one HTML file with the pictures embedded as base64 PNGs, so it can be mailed or
archived alone. Its centre is what EM users judge alignment by: XZ and YZ reslices through the
middle of the volume, before and after, side by side (a well aligned stack shows continuous
membranes along z, a misaligned one shows jagged ones). Around it: per-slice transform parameters
(decomposed from the 2x3 affines), residuals, neighbour NCC before/after, flagged slices,
Jacobian maps and timings.

Stacks are read lazily, one slice at a time: only the centre row and column of each slice and
the previous slice (for neighbour NCC) are kept, so memory does not grow with the volume.
Plots are drawn with OpenCV into numpy canvases (no matplotlib needed), one code path.

Conventions (see the package docstring): arrays ``(z, y, x)``; transforms are 2x3 pull maps
``[[a, b, tx], [c, d, ty]]`` from output (reference) to input (moving) coordinates.
"""

from __future__ import annotations

import base64
import datetime
import html
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import ArrayLike, NDArray

from ._errors import DeepAlignError
from .metrics import _read, ncc

__all__ = ["decompose_affine", "write_report"]

_MAX_PICTURE = 640  # longest side of an embedded reslice panel, pixels
_MAX_UPSCALE = 2.0  # small stacks are enlarged (nearest) up to this factor


# --------------------------------------------------------------------------------------------
# transform decomposition
# --------------------------------------------------------------------------------------------
def decompose_affine(transforms: Sequence[ArrayLike | None] | NDArray[np.float64]
                     ) -> dict[str, NDArray[np.float64]]:
    """Decompose 2x3 affines into translation, rotation, scale and shear.

    The linear part is written ``L = R(theta) @ [[sx, sx * shear], [0, sy]]`` (QR form).

    Parameters
    ----------
    transforms : sequence of (2, 3) array_like or None
        ``None`` rows (failed slices) give NaN.

    Returns
    -------
    dict of ndarray (n,)
        ``tx``, ``ty`` (pixels), ``rotation_deg``, ``scale_x``, ``scale_y``, ``shear``.
    """
    keys = ("tx", "ty", "rotation_deg", "scale_x", "scale_y", "shear")
    n = len(transforms)
    out = {k: np.full(n, np.nan) for k in keys}
    for z, t in enumerate(transforms):
        if t is None:
            continue
        m = np.asarray(t, dtype=np.float64)
        if m.shape != (2, 3):
            raise DeepAlignError(f"transform of slice {z} has shape {m.shape}, expected (2, 3)")
        a, b, c, d = m[0, 0], m[0, 1], m[1, 0], m[1, 1]
        theta = math.atan2(c, a)
        sx = math.hypot(a, c)
        # R^T L = [[sx, m01], [0, sy]]
        m01 = math.cos(theta) * b + math.sin(theta) * d
        sy = -math.sin(theta) * b + math.cos(theta) * d
        out["tx"][z], out["ty"][z] = m[0, 2], m[1, 2]
        out["rotation_deg"][z] = math.degrees(theta)
        out["scale_x"][z], out["scale_y"][z] = sx, sy
        out["shear"][z] = m01 / sx if sx else np.nan
    return out


# --------------------------------------------------------------------------------------------
# streaming pass over a stack
# --------------------------------------------------------------------------------------------
@dataclass
class _StackSummary:
    xz: NDArray[Any]  # (n, w): centre row of each slice
    yz: NDArray[Any]  # (n, h): centre column of each slice
    ncc: NDArray[np.float64]  # (n - 1,)
    shape: tuple[int, int, int]


def _summarise(stack: Any, name: str) -> _StackSummary:
    try:
        n = len(stack)
    except TypeError as exc:
        raise DeepAlignError(f"{name}: need an array or an object with __len__") from exc
    if n < 1:
        raise DeepAlignError(f"{name}: empty stack")
    rows: list[NDArray[Any]] = []
    cols: list[NDArray[Any]] = []
    scores = np.full(max(n - 1, 0), np.nan)
    prev: NDArray[Any] | None = None
    shape: tuple[int, int] | None = None
    for z in range(n):
        sl = _read(stack, z)
        if sl.ndim != 2:
            raise DeepAlignError(f"{name}: slice {z} has shape {sl.shape}, expected (y, x)")
        if shape is None:
            shape = (int(sl.shape[0]), int(sl.shape[1]))
        elif sl.shape != shape:
            raise DeepAlignError(f"{name}: slice {z} has shape {sl.shape}, slice 0 has {shape}")
        rows.append(np.array(sl[shape[0] // 2, :], copy=True))
        cols.append(np.array(sl[:, shape[1] // 2], copy=True))
        if prev is not None:
            scores[z - 1] = ncc(prev, sl)
        prev = sl
    h, w = shape if shape is not None else (0, 0)
    return _StackSummary(np.stack(rows), np.stack(cols), scores, (n, h, w))


# --------------------------------------------------------------------------------------------
# pictures
# --------------------------------------------------------------------------------------------
def _stretch(img: NDArray[Any]) -> NDArray[np.uint8]:
    f = img.astype(np.float64)
    finite = f[np.isfinite(f)]
    if finite.size == 0:
        return np.zeros(f.shape, np.uint8)
    lo, hi = np.percentile(finite, [0.5, 99.5])
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((f - lo) * (255.0 / (hi - lo)), 0, 255).astype(np.uint8)


def _reslice_panel(
    lines: NDArray[Any], z_scale: float, flagged: Sequence[int], label: str
) -> NDArray[np.uint8]:
    """A (z, x) reslice as a BGR picture with z down, resized so voxels have the right aspect."""
    img = _stretch(lines)
    n, length = img.shape
    height = max(1, int(round(n * z_scale)))
    scale = min(_MAX_UPSCALE, _MAX_PICTURE / max(length, height))
    size = (max(1, int(round(length * scale))), max(1, int(round(height * scale))))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_NEAREST
    resized = cv2.resize(img, size, interpolation=interp)
    bgr = cv2.cvtColor(resized, cv2.COLOR_GRAY2BGR)
    pad = 14
    canvas = np.full((bgr.shape[0] + 22, bgr.shape[1] + pad, 3), 255, np.uint8)
    canvas[22:, pad:] = bgr
    for z in flagged:
        if 0 <= z < n:
            y = 22 + int((z + 0.5) * size[1] / n)
            cv2.line(canvas, (0, y), (pad - 3, y), (0, 0, 220), 2)
    cv2.putText(canvas, label, (pad, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1,
                cv2.LINE_AA)
    return canvas


def _side_by_side(left: NDArray[np.uint8], right: NDArray[np.uint8]) -> NDArray[np.uint8]:
    h = max(left.shape[0], right.shape[0])
    gap = 16
    out = np.full((h, left.shape[1] + gap + right.shape[1], 3), 255, np.uint8)
    out[: left.shape[0], : left.shape[1]] = left
    out[: right.shape[0], left.shape[1] + gap:] = right
    return out


_COLOURS = [(180, 90, 30), (30, 120, 230), (40, 160, 40), (40, 40, 200), (150, 60, 150),
            (90, 90, 90)]


def _nice_ticks(lo: float, hi: float, count: int = 5, *, integer: bool = False
                ) -> tuple[list[float], float]:
    if not math.isfinite(lo) or not math.isfinite(hi) or hi <= lo:
        return ([lo] if math.isfinite(lo) else []), 1.0
    raw = (hi - lo) / count
    if integer:  # slice indices: whole-number ticks only
        raw = max(raw, 1.0)
    mag = 10 ** math.floor(math.log10(raw))
    steps = (1, 2, 5, 10) if integer else (1, 2, 2.5, 5, 10)
    step = min((s * mag for s in steps if s * mag >= raw), default=10 * mag)
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)], step


def _fmt(v: float, step: float) -> str:
    if abs(v) < step * 1e-6:
        return "0"
    if abs(v) >= 1e5 or step < 1e-4:
        return f"{v:.3g}"
    decimals = max(0, -math.floor(math.log10(step)) + (1 if step / 10 ** math.floor(
        math.log10(step)) == 2.5 else 0))
    return f"{v:.{decimals}f}"


def _plot(
    series: Sequence[tuple[str, ArrayLike, ArrayLike]],
    *,
    title: str,
    xlabel: str = "z",
    flagged: Sequence[int] = (),
    width: int = 820,
    height: int = 250,
) -> NDArray[np.uint8]:
    """Line plot drawn with OpenCV: ``series`` are ``(label, x, y)``; NaN breaks a line."""
    canvas = np.full((height, width, 3), 255, np.uint8)
    left, right, top, bottom = 70, 20, 28, 36
    pw, ph = width - left - right, height - top - bottom
    xs_all = np.concatenate([np.asarray(x, float).ravel() for _, x, _ in series] or [np.zeros(1)])
    ys_all = np.concatenate([np.asarray(y, float).ravel() for _, _, y in series] or [np.zeros(1)])
    ys_fin = ys_all[np.isfinite(ys_all)]
    x0, x1 = float(np.nanmin(xs_all)), float(np.nanmax(xs_all))
    if x1 <= x0:
        x1 = x0 + 1
    if ys_fin.size:
        y0, y1 = float(ys_fin.min()), float(ys_fin.max())
    else:
        y0, y1 = 0.0, 1.0
    if y1 - y0 < 1e-9 * max(1.0, abs(y0)):  # constant: show a small band around it
        pad = max(abs(y0) * 0.01, 1e-3)
        y0, y1 = y0 - pad, y1 + pad
    span = y1 - y0
    y0, y1 = y0 - 0.05 * span, y1 + 0.05 * span

    def px(x: NDArray[np.float64], y: NDArray[np.float64]) -> NDArray[np.int32]:
        u = left + (x - x0) / (x1 - x0) * pw
        v = top + (1 - (y - y0) / (y1 - y0)) * ph
        return np.stack([u, v], -1).round().astype(np.int32)

    font, grey = cv2.FONT_HERSHEY_SIMPLEX, (200, 200, 200)
    yt, ystep = _nice_ticks(y0, y1)
    for t in yt:
        v = int(px(np.array([x0]), np.array([t]))[0, 1])
        cv2.line(canvas, (left, v), (left + pw, v), (235, 235, 235), 1)
        cv2.putText(canvas, _fmt(t, ystep), (4, v + 4), font, 0.38, (60, 60, 60), 1, cv2.LINE_AA)
    xt, xstep = _nice_ticks(x0, x1, 8, integer=True)
    for t in xt:
        u = int(px(np.array([t]), np.array([y0]))[0, 0])
        cv2.line(canvas, (u, top + ph), (u, top + ph + 4), (60, 60, 60), 1)
        cv2.putText(canvas, _fmt(t, xstep), (u - 8, top + ph + 16), font, 0.38, (60, 60, 60), 1,
                    cv2.LINE_AA)
    for z in flagged:
        if x0 <= z <= x1:
            u = int(px(np.array([float(z)]), np.array([y0]))[0, 0])
            cv2.line(canvas, (u, top), (u, top + ph), (120, 120, 255), 1)
    cv2.rectangle(canvas, (left, top), (left + pw, top + ph), grey, 1)
    legend_x = left + 8
    for i, (label, x, y) in enumerate(series):
        colour = _COLOURS[i % len(_COLOURS)]
        xa, ya = np.asarray(x, float).ravel(), np.asarray(y, float).ravel()
        ok = np.isfinite(xa) & np.isfinite(ya)
        pts = px(np.where(ok, xa, 0), np.where(ok, ya, 0))
        # split at NaN gaps so failed slices show as breaks
        start = None
        for k in range(len(xa) + 1):
            if k < len(xa) and ok[k]:
                start = k if start is None else start
                continue
            if start is not None:
                seg = pts[start:k]
                if len(seg) > 1:
                    cv2.polylines(canvas, [seg.reshape(-1, 1, 2)], False, colour, 1, cv2.LINE_AA)
                if len(xa) <= 80 or len(seg) == 1:
                    for p in seg:
                        cv2.circle(canvas, (int(p[0]), int(p[1])), 2, colour, -1, cv2.LINE_AA)
                start = None
        cv2.putText(canvas, label, (legend_x, top - 8), font, 0.42, colour, 1, cv2.LINE_AA)
        legend_x += 12 + cv2.getTextSize(label, font, 0.42, 1)[0][0]
    cv2.putText(canvas, title, (max(left, legend_x + 16), top - 8), font, 0.45, (0, 0, 0), 1,
                cv2.LINE_AA)
    cv2.putText(canvas, xlabel, (left + pw // 2, height - 4), font, 0.4, (60, 60, 60), 1,
                cv2.LINE_AA)
    return canvas


def _jacobian_panel(det: NDArray[Any], label: str) -> NDArray[np.uint8]:
    d = np.asarray(det, dtype=np.float64)
    scaled = np.clip(d / 2.0 * 255.0, 0, 255).astype(np.uint8)  # 0..2 -> 0..255, 1 = grey
    bgr = cv2.applyColorMap(scaled, cv2.COLORMAP_VIRIDIS)
    bgr[d <= 0] = (0, 0, 255)  # folding in red
    s = min(1.0, 300 / max(d.shape))
    bgr = cv2.resize(bgr, (max(1, int(d.shape[1] * s)), max(1, int(d.shape[0] * s))),
                     interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_NEAREST)
    canvas = np.full((bgr.shape[0] + 22, max(bgr.shape[1], 200), 3), 255, np.uint8)
    canvas[22:, : bgr.shape[1]] = bgr
    cv2.putText(canvas, label, (2, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1,
                cv2.LINE_AA)
    return canvas


def _png(img: NDArray[np.uint8], alt: str) -> str:
    ok, buf = cv2.imencode(".png", img)
    if not ok:  # pragma: no cover - cv2 encodes any uint8 BGR image
        raise DeepAlignError(f"could not encode the {alt!r} picture")
    data = base64.b64encode(buf.tobytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


# --------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------
_CSS = """
body{font-family:sans-serif;margin:24px;color:#222;max-width:1900px}
h1{font-size:22px}
h2{font-size:17px;border-bottom:1px solid #ccc;padding-bottom:3px;margin-top:28px}
table{border-collapse:collapse} td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
img{display:block;margin:6px 0;max-width:100%} .note{color:#666;font-size:13px}
.flag{color:#c00}
"""


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _num(v: float, digits: int = 4) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}g}"


def write_report(
    path: str | os.PathLike[str],
    *,
    before: Any,
    after: Any,
    transforms: Sequence[ArrayLike | None] | NDArray[np.float64] | None = None,
    residuals: ArrayLike | None = None,
    flagged: Sequence[int] | Mapping[int, str] = (),
    timings: Mapping[str, float] | None = None,
    jacobian_maps: Mapping[int, ArrayLike] | Sequence[ArrayLike] | None = None,
    title: str = "",
    z_scale: float = 1.0,
) -> Path:
    """Write a self-contained HTML quality-control report.

    Parameters
    ----------
    path : str or path-like
        Output ``.html`` file, written atomically (temporary file + rename).
    before, after : array (z, y, x) or lazy stack
        The stack before and after alignment: an array or any object with ``__len__`` and
        ``read(i)`` or ``__getitem__(i)`` returning one slice. Slices are read one at a time;
        only the centre row and column of each are kept.
    transforms : sequence of (2, 3) array_like or None, optional
        Per-slice transforms (output -> input pull maps); ``None`` marks a failed slice. Plotted
        as translation, rotation, scale and shear over z.
    residuals : array_like (n,), optional
        Per-slice residual (e.g. matching residual or TRE) in pixels; NaN for unknown.
    flagged : sequence of int or mapping {z: reason}
        Slices to list and mark (red ticks) on the reslices and plots.
    timings : mapping {stage: seconds}, optional
    jacobian_maps : mapping {z: (H, W) determinant} or sequence, optional
        Jacobian determinant maps of deformable fields; non-positive values are drawn red.
    title : str
    z_scale : float
        Slice spacing divided by the in-plane pixel size, so reslices show true proportions.

    Returns
    -------
    pathlib.Path
        The written file.
    """
    path = Path(path)
    if not z_scale > 0:
        raise DeepAlignError(f"z_scale must be > 0, got {z_scale}")
    flags: dict[int, str] = (
        {int(k): str(v) for k, v in flagged.items()} if isinstance(flagged, Mapping)
        else {int(z): "" for z in flagged}
    )
    flag_list = sorted(flags)
    b = _summarise(before, "before")
    a = _summarise(after, "after")

    parts: list[str] = []
    heading = title or "deepalign-fast alignment report"
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    parts.append(f"<h1>{html.escape(heading)}</h1><p class='note'>written {stamp}</p>")

    # summary
    mb, ma = float(np.nanmean(b.ncc)) if b.ncc.size else math.nan, (
        float(np.nanmean(a.ncc)) if a.ncc.size else math.nan)
    n_ncc = (ma - mb) / (1 - mb) if math.isfinite(mb) and mb != 1 else math.nan
    rows = [
        ["slices (before / after)", f"{b.shape[0]} / {a.shape[0]}"],
        ["slice size before (y x)", f"{b.shape[1]} x {b.shape[2]}"],
        ["slice size after (y x)", f"{a.shape[1]} x {a.shape[2]}"],
        ["mean neighbour NCC before", _num(mb)],
        ["mean neighbour NCC after", _num(ma)],
        ["normalised improvement (after-before)/(1-before)", _num(n_ncc)],
        ["flagged slices", str(len(flag_list))],
    ]
    if residuals is not None:
        r = np.asarray(residuals, dtype=np.float64).ravel()
        if np.isfinite(r).any():
            rows.append(["median / max residual (px)",
                         f"{_num(float(np.nanmedian(r)))} / {_num(float(np.nanmax(r)))}"])
    parts.append("<h2 id='summary'>Summary</h2>" + _table(["quantity", "value"], rows))

    # reslices
    parts.append(
        "<h2 id='reslices'>Reslices (before | after)</h2><p class='note'>Through the centre of "
        "each slice; z runs downwards; contrast stretched (0.5-99.5 percentile); red ticks mark "
        f"flagged slices; z scale {z_scale:g}. Aligned stacks show smooth, continuous "
        "structures along z.</p>"
    )
    for name, lb, la, axis in (("XZ", b.xz, a.xz, "x"), ("YZ", b.yz, a.yz, "y")):
        pic = _side_by_side(
            _reslice_panel(lb, z_scale, flag_list, f"{name} before ({axis} across, z down)"),
            _reslice_panel(la, z_scale, flag_list, f"{name} after"),
        )
        parts.append(f"<h3>{name}</h3>" + _png(pic, f"{name} reslice before and after"))

    # similarity
    zs_pairs = np.arange(len(b.ncc)) + 0.5
    za_pairs = np.arange(len(a.ncc)) + 0.5
    if len(b.ncc) or len(a.ncc):
        plot = _plot([("before", zs_pairs, b.ncc), ("after", za_pairs, a.ncc)],
                     title="NCC of slices z, z+1", xlabel="z", flagged=flag_list)
        parts.append("<h2 id='similarity'>Neighbour similarity</h2>" + _png(plot, "neighbour NCC"))

    # residuals
    if residuals is not None:
        r = np.asarray(residuals, dtype=np.float64).ravel()
        plot = _plot([("residual (px)", np.arange(len(r)), r)], title="per-slice residual",
                     flagged=flag_list)
        parts.append("<h2 id='residuals'>Residuals</h2>" + _png(plot, "per-slice residual"))

    # transforms
    if transforms is not None:
        d = decompose_affine(transforms)
        z = np.arange(len(transforms))
        plots = [
            _plot([("tx", z, d["tx"]), ("ty", z, d["ty"])], title="translation (px)",
                  flagged=flag_list),
            _plot([("rotation", z, d["rotation_deg"])], title="rotation (deg)", flagged=flag_list),
            _plot([("scale x", z, d["scale_x"]), ("scale y", z, d["scale_y"])], title="scale",
                  flagged=flag_list),
            _plot([("shear", z, d["shear"])], title="shear", flagged=flag_list),
        ]
        failed = [int(i) for i in np.flatnonzero(np.isnan(d["tx"]))]
        note = (f"<p class='note'>failed (no transform): {', '.join(map(str, failed))}</p>"
                if failed else "")
        parts.append(
            "<h2 id='transforms'>Transforms</h2><p class='note'>2x3 pull maps decomposed as "
            "L = R(rotation) [[sx, sx*shear], [0, sy]], translation (tx, ty).</p>" + note
            + "".join(_png(p, "transform parameters") for p in plots)
        )

    # flagged
    parts.append("<h2 id='flagged'>Flagged slices</h2>")
    if flag_list:
        parts.append(_table(["slice", "reason"], [[str(z), flags[z]] for z in flag_list]))
    else:
        parts.append("<p>none</p>")

    # jacobian
    if jacobian_maps is not None:
        items = (list(jacobian_maps.items()) if isinstance(jacobian_maps, Mapping)
                 else list(enumerate(jacobian_maps)))
        scored = []
        for zk, det in items:
            arr = np.asarray(det, dtype=np.float64)
            scored.append((float(np.mean(arr <= 0)), int(zk), arr))
        rows = [[str(zk), f"{100 * f:.3f}", _num(float(arr.min()))] for f, zk, arr in scored]
        worst = sorted(scored, key=lambda s: -s[0])[:4]
        pics = [_jacobian_panel(arr, f"z={zk}: {100 * f:.2f}% <= 0") for f, zk, arr in worst]
        parts.append(
            "<h2 id='jacobian'>Jacobian determinant</h2><p class='note'>Colour 0 (dark) .. 2 "
            "(yellow); non-positive (folding) red. Target: &lt; 0.1 % non-positive.</p>"
            + _table(["slice", "% non-positive", "min det"], rows)
            + "".join(_png(p, f"jacobian map {i}") for i, p in enumerate(pics))
        )

    # timings
    if timings:
        total = sum(float(v) for v in timings.values())
        rows = [[k, f"{float(v):.3f}"] for k, v in timings.items()] + [["total", f"{total:.3f}"]]
        parts.append("<h2 id='timings'>Timings</h2>" + _table(["stage", "seconds"], rows))

    doc = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(heading)}</title><style>{_CSS}</style></head><body>\n"
        + "\n".join(parts) + "\n</body></html>\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(doc)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a report is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
