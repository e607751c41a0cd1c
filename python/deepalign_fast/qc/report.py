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

Neighbour similarity at equal interpolation: resampling blurs, and blur alone raises the NCC
of neighbouring slices (their noise is independent): shifting an aligned stack by half a pixel
with bilinear interpolation raises its mean neighbour NCC from 0.88 to 0.95. So "before" is
not scored on the raw input. With the transforms known, pair ``(z, z+1)`` before alignment is
``after[z]`` against ``before[z+1]`` resampled with slice ``z``'s transform: the same
interpolation as the after stack, while the two slices keep the geometry they had before
alignment (both went through transform ``z``). After alignment it is ``after[z]`` against
``after[z+1]``. Both are scored over the same pixels (inside both warped frames). A stack that
only went through interpolation (every slice shifted alike) scores exactly no improvement.

Conventions (see the package docstring): arrays ``(z, y, x)``; transforms are 2x3 pull maps
``[[a, b, tx], [c, d, ty]]`` from output (reference) to input (moving) coordinates.
"""

from __future__ import annotations

import base64
import datetime
import html
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import ArrayLike, NDArray

from .._errors import DeepAlignError
from ..intensity import to_uint8
from ..io import voxel_size_of
from ..outputs import write_atomic
from ..warp import warp_affine
from .metrics import ncc

__all__ = ["decompose_affine", "equal_interpolation_ncc", "write_report"]

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
    ncc: NDArray[np.float64]  # (n - 1,): raw neighbour NCC
    shape: tuple[int, int, int]


def _slice(stack: Any, i: int) -> NDArray[Any]:
    reader = getattr(stack, "read", None)
    return np.asarray(reader(i) if callable(reader) else stack[i])


def _length(stack: Any, name: str) -> int:
    try:
        n = len(stack)
    except TypeError as exc:
        raise DeepAlignError(f"{name}: need an array or an object with __len__") from exc
    if n < 1:
        raise DeepAlignError(f"{name}: empty stack")
    return int(n)


class _Collector:
    """Centre row/column of each slice and raw neighbour NCC, one slice at a time."""

    def __init__(self, name: str, n: int) -> None:
        self.name, self.n = name, n
        self.rows: list[NDArray[Any]] = []
        self.cols: list[NDArray[Any]] = []
        self.scores = np.full(max(n - 1, 0), np.nan)
        self.prev: NDArray[Any] | None = None
        self.shape: tuple[int, int] | None = None

    def add(self, z: int, sl: NDArray[Any]) -> None:
        if sl.ndim != 2:
            raise DeepAlignError(f"{self.name}: slice {z} has shape {sl.shape}, expected (y, x)")
        if self.shape is None:
            self.shape = (int(sl.shape[0]), int(sl.shape[1]))
        elif sl.shape != self.shape:
            raise DeepAlignError(
                f"{self.name}: slice {z} has shape {sl.shape}, slice 0 has {self.shape}")
        self.rows.append(np.array(sl[self.shape[0] // 2, :], copy=True))
        self.cols.append(np.array(sl[:, self.shape[1] // 2], copy=True))
        if self.prev is not None:
            self.scores[z - 1] = ncc(self.prev, sl)
        self.prev = sl

    def summary(self) -> _StackSummary:
        h, w = self.shape if self.shape is not None else (0, 0)
        return _StackSummary(np.stack(self.rows), np.stack(self.cols), self.scores,
                             (self.n, h, w))


def _valid(matrix: NDArray[np.float64], src_shape: tuple[int, int],
           shape: tuple[int, int]) -> NDArray[np.bool_]:
    """Output pixels of a pull map whose source position lies inside the source slice."""
    ones = np.ones(src_shape, np.uint8)
    return warp_affine(ones, matrix, shape, interpolation="nearest", fill=0) > 0


def equal_interpolation_ncc(before: Any, after: Any,
                            transforms: Sequence[ArrayLike | None] | NDArray[np.float64],
                            ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Neighbour NCC before and after alignment, compared at equal interpolation.

    Pair ``z`` after alignment: ``after[z]`` vs ``after[z+1]``. Before alignment:
    ``after[z]`` vs ``before[z+1]`` resampled (bilinear) with ``transforms[z]``, i.e. the
    neighbour as it was before alignment, relative to slice ``z``, through the same
    interpolation. Both over the pixels inside both warped frames (no fill border).

    Parameters
    ----------
    before, after : array (z, y, x) or lazy stack
        Same number of slices; read one slice at a time.
    transforms : sequence of (2, 3) array_like or None
        Pull maps from ``after`` pixel coordinates to ``before`` pixel coordinates; a pair
        with a ``None`` transform scores NaN.

    Returns
    -------
    before_ncc, after_ncc : ndarray (n - 1,)
    """
    n = _length(before, "before")
    if _length(after, "after") != n or len(transforms) != n:
        raise DeepAlignError(f"equal-interpolation NCC needs as many before slices, after "
                             f"slices and transforms; got {n}, {len(after)}, {len(transforms)}")
    return _equal_interpolation(before, after, transforms, None, None)


