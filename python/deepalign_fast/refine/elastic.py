"""Elastic refinement of a stack render (``align --mode elastic``).

After the affine solve, each slice is rendered with its affine, and the learned flow network
(:class:`deepalign_fast.refine.flow.FlowPredictor`) registers it onto its two neighbours'
affine renders, the slice before and the slice after. The slice then moves **two thirds of
the way toward the mean of the two** (``TOWARD_NEIGHBOURS``): its field is that fraction of
the mean of the two flows, less their affine part (the solve's job), and the slice is
rendered once with the pull map ``p -> A_z(p + u_z(p))``
(:func:`deepalign_fast.warp_displacement`). The first and the last slice, and a slice next
to a flagged one, use the one neighbour they have; a slice with none keeps its affine.

Each field depends only on the input slices z - 1, z and z + 1, never on an earlier output,
so nothing is carried down the stack. (Before, each slice was registered onto the previous
*output* slice: each took on its predecessor's deformation. Aligned lucchi crops moved by
1.5-1.7 px, and crops with an independent deformation on every slice came out 1.2-1.6 px
from the clean slices, against 0.6-0.7 now and 0.8-1.0 for the affine mode; see
benchmarks/RESULTS.md, "Elastic refinement toward both neighbours".) For independent
per-slice deformations of equal size, two thirds of the way leaves the least of them: 0.58
of a slice's own deformation (rms), against 0.61 half way and 0.71 the full way. The flow of
a pair serves both of its slices (the second one takes its negative), so a stack costs one
flow per slice as before.

Folding control: the fraction of non-positive Jacobian determinants of ``u_z`` must stay at
or below ``max_folding`` (default 0.1 %). A field that folds more is scaled down (by halves,
at most three times); if it still folds, the slice keeps its plain affine and is listed in
``failed`` (flagged "unrefined"). A flow with NaN or infinite values (a broken model or
input) is never applied: both slices of that pair keep their affine renders and are listed
in ``failed`` too. Calls come in z order (:class:`~deepalign_fast.refine.order.InOrder`: the
flows of a pair are shared between consecutive calls).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..fields import nonpositive_jacobian_fraction, without_affine_part
from ..render import SliceMap, render_slice
from .order import TOWARD_NEIGHBOURS, InOrder, Neighbours

__all__ = ["TOWARD_NEIGHBOURS", "ElasticRefiner"]


class ElasticRefiner:
    """Per-slice flow refinement toward both neighbours, with folding control (see the
    module docstring).

    Called as ``refiner(z, image, affine, neighbours)`` for z = 0, 1, 2, ... in order (from
    any thread); ``neighbours`` gives the slices next to z (:class:`Neighbours`); without it
    the slice keeps its affine.

    Parameters
    ----------
    shape : (int, int)
        Output frame.
    store : FieldStore, optional
        Where each slice's field is kept (so ``apply`` can reproduce the render).
    provider, num_threads :
        Passed to :class:`~deepalign_fast.refine.flow.FlowPredictor`.
    max_folding : float
        Largest accepted fraction of non-positive Jacobian determinants.
    """

    def __init__(self, shape: tuple[int, int], *, store: Any | None = None,
                 provider: str = "cpu", num_threads: int = 0,
                 max_folding: float = 0.001) -> None:
        from .flow import FlowPredictor

        self.shape = shape
        self.store = store
        self.num_threads = num_threads
        self.max_folding = max_folding
        self.predictor = FlowPredictor(provider=provider, num_threads=num_threads)
        self.folding: list[float | None] = []
        self.notes: dict[int, str] = {}
        self.failed: list[int] = []
        self._order = InOrder()
        # affine renders by slice: (affine, render); flows by pair (moving, fixed)
        self._renders: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._flows: dict[tuple[int, int], np.ndarray] = {}

    def __call__(self, z: int, image: np.ndarray, affine: np.ndarray,
                 neighbours: Neighbours | None = None, *,
                 flagged: bool = False) -> tuple[SliceMap, np.ndarray]:
        if flagged:  # placed from its neighbours: the flow could pull it anywhere
            neighbours = None
        with self._order.turn(z):
            slice_map, out, fold = self._refine(z, image, np.asarray(affine, np.float64),
                                                neighbours)
            self.folding.append(fold)
            # what the next slice can use: its own render and the pair (z, z + 1)'s flow
            self._renders = {k: v for k, v in self._renders.items() if k >= z}
            self._flows = {k: v for k, v in self._flows.items() if k == (z, z + 1)}
            return slice_map, out

    def close(self) -> None:
        """Nothing to release (the flow network is freed with the refiner)."""

    def _render(self, z: int, image: np.ndarray, affine: np.ndarray) -> np.ndarray:
        kept = self._renders.get(z)
        if kept is not None and np.array_equal(kept[0], affine):
            return kept[1]
        out = render_slice(image, SliceMap(affine), self.shape, num_threads=self.num_threads)
        self._renders[z] = (affine, out)
        return out

    def _flow(self, moving: int, fixed: int, base: np.ndarray,
              neighbours: Neighbours) -> np.ndarray:
        """The flow registering slice ``moving`` (rendered: ``base``) onto slice ``fixed``."""
        reverse = self._flows.get((fixed, moving))
        if reverse is not None:  # the pair's flow the other way, from the previous call
            return -reverse
        kept = self._renders.get(fixed)  # the previous slice's own render, or the next one's
        if kept is not None:
            other = kept[1]
        else:
            image, affine = neighbours.read(fixed)
            other = self._render(fixed, np.asarray(image), np.asarray(affine, np.float64))
        u = self.predictor.predict(other.astype(np.float32), base.astype(np.float32))
        self._flows[(moving, fixed)] = u
        return u

    def _refine(self, z: int, image: np.ndarray, affine: np.ndarray,
                neighbours: Neighbours | None
                ) -> tuple[SliceMap, np.ndarray, float | None]:
        plain_map = SliceMap(affine)
        base = self._render(z, image, affine)
        if neighbours is None:
            return plain_map, base, None
        sides = [k for k in (z - 1, z + 1) if neighbours.usable(k)]
        if not sides:
            return plain_map, base, None
        flows = [self._flow(z, k, base, neighbours) for k in sides]
        if not all(np.isfinite(u).all() for u in flows):
            self.notes[z] = "flow holds NaN or infinite values: kept the affine"
            self.failed.append(z)
            return plain_map, base, None
        u = TOWARD_NEIGHBOURS * (flows[0] if len(flows) == 1 else 0.5 * (flows[0] + flows[1]))
        # Only what no affine describes: the affine part is the solve's
        u = without_affine_part(u)
        fold = nonpositive_jacobian_fraction(u, num_threads=self.num_threads)
        scale = 1.0
        while fold > self.max_folding and scale > 0.125:
            scale *= 0.5
            fold = nonpositive_jacobian_fraction(u * scale, num_threads=self.num_threads)
        if fold > self.max_folding:
            self.notes[z] = (f"flow folds {100 * fold:.3f} % even at 1/8 strength: "
                             "kept the affine")
            # flagged "unrefined"; no folding recorded: a slice with a folding value has a
            # field in the store (TransformSet.slice_map), and this one has none
            self.failed.append(z)
            return plain_map, base, None
        if scale < 1.0:
            self.notes[z] = f"flow scaled by {scale:g} to keep folding <= {self.max_folding:g}"
            u = u * scale
        u = np.ascontiguousarray(u, np.float32)
        if self.store is not None:
            # Render with exactly what is stored (coarse grid, float16), so that `apply`
            # reproduces this render and labels follow the identical deformation.
            self.store.put(z, u)
            stored = self.store.get(z, num_threads=self.num_threads)
            if stored is not None:
                u = stored
                fold = nonpositive_jacobian_fraction(u, num_threads=self.num_threads)
        slice_map = SliceMap(affine, displacement=u)
        return slice_map, render_slice(image, slice_map, self.shape,
                                       num_threads=self.num_threads), fold
