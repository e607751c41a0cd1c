"""The known misalignment of a synthetic stack (written by the generator, read by the
metrics)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from .._errors import DeepAlignError

__all__ = ["GroundTruth"]


@dataclass
class GroundTruth:
    """Known misalignment of a synthetic stack.

    Attributes
    ----------
    transforms : ndarray, shape (n, 2, 3), float64
        ``transforms[z]`` maps pixel coordinates of MISALIGNED slice ``z`` to coordinates of the
        CLEAN slice ``z`` (pull map used to render the misaligned slice from the clean one).
    shape : tuple of int
        ``(h, w)`` of the misaligned slices.
    clean_shape : tuple of int
        ``(h, w)`` of the clean slices.
    profile : str
        Name of the profile that generated the transforms (``"custom"`` if given explicitly).
    params : dict
        Profile parameters used.
    margin : int
        Crop margin (pixels on every side) between the clean and the misaligned frame.
    seed : int or None
        Seed used, when known.
    """

    transforms: NDArray[np.float64]
    shape: tuple[int, int]
    clean_shape: tuple[int, int]
    profile: str = "custom"
    params: dict[str, float] = field(default_factory=dict)
    margin: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        t = np.asarray(self.transforms, dtype=np.float64)
        if t.ndim != 3 or t.shape[1:] != (2, 3):
            raise DeepAlignError(f"ground-truth transforms must be (n, 2, 3), got {t.shape}")
        self.transforms = t
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        self.clean_shape = (int(self.clean_shape[0]), int(self.clean_shape[1]))

    def __len__(self) -> int:
        return int(self.transforms.shape[0])

    def to_json(self) -> str:
        """Serialise to a JSON string (states the transform convention)."""
        return json.dumps(
            {
                "format": "deepalign-fast ground truth",
                "version": 1,
                "convention": (
                    "transforms[z] is a 2x3 affine [[a,b,tx],[c,d,ty]] acting on (x, y, 1); it "
                    "maps pixel coords of MISALIGNED slice z to coords of the CLEAN slice z; "
                    "origin at the centre of the top-left pixel"
                ),
                "shape": list(self.shape),
                "clean_shape": list(self.clean_shape),
                "profile": self.profile,
                "params": self.params,
                "margin": self.margin,
                "seed": self.seed,
                "transforms": self.transforms.tolist(),
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> GroundTruth:
        """Inverse of :meth:`to_json`."""
        try:
            d = json.loads(text)
            if not isinstance(d, dict):
                raise TypeError(f"expected an object, got a {type(d).__name__}")
            transforms = np.asarray(d["transforms"], dtype=np.float64)
            if transforms.ndim != 3 or transforms.shape[1:] != (2, 3):
                raise ValueError(f"'transforms' must be 2x3 affines, got shape "
                                 f"{transforms.shape}")
            bad = np.nonzero(~np.isfinite(transforms).all(axis=(1, 2)))[0]
            if bad.size:
                raise ValueError(f"the transform of slice {int(bad[0])} holds NaN or infinity")
            return cls(
                transforms=transforms,
                shape=tuple(d["shape"]),
                clean_shape=tuple(d["clean_shape"]),
                profile=str(d.get("profile", "custom")),
                params={k: float(v) for k, v in d.get("params", {}).items()},
                margin=int(d.get("margin", 0)),
                seed=d.get("seed"),
            )
        except KeyError as exc:
            raise DeepAlignError(f"not a valid ground-truth JSON: no {exc} key") from exc
        except (TypeError, ValueError, AttributeError) as exc:
            raise DeepAlignError(f"not a valid ground-truth JSON: {exc}") from exc
