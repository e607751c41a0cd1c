"""Learned, artifact-invariant keypoints and descriptors (ONNX encoder, no torch).

The shipped encoder (``models/ssl_encoder.onnx``, see ``models/MODEL_CARD.md``) was trained
self-supervised to give the same feature vector at the same tissue location whatever synthetic
EM artifacts (curtaining, charging, drift, noise, scan glitches, blur) corrupt the slice, and
across neighbouring sections, while differing between locations. Its output is a stride-4 map
of unit-length ``C``-dim vectors; feature cell ``(i, j)`` covers pixels ``4i..4i+3`` x
``4j..4j+3`` and its centre is pixel ``(x, y) = (4j + 1.5, 4i + 1.5)``.

:class:`LearnedExtractor` turns that map into :class:`~deepalign_fast.match.keypoints.Features`:

1. normalise the slice exactly as in training (``_norm.normalise_slice``), pad to a multiple
   of 4 (reflect), run the encoder, in overlapping tiles for slices larger than ``tile``;
2. keypoints, either
   ``keypoints="dog"`` (default): OpenCV's SIFT detector (difference of Gaussians) on the
   contrast-stretched slice. Its blob centres are localised to a fraction of a pixel, which the
   stride-4 feature map cannot do by itself (measured on lucchi: point residuals of about 0.2 px
   versus about 1.1 px), and a 1 px alignment target needs that precision; or
   ``keypoints="response"``: 3x3 local maxima of the feature response (squared distance of each
   feature vector from the mean of its 3x3 neighbours: high where the features change), refined
   to sub-cell precision by a parabola fit. Uses nothing but the learned map.
   In both cases the strongest ``max_features`` are kept;
3. descriptor = the feature vector sampled bilinearly at the keypoint (L2-normalised); with
   ``descriptor_radius > 0`` the vectors at the 4 points ``radius`` pixels left/right/up/down
   are appended (more context, still tolerant of small rotations).

Keypoints are ``(x, y)`` float32 in the ORIGINAL slice's pixels (origin at the centre of the
top-left pixel). Output is deterministic for a given model, provider and thread count.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import cv2
import numpy as np

from .._errors import DeepAlignError
from ..intensity import to_uint8
from ..onnx.normalise import NORMALISATION, normalise_slice
from ..onnx.session import TensorSpec, create_session
from ..onnx.tiling import tile_starts
from .keypoints import Features

__all__ = ["LearnedExtractor", "default_model_path", "normalise_slice"]

STRIDE = 4
INPUT = TensorSpec("image", 4)
OUTPUT = TensorSpec("features", 4)


def default_model_path() -> Path:
    """Path of the encoder shipped inside the package."""
    return Path(str(resources.files("deepalign_fast") / "models" / "ssl_encoder.onnx"))


class LearnedExtractor:
    """Keypoints + descriptors from the self-supervised encoder's feature map.

    Parameters
    ----------
    model : path, optional
        ONNX encoder; default: the shipped ``models/ssl_encoder.onnx``.
    provider : {"cpu", "cuda", "tensorrt"}
        onnxruntime execution provider (see :func:`deepalign_fast.onnx.session.create_session`).
    num_threads : int
        onnxruntime intra-op threads; 0 = its default (one per physical core).
    tile : int
        Slices with a side larger than this are run in overlapping ``tile`` x ``tile`` tiles
        (bounded memory; rounded down to a multiple of 4).
    overlap : int
        Tile overlap in pixels (multiple of 4); half of it is discarded at every inner tile
        edge, where the convolutions saw padding instead of tissue.
    batch : int
        Tiles per encoder call.
    max_features : int
        Keep at most this many keypoints (strongest response first). 0 = no limit.
    descriptor_radius : float
        0: descriptor = the feature vector at the keypoint. > 0: also the vectors this many
        pixels away in x and y (5 x C dims).
    border : int
        Drop keypoints closer than this many pixels to the slice edge.
    keypoints : {"dog", "response"}
        Keypoint detector (see the module docstring); descriptors are learned either way.
    contrast_threshold : float
        Contrast threshold of the ``"dog"`` detector (SIFT's; EM is low-contrast).
    """

    name = "learned"

    def __init__(self, model: str | os.PathLike[str] | None = None, *, provider: str = "cpu",
                 num_threads: int = 0, tile: int = 1024, overlap: int = 64, batch: int = 4,
                 max_features: int = 4000, descriptor_radius: float = 0.0,
                 border: int = 8, keypoints: str = "dog",
                 contrast_threshold: float = 0.02) -> None:
        if keypoints not in ("dog", "response"):
            raise DeepAlignError(f"keypoints must be 'dog' or 'response', got {keypoints!r}")
        if tile < 64:
            raise DeepAlignError(f"tile must be >= 64 pixels, got {tile}")
        if overlap < 0 or overlap % STRIDE or overlap >= tile // 2:
            raise DeepAlignError(
                f"overlap must be a multiple of {STRIDE} in [0, tile/2), got {overlap}")
        if batch < 1 or max_features < 0 or border < 0 or descriptor_radius < 0:
            raise DeepAlignError("batch must be >= 1; max_features, border and "
                                 "descriptor_radius must be >= 0")
        self.model_path = Path(model) if model is not None else default_model_path()
        self.session = create_session(self.model_path, provider=provider,
                                      num_threads=num_threads, inputs=(INPUT,),
                                      outputs=(OUTPUT,))
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("normalisation", NORMALISATION) != NORMALISATION:
            raise DeepAlignError(
                f"{self.model_path} was trained with normalisation {meta['normalisation']!r}, "
                f"this code applies {NORMALISATION!r}; use a matching deepalign-fast version")
        if int(meta.get("stride", STRIDE)) != STRIDE:
            raise DeepAlignError(f"{self.model_path} has stride {meta['stride']}, expected 4")
        self.metadata = dict(meta)
        self.tile = tile - tile % STRIDE
        self.overlap = overlap
        self.batch = batch
        self.max_features = max_features
        self.descriptor_radius = float(descriptor_radius)
        self.border = border
        self.keypoints = keypoints
        self._dog = cv2.SIFT.create(nfeatures=max_features, contrastThreshold=contrast_threshold)
        self.name = "learned" if keypoints == "dog" else "learned-response"

    # -- feature map ------------------------------------------------------------------------
    def feature_map(self, image: np.ndarray) -> np.ndarray:
        """Encoder features ``(ceil(H/4), ceil(W/4), C)`` float32 of one slice."""
        img = np.asarray(image)
        if img.ndim != 2 or min(img.shape) < 8:
            raise DeepAlignError(f"expected a 2-D slice of at least 8x8 pixels, got {img.shape}")
        if not (np.issubdtype(img.dtype, np.integer) or np.issubdtype(img.dtype, np.floating)):
            raise DeepAlignError(f"expected a real-valued slice, got dtype {img.dtype}")
        x = normalise_slice(img)
        h, w = x.shape
        hp, wp = -(-h // STRIDE) * STRIDE, -(-w // STRIDE) * STRIDE
        if (hp, wp) != (h, w):
            x = cv2.copyMakeBorder(x, 0, hp - h, 0, wp - w, cv2.BORDER_REFLECT_101)
        th, tw = min(self.tile, hp), min(self.tile, wp)
        ys, xs = tile_starts(hp, th, self.overlap), tile_starts(wp, tw, self.overlap)
        tiles = [(y0, x0) for y0 in ys for x0 in xs]
        out: np.ndarray | None = None
        half = self.overlap // 2
        for k in range(0, len(tiles), self.batch):
            chunk = tiles[k:k + self.batch]
            inp = np.stack([x[y0:y0 + th, x0:x0 + tw] for y0, x0 in chunk])[:, None]
            feats = self.session.run([OUTPUT.name], {INPUT.name: np.ascontiguousarray(inp)})[0]
            if out is None:
                out = np.empty((hp // STRIDE, wp // STRIDE, feats.shape[1]), np.float32)
            for (y0, x0), f in zip(chunk, feats, strict=False):
                # Keep the tile's interior: drop `half` px at edges shared with another tile.
                a0 = 0 if y0 == 0 else half
                a1 = th if y0 + th == hp else th - half
                b0 = 0 if x0 == 0 else half
                b1 = tw if x0 + tw == wp else tw - half
                out[(y0 + a0) // 4:(y0 + a1) // 4, (x0 + b0) // 4:(x0 + b1) // 4] = \
                    f[:, a0 // 4:a1 // 4, b0 // 4:b1 // 4].transpose(1, 2, 0)
        assert out is not None
        return out

    def _dog_keypoints(self, img: np.ndarray, mask: np.ndarray | None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cv_mask = None if mask is None else mask.astype(np.uint8)
        kps = self._dog.detect(to_uint8(img), cv_mask)
        if not kps:
            z = np.zeros(0)
            return z, z, z
        pts = np.array([k.pt for k in kps], np.float64).reshape(-1, 2)
        score = np.array([k.response for k in kps], np.float64)
        return pts[:, 0], pts[:, 1], score

    # -- keypoints + descriptors ------------------------------------------------------------
    def extract(self, image: np.ndarray, mask: np.ndarray | None = None) -> Features:
        """Keypoints ``(x, y)`` in slice pixels and L2-normalised descriptors of ``image``.

        ``mask`` (same shape, non-zero = usable) removes keypoints on unusable pixels.
        """
        img = np.asarray(image)
        fmap = self.feature_map(img)
        h, w = img.shape
        if mask is not None and np.asarray(mask).shape != img.shape:
            raise DeepAlignError(f"mask shape {np.asarray(mask).shape} != slice shape {img.shape}")
        dim = fmap.shape[2] * (5 if self.descriptor_radius > 0 else 1)
        m = None if mask is None else (np.asarray(mask) > 0)
        if self.keypoints == "dog":
            px, py, score = self._dog_keypoints(img, m)
        else:
            px, py, score = _response_keypoints(fmap, m)
        r = max(self.border, self.descriptor_radius + STRIDE)
        keep = (px >= r) & (px <= w - 1 - r) & (py >= r) & (py <= h - 1 - r)
        px, py, score = px[keep], py[keep], score[keep]
        if px.size == 0:
            return Features.empty((h, w), dim)
        # Stable sort so equal responses keep their (deterministic) detection order.
        order = np.argsort(-score, kind="stable")
        if self.max_features:
            order = order[: self.max_features]
        px, py = px[order], py[order]
        desc = _bilinear(fmap, px, py)
        if self.descriptor_radius > 0:
            rad = self.descriptor_radius
            parts = [desc] + [_bilinear(fmap, px + ox, py + oy)
                              for ox, oy in ((-rad, 0), (rad, 0), (0, -rad), (0, rad))]
            desc = np.concatenate(parts, axis=1)
        desc /= np.linalg.norm(desc, axis=1, keepdims=True) + 1e-12
        pts = np.stack([px, py], axis=1).astype(np.float32)
        return Features(np.ascontiguousarray(pts), np.ascontiguousarray(desc, np.float32), (h, w))


def _response_keypoints(fmap: np.ndarray, mask: np.ndarray | None
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mean = cv2.blur(fmap, (3, 3), borderType=cv2.BORDER_REFLECT)
    resp = ((fmap - mean) ** 2).sum(axis=2).astype(np.float32)
    dil = cv2.dilate(resp, np.ones((3, 3), np.uint8))
    ii, jj = np.nonzero((resp >= dil) & (resp > 0))
    hf, wf = resp.shape
    # Sub-cell refinement: vertex of the parabola through the response at -1, 0, +1.
    di = _parabola(resp, ii, jj, 1, 0, hf)
    dj = _parabola(resp, ii, jj, 0, 1, wf)
    px = STRIDE * (jj + dj) + (STRIDE - 1) / 2.0
    py = STRIDE * (ii + di) + (STRIDE - 1) / 2.0
    score = resp[ii, jj].astype(np.float64)
    if mask is not None:
        h, w = mask.shape
        ok = mask[np.clip(np.rint(py), 0, h - 1).astype(int),
                  np.clip(np.rint(px), 0, w - 1).astype(int)]
        px, py, score = px[ok], py[ok], score[ok]
    return px, py, score


def _parabola(resp: np.ndarray, ii: np.ndarray, jj: np.ndarray, si: int, sj: int,
              n: int) -> np.ndarray:
    idx = ii if si else jj
    inner = (idx > 0) & (idx < n - 1)
    off = np.zeros(ii.shape, np.float64)
    a = resp[np.clip(ii - si, 0, None), np.clip(jj - sj, 0, None)][inner]
    b = resp[ii, jj][inner]
    c = resp[np.minimum(ii + si, resp.shape[0] - 1), np.minimum(jj + sj, resp.shape[1] - 1)][inner]
    den = a - 2 * b + c
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(den < 0, 0.5 * (a - c) / den, 0.0)
    off[inner] = np.clip(d, -0.5, 0.5)
    return off


def _bilinear(fmap: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Bilinear sample of a (Hf, Wf, C) stride-4 map at pixel points -> (N, C)."""
    hf, wf, _ = fmap.shape
    u = np.clip((px - (STRIDE - 1) / 2.0) / STRIDE, 0, wf - 1)
    v = np.clip((py - (STRIDE - 1) / 2.0) / STRIDE, 0, hf - 1)
    j0 = np.minimum(np.floor(u).astype(np.intp), wf - 2 if wf > 1 else 0)
    i0 = np.minimum(np.floor(v).astype(np.intp), hf - 2 if hf > 1 else 0)
    j1, i1 = np.minimum(j0 + 1, wf - 1), np.minimum(i0 + 1, hf - 1)
    fu = (u - j0)[:, None].astype(np.float32)
    fv = (v - i0)[:, None].astype(np.float32)
    out = (fmap[i0, j0] * (1 - fu) * (1 - fv) + fmap[i0, j1] * fu * (1 - fv)
           + fmap[i1, j0] * (1 - fu) * fv + fmap[i1, j1] * fu * fv)
    return out.astype(np.float32, copy=False)
