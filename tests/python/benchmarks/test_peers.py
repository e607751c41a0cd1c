"""The benchmark peers return pull maps in the package convention: a known misalignment,
undone exactly, scores ~0 for every peer (benchmarks/peers.py, used by bench_exact)."""

from __future__ import annotations

import numpy as np
import pytest
from deepalign_fast.qc.metrics import exact_truth_score
from deepalign_fast.qc.synth import misalign_stack
from scipy import ndimage

from benchmarks.peers import PEERS, available


def _texture(n: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = ndimage.gaussian_filter(rng.normal(size=(size, size)), 2.0)
    img = (img - img.min()) / np.ptp(img) * 255
    return np.repeat(img[None].astype(np.uint8), n, axis=0)  # aligned: one section, n times


@pytest.mark.parametrize("rotate", [False, True], ids=["translation", "rotation"])
@pytest.mark.parametrize("peer", sorted(PEERS))
def test_peer_recovers_known_motion(peer: str, rotate: bool) -> None:
    if not available(peer):
        pytest.skip(f"{PEERS[peer][0]} not installed")
    n = 5 if peer.startswith("elastix") else 6
    clean = _texture(n, 160, 7)
    full = np.tile(np.eye(2, 3), (n, 1, 1))
    if rotate:  # 0.8 degrees more per slice, about a point off the centre
        a = np.deg2rad(0.8) * np.arange(n)
        full[:, 0, 0], full[:, 0, 1] = np.cos(a), -np.sin(a)
        full[:, 1, 0], full[:, 1, 1] = np.sin(a), np.cos(a)
        pivot = np.array([60.0, 90.0])
        full[:, :, 2] = pivot - np.einsum("nij,j->ni", full[:, :, :2], pivot)
    full[:, 0, 2] += 2.5 * np.arange(n) - 3.0  # sub-pixel steps, the first slice moved too
    full[:, 1, 2] += -1.25 * np.arange(n) + 1.0
    mis, truth = misalign_stack(clean, full)
    est = PEERS[peer][1](mis)
    assert est.shape == (n, 2, 3) and est.dtype == np.float64
    score = exact_truth_score(est, truth.transforms, mis.shape[1:])
    nothing = exact_truth_score(np.tile(np.eye(2, 3), (n, 1, 1)), truth.transforms,
                                mis.shape[1:])
    assert nothing.tre_median > 2
    assert score.tre_p95 < 0.25, (peer, score.per_slice_tre)


def test_bench_exact_option_sets() -> None:
    from benchmarks.bench_exact import main, parse_ours

    assert parse_ours("default") == ("default", {})
    assert parse_ours("r:model=rigid,threshold=1.5,neighbours=3") == (
        "r", {"model": "rigid", "threshold": 1.5, "neighbours": 3})
    assert parse_ours("offsets=1/2/4") == ("offsets=1/2/4", {"offsets": (1, 2, 4)})
    with pytest.raises(SystemExit, match="not key=value"):
        parse_ours("x:model")
    with pytest.raises(SystemExit, match="--ours bad"):  # checked before any stack is built
        main(["--quick", "--ours", "bad:no_such_option=1", "--peers", "none"])
    with pytest.raises(SystemExit, match="lookahead must be"):
        main(["--quick", "--ours", "s:lookahead=-1", "--peers", "none"])
    with pytest.raises(SystemExit, match="unknown case"):
        main(["--cases", "nope"])
    with pytest.raises(SystemExit, match="unknown peer"):
        main(["--quick", "--peers", "nope"])


def test_bench_exact_streams_with_lookahead() -> None:
    """``lookahead=L`` runs ours through Aligner.stream: with the whole stack as look-ahead
    it equals the batch estimate; a short one still removes most of a known jitter."""
    from benchmarks.bench_exact import ours

    n = 8
    full = np.tile(np.eye(2, 3), (n, 1, 1))
    full[:, 0, 2] = np.random.default_rng(3).normal(0, 2.0, n)
    mis, truth = misalign_stack(_texture(n, 160, 5), full)
    batch = ours({})(mis)
    assert np.abs(ours({"lookahead": n})(mis) - batch).max() < 1e-6
    short = ours({"lookahead": 2})(mis)
    assert short.shape == (n, 2, 3)
    nothing = np.tile(np.eye(2, 3), (n, 1, 1))
    assert (exact_truth_score(short, truth.transforms, mis.shape[1:]).tre_median
            < 0.8 * exact_truth_score(nothing, truth.transforms, mis.shape[1:]).tre_median)