def _equal_interpolation(before: Any, after: Any,
                         transforms: Sequence[ArrayLike | None] | NDArray[np.float64],
                         cb: _Collector | None, ca: _Collector | None, *,
                         progress: bool | None = False,
                         ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    from ..progress import Progress

    n = len(before)
    bar = Progress(n, "report", progress)
    sb = np.full(max(n - 1, 0), np.nan)
    sa = np.full(max(n - 1, 0), np.nan)
    prev_a: NDArray[Any] | None = None
    prev_valid: NDArray[np.bool_] | None = None
    prev_m: NDArray[np.float64] | None = None
    for z in range(n):
        b, a = _slice(before, z), _slice(after, z)
        if cb is not None and ca is not None:
            cb.add(z, b)
            ca.add(z, a)
        if b.ndim != 2 or a.ndim != 2:
            raise DeepAlignError(f"slice {z}: expected (y, x) slices, got {b.shape}, {a.shape}")
        t = transforms[z]
        m = None if t is None else np.asarray(t, dtype=np.float64)
        if m is not None and m.shape != (2, 3):
            raise DeepAlignError(f"transform of slice {z} has shape {m.shape}, expected (2, 3)")
        shape = (int(a.shape[0]), int(a.shape[1]))
        valid = None if m is None else _valid(m, (int(b.shape[0]), int(b.shape[1])), shape)
        if prev_a is not None and prev_m is not None and prev_valid is not None \
                and valid is not None:
            mask = prev_valid & valid
            if mask.sum() >= 16:
                src = b if b.dtype in (np.uint8, np.uint16, np.float32) else b.astype(np.float32)
                moved = warp_affine(src, prev_m, shape, fill=0)
                sb[z - 1] = ncc(prev_a, moved, mask)
                sa[z - 1] = ncc(prev_a, a, mask)
        prev_a, prev_m, prev_valid = a, m, valid
        bar.step()
    bar.close()
    return sb, sa


# --------------------------------------------------------------------------------------------
# pictures
# --------------------------------------------------------------------------------------------
def _reslice_panel(
    lines: NDArray[Any], z_scale: float, flagged: Sequence[int], label: str
) -> NDArray[np.uint8]:
    """A (z, x) reslice as a BGR picture with z down, resized so voxels have the right aspect."""
    img = to_uint8(lines)
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


def nice_ticks(lo: float, hi: float, count: int = 5, *, integer: bool = False
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


def format_tick(v: float, step: float) -> str:
    """Tick label with as many decimals as the tick step needs, so neighbouring ticks differ
    (e.g. scales 0.9996, 0.9998, 1.0000 rather than "1", "1", "1")."""
    if abs(v) < step * 1e-6:
        return "0"
    if abs(v) >= 1e5:
        return f"{v:.3e}" if step < abs(v) * 1e-3 else f"{v:.0f}"
    decimals = max(0, math.ceil(-math.log10(step) - 1e-9))
    while decimals < 12 and abs(step * 10**decimals - round(step * 10**decimals)) > 1e-6:
        decimals += 1  # steps like 2.5, 0.25
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
    yt, ystep = nice_ticks(y0, y1)
    for t in yt:
        v = int(px(np.array([x0]), np.array([t]))[0, 1])
        cv2.line(canvas, (left, v), (left + pw, v), (235, 235, 235), 1)
        cv2.putText(canvas, format_tick(t, ystep), (4, v + 4), font, 0.38, (60, 60, 60), 1,
                    cv2.LINE_AA)
    xt, xstep = nice_ticks(x0, x1, 8, integer=True)
    for t in xt:
        u = int(px(np.array([t]), np.array([y0]))[0, 0])
        cv2.line(canvas, (u, top + ph), (u, top + ph + 4), (60, 60, 60), 1)
        cv2.putText(canvas, format_tick(t, xstep), (u - 8, top + ph + 16), font, 0.38,
                    (60, 60, 60), 1, cv2.LINE_AA)
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


def _json_value(v: Any) -> str:
    """An option value as compact text (JSON where it is JSON-able)."""
    import json

    try:
        return json.dumps(v, default=str)
    except (TypeError, ValueError):
        return str(v)


def _num(v: float, digits: int = 4) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}g}"


