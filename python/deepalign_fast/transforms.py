"""The transforms file: what an alignment produced, re-appliable to labels or other copies.

Schema ``deepalign-fast/transforms`` version 1 (JSON)::

    {
      "schema": "deepalign-fast/transforms", "version": 1,
      "convention": "...",                 # human-readable statement of the convention below
      "input_shape": [z, y, x],            # the stack the transforms were estimated on
      "output_shape": [y, x],              # the aligned canvas
      "affines": [[[a, b, tx], [c, d, ty]], ...],   # one per slice
      "flagged": [z, ...],                 # slices that could not be registered
      "residuals": [px, ...],              # per-slice RMS residual of the fit (null if none)
      "options": {...}                     # the options the aligner ran with
    }

Version 2 adds per-slice displacement fields (``align --mode elastic``), stored beside the
JSON in a Zarr array ``NAME.fields.zarr`` of shape ``(n, 2, rows, cols)`` float16, one chunk per
slice, sampled every ``stride`` output pixels (grid point ``(i, j)`` is output pixel
``(x, y) = (j * stride, i * stride)``; bilinear in between, edge values held beyond the last
grid point)::

      "fields": {"path": "NAME.fields.zarr", "stride": 4},
      "folding": [fraction, ...]           # non-positive Jacobian fraction per slice

With a field ``u_z`` the pull map of slice ``z`` is ``p -> A_z(p + u_z(p))``; slices without a
field (NaN-filled chunks) use ``A_z`` alone.

Version 3 names the kind of the fields (``"kind"``, default ``"displacement"``) and adds
per-pixel affine fields (``align --mode expected-affine``): ``(n, 6, rows, cols)`` float64,
the 2x3 affine ``F_z`` row by row at grid point ``(i, j)`` = output pixel
``(j * stride, i * stride)``, ``rows = ceil((H - 1) / stride) + 1`` (the grid covers the last
pixel), parameters bilinear in between; the pull map is ``p -> A_z F_z(p) p``::

      "fields": {"path": "NAME.fields.zarr", "stride": 8, "kind": "affine"}

A refined run may add ``"notes": {"z": "why", ...}``: why its refinement left slice z with its
affine, or refined it in part (optional, any version). ``"flag_reasons": {"z": "reason"}``
says why each flagged slice was flagged (a key of
:data:`deepalign_fast.alignment.solve.FLAG_REASONS`; optional, any version).
``"voxel_size": [z, y, x], "unit": "nanometer"``: the aligned stack's voxel size as its
output records it (optional, any version; for ``export-transforms``).

Every kind is rendered by :func:`deepalign_fast.render.render_slice` through
:meth:`TransformSet.slice_map`.

``affines[z]`` maps OUTPUT (aligned canvas) pixel coordinates ``(x, y, 1)`` to pixel
coordinates of INPUT slice ``z`` (the pull map a warp samples with); pixel centres are at
integer coordinates, origin at the centre of the top-left pixel. To carry the alignment to a
copy at a different resolution, scale the affines (``TransformSet.rescaled``).
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from ._errors import DeepAlignError

if TYPE_CHECKING:
    from .render import SliceMap

__all__ = ["FIELD_KINDS", "SCHEMA", "FieldStore", "TransformSet", "export_itk", "holds_text",
           "itk_files", "outside_slices"]

SCHEMA = "deepalign-fast/transforms"
VERSION = 3  # written when fields are present; version 1 otherwise (2: displacement only)
#: What a field store holds: displacements ``u`` or per-pixel affines ``F`` (module docstring).
FIELD_KINDS = ("displacement", "affine")
CONVENTION = (
    "affines[z] maps output (aligned canvas) pixel coordinates (x, y, 1) to pixel coordinates of "
    "input slice z; pixel centres at integer coordinates, origin at the centre of the top-left "
    "pixel; arrays are (z, y, x)"
)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@dataclass
class TransformSet:
    """Per-slice 2x3 affines (output -> input) plus what is needed to re-apply them."""

    affines: np.ndarray  # (n, 2, 3) float64
    input_shape: tuple[int, int, int]
    output_shape: tuple[int, int]
    flagged: list[int] = field(default_factory=list)
    residuals: list[float | None] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    fields: FieldStore | None = None
    folding: list[float | None] = field(default_factory=list)
    # Refined runs: why a refinement left a slice with its affine, or refined it in part
    # (the refiner's notes, e.g. "affine kept: onto slice 4: too few matches").
    notes: dict[int, str] = field(default_factory=dict)
    # Why each flagged slice was flagged (solve.FLAG_REASONS keys, "unrefined" included).
    flag_reasons: dict[int, str] = field(default_factory=dict)
    # The aligned stack's voxel size (z, y, x) and unit, as its output records them.
    voxel_size: tuple[float, float, float] | None = None
    unit: str | None = None

    def __post_init__(self) -> None:
        self.affines = np.asarray(self.affines, np.float64)
        if self.affines.ndim != 3 or self.affines.shape[1:] != (2, 3):
            raise DeepAlignError(f"affines must have shape (n, 2, 3), got {self.affines.shape}")
        if not np.isfinite(self.affines).all():
            raise DeepAlignError("affines contain NaN or inf")

    def __len__(self) -> int:
        return int(self.affines.shape[0])

    def slice_map(self, z: int, *, num_threads: int = 0) -> SliceMap:
        """The pull map of slice ``z`` (its affine, with its field if it has one), for
        :func:`deepalign_fast.render.render_slice`."""
        from .render import SliceMap

        a = self.affines[z]
        if self.fields is None:
            return SliceMap(a)
        if self.fields.kind == "affine":
            grid = self.fields.get_affine(z)
            return SliceMap(a) if grid is None else SliceMap(a, affine_field=grid,
                                                             field_step=self.fields.stride)
        field = self.fields.get(z, num_threads=num_threads)
        if field is None and z < len(self.folding) and self.folding[z] is not None:
            # a refined slice (its folding was measured on its field) without one: the store
            # lost it (a chunk deleted or replaced by an empty one since it was written)
            raise DeepAlignError(f"{self.fields.path}: slice {z}: its displacement field is "
                                 "missing from the store (changed or damaged since it was "
                                 "written); align again to rewrite it")
        return SliceMap(a, displacement=field)

    def rescaled(self, factor: float,
                 input_shape: tuple[int, int, int] | None = None) -> TransformSet:
        """The same alignment for a copy whose pixels are ``1/factor`` as large (factor 2 = 2x
        finer), e.g. to apply transforms found on a binned stack to the full-resolution one."""
        if self.fields is not None:
            raise DeepAlignError("rescaling transforms that carry fields (elastic or "
                                 "expected-affine) is not supported yet: align the "
                                 "full-resolution stack instead")
        off = (factor - 1.0) / 2.0
        s = np.array([[factor, 0.0, off], [0.0, factor, off], [0.0, 0.0, 1.0]])
        s_inv = np.linalg.inv(s)
        full = np.concatenate([self.affines, np.tile([[[0.0, 0.0, 1.0]]], (len(self), 1, 1))], 1)
        scaled = (s @ full @ s_inv)[:, :2]
        h, w = self.output_shape
        shape = input_shape or (self.input_shape[0], round(self.input_shape[1] * factor),
                                round(self.input_shape[2] * factor))
        size = None if self.voxel_size is None else (
            self.voxel_size[0], self.voxel_size[1] / factor, self.voxel_size[2] / factor)
        return TransformSet(scaled, shape, (round(h * factor), round(w * factor)),
                            list(self.flagged), list(self.residuals), dict(self.options),
                            flag_reasons=dict(self.flag_reasons), voxel_size=size,
                            unit=self.unit)

    def to_json(self, base: Path | None = None) -> dict[str, Any]:
        """JSON form; ``base`` is the folder the file goes to (field paths are stored relative
        to it)."""
        data: dict[str, Any] = {
            "schema": SCHEMA,
            "version": VERSION if self.fields is not None else 1,
            "convention": CONVENTION,
            "input_shape": [int(v) for v in self.input_shape],
            "output_shape": [int(v) for v in self.output_shape],
            "affines": self.affines.tolist(),
            "flagged": [int(z) for z in self.flagged],
            "residuals": [None if r is None else float(r) for r in self.residuals],
            "options": self.options,
        }
        if self.fields is not None:
            path = self.fields.path.resolve()
            rel = os.path.relpath(path, base.resolve()) if base is not None else str(path)
            data["fields"] = {"path": rel, "stride": self.fields.stride,
                              "kind": self.fields.kind,
                              **({"run": self.fields.run} if self.fields.run else {})}
            data["folding"] = [None if f is None else float(f) for f in self.folding]
        if self.notes:
            data["notes"] = {str(z): str(self.notes[z]) for z in sorted(self.notes)}
        if self.flag_reasons:
            data["flag_reasons"] = {str(z): str(self.flag_reasons[z])
                                    for z in sorted(self.flag_reasons)}
        if self.voxel_size is not None:
            data["voxel_size"] = [float(v) for v in self.voxel_size]
            data["unit"] = str(self.unit or "pixel")
        return data

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically: an exclusive temporary file in the same folder, then a rename."""
        from .outputs import create_temp, os_error, publish

        path = Path(path)
        text = json.dumps(self.to_json(path.parent), indent=1)
        fd, tmp = create_temp(path)
        try:
            os.fchmod(fd, 0o666 & ~_umask())
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            publish(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise os_error(exc, path, "cannot write the transforms file") from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def from_json(cls, data: Any, *, source: str = "transforms",
                  base: Path | None = None) -> TransformSet:
        """Build from the JSON form, checking it against the schema (module docstring).

        Types, shapes, finite values, the slice count of every per-slice list, a sensible
        output size, and (version 2) that the field store lies in ``base`` (the transforms
        file's folder) and matches the transforms are all checked; anything else is a
        :class:`~deepalign_fast.DeepAlignError` naming ``source`` and the problem.
        """
        if not isinstance(data, dict):
            raise DeepAlignError(f"{source}: not a deepalign-fast transforms file (the JSON is "
                                 f"{type(data).__name__}, not an object)")
        if data.get("schema") != SCHEMA:
            raise DeepAlignError(f"{source}: not a deepalign-fast transforms file "
                                 f"(schema {data.get('schema')!r})")
        if data.get("version") not in (1, 2, VERSION):
            raise DeepAlignError(f"{source}: unsupported transforms version {data.get('version')!r}"
                                 f" (this build reads versions 1 to {VERSION})")
        for key in ("affines", "input_shape", "output_shape"):
            if key not in data:
                raise DeepAlignError(f"{source}: malformed transforms file: {key!r} is missing")
        input_shape = _int_list(data["input_shape"], 3, source, "input_shape")
        output_shape = _int_list(data["output_shape"], 2, source, "output_shape")
        affines = _affines(data["affines"], source)
        n = len(affines)
        if n != input_shape[0]:
            raise DeepAlignError(f"{source}: {n} affines but input_shape says {input_shape[0]} "
                                 "slices")
        _check_output_size(output_shape, input_shape, source)
        _check_reach(affines, source)
        flagged = data.get("flagged", [])
        if not isinstance(flagged, list) or not all(
                _is_int(z) and 0 <= z < n for z in flagged) or len(set(flagged)) < len(flagged):
            raise DeepAlignError(f"{source}: 'flagged' must list slice numbers 0..{n - 1}, "
                                 "each once")
        residuals = _optional_floats(data.get("residuals", []), n, source, "residuals")
        folding = _optional_floats(data.get("folding", []), n, source, "folding")
        notes = data.get("notes", {})
        if not isinstance(notes, dict) or not all(
                isinstance(k, str) and re.fullmatch(r"0|[1-9][0-9]*", k) and int(k) < n
                and isinstance(v, str) for k, v in notes.items()):
            raise DeepAlignError(f"{source}: 'notes' must map slice numbers 0..{n - 1} to text")
        reasons = data.get("flag_reasons", {})
        if not isinstance(reasons, dict) or not all(
                isinstance(k, str) and re.fullmatch(r"0|[1-9][0-9]*", k) and int(k) in flagged
                and isinstance(v, str) for k, v in reasons.items()):
            raise DeepAlignError(f"{source}: 'flag_reasons' must map flagged slices to text")
        voxel, unit = data.get("voxel_size"), data.get("unit")
        if voxel is not None and not (
                isinstance(voxel, list) and len(voxel) == 3
                and all(_finite_number(v) and not isinstance(v, bool) and v > 0 for v in voxel)
                and isinstance(unit, str)):
            raise DeepAlignError(f"{source}: 'voxel_size' must be 3 numbers > 0 (z, y, x) "
                                 "with a 'unit'")
        options = data.get("options", {})
        if not isinstance(options, dict):
            raise DeepAlignError(f"{source}: 'options' must be an object")
        fields = None
        if data.get("fields"):
            fields = _open_fields(data["fields"], base, source, n, (output_shape[0],
                                                                   output_shape[1]))
        return cls(affines=affines, input_shape=(input_shape[0], input_shape[1], input_shape[2]),
                   output_shape=(output_shape[0], output_shape[1]),
                   flagged=[int(z) for z in flagged], residuals=residuals, options=options,
                   fields=fields, folding=folding,
                   notes={int(k): v for k, v in notes.items()},
                   flag_reasons={int(k): v for k, v in reasons.items()},
                   voxel_size=None if voxel is None else (float(voxel[0]), float(voxel[1]),
                                                          float(voxel[2])),
                   unit=None if voxel is None else unit)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TransformSet:
        """Read and check a transforms file (see :meth:`from_json`)."""
        path = Path(path)
        try:
            if path.stat().st_size > MAX_JSON_BYTES:
                raise DeepAlignError(f"{path}: {path.stat().st_size} bytes is too large for a "
                                     "transforms file; is it the right file?")
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise DeepAlignError(f"{path}: transforms file not found") from None
        except IsADirectoryError:
            raise DeepAlignError(f"{path}: is a folder, not a transforms file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DeepAlignError(f"{path}: not valid JSON ({exc})") from exc
        except RecursionError:
            raise DeepAlignError(f"{path}: JSON nested too deeply; not a transforms file"
                                 ) from None
        return cls.from_json(data, source=str(path), base=path.parent)


#: Largest transforms file read (a million slices is ~200 MB of JSON).
MAX_JSON_BYTES = 512 * 2**20
#: An output canvas may be at most this many times the input slice in each direction.
MAX_CANVAS_GROWTH = 16


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_list(v: Any, k: int, source: str, key: str) -> list[int]:
    if not isinstance(v, list) or len(v) != k or not all(_is_int(x) and x >= 1 for x in v):
        raise DeepAlignError(f"{source}: {key!r} must be a list of {k} positive integers, got "
                             f"{str(v)[:60]}")
    return [int(x) for x in v]


def _affines(v: Any, source: str) -> np.ndarray:
    ok = isinstance(v, list) and len(v) >= 1 and all(
        isinstance(a, list) and len(a) == 2 and all(
            isinstance(r, list) and len(r) == 3 and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in r)
            for r in a)
        for a in v)
    if not ok:
        raise DeepAlignError(f"{source}: 'affines' must be a list of 2x3 number matrices "
                             "([[a, b, tx], [c, d, ty]] per slice)")
    try:
        arr = np.asarray(v, np.float64)
    except OverflowError:  # (an integer too large for any float)
        raise DeepAlignError(f"{source}: 'affines' hold a number too large") from None
    if not np.isfinite(arr).all():
        z = int(np.nonzero(~np.isfinite(arr).all(axis=(1, 2)))[0][0])
        raise DeepAlignError(f"{source}: the affine of slice {z} holds NaN or infinity")
    det = arr[:, 0, 0] * arr[:, 1, 1] - arr[:, 0, 1] * arr[:, 1, 0]
    if (np.abs(det) < 1e-12).any():
        z = int(np.nonzero(np.abs(det) < 1e-12)[0][0])
        raise DeepAlignError(f"{source}: the affine of slice {z} is singular (it collapses the "
                             "slice to a line)")
    return arr


def _check_reach(affines: NDArray[np.float64], source: str) -> None:
    """Refuse a slice whose map scales by more than :data:`MAX_CANVAS_GROWTH` either way:
    no alignment makes one (an edited or foreign file does, and warping with it overflows)."""
    sv = np.linalg.svd(affines[:, :, :2], compute_uv=False)  # (n, 2), largest first
    bad = np.nonzero((sv[:, 0] > MAX_CANVAS_GROWTH) | (sv[:, 1] < 1 / MAX_CANVAS_GROWTH))[0]
    if bad.size:
        z = int(bad[0])
        raise DeepAlignError(f"{source}: the affine of slice {z} scales by "
                             f"{sv[z, 1]:.3g}-{sv[z, 0]:.3g}x, beyond 1/{MAX_CANVAS_GROWTH}-"
                             f"{MAX_CANVAS_GROWTH}x: not a transform of this stack")


def outside_slices(transforms: TransformSet) -> list[int]:
    """Slices whose map samples nothing of their input slice: the output frame's image lies
    wholly outside it, so the slice renders empty. An alignment that follows a strong drift
    on a frame fixed to the stack's mean (``--slow-drift follow``, ``canvas="reference"``)
    puts its end slices there; an edited file may too. (Judged by the bounding box of the
    frame's image: a turned map that misses the input only beyond a corner is not listed.)"""
    a = transforms.affines
    h, w = transforms.output_shape
    corners = np.array([[-0.5, -0.5], [w - 0.5, -0.5], [-0.5, h - 0.5], [w - 0.5, h - 0.5]])
    mapped = corners @ a[:, :, :2].transpose(0, 2, 1) + a[:, None, :, 2]
    lo, hi = mapped.min(axis=1), mapped.max(axis=1)  # (n, 2): x, y
    size = np.array([transforms.input_shape[2], transforms.input_shape[1]], np.float64)
    return [int(z) for z in np.nonzero(((hi < -0.5) | (lo > size - 0.5)).any(axis=1))[0]]


def _finite_number(x: float) -> bool:
    """Whether ``x`` is a finite float, or an integer a float holds."""
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


def _optional_floats(v: Any, n: int, source: str, key: str) -> list[float | None]:
    if v == []:
        return []
    if not isinstance(v, list) or len(v) != n or not all(
            x is None or (isinstance(x, (int, float)) and not isinstance(x, bool)
                          and _finite_number(x)) for x in v):
        raise DeepAlignError(f"{source}: {key!r} must list {n} finite numbers or nulls, one per "
                             "slice")
    return [None if x is None else float(x) for x in v]


def _check_output_size(out: list[int], inp: list[int], source: str) -> None:
    from .io import max_slice_pixels

    limit = max_slice_pixels()
    if out[0] * out[1] > limit or out[0] > MAX_CANVAS_GROWTH * max(inp[1:]) \
            or out[1] > MAX_CANVAS_GROWTH * max(inp[1:]):
        raise DeepAlignError(
            f"{source}: output_shape {out[0]} x {out[1]} is implausible for input slices of "
            f"{inp[1]} x {inp[2]} (limit: {MAX_CANVAS_GROWTH}x the input side and {limit} "
            "pixels); the file is corrupt or was edited")


def _open_fields(spec: Any, base: Path | None, source: str, n: int,
                 output_shape: tuple[int, int]) -> FieldStore:
    if not isinstance(spec, dict) or not isinstance(spec.get("path"), str) \
            or not _is_int(spec.get("stride")) or spec["stride"] < 1 \
            or spec.get("kind", "displacement") not in FIELD_KINDS:
        raise DeepAlignError(f"{source}: 'fields' must be {{\"path\": str, \"stride\": int >= 1, "
                             f"\"kind\": {' or '.join(FIELD_KINDS)}}}")
    folder = (base or Path(".")).resolve()
    rel = Path(spec["path"])
    target = (folder / rel).resolve()
    if rel.is_absolute() or not target.is_relative_to(folder) or target == folder:
        raise DeepAlignError(
            f"{source}: fields.path {spec['path']!r} points outside the transforms file's "
            f"folder; the field store must sit beside the transforms file")
    store = FieldStore.open(target)
    kind = spec.get("kind", "displacement")
    want = FieldStore.array_shape(n, output_shape, store.stride, kind)
    if tuple(store.shape) != want or store.stride != spec["stride"] \
            or store.output_shape != output_shape or store.kind != kind:
        raise DeepAlignError(
            f"{target}: the field store holds {store.kind} fields of shape "
            f"{tuple(store.shape)} (stride {store.stride}), but the transforms need {kind} "
            f"fields of shape {want} (stride {spec['stride']}) for {n} slices of "
            f"{output_shape[0]} x {output_shape[1]}")
    if isinstance(spec.get("run"), str) and store.run is not None and store.run != spec["run"]:
        raise DeepAlignError(f"{target}: the field store was written by another run than "
                             f"{source}; align again to write both together")
    return store


class FieldStore:
    """Per-slice fields on a coarse grid, in a Zarr array (see module docstring): displacements
    (``kind="displacement"``, float16) or per-pixel affines (``kind="affine"``, float64).

    Written slice by slice into ``PATH.partial`` and renamed by :meth:`commit`, so a crash never
    leaves a half-written store under the final name. Memory does not grow with the stack.
    """

    def __init__(self, path: Path, array: Any, stride: int, output_shape: tuple[int, int],
                 kind: str = "displacement", run: str | None = None) -> None:
        self.path = path
        self._array = array
        self.stride = stride
        self.output_shape = output_shape
        self.kind = kind
        # A token of the run that wrote the store, also in its transforms file: a store of
        # another run of the same shape put in its place is refused (None: older stores).
        self.run = run

    @staticmethod
    def grid_shape(output_shape: tuple[int, int], stride: int,
                   kind: str = "displacement") -> tuple[int, int]:
        """Grid rows and columns: every ``stride`` output pixels, and (affine fields) one
        more node past the last pixel when ``stride`` does not divide the size."""
        if kind == "affine":  # the expected-affine kernel's own grid
            from . import _core

            return (_core.grid_size(output_shape[0], stride),
                    _core.grid_size(output_shape[1], stride))
        return (output_shape[0] - 1) // stride + 1, (output_shape[1] - 1) // stride + 1

    @classmethod
    def array_shape(cls, n: int, output_shape: tuple[int, int], stride: int,
                    kind: str) -> tuple[int, int, int, int]:
        rows, cols = cls.grid_shape(output_shape, stride, kind)
        return (n, 6 if kind == "affine" else 2, rows, cols)

    @classmethod
    def create(cls, path: str | os.PathLike[str], n: int, output_shape: tuple[int, int],
               stride: int = 4, kind: str = "displacement") -> FieldStore:
        import zarr

        if stride < 1:
            raise DeepAlignError(f"field stride must be >= 1, got {stride}")
        if kind not in FIELD_KINDS:
            raise ValueError(f"kind must be one of {', '.join(FIELD_KINDS)}; got {kind!r}")
        path = Path(path)
        from .outputs import STORE_MARK, partial_path_for, store_mark, store_problem

        partial = partial_path_for(path)
        if os.path.lexists(partial):  # a store of an earlier run is started again; else refused
            why = store_problem(partial, unfinished=True)
            if why is not None:
                raise DeepAlignError(f"{partial}: {why}, so it is not an unfinished field "
                                     "store of this tool; remove it or choose another name.")
        shape = cls.array_shape(n, output_shape, stride, kind)
        run = secrets.token_hex(8)
        # The attributes (this tool's mark among them) go into the array's first metadata.
        arr = zarr.open_array(str(partial), mode="w", shape=shape, chunks=(1, *shape[1:]),
                              dtype="f8" if kind == "affine" else "f2",
                              fill_value=float("nan"),
                              attributes={"stride": stride, "output_shape": list(output_shape),
                                          "kind": kind, "run": run, STORE_MARK: store_mark()})
        return cls(partial, arr, stride, output_shape, kind, run)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> FieldStore:
        import zarr

        path = Path(path)
        if not path.exists():
            raise DeepAlignError(f"{path}: field store not found (it is written next to the "
                                 "transforms file by `align --mode elastic` or "
                                 "`--mode expected-affine`)")
        try:
            arr = zarr.open_array(str(path), mode="r")
            attrs: dict[str, Any] = dict(arr.attrs)
            shape = [int(v) for v in attrs["output_shape"]]
            stride = int(attrs["stride"])
            kind = str(attrs.get("kind", "displacement"))
            run = attrs.get("run")
        except Exception as exc:  # zarr raises many types for a damaged store
            raise DeepAlignError(f"{path}: not a readable displacement-field store "
                                 f"({type(exc).__name__}: {exc})") from exc
        if len(arr.shape) != 4 or len(shape) != 2 or kind not in FIELD_KINDS:
            raise DeepAlignError(f"{path}: field store of kind {kind!r} has shape {arr.shape}; "
                                 "expected (slices, 2 or 6, rows, cols)")
        return cls(path, arr, stride, (shape[0], shape[1]), kind,
                   run if isinstance(run, str) else None)

    @property
    def shape(self) -> tuple[int, ...]:
        """``(n, 2, rows, cols)`` of the stored grid."""
        return tuple(int(v) for v in self._array.shape)

    def put(self, z: int, displacement: np.ndarray | None) -> None:
        """Store slice ``z``'s full-resolution displacement (None: the slice has none)."""
        if displacement is None:
            return
        s = self.stride
        self._array[z] = displacement[:, ::s, ::s].astype(np.float16)

    def put_affine(self, z: int, field: np.ndarray) -> None:
        """Store slice ``z``'s per-pixel affine field (``(rows, cols, 2, 3)`` on the grid)."""
        f = np.asarray(field, np.float64)
        want = self.array_shape(1, self.output_shape, self.stride, "affine")[2:]
        if self.kind != "affine" or f.shape != (*want, 2, 3):
            raise ValueError(f"field: expected a {(*want, 2, 3)} affine field for a store of "
                             f"kind {self.kind!r}, got {f.shape}")
        self._array[z] = f.reshape(want[0], want[1], 6).transpose(2, 0, 1)

    def _read(self, z: int, dtype: Any) -> np.ndarray:
        """Slice ``z``'s stored grid; a store that cannot be read names itself and the
        slice."""
        try:
            return np.asarray(self._array[z], dtype)
        except Exception as exc:  # zarr and its codecs raise many types for a damaged chunk
            raise DeepAlignError(f"{self.path}: slice {z}: cannot read its field "
                                 f"({type(exc).__name__}: {exc})") from exc

    def _checked(self, z: int, grid: np.ndarray, limits: np.ndarray) -> bool:
        """Whether slice ``z`` has a field (all NaN, the store's fill: none); one that is
        partly NaN, infinite, or beyond ``limits`` (per stored component, broadcast over the
        grid) was damaged or edited since it was written (it would render the slice empty)."""
        nan = np.isnan(grid)
        if nan.all():
            return False
        if nan.any() or not np.isfinite(grid).all() or \
                (np.abs(grid) > limits.reshape(-1, 1, 1)).any():
            raise DeepAlignError(f"{self.path}: slice {z}: its field holds non-finite values or "
                                 "values beyond the output frame, which no alignment writes "
                                 "(the store was changed or damaged since); align again to "
                                 "rewrite it")
        return True

    def get_affine(self, z: int) -> np.ndarray | None:
        """Slice ``z``'s per-pixel affine field ``(rows, cols, 2, 3)``, or None if it has none."""
        grid = self._read(z, np.float64)
        size = float(max(self.output_shape))
        if not self._checked(z, grid, np.array([16, 16, 16 * size] * 2)):  # (a, b, tx, c, d, ty)
            return None
        rows, cols = grid.shape[1:]
        return np.ascontiguousarray(grid.transpose(1, 2, 0).reshape(rows, cols, 2, 3))

    def get(self, z: int, *, num_threads: int = 0) -> np.ndarray | None:
        """Slice ``z``'s field at full output resolution, or None if it has none."""
        from .warp import warp_affine

        grid = self._read(z, np.float32)
        if not self._checked(z, grid, np.full(2, float(max(self.output_shape)))):
            return None
        s = float(self.stride)
        up = np.array([[1.0 / s, 0.0, 0.0], [0.0, 1.0 / s, 0.0]])
        return np.stack([warp_affine(np.ascontiguousarray(c), up, self.output_shape,
                                     border="replicate", num_threads=num_threads)
                         for c in grid])

    def commit(self, path: str | os.PathLike[str]) -> None:
        """Move the finished store to ``path``, replacing an older one only when this tool
        wrote it (:func:`deepalign_fast.outputs.store_problem`)."""
        from .outputs import replace_store, store_problem

        final = Path(path)
        if os.path.lexists(final):
            why = store_problem(final)
            if why is not None:
                raise DeepAlignError(f"{final}: exists and {why}; only a field store written "
                                     "by deepalign-fast is replaced. Remove it yourself or "
                                     "choose another name.")
        replace_store(self.path, final)
        self.path = final
        # The open array still points at the old (moved) location: reopen it, so the store
        # in memory reads what is on disk (the QC report draws from it).
        import zarr

        self._array = zarr.open_array(str(final), mode="r")


def itk_files(transforms: TransformSet, *, pixel_size: float = 1.0) -> dict[str, str]:
    """The ITK transform file of each slice, name (``slice_0000.tfm``, ...) -> text: an
    ``AffineTransform_double_2_2`` in ITK's text format (see :func:`export_itk`)."""
    if not (math.isfinite(pixel_size) and pixel_size > 0):
        raise ValueError(f"pixel_size must be a finite number > 0, got {pixel_size}")
    width = max(4, len(str(len(transforms) - 1)))
    files = {}
    for z, a in enumerate(transforms.affines):
        params = " ".join(repr(float(v)) for v in (a[0, 0], a[0, 1], a[1, 0], a[1, 1],
                                                    a[0, 2] * pixel_size,
                                                    a[1, 2] * pixel_size))
        files[f"slice_{z:0{width}d}.tfm"] = (
            "#Insight Transform File V1.0\n#Transform 0\n"
            "Transform: AffineTransform_double_2_2\n"
            f"Parameters: {params}\nFixedParameters: 0 0\n")
    return files


def export_itk(transforms: TransformSet, folder: str | os.PathLike[str], *,
               pixel_size: float = 1.0) -> list[Path]:
    """Write one ITK transform file per slice: ``FOLDER/slice_0000.tfm``, ...

    Each is an ``AffineTransform_double_2_2`` in ITK's text format (read by ITK/SimpleITK,
    3D Slicer, ANTs, elastix's ITK interface). ITK, like this package, maps output (fixed)
    points to input (moving) points, and pixel ``(i, j)`` at spacing 1 and origin 0 sits at
    physical ``(i, j)``, the centre-of-pixel convention used here, so the matrices are written
    as they are: ``Parameters: a b c d tx ty`` with center 0. ITK applies a transform in
    physical coordinates: for images whose spacing is ``pixel_size`` (square pixels, origin
    0) the translation is scaled by it (the matrix is unchanged). Files are written
    atomically; one that already holds exactly its text (a killed export's, rerun) is left
    as it is.
    """
    from .outputs import write_atomic

    files = itk_files(transforms, pixel_size=pixel_size)
    out = Path(folder)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DeepAlignError(f"{out}: cannot create the folder: {exc.strerror or exc}") from None
    written = []
    for name, text in files.items():
        path = out / name
        if not holds_text(path, text):
            write_atomic(path, text, doing="cannot write the ITK transform file")
        written.append(path)
    return written


def holds_text(path: str | os.PathLike[str], text: str) -> bool:
    """Whether the regular file ``path`` (not a symbolic link) holds exactly ``text``."""
    p = Path(path)
    try:
        if p.is_symlink() or not p.is_file() or p.stat().st_size != len(text.encode()):
            return False
        return p.read_text(encoding="utf-8") == text
    except (OSError, UnicodeDecodeError):
        return False
