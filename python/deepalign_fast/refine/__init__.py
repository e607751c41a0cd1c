"""Refinement after the affine solve: a per-slice map beyond one affine.

``expected_affine`` (damaged sections: a per-pixel affine field), ``elastic`` (the learned
flow: an affine plus a displacement field), ``flow`` (the flow network run by onnxruntime),
``order`` (refinements run slice after slice, in order, from several threads; the slices
next to the one refined).

Every refiner is a :class:`Refiner`: called with slice z, its input image, its solved
affine, its :class:`Neighbours` and whether the solve flagged it (for z = 0, 1, 2, ... in
order), it returns the slice's
:class:`~deepalign_fast.render.SliceMap` and the slice rendered with it (by
:func:`~deepalign_fast.render.render_slice`); it keeps the maps in a
:class:`~deepalign_fast.transforms.FieldStore` so the transforms file reproduces the render.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np

from .order import Neighbours

if TYPE_CHECKING:
    from ..render import SliceMap
    from ..transforms import FieldStore
    from .expected_affine import Features

__all__ = ["Neighbours", "Refiner", "make_refiner"]


class Refiner(Protocol):
    """A per-slice refinement of the affine render (see the package docstring)."""

    notes: dict[int, str]
    failed: list[int]

    def __call__(self, z: int, image: np.ndarray, affine: np.ndarray,
                 neighbours: Neighbours | None = None, *,
                 flagged: bool = False) -> tuple[SliceMap, np.ndarray]: ...

    def close(self) -> None:
        """Release the files the refiner reads (the damage masks)."""


def make_refiner(mode: str, shape: tuple[int, int], *, num_slices: int | None,
                 fields_path: Path | None,
                 masks: Any = None, features: str = "learned", provider: str = "cpu",
                 num_threads: int = 0,
                 max_folding: float = 0.001, field_stride: int = 4
                 ) -> tuple[Refiner | None, FieldStore | None]:
    """The refiner of ``mode`` and the field store it fills (``(None, None)`` for
    ``"affine"``). The store is written to ``fields_path + ".partial"`` until committed; with
    ``fields_path=None`` the maps are not kept (a stream, whose length ``num_slices`` is not
    known: None). ``features`` names the matcher of the expected-affine registration
    (``AlignOptions.refine_features``)."""
    from ..transforms import FieldStore

    if mode == "affine":
        return None, None
    if mode == "elastic":
        from .elastic import ElasticRefiner

        store = None if fields_path is None or num_slices is None else FieldStore.create(
            fields_path, num_slices, shape, stride=field_stride)
        return ElasticRefiner(shape, store=store, provider=provider, num_threads=num_threads,
                              max_folding=max_folding), store
    if mode == "expected-affine":
        from ..match import FEATURES
        from .expected_affine import FIELD_STEP, StackRefiner

        if features not in FEATURES:
            raise ValueError(f"features must be one of {', '.join(FEATURES)}; got {features!r}")
        # The refiner first: it checks the masks before anything is created on disk.
        refiner = StackRefiner(masks, shape, num_slices=num_slices,
                               features=cast("Features", features), num_threads=num_threads)
        try:
            store = None if fields_path is None or num_slices is None else FieldStore.create(
                fields_path, num_slices, shape, stride=FIELD_STEP, kind="affine")
        except BaseException:
            refiner.close()
            raise
        refiner.store = store
        return refiner, store
    raise ValueError(f"mode must be affine, expected-affine or elastic; got {mode!r}")
