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

``affines[z]`` maps OUTPUT (aligned canvas) pixel coordinates ``(x, y, 1)`` to pixel
coordinates of INPUT slice ``z`` (the pull map a warp samples with); pixel centres are at
integer coordinates, origin at the centre of the top-left pixel. To carry the alignment to a
copy at a different resolution, scale the affines (``TransformSet.rescaled``).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._errors import DeepAlignError

__all__ = ["SCHEMA", "FieldStore", "TransformSet"]

SCHEMA = "deepalign-fast/transforms"
VERSION = 2  # written when fields are present; version 1 otherwise
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

    def __post_init__(self) -> None:
        self.affines = np.asarray(self.affines, np.float64)
        if self.affines.ndim != 3 or self.affines.shape[1:] != (2, 3):
            raise DeepAlignError(f"affines must have shape (n, 2, 3), got {self.affines.shape}")
        if not np.isfinite(self.affines).all():
            raise DeepAlignError("affines contain NaN or inf")

    def __len__(self) -> int:
        return int(self.affines.shape[0])

    def rescaled(self, factor: float,
                 input_shape: tuple[int, int, int] | None = None) -> TransformSet:
        """The same alignment for a copy whose pixels are ``1/factor`` as large (factor 2 = 2x
        finer), e.g. to apply transforms found on a binned stack to the full-resolution one."""
        if self.fields is not None:
            raise DeepAlignError("rescaling transforms that carry displacement fields is not "
                                 "supported yet: align the full-resolution stack instead")
        off = (factor - 1.0) / 2.0
        s = np.array([[factor, 0.0, off], [0.0, factor, off], [0.0, 0.0, 1.0]])
        s_inv = np.linalg.inv(s)
        full = np.concatenate([self.affines, np.tile([[[0.0, 0.0, 1.0]]], (len(self), 1, 1))], 1)
        scaled = (s @ full @ s_inv)[:, :2]
        h, w = self.output_shape
        shape = input_shape or (self.input_shape[0], round(self.input_shape[1] * factor),
                                round(self.input_shape[2] * factor))
        return TransformSet(scaled, shape, (round(h * factor), round(w * factor)),
                            list(self.flagged), list(self.residuals), dict(self.options))

    def to_json(self, base: Path | None = None) -> dict[str, Any]:
        """JSON form; ``base`` is the folder the file goes to (field paths are stored relative
        to it)."""
        data: dict[str, Any] = {
            "schema": SCHEMA,
            "version": 2 if self.fields is not None else 1,
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
            data["fields"] = {"path": rel, "stride": self.fields.stride}
            data["folding"] = [None if f is None else float(f) for f in self.folding]
        return data

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically (temp file in the same folder, then rename)."""
        path = Path(path)
        text = json.dumps(self.to_json(path.parent), indent=1)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial",
                                   dir=path.parent or ".")
        try:
            os.chmod(tmp, 0o666 & ~_umask())
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def from_json(cls, data: dict[str, Any], *, source: str = "transforms",
                  base: Path | None = None) -> TransformSet:
        if data.get("schema") != SCHEMA:
            raise DeepAlignError(f"{source}: not a deepalign-fast transforms file "
                                 f"(schema {data.get('schema')!r})")
        if data.get("version") not in (1, VERSION):
            raise DeepAlignError(f"{source}: unsupported transforms version {data.get('version')!r}"
                                 f" (this build reads version {VERSION})")
        try:
            return cls(
                affines=np.asarray(data["affines"], np.float64),
                input_shape=tuple(int(v) for v in data["input_shape"]),  # type: ignore[arg-type]
                output_shape=tuple(int(v) for v in data["output_shape"]),  # type: ignore[arg-type]
                flagged=[int(z) for z in data.get("flagged", [])],
                residuals=list(data.get("residuals", [])),
                options=dict(data.get("options", {})),
                fields=(FieldStore.open((base or Path(".")) / data["fields"]["path"])
                        if data.get("fields") else None),
                folding=list(data.get("folding", [])),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DeepAlignError(f"{source}: malformed transforms file: {exc}") from exc

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TransformSet:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise DeepAlignError(f"{path}: transforms file not found") from None
        except json.JSONDecodeError as exc:
            raise DeepAlignError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_json(data, source=str(path), base=path.parent)


class FieldStore:
    """Per-slice displacement fields on a coarse grid, in a Zarr array (see module docstring).

    Written slice by slice into ``PATH.partial`` and renamed by :meth:`commit`, so a crash never
    leaves a half-written store under the final name. Memory does not grow with the stack.
    """

    def __init__(self, path: Path, array: Any, stride: int, output_shape: tuple[int, int]) -> None:
        self.path = path
        self._array = array
        self.stride = stride
        self.output_shape = output_shape

    @staticmethod
    def grid_shape(output_shape: tuple[int, int], stride: int) -> tuple[int, int]:
        return (output_shape[0] - 1) // stride + 1, (output_shape[1] - 1) // stride + 1

    @classmethod
    def create(cls, path: str | os.PathLike[str], n: int, output_shape: tuple[int, int],
               stride: int = 4) -> FieldStore:
        import zarr

        if stride < 1:
            raise DeepAlignError(f"field stride must be >= 1, got {stride}")
        path = Path(path)
        partial = path.with_name(path.name + ".partial")
        rows, cols = cls.grid_shape(output_shape, stride)
        arr = zarr.open_array(str(partial), mode="w", shape=(n, 2, rows, cols),
                              chunks=(1, 2, rows, cols), dtype="f2", fill_value=float("nan"))
        arr.attrs["stride"] = stride
        arr.attrs["output_shape"] = list(output_shape)
        return cls(partial, arr, stride, output_shape)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> FieldStore:
        import zarr

        path = Path(path)
        if not path.exists():
            raise DeepAlignError(f"{path}: displacement-field store not found (it is written "
                                 "next to the transforms file by `align --mode elastic`)")
        arr = zarr.open_array(str(path), mode="r")
        attrs: dict[str, Any] = dict(arr.attrs)
        shape = [int(v) for v in attrs["output_shape"]]
        return cls(path, arr, int(attrs["stride"]), (shape[0], shape[1]))

    def put(self, z: int, displacement: np.ndarray | None) -> None:
        """Store slice ``z``'s full-resolution field (None: the slice has no field)."""
        if displacement is None:
            return
        s = self.stride
        self._array[z] = displacement[:, ::s, ::s].astype(np.float16)

    def get(self, z: int, *, num_threads: int = 0) -> np.ndarray | None:
        """Slice ``z``'s field at full output resolution, or None if it has none."""
        from .warp import warp_affine

        grid = np.asarray(self._array[z], np.float32)
        if np.isnan(grid).any():
            return None
        s = float(self.stride)
        up = np.array([[1.0 / s, 0.0, 0.0], [0.0, 1.0 / s, 0.0]])
        return np.stack([warp_affine(np.ascontiguousarray(c), up, self.output_shape,
                                     border="replicate", num_threads=num_threads)
                         for c in grid])

    def commit(self, path: str | os.PathLike[str]) -> None:
        """Move the finished store to ``path`` (replacing an older one)."""
        import shutil

        final = Path(path)
        if final.exists():
            shutil.rmtree(final)
        os.replace(self.path, final)
        self.path = final
