"""The expected-affine stack refinement moves each slice toward both neighbours' affine
renders, a damaged slice the whole way and the others two thirds, never a clean slice toward
a damaged one, and carries nothing down the stack (registrations from an oracle that knows
each slice's per-pixel affine deformation exactly)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from deepalign_fast import _core
from deepalign_fast.fields import without_common_affine
from deepalign_fast.refine import Neighbours
from deepalign_fast.refine import expected_affine as ea
from deepalign_fast.refine.order import TOWARD_NEIGHBOURS
from deepalign_fast.render import SliceMap, render_slice

IDENT = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
SHAPE = (48, 64)
GRID = (_core.grid_size(SHAPE[0], ea.FIELD_STEP), _core.grid_size(SHAPE[1], ea.FIELD_STEP))


class _Registered:
    """What the refiner reads of a :func:`register_pair` result."""

    def __init__(self, field: np.ndarray | None, reason: str = "") -> None:
        self.field, self.reason = field, reason
        self.fallback = field is None

    def __bool__(self) -> bool:
        return True


class _Matches:
    """Stands in for the feature matcher: sections are prepared as they are, no matches."""

    reach = 0

    def prepare(self, image: np.ndarray, mask: Any = None) -> np.ndarray:
        return image

    def match(self, reference: np.ndarray, moving: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros((0, 2)), np.zeros((0, 2))


def _tear(shift: float) -> np.ndarray:
    """A per-pixel affine deformation (parameter offsets from the identity) that no affine
    describes: the left third of the frame moved by ``shift`` px in x, the rest not."""
    d = np.zeros((*GRID, 2, 3))
    d[:, : GRID[1] // 3, 0, 2] = shift
    return d


def _refine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, d: np.ndarray,
            damaged: set[int], fail: set[tuple[int, int]] = frozenset(),  # type: ignore[assignment]
            flagged: set[int] = frozenset()  # type: ignore[assignment]
            ) -> tuple[ea.StackRefiner, list[np.ndarray | None], list[tuple[int, int]]]:
    """Refine a stack of textures whose slice z is deformed by ``d[z]``; ``damaged`` slices
    have a mask marking damage (``None``: no masks at all); registrations of (moving,
    reference) in ``fail`` fall back; ``flagged`` slices were flagged by the solve (as the
    aligner does, they serve no other slice). Returns the refiner, each slice's stored field and the
    registrations made."""
    n = len(d)
    rng = np.random.default_rng(3)
    stack = rng.uniform(0, 255, (n, *SHAPE)).astype(np.float32)
    masks_path = None
    if damaged is not None:
        masks = np.zeros((n, *SHAPE), np.uint8)
        for z in damaged:
            masks[z, 20:28, 30:34] = 255
        masks_path = tmp_path / "masks.tif"
        tifffile.imwrite(masks_path, masks)
    made: list[tuple[int, int]] = []

    def index(image: np.ndarray) -> int:
        found = [z for z, s in enumerate(stack) if np.array_equal(s, image)]
        assert len(found) == 1
        return found[0]

    def oracle(reference: np.ndarray, moving: np.ndarray, **_: Any) -> _Registered:
        k, z = index(reference), index(moving)
        made.append((z, k))
        if (z, k) in fail:
            return _Registered(None, "too few matches")
        return _Registered(IDENT + d[k] - d[z])  # registering z onto k undoes d_z, adds d_k

    monkeypatch.setattr(ea, "register_pair", oracle)
    # the textures are unrelated: the local choice of a damaged slice's field is tested on
    # real content below; here a damaged slice takes the mean of its registrations
    monkeypatch.setattr(ea.StackRefiner, "_best_per_side",
                        lambda self, plain, affine, shape, damage, fields, refs, pooled=None:
                        np.mean(fields, axis=0))

    class Store:
        def __init__(self) -> None:
            self.fields: dict[int, np.ndarray] = {}

        def put_affine(self, z: int, field: np.ndarray) -> None:
            self.fields[z] = field

    store = Store()
    refiner = ea.StackRefiner(masks_path, SHAPE, num_slices=n, store=store)
    refiner._matcher = _Matches()  # type: ignore[assignment]
    neighbours = Neighbours(usable=lambda k: 0 <= k < n and k not in flagged,
                            read=lambda k: (stack[k], IDENT))
    try:
        for z in range(n):
            refiner(z, stack[z], IDENT, neighbours, flagged=z in flagged)
    finally:
        refiner.close()
    return refiner, [store.fields.get(z) for z in range(n)], made


def _want(moved: np.ndarray) -> np.ndarray:
    """The field of a slice without damage: less its common affine."""
    return without_common_affine(IDENT + moved, ea.FIELD_STEP)


def _whole(moved: np.ndarray) -> np.ndarray:
    """The field of a damaged slice: all of it (the tear has a common affine part too)."""
    assert np.abs(_want(moved) - (IDENT + moved)).max() > 0.1
    return IDENT + moved


def test_a_damaged_slice_moves_onto_its_clean_neighbours_and_they_stay(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Slice 4 of 9 torn and marked damaged: it gets the whole way onto its neighbours
    (its tear undone, its common affine part included), slices 3 and 5 are refined toward
    their other neighbour only and stay where they are, and no slice is registered onto the
    damaged one."""
    n = 9
    d = np.zeros((n, *GRID, 2, 3))
    d[4] = _tear(6.0)
    _, fields, made = _refine(monkeypatch, tmp_path, d, damaged={4})
    np.testing.assert_allclose(fields[4], _whole(-d[4]), atol=1e-9)
    for z in set(range(n)) - {4}:
        np.testing.assert_allclose(fields[z], _want(np.zeros_like(d[4])), atol=1e-9,
                                   err_msg=f"slice {z}")
    assert (3, 4) not in made and (5, 4) not in made and {(4, 3), (4, 5)} <= set(made)


