"""What every matcher gives the solve: correspondences between two slices.

A :class:`MatchBackend` prepares each slice once (pyramids, keypoints, feature maps) and
matches prepared pairs; it returns the reference -> moving affine and the
:class:`Correspondences` behind it. Coordinates are ``(x, y)`` pixels of the slice they lie
in, origin at the centre of the top-left pixel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

__all__ = ["Correspondences", "MatchBackend", "turned_start"]


@dataclass(frozen=True)
class Correspondences:
    """Point pairs: ``src[i]`` in the reference slice matches ``dst[i]`` in the moving slice."""

    src: np.ndarray  # (N, 2) float64, (x, y) in reference-slice pixels
    dst: np.ndarray  # (N, 2) float64, (x, y) in moving-slice pixels
    weights: np.ndarray  # (N,) float64 in (0, 1]
    # Median correlation of all the textured blocks of the pair once aligned (inliers or not,
    # however weak): how alike the two slices are; NaN where the back-end does not measure it.
    correlation: float = float("nan")

    def __len__(self) -> int:
        return int(self.src.shape[0])

    @staticmethod
    def empty() -> Correspondences:
        z = np.zeros((0, 2), np.float64)
        return Correspondences(z, z.copy(), np.zeros(0, np.float64))


def turned_start(degrees: float) -> np.ndarray:
    """The ``init`` of a match that predicts only a turn by ``degrees`` (its translation NaN:
    the back-end searches it, see :class:`MatchBackend`)."""
    t = np.deg2rad(degrees)
    return np.array([[np.cos(t), -np.sin(t), np.nan], [np.sin(t), np.cos(t), np.nan]])


class MatchBackend(Protocol):
    """Per-slice preparation and pairwise matching.

    ``match(ref, mov, init)`` returns the reference -> moving affine (None when the pair
    cannot be registered) and the inlier correspondences; ``init`` is a prediction of that
    affine, which lets the back-end skip its coarse search. An ``init`` whose translation is
    NaN predicts only the linear part (a turned start): the back-end searches the
    translation as from scratch (a keypoint back-end, which needs no start, ignores it).
    """

    def prepare(self, image: np.ndarray) -> Any: ...

    def match(self, ref: Any, mov: Any, init: np.ndarray | None = None
              ) -> tuple[np.ndarray | None, Correspondences]: ...
