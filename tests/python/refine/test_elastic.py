"""The elastic refinement moves each slice toward both neighbours and carries nothing down
the stack (flows from an oracle that knows each slice's deformation exactly)."""

from __future__ import annotations

import numpy as np
import pytest
from deepalign_fast.fields import without_affine_part
from deepalign_fast.refine import Neighbours
from deepalign_fast.refine.elastic import TOWARD_NEIGHBOURS, ElasticRefiner

IDENT = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
SHAPE = (48, 64)


class OracleFlow:
    """The exact flow between two slices of a stack whose slice z is deformed by ``d[z]``
    (pull: registering slice z onto slice k takes ``d[k] - d[z]``); slices are told apart
    by their pixels (each is a different texture; the identity render leaves them exact)."""

    def __init__(self, stack: np.ndarray, d: np.ndarray) -> None:
        self.stack, self.d, self.calls = stack, d, 0

    def _index(self, image: np.ndarray) -> int:
        found = [z for z, s in enumerate(self.stack) if np.array_equal(s, image)]
        assert len(found) == 1
        return found[0]

    def predict(self, fixed: np.ndarray, moving: np.ndarray) -> np.ndarray:
        self.calls += 1
        return (self.d[self._index(fixed)] - self.d[self._index(moving)]).astype(np.float32)


def _bump(amplitude: float) -> np.ndarray:
    """A smooth local displacement (no affine part to speak of: a Gaussian bump)."""
    y, x = np.mgrid[0:SHAPE[0], 0:SHAPE[1]].astype(np.float64)
    g = amplitude * np.exp(-((x - 30) ** 2 + (y - 22) ** 2) / (2 * 6.0 ** 2))
    return np.stack([g, -0.5 * g])


def _refine(stack: np.ndarray, d: np.ndarray, usable: set[int] | None = None
            ) -> tuple[ElasticRefiner, list[np.ndarray | None]]:
    pytest.importorskip("onnxruntime")
    refiner = ElasticRefiner(SHAPE)
    oracle = OracleFlow(stack, d)
    refiner.predictor = oracle  # type: ignore[assignment]
    ok = set(range(len(stack))) if usable is None else usable
    neighbours = Neighbours(usable=lambda k: k in ok, read=lambda k: (stack[k], IDENT))
    fields = []
    for z, image in enumerate(stack):
        # as the aligner does: a flagged slice is not refined (and serves no other slice)
        slice_map, _ = refiner(z, image, IDENT, neighbours if z in ok else None)
        fields.append(slice_map.displacement)
    if usable is None:
        assert oracle.calls == len(stack) - 1  # one flow per pair, shared by its two slices
    return refiner, fields


def _textures(n: int) -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.uniform(0, 255, (n, *SHAPE)).astype(np.float32)


def test_one_deformed_slice_moves_toward_its_neighbours_and_no_slice_beyond() -> None:
    """Slice 4 of 9 deformed by a bump D, the others not: slice 4 gets -2/3 D (two thirds of
    the way to its neighbours' mean), slices 3 and 5 get D/3 (toward the mean of 0 and D),
    and no other slice moves (the refinement onto the previous output carried D into every
    later slice)."""
    n = 9
    stack = _textures(n)
    d = np.zeros((n, 2, *SHAPE))
    d[4] = _bump(3.0)
    _, fields = _refine(stack, d)
    f = TOWARD_NEIGHBOURS
    expected = {4: -f * d[4], 3: f * 0.5 * d[4], 5: f * 0.5 * d[4]}
    for z, u in enumerate(fields):
        want = without_affine_part(expected.get(z, np.zeros_like(d[4])).astype(np.float32))
        if not np.any(want):
            assert u is None or np.abs(u).max() < 1e-5, z
        else:
            assert u is not None
            np.testing.assert_allclose(u, want, atol=1e-4, err_msg=f"slice {z}")


def test_independent_deformations_shrink_and_ends_use_their_one_neighbour() -> None:
    """Independent bumps on every slice: each field is 2/3 of the way to the neighbours'
    mean; the first and the last slice use their one neighbour; what is left of the
    deformations is smaller than before (about 0.58 of it, rms, for equal sizes)."""
    n = 12
    stack = _textures(n)
    rng = np.random.default_rng(5)
    d = np.stack([_bump(a) for a in rng.normal(0.0, 3.0, n)])
    _, fields = _refine(stack, d)
    f = TOWARD_NEIGHBOURS
    for z, u in enumerate(fields):
        around = [k for k in (z - 1, z + 1) if 0 <= k < n]
        want = f * (np.mean([d[k] for k in around], axis=0) - d[z])
        np.testing.assert_allclose(u, without_affine_part(want.astype(np.float32)), atol=1e-4)
    # the pull map is p + d_z(p + u(p)) ~ p + d_z + u: what is left of each deformation
    left = [d[z] + without_affine_part(fields[z]) for z in range(1, n - 1)]
    before = np.sqrt(np.mean(d[1:-1] ** 2))
    after = np.sqrt(np.mean(np.square(left)))
    assert after < 0.75 * before


def test_a_slice_next_to_an_unusable_one_uses_the_other_neighbour_and_alone_keeps_its_affine(
        ) -> None:
    """Slice 3 flagged: slices 2 and 4 move toward their other neighbour only, slice 3 keeps
    its affine; a stack of one slice has no neighbour and keeps its affine."""
    n = 6
    stack = _textures(n)
    d = np.stack([_bump(a) for a in (1.0, -2.0, 2.5, 4.0, -1.5, 0.5)])
    _, fields = _refine(stack, d, usable={0, 1, 2, 4, 5})
    f = TOWARD_NEIGHBOURS
    np.testing.assert_allclose(fields[2], without_affine_part(
        (f * (d[1] - d[2])).astype(np.float32)), atol=1e-4)
    np.testing.assert_allclose(fields[4], without_affine_part(
        (f * (d[5] - d[4])).astype(np.float32)), atol=1e-4)
    assert fields[3] is None

    _, alone = _refine(stack[:1], d[:1])
    assert alone[0] is None