def test_without_masks_each_slice_moves_two_thirds_and_nothing_is_carried(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No masks: slice 4's tear is taken two thirds of the way out, its neighbours move a
    third of it toward it, and no other slice moves (the refinement onto the previous output
    carried each slice's change into every later slice)."""
    n = 9
    d = np.zeros((n, *GRID, 2, 3))
    d[4] = _tear(6.0)
    _, fields, _ = _refine(monkeypatch, tmp_path, d, damaged=None)  # type: ignore[arg-type]
    f = TOWARD_NEIGHBOURS
    expected = {4: -f * d[4], 3: f * 0.5 * d[4], 5: f * 0.5 * d[4]}
    for z in range(n):
        np.testing.assert_allclose(fields[z], _want(expected.get(z, np.zeros_like(d[4]))),
                                   atol=1e-9, err_msg=f"slice {z}")


def test_damaged_neighbours_serve_only_a_damaged_slice_with_no_other(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Slices 3, 4 and 5 damaged: 3 and 5 move the whole way onto their clean neighbours 2
    and 6; 4, with no clean neighbour, moves the whole way onto the mean of 3 and 5."""
    n = 8
    d = np.zeros((n, *GRID, 2, 3))
    d[3], d[4], d[5] = _tear(4.0), _tear(-5.0), _tear(2.0)
    _, fields, _ = _refine(monkeypatch, tmp_path, d, damaged={3, 4, 5})
    np.testing.assert_allclose(fields[3], _whole(d[2] - d[3]), atol=1e-9)
    np.testing.assert_allclose(fields[5], _whole(d[6] - d[5]), atol=1e-9)
    np.testing.assert_allclose(fields[4], _whole(0.5 * (d[3] + d[5]) - d[4]), atol=1e-9)


def test_a_failed_side_leaves_the_other_and_both_failed_keep_the_affine(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Slice 2's registration onto slice 1 falls back: it moves toward slice 3 alone (noted,
    not failed). Slice 5's both fall back: it keeps its affine, is listed in ``failed``, and
    its note says why; its neighbours are still refined."""
    n = 7
    d = np.zeros((n, *GRID, 2, 3))
    d[2], d[5] = _tear(3.0), _tear(-4.0)
    refiner, fields, _ = _refine(monkeypatch, tmp_path, d, damaged=None,  # type: ignore[arg-type]
                                 fail={(2, 1), (5, 4), (5, 6)})
    f = TOWARD_NEIGHBOURS
    np.testing.assert_allclose(fields[2], _want(f * (d[3] - d[2])), atol=1e-9)
    assert "onto slice 1" in refiner.notes[2] and 2 not in refiner.failed
    assert fields[5] is None and refiner.failed == [5]
    assert "too few matches" in refiner.notes[5]
    np.testing.assert_allclose(fields[4], _want(f * 0.5 * (d[3] + d[5] - 2 * d[4])),
                               atol=1e-9)


def test_a_flagged_slice_is_refined_only_where_its_mask_marks_damage(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The solve flagged slices 2 and 5 (placed from their neighbours). Slice 5 is damaged:
    it is still refined, the whole way (the damage is often why it was flagged). Slice 2 is
    not: it keeps its affine. Neither serves its neighbours."""
    n = 8
    d = np.zeros((n, *GRID, 2, 3))
    d[2], d[5] = _tear(3.0), _tear(-4.0)
    refiner, fields, made = _refine(monkeypatch, tmp_path, d, damaged={5}, flagged={2, 5})
    assert fields[2] is None and all(2 not in pair for pair in made)
    np.testing.assert_allclose(fields[5], _whole(-d[5]), atol=1e-9)
    assert {(5, 4), (5, 6)} <= set(made) and (4, 5) not in made and (6, 5) not in made
    assert refiner.failed == []


def test_the_next_slice_is_registered_onto_the_previous_one_as_it_went_out(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """In a stream the next slice is read at the window's estimate, and later goes out at
    its own affine. Slices 0 and 2 damaged, slice 1 clean: slice 1 (read by slice 0 at the
    estimate) is not refined (it has no clean neighbour), and slice 2 is then registered
    onto slice 1's render at the affine it went out with, not the estimate's render kept
    from slice 0's call."""
    n = 3
    rng = np.random.default_rng(4)
    stack = rng.uniform(0, 255, (n, *SHAPE)).astype(np.float32)
    masks = np.zeros((n, *SHAPE), np.uint8)
    masks[[0, 2], 20:28, 30:34] = 255
    tifffile.imwrite(tmp_path / "masks.tif", masks, photometric="minisblack")
    estimate = np.array([[1.0, 0.0, 5.0], [0.0, 1.0, -4.0]])
    renders = {(z, name): render_slice(stack[z], SliceMap(a), SHAPE)
               for z in range(n) for name, a in (("own", IDENT), ("estimate", estimate))}
    made: list[tuple[int, int, str]] = []

    def oracle(reference: np.ndarray, moving: np.ndarray, **_: Any) -> _Registered:
        (k, how), = [key for key, r in renders.items() if np.array_equal(r, reference)]
        (z, _), = [key for key, r in renders.items() if np.array_equal(r, moving)]
        made.append((z, k, how))
        return _Registered(IDENT.copy() + np.zeros((*GRID, 2, 3)))

    monkeypatch.setattr(ea, "register_pair", oracle)
    monkeypatch.setattr(ea.StackRefiner, "_best_per_side",
                        lambda self, plain, affine, shape, damage, fields, refs, pooled=None:
                        np.mean(fields, axis=0))
    refiner = ea.StackRefiner(tmp_path / "masks.tif", SHAPE, num_slices=n)
    refiner._matcher = _Matches()  # type: ignore[assignment]
    current = 0
    neighbours = Neighbours(usable=lambda k: 0 <= k < n, read=lambda k: (
        stack[k], IDENT if k < current else estimate))
    try:
        for current in range(n):
            refiner(current, stack[current], IDENT, neighbours)
    finally:
        refiner.close()
    assert (0, 1, "estimate") in made  # slice 0 onto the next slice, at the estimate
    assert (2, 1, "own") in made and (2, 1, "estimate") not in made


def test_a_damaged_slice_takes_on_each_side_the_registration_that_fits_there() -> None:
    """A slice torn in two, its sides moved by two affines; one registration has both sides
    right, the other only the left. On the right side the first is taken, whole (their mean
    would leave it halfway, the plain affine all the way off); on the left, where both are
    right, the mean is kept, and is right too."""
    from deepalign_fast.datasets import sample_stack_path
    from deepalign_fast.warp import warp_affine

    clean = tifffile.imread(sample_stack_path())[0].astype(np.float32)
    h, w = clean.shape
    left = np.array([[1.0, 0.0, -6.0], [0.0, 1.0, 3.0]])   # pull maps: clean -> torn
    right = np.array([[1.0, 0.0, 6.0], [0.0, 1.0, -3.0]])
    ys, xs = np.mgrid[0:h, 0:w]

    def moved(a: np.ndarray) -> np.ndarray:  # torn(a(p)) = clean(p)
        return warp_affine(clean, np.linalg.inv(np.vstack([a, [0, 0, 1]]))[:2], (h, w))

    torn = np.where(xs < w // 2, moved(left), moved(right))
    damage = ((xs >= w // 2 - 6) & (xs <= w // 2 + 6)).astype(np.uint8)
    rows, cols = _core.grid_size(h, ea.FIELD_STEP), _core.grid_size(w, ea.FIELD_STEP)
    node_x = np.arange(cols) * ea.FIELD_STEP
    good = np.empty((rows, cols, 2, 3))
    good[:, node_x < w // 2] = left
    good[:, node_x >= w // 2] = right
    bad = np.broadcast_to(left, good.shape).copy()
    refiner = ea.StackRefiner(None, (h, w), num_slices=1)
    chosen = refiner._best_per_side(torn, IDENT, (h, w), damage, [good, bad],
                                    [(clean, IDENT), (clean, IDENT)])
    away = np.abs(node_x - w // 2) > 24  # (nodes by the tear lie in the damage)
    np.testing.assert_allclose(chosen[:, away], good[:, away])
    # no side split between candidates: the right side is the good field throughout
    right_nodes = node_x > w // 2 + 24
    assert np.array_equal(chosen[:, right_nodes], good[:, right_nodes])


def test_side_ncc_is_each_sides_correlation() -> None:
    """Per side, the correlation of its pixels (against np.corrcoef); -inf for a side too
    small or without contrast, and for side 0 (the damage)."""
    rng = np.random.default_rng(7)
    a = rng.normal(0, 1, 3000)
    b = 0.6 * a + rng.normal(0, 1, 3000)
    side = rng.integers(1, 3, 3000).astype(np.int32)
    side[:10] = 3  # a speck: below 1 % of the pixels
    a[side == 2] = 5.0  # no contrast
    got = ea._side_ncc(a, b, side, 4)
    want = np.corrcoef(a[side == 1], b[side == 1])[0, 1]
    assert got[1] == pytest.approx(want, abs=1e-9)
    assert got[0] == got[2] == got[3] == got[4] == -np.inf


def test_a_stream_longer_than_its_masks_stops_with_one_line_naming_the_slice(
        tmp_path: Path) -> None:
    """A stream's length is not known in advance: slice 3 of a stream whose mask stack
    holds three masks is a DeepAlignError naming the masks file and the slice (it was a
    raw IndexError, after three slices had gone out)."""
    from deepalign_fast import Aligner, DeepAlignError

    stack = tifffile.imread(_sample())[:5]
    masks = tmp_path / "masks.tif"
    tifffile.imwrite(masks, np.zeros((3, *stack.shape[1:]), np.uint8),
                     photometric="minisblack")
    stream = Aligner(mode="expected-affine", refine_features="blocks", masks=str(masks),
                     num_threads=1).stream(iter(stack), lookahead=1)
    with pytest.raises(DeepAlignError) as err:
        list(stream)
    message = str(err.value)
    assert str(masks) in message and "slice 3" in message and "\n" not in message


def test_masks_given_as_an_array_are_refused_in_one_short_line() -> None:
    from deepalign_fast import AlignOptions

    with pytest.raises(TypeError) as err:
        AlignOptions(mode="expected-affine", masks=np.zeros((9, 100, 100)))  # type: ignore[arg-type]
    assert str(err.value) == ("masks must be a path (text) or null, got an array of shape "
                              "(9, 100, 100) (ndarray)")


def _sample() -> Path:
    from deepalign_fast.datasets import sample_stack_path

    return sample_stack_path()


def test_a_damaged_slice_is_also_registered_onto_both_neighbours_matches_at_once(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Slice 2 of 5 damaged: besides one registration onto each neighbour, one onto the
    matches with both at once (twice the evidence); that field is what each side of the
    damage starts from (``pooled``). Undamaged slices make no such registration."""
    n = 5
    rng = np.random.default_rng(5)
    stack = rng.uniform(0, 255, (n, *SHAPE)).astype(np.float32)
    masks = np.zeros((n, *SHAPE), np.uint8)
    masks[2, 20:28, 30:34] = 255
    tifffile.imwrite(tmp_path / "masks.tif", masks, photometric="minisblack")

    class Pairs(_Matches):
        def match(self, reference: np.ndarray, moving: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
            k = next(z for z in range(n) if np.array_equal(stack[z], reference))
            pts = np.full((3 + k, 2), float(k))  # 3 + k matches, tagged by the reference
            return pts, pts.copy()

    counts: list[int] = []
    pooled_seen: list[object] = []

    def oracle(reference: np.ndarray, moving: np.ndarray, **kw: Any) -> _Registered:
        counts.append(len(kw["matches"][0]))
        field = np.broadcast_to(IDENT, (*GRID, 2, 3)).copy()
        field[..., 0, 2] = len(kw["matches"][0])  # a field that says what it was made of
        return _Registered(field)

    def best(self, plain, affine, shape, damage, fields, refs, pooled=None):  # type: ignore[no-untyped-def]
        pooled_seen.append(pooled)
        return pooled

    monkeypatch.setattr(ea, "register_pair", oracle)
    monkeypatch.setattr(ea.StackRefiner, "_best_per_side", best)
    refiner = ea.StackRefiner(tmp_path / "masks.tif", SHAPE, num_slices=n)
    refiner._matcher = Pairs()  # type: ignore[assignment]
    neighbours = Neighbours(usable=lambda k: 0 <= k < n, read=lambda k: (stack[k], IDENT))
    try:
        maps = [refiner(z, stack[z], IDENT, neighbours)[0] for z in range(n)]
    finally:
        refiner.close()
    # slice 2: onto 1 (4 matches), onto 3 (6), onto both (10); no other slice pools
    assert counts.count(10) == 1 and len(pooled_seen) == 1
    assert pooled_seen[0] is not None and float(pooled_seen[0][0, 0, 0, 2]) == 10.0
    assert maps[2].affine_field is not None and float(maps[2].affine_field[0, 0, 0, 2]) == 10.0
