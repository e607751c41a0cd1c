"""Elastic refinement of a stack render (``align --mode elastic``).

After the affine solve, each slice is rendered with its affine and registered onto the
previous *output* slice by the learned flow network
(:class:`deepalign_fast.refine.flow.FlowPredictor`); the slice is then rendered once with
the pull map ``p -> A_z(p + u_z(p))`` (:func:`deepalign_fast.warp_displacement`).

Folding control: the fraction of non-positive Jacobian determinants of ``u_z`` must stay at
or below ``max_folding`` (default 0.1 %). A field that folds more is scaled down (by halves,
at most three times); if it still folds, the slice keeps its plain affine and is listed in
``failed`` (flagged "unrefined"). A flow with NaN or infinite values (a broken model or
input) is never applied: the slice keeps its affine render and is listed in ``failed`` too.
The refinement is sequential by nature (each slice follows the previous output), so calls
from several threads wait for their predecessor.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..fields import nonpositive_jacobian_fraction, without_affine_part
from ..render import SliceMap, render_slice
from .order import SequentialRefiner

__all__ = ["ElasticRefiner"]


class ElasticRefiner(SequentialRefiner):
    """Per-slice flow refinement with folding control (see module docstring).

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

        super().__init__()
        self.shape = shape
        self.store = store
        self.num_threads = num_threads
        self.max_folding = max_folding
        self.predictor = FlowPredictor(provider=provider, num_threads=num_threads)
        self.folding: list[float | None] = []
        self.notes: dict[int, str] = {}
        self.failed: list[int] = []

    def refine(self, z: int, image: np.ndarray, affine: np.ndarray
               ) -> tuple[SliceMap, np.ndarray]:
        slice_map, out, fold = self._refine(z, image, affine)
        self.folding.append(fold)
        return slice_map, out

    def _refine(self, z: int, image: np.ndarray, affine: np.ndarray
                ) -> tuple[SliceMap, np.ndarray, float | None]:
        plain_map = SliceMap(affine)
        base = render_slice(image, plain_map, self.shape, num_threads=self.num_threads)
        if self.previous is None:
            return plain_map, base, None
        u = self.predictor.predict(self.previous.astype(np.float32), base.astype(np.float32))
        if not np.isfinite(u).all():
            self.notes[z] = "flow holds NaN or infinite values: kept the affine"
            self.failed.append(z)
            return plain_map, base, None
        # Only what no affine describes: the affine part is the solve's, and kept it would be
        # carried into every later slice (each follows the previous output)
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