def _source_name(stack: Any) -> str | None:
    path = getattr(stack, "path", None)
    if isinstance(path, (str, os.PathLike)):
        return str(Path(path).resolve())
    return None


def _options_beside(after: Any) -> dict[str, Any] | None:
    """The options recorded in the aligner's transforms file next to ``after``, if any."""
    path = getattr(after, "path", None)
    if not isinstance(path, (str, os.PathLike)):
        return None
    import json

    from ..outputs import transforms_path_for

    try:
        data = json.loads(transforms_path_for(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    opts = data.get("options") if isinstance(data, dict) else None
    return dict(opts) if isinstance(opts, dict) else None


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
    z_scale: float | None = None,
    voxel_size: tuple[float, float, float] | None = None,
    unit: str = "\u00b5m",
    options: Mapping[str, Any] | None = None,
    source: str | os.PathLike[str] | None = None,
    progress: bool | None = False,
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
        as translation, rotation, scale and shear over z, and used to score the neighbour
        similarity before alignment at the after stack's interpolation (module docstring).
        Without them the report shows raw neighbour NCC only and says why.
    residuals : array_like (n,), optional
        Per-slice residual (e.g. matching residual or TRE) in pixels; NaN for unknown.
    flagged : sequence of int or mapping {z: reason}
        Slices to list and mark (red ticks) on the reslices and plots.
    timings : mapping {stage: seconds}, optional
        Stage times; a ``"total"`` entry is the wall time and is shown once, as given
        (stages may overlap). Without it the sum of the stages is shown as the total.
    jacobian_maps : mapping {z: (H, W) determinant} or sequence, optional
        Jacobian determinant maps of deformable fields; non-positive values are drawn red.
    title : str
    z_scale : float, optional
        Vertical stretch of the reslices when the voxel size is unknown, labelled "display
        stretch" (default: short stacks are stretched to about 96 rows). Ignored when the
        voxel size is known: the reslices then show true proportions.
    voxel_size : (z, y, x) float, optional
        Slice spacing and pixel size in ``unit``. Default: read from ``before``'s file
        metadata when ``before`` is a reader with a ``path`` (:func:`voxel_size_of`).
    unit : str
        Unit of ``voxel_size``.
    options : mapping, optional
        The aligner's options, listed in the report. Default: the options recorded in the
        transforms file next to ``after`` (the aligner's default name), if ``after`` is a
        reader with a ``path`` and that file exists.
    source : str or path-like, optional
        The input's path, recorded in the report (default: ``before.path`` when present).

    Returns
    -------
    pathlib.Path
        The written file.
    """
    from .. import __version__

    path = Path(path)
    if z_scale is not None and not (math.isfinite(z_scale) and z_scale > 0):
        raise DeepAlignError(f"z_scale must be > 0, got {z_scale}")
    vox: tuple[tuple[float, float, float], str] | None
    if voxel_size is not None:
        if len(voxel_size) != 3 or not all(math.isfinite(v) and v > 0 for v in voxel_size):
            raise DeepAlignError(f"voxel_size must be three positive numbers (z, y, x), got "
                                 f"{voxel_size!r}")
        vox = (float(voxel_size[0]), float(voxel_size[1]), float(voxel_size[2])), unit
    else:
        vox = voxel_size_of(before)
    flags: dict[int, str] = (
        {int(k): str(v) for k, v in flagged.items()} if isinstance(flagged, Mapping)
        else {int(z): "" for z in flagged}
    )
    flag_list = sorted(flags)
    nb, na = _length(before, "before"), _length(after, "after")
    cb, ca = _Collector("before", nb), _Collector("after", na)
    fair = transforms is not None and nb == na and len(transforms) == nb
    eq_before = eq_after = np.zeros(0)
    if transforms is not None and fair:
        eq_before, eq_after = _equal_interpolation(before, after, transforms, cb, ca,
                                                   progress=progress)
    else:
        for z in range(nb):
            cb.add(z, _slice(before, z))
        for z in range(na):
            ca.add(z, _slice(after, z))
    b, a = cb.summary(), ca.summary()

    parts: list[str] = []
    heading = title or "deepalign-fast alignment report"
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    parts.append(f"<h1>{html.escape(heading)}</h1><p class='note'>written {stamp} by "
                 f"deepalign-fast {html.escape(__version__)}</p>")

    # summary
    def mean(v: NDArray[np.float64]) -> float:
        return float(np.nanmean(v)) if v.size and np.isfinite(v).any() else math.nan

    raw_b, raw_a = mean(b.ncc), mean(a.ncc)
    rows = [
        ["slices (before / after)", f"{b.shape[0]} / {a.shape[0]}"],
        ["slice size before (y x)", f"{b.shape[1]} x {b.shape[2]}"],
        ["slice size after (y x)", f"{a.shape[1]} x {a.shape[2]}"],
    ]
    if fair:
        mb, ma = mean(eq_before), mean(eq_after)
        n_ncc = (ma - mb) / (1 - mb) if math.isfinite(mb) and mb != 1 else math.nan
        rows += [
            ["mean neighbour NCC before (at the after stack's interpolation)", _num(mb)],
            ["mean neighbour NCC after", _num(ma)],
            ["normalised improvement (after-before)/(1-before)", _num(n_ncc)],
            ["mean neighbour NCC of the raw input (not comparable: no interpolation blur)",
             _num(raw_b)],
        ]
    else:
        why = ("no transforms given" if transforms is None
               else "before, after and transforms differ in length")
        rows += [
            ["mean neighbour NCC before (raw input)", _num(raw_b)],
            ["mean neighbour NCC after (raw; raised by interpolation blur alone)", _num(raw_a)],
            ["normalised improvement", f"n/a ({why}: cannot compare at equal interpolation)"],
        ]
    rows.append(["flagged slices", str(len(flag_list))])
    if residuals is not None:
        r = np.asarray(residuals, dtype=np.float64).ravel()
        if np.isfinite(r).any():
            rows.append(["median / max residual (px)",
                         f"{_num(float(np.nanmedian(r)))} / {_num(float(np.nanmax(r)))}"])
    parts.append("<h2 id='summary'>Summary</h2>" + _table(["quantity", "value"], rows))

    # run: version, input, voxel size, options
    src = str(Path(source).resolve()) if source is not None else _source_name(before)
    run_rows = [["deepalign-fast version", __version__],
                ["input", src or "(in-memory array)"],
                ["aligned", _source_name(after) or "(in-memory array)"]]
    if vox is not None:
        (vz, vy, vx), vunit = vox
        run_rows.append(["voxel size (z, y, x)", f"{vz:g} x {vy:g} x {vx:g} {vunit}"])
    else:
        run_rows.append(["voxel size", "unknown (not in the input's metadata)"])
    opts = dict(options) if options is not None else _options_beside(after)
    if opts:
        run_rows += [[f"option {k}", _json_value(opts[k])] for k in sorted(opts)]
    else:
        run_rows.append(["options", "not recorded"])
    parts.append("<h2 id='run'>Run</h2>" + _table(["item", "value"], run_rows))

    # reslices: true voxel proportions when the voxel size is known, else a display stretch
    if vox is not None:
        (vz, vy, vx), vunit = vox
        scale_xz, scale_yz = vz / vx, vz / vy
        z_note = (f"true voxel proportions: slice spacing {vz:g} {vunit} / pixel size "
                  f"{vx:g} {vunit} = z aspect {scale_xz:.3g}")
    else:
        stretch = z_scale if z_scale is not None else max(1.0, 96.0 / max(1, b.shape[0]))
        scale_xz = scale_yz = stretch
        z_note = (f"display stretch: each slice drawn {stretch:.3g} pixels tall (voxel size "
                  "unknown, so these are not true proportions)")
    parts.append(
        "<h2 id='reslices'>Reslices (before | after)</h2><p class='note'>Through the centre of "
        "each slice; z runs downwards; contrast stretched (0.5-99.5 percentile); red ticks mark "
        f"flagged slices; {html.escape(z_note)}. Aligned stacks show smooth, continuous "
        "structures along z.</p>"
    )
    for name, lb, la, axis, zs in (("XZ", b.xz, a.xz, "x", scale_xz),
                                    ("YZ", b.yz, a.yz, "y", scale_yz)):
        pic = _side_by_side(
            _reslice_panel(lb, zs, flag_list, f"{name} before ({axis} across, z down)"),
            _reslice_panel(la, zs, flag_list, f"{name} after"),
        )
        parts.append(f"<h3>{name}</h3>" + _png(pic, f"{name} reslice before and after"))

    # similarity
    if fair:
        zp = np.arange(len(eq_after)) + 0.5
        plot = _plot([("before", zp, eq_before), ("after", zp, eq_after)],
                     title="NCC of slices z, z+1 (equal interpolation)", xlabel="z",
                     flagged=flag_list)
        parts.append(
            "<h2 id='similarity'>Neighbour similarity</h2><p class='note'>Before: after[z] "
            "against before[z+1] resampled with transform z (the neighbour as it was before "
            "alignment, through the same interpolation); after: after[z] against after[z+1]; "
            "both over the pixels inside both warped frames. Resampling blur alone cannot raise "
            "the after score above the before score this way.</p>" + _png(plot, "neighbour NCC"))
    elif len(b.ncc) or len(a.ncc):
        plot = _plot([("before (raw)", np.arange(len(b.ncc)) + 0.5, b.ncc),
                      ("after (raw)", np.arange(len(a.ncc)) + 0.5, a.ncc)],
                     title="NCC of slices z, z+1 (raw)", xlabel="z", flagged=flag_list)
        parts.append(
            "<h2 id='similarity'>Neighbour similarity</h2><p class='note'>Raw scores: without "
            "the transforms the two stacks cannot be compared at equal interpolation, and "
            "resampling blur alone raises the after score.</p>" + _png(plot, "neighbour NCC"))

    # residuals
    if residuals is not None:
        r = np.asarray(residuals, dtype=np.float64).ravel()
        plot = _plot([("residual (px)", np.arange(len(r)), r)], title="per-slice residual",
                     flagged=flag_list)
        parts.append("<h2 id='residuals'>Residuals</h2>" + _png(plot, "per-slice residual"))

    # transforms
    if transforms is not None:
        d = decompose_affine(transforms)
        zt = np.arange(len(transforms))
        plots = [
            _plot([("tx", zt, d["tx"]), ("ty", zt, d["ty"])], title="translation (px)",
                  flagged=flag_list),
            _plot([("rotation", zt, d["rotation_deg"])], title="rotation (deg)", flagged=flag_list),
            _plot([("scale x", zt, d["scale_x"]), ("scale y", zt, d["scale_y"])], title="scale",
                  flagged=flag_list),
            _plot([("shear", zt, d["shear"])], title="shear", flagged=flag_list),
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
        stages = {k: float(v) for k, v in timings.items() if k != "total"}
        rows = [[k, f"{v:.3f}"] for k, v in stages.items()]
        if "total" in timings:
            rows.append(["total (wall time)", f"{float(timings['total']):.3f}"])
            note = ("<p class='note'>Stages may overlap (e.g. reading runs alongside "
                    "matching), so they can add up to more than the wall time.</p>")
        else:
            rows.append(["total (sum of the stages)", f"{sum(stages.values()):.3f}"])
            note = ""
        parts.append("<h2 id='timings'>Timings</h2>" + note
                     + _table(["stage", "seconds"], rows))

    doc = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(heading)}</title><style>{_CSS}</style></head><body>\n"
        + "\n".join(parts) + "\n</body></html>\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    # An exclusive temporary file of this tool (a killed run's is removed by the next run on
    # this output), then a rename that a resumable run records (deepalign_fast.outputs.publish).
    write_atomic(path, doc, doing="cannot write the report")
    return path
