"""Learned deformable registration of a slice pair (ONNX flow network, no torch).

The shipped model (``models/flow.onnx``, see ``models/MODEL_CARD.md``) is a small
VoxelMorph-like U-Net trained unsupervised on neighbouring EM sections (``export/``). Given a
``fixed`` and a ``moving`` slice of the same shape it predicts a dense displacement field
``u`` ``(2, H, W)`` float32 in pixels, ``dx`` then ``dy``, in the package's **pull**
convention: ``aligned(p) = moving(p + u(p))`` registers ``moving`` onto ``fixed``. Points are
``(x, y)`` with the origin at the centre of the top-left pixel.

It is meant for the *residual* non-linear misalignment after the affine stage (a few pixels);
it does not recover large shifts or rotations by itself.

:class:`FlowPredictor`:

1. normalises each slice exactly as in training (``_norm.normalise_slice``, whole slice);
2. pads (reflect) to the network's multiple (16) and, for slices larger than ``tile``, runs
   overlapping tiles whose fields are blended with linear ramps over the overlap (the field
   is in pixels, so tiles need no offset);
3. returns the field cropped to the input shape.

Warping with the field: the C++ :func:`deepalign_fast.warp_displacement`.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import cv2
import numpy as np

from .._errors import DeepAlignError
from ..onnx.normalise import NORMALISATION, normalise_slice
from ..onnx.session import TensorSpec, create_session
from ..onnx.tiling import blend_ramp, tile_starts

__all__ = ["FlowPredictor", "default_flow_model_path"]

MULTIPLE = 16
INPUTS = (TensorSpec("fixed", 4), TensorSpec("moving", 4))
OUTPUTS = (TensorSpec("flow", 4),)


def default_flow_model_path() -> Path:
    """Path of the flow network shipped inside the package."""
    return Path(str(resources.files("deepalign_fast") / "models" / "flow.onnx"))


class FlowPredictor:
    """Dense displacement field between two slices from the ONNX flow network.

    Parameters
    ----------
    model : path, optional
        ONNX flow model; default: the shipped ``models/flow.onnx``.
    provider : {"cpu", "cuda", "tensorrt"}
        onnxruntime execution provider (see :func:`deepalign_fast.onnx.session.create_session`).
    num_threads : int
        onnxruntime intra-op threads; 0 = its default (one per physical core).
    tile : int
        Slices with a side larger than this run in overlapping ``tile`` x ``tile`` tiles
        (bounded memory; rounded down to a multiple of 16, at least 128).
    overlap : int
        Tile overlap in pixels (multiple of 16, in ``[0, tile / 2)``); fields are blended with
        linear ramps across it.
    batch : int
        Tiles per network call.

    Raises
    ------
    DeepAlignError
        Bad options, a missing/corrupt model, or a model whose inputs/outputs or
        normalisation are not the ones this code expects.
    """

    def __init__(self, model: str | os.PathLike[str] | None = None, *, provider: str = "cpu",
                 num_threads: int = 0, tile: int = 1024, overlap: int = 128,
                 batch: int = 1) -> None:
        if tile < 128:
            raise DeepAlignError(f"tile must be >= 128 pixels, got {tile}")
        tile -= tile % MULTIPLE
        if overlap < 0 or overlap % MULTIPLE or overlap >= tile // 2:
            raise DeepAlignError(
                f"overlap must be a multiple of {MULTIPLE} in [0, tile/2), got {overlap}")
        if batch < 1:
            raise DeepAlignError(f"batch must be >= 1, got {batch}")
        self.model_path = Path(model) if model is not None else default_flow_model_path()
        self.session = create_session(self.model_path, provider=provider,
                                      num_threads=num_threads, inputs=INPUTS, outputs=OUTPUTS)
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("normalisation", NORMALISATION) != NORMALISATION:
            raise DeepAlignError(
                f"{self.model_path} was trained with normalisation {meta['normalisation']!r}, "
                f"this code applies {NORMALISATION!r}; use a matching deepalign-fast version")
        if int(meta.get("multiple", MULTIPLE)) != MULTIPLE:
            raise DeepAlignError(
                f"{self.model_path} needs sizes that are multiples of {meta['multiple']}, "
                f"this code pads to {MULTIPLE}")
        self.metadata = dict(meta)
        self.tile = tile
        self.overlap = overlap
        self.batch = batch

    def predict(self, fixed: np.ndarray, moving: np.ndarray) -> np.ndarray:
        """Displacement ``(2, H, W)`` float32 registering ``moving`` onto ``fixed``.

        Parameters
        ----------
        fixed, moving : ndarray, shape (H, W)
            Real-valued slices of the same shape (at least 16 x 16), already affinely aligned
            to within a few pixels.

        Returns
        -------
        ndarray, shape (2, H, W), float32
            ``dx``, ``dy`` in pixels; ``aligned(p) = moving(p + u(p))``.
        """
        f = _check_slice(fixed, "fixed")
        m = _check_slice(moving, "moving")
        if f.shape != m.shape:
            raise DeepAlignError(f"fixed {f.shape} and moving {m.shape} must have the same shape")
        h, w = f.shape
        hp, wp = _round_up(h), _round_up(w)
        pair = np.stack([normalise_slice(f), normalise_slice(m)])
        if (hp, wp) != (h, w):
            pair = np.stack([cv2.copyMakeBorder(p, 0, hp - h, 0, wp - w, cv2.BORDER_REFLECT_101)
                             for p in pair])
        th, tw = min(self.tile, hp), min(self.tile, wp)
        if (th, tw) == (hp, wp):
            return np.ascontiguousarray(self._run(pair[None])[0][:, :h, :w])
        ys = tile_starts(hp, th, self.overlap)
        xs = tile_starts(wp, tw, self.overlap)
        acc = np.zeros((2, hp, wp), np.float32)
        wsum = np.zeros((hp, wp), np.float32)
        ramp = blend_ramp(th, self.overlap)[:, None] * blend_ramp(tw, self.overlap)[None, :]
        tiles = [(y, x) for y in ys for x in xs]
        for i in range(0, len(tiles), self.batch):
            chunk = tiles[i:i + self.batch]
            out = self._run(np.stack([pair[:, y:y + th, x:x + tw] for y, x in chunk]))
            for (y, x), fl in zip(chunk, out, strict=True):
                acc[:, y:y + th, x:x + tw] += fl * ramp
                wsum[y:y + th, x:x + tw] += ramp
        acc /= wsum
        return np.ascontiguousarray(acc[:, :h, :w])

    def _run(self, pairs: np.ndarray) -> np.ndarray:
        """``(N, 2, h, w)`` normalised pairs -> ``(N, 2, h, w)`` fields."""
        pairs = np.ascontiguousarray(pairs, np.float32)
        out = self.session.run(["flow"], {"fixed": pairs[:, :1], "moving": pairs[:, 1:]})[0]
        return np.asarray(out, np.float32)


def _check_slice(image: np.ndarray, name: str) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim != 2 or min(img.shape) < MULTIPLE:
        raise DeepAlignError(f"{name} must be a 2-D slice of at least 16x16 pixels, "
                             f"got shape {img.shape}")
    if not (np.issubdtype(img.dtype, np.integer) or np.issubdtype(img.dtype, np.floating)):
        raise DeepAlignError(f"{name} must be real-valued, got dtype {img.dtype}")
    return img


def _round_up(n: int) -> int:
    return -(-n // MULTIPLE) * MULTIPLE
