"""Strict z order for work that depends on the previous slice's result."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


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
