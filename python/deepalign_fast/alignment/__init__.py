"""The alignment itself: options, pairwise matching, the global solve, the Aligner.

``options`` (:class:`AlignOptions`), ``matcher`` (:class:`StackMatcher`: each slice with its
predecessors), ``solve`` (one global robust solve and the slow-drift choice), ``aligner``
(:class:`Aligner`: estimate, render, stream), ``applying`` (:func:`apply_transforms`: an
earlier alignment's transforms applied to another stack), ``distributed`` (the same on a
Dask cluster).
"""
from __future__ import annotations

from .aligner import Aligner, AlignResult
from .applying import apply_transforms
from .matcher import StackMatcher
from .options import AlignOptions

__all__ = ["AlignOptions", "AlignResult", "Aligner", "StackMatcher", "apply_transforms"]
