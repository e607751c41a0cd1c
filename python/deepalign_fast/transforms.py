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

__all__ = ["SCHEMA", "TransformSet"]

SCHEMA = "deepalign-fast/transforms"
VERSION = 1
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

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "version": VERSION,
            "convention": CONVENTION,
            "input_shape": [int(v) for v in self.input_shape],
            "output_shape": [int(v) for v in self.output_shape],
            "affines": self.affines.tolist(),
            "flagged": [int(z) for z in self.flagged],
            "residuals": [None if r is None else float(r) for r in self.residuals],
            "options": self.options,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically (temp file in the same folder, then rename)."""
        path = Path(path)
        text = json.dumps(self.to_json(), indent=1)
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
    def from_json(cls, data: dict[str, Any], *, source: str = "transforms") -> TransformSet:
        if data.get("schema") != SCHEMA:
            raise DeepAlignError(f"{source}: not a deepalign-fast transforms file "
                                 f"(schema {data.get('schema')!r})")
        if data.get("version") != VERSION:
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
        return cls.from_json(data, source=str(path))
