"""Refinements in z order, and the slices next to the one refined."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

__all__ = ["TOWARD_NEIGHBOURS", "InOrder", "Neighbours"]

#: How far a refined slice moves toward the mean of its two neighbours (1 = onto it): for
#: independent deformations d of equal size, (1 - f) d_z + f (d_{z-1} + d_{z+1}) / 2 is
#: least at 2/3 (it leaves 0.58 of each, rms, against 0.61 half way and 0.71 the full way).
TOWARD_NEIGHBOURS = 2.0 / 3.0


@dataclass(frozen=True)
class Neighbours:
    """The slices a refinement may compare slice z with: ``usable(k)`` says whether slice k
    exists and may serve (not flagged, not blank), ``read(k)`` returns its input image and
    its affine (called only when the refiner has not rendered slice k already)."""

    usable: Callable[[int], bool]
    read: Callable[[int], tuple[np.ndarray, np.ndarray]]


class InOrder:
    """Lets calls for z = 0, 1, 2, ... run one at a time in z order, whatever thread makes
    them (the render pool prefetches slices on two threads; a refinement reuses what its
    predecessor computed for the pair of slices they share)."""

    def __init__(self) -> None:
        self._next = 0
        self._cond = threading.Condition()

    @contextmanager
    def turn(self, z: int) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: self._next == z)
        try:
            yield
        finally:
            with self._cond:
                self._next = z + 1
                self._cond.notify_all()
