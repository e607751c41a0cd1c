"""Strict z order for work that depends on the previous slice's result, and the slices next
to the one refined."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ..render import SliceMap

__all__ = ["InOrder", "Neighbours", "SequentialRefiner"]


@dataclass(frozen=True)
class Neighbours:
    """The slices a refinement may compare slice z with: ``usable(k)`` says whether slice k
    exists and may serve (not flagged, not blank), ``read(k)`` returns its input image and
    its affine (called only when the refiner has not rendered slice k already)."""

    usable: Callable[[int], bool]
    read: Callable[[int], tuple[np.ndarray, np.ndarray]]


class InOrder:
    """Lets calls for z = 0, 1, 2, ... run one at a time in z order, whatever thread makes
    them (the render pool prefetches slices on two threads; refinements against the previous
    output slice must still run in sequence)."""

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


class SequentialRefiner:
    """Base of the refiners that register each slice onto the previous *output* slice: calls
    run in z order (:class:`InOrder`) and the output of each becomes ``previous`` for the
    next. Subclasses implement ``refine(z, image, affine) -> (SliceMap, rendered)``."""

    def __init__(self) -> None:
        self.previous: np.ndarray | None = None
        self._order = InOrder()

    def __call__(self, z: int, image: np.ndarray, affine: np.ndarray,
                 neighbours: Neighbours | None = None) -> tuple[SliceMap, np.ndarray]:
        """``neighbours`` is not used: these refiners follow the previous output."""
        with self._order.turn(z):
            slice_map, out = self.refine(z, image, np.asarray(affine, np.float64))
            self.previous = out
            return slice_map, out

    def refine(self, z: int, image: np.ndarray, affine: np.ndarray
               ) -> tuple[SliceMap, np.ndarray]:
        raise NotImplementedError
