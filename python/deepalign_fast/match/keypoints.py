"""Per-slice features and pairwise matching.

A :class:`FeatureExtractor` turns one slice into :class:`Features` (keypoints + descriptors);
:func:`match_features` pairs the features of two slices by mutual nearest neighbour with a
ratio test. The aligner only sees this interface, so raw-image SIFT and learned feature maps
(``deepalign_fast.match.learned``) are interchangeable.

Keypoints are ``(x, y)`` float32 pixel coordinates of the slice they came from (origin at the
centre of the top-left pixel).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import cv2
import numpy as np

from ..intensity import to_uint8

__all__ = ["Features", "FeatureExtractor", "SiftExtractor", "match_features"]


@dataclass(frozen=True)
class Features:
    """Keypoints ``(N, 2)`` float32 (x, y) and descriptors ``(N, D)`` float32 of one slice."""

    keypoints: np.ndarray
    descriptors: np.ndarray
    shape: tuple[int, int]

    def __len__(self) -> int:
        return int(self.keypoints.shape[0])

    @staticmethod
    def empty(shape: tuple[int, int], dim: int = 128) -> Features:
        return Features(np.zeros((0, 2), np.float32), np.zeros((0, dim), np.float32), shape)


@runtime_checkable
class FeatureExtractor(Protocol):
    """Anything that turns a 2-D slice into :class:`Features`."""

    name: str

    def extract(self, image: np.ndarray, mask: np.ndarray | None = None) -> Features:
        """Keypoints and descriptors of ``image``; ``mask`` (non-zero = usable) restricts them."""
        ...


class SiftExtractor:
    """OpenCV SIFT on the raw slice (contrast-stretched to uint8).

    Parameters
    ----------
    max_features : int
        Keep at most this many keypoints (strongest responses). 0 = no limit.
    contrast_threshold : float
        SIFT's contrast threshold; EM slices are low-contrast, so the default is lower than
        OpenCV's 0.04.
    root_sift : bool
        Apply the RootSIFT mapping (L1-normalise, square root), which makes Euclidean matching
        behave like the Hellinger kernel and matches more reliably.
    """

    name = "sift"

    def __init__(self, *, max_features: int = 4000, contrast_threshold: float = 0.02,
                 root_sift: bool = True) -> None:
        if max_features < 0:
            raise ValueError(f"max_features must be >= 0, got {max_features}")
        self.max_features = max_features
        self.root_sift = root_sift
        self._sift = cv2.SIFT.create(nfeatures=max_features, contrastThreshold=contrast_threshold)

    def extract(self, image: np.ndarray, mask: np.ndarray | None = None) -> Features:
        img8 = to_uint8(image)
        cv_mask = None if mask is None else (np.asarray(mask) > 0).astype(np.uint8)
        kps, desc = self._sift.detectAndCompute(img8, cv_mask)
        shape = (int(img8.shape[0]), int(img8.shape[1]))
        if desc is None or len(kps) == 0:
            return Features.empty(shape)
        pts = np.array([kp.pt for kp in kps], dtype=np.float32).reshape(-1, 2)
        desc = desc.astype(np.float32, copy=False)
        if self.root_sift:
            desc = desc / (np.abs(desc).sum(axis=1, keepdims=True) + 1e-7)
            desc = np.sqrt(desc)
        return Features(pts, np.ascontiguousarray(desc), shape)


def match_features(a: Features, b: Features, *, ratio: float = 0.85,
                   mutual: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(ia, ib)`` of matched keypoints between two slices.

    A pair is kept when ``b[ib]`` is ``a[ia]``'s nearest neighbour in descriptor space, passes
    Lowe's ratio test against the second nearest, and (``mutual=True``) ``a[ia]`` is also
    ``b[ib]``'s nearest neighbour.
    """
    if len(a) < 2 or len(b) < 2:
        return np.zeros(0, np.intp), np.zeros(0, np.intp)
    if a.descriptors.shape[1] != b.descriptors.shape[1]:
        raise ValueError(
            f"descriptor sizes differ ({a.descriptors.shape[1]} vs {b.descriptors.shape[1]}): "
            "features from different extractors cannot be matched"
        )
    matcher = cv2.BFMatcher(cv2.NORM_L2)
    knn = matcher.knnMatch(a.descriptors, b.descriptors, k=2)
    ia, ib = [], []
    for pair in knn:
        if len(pair) < 2:
            continue
        m, n = pair
        if m.distance < ratio * n.distance:
            ia.append(m.queryIdx)
            ib.append(m.trainIdx)
    ia_arr = np.asarray(ia, np.intp)
    ib_arr = np.asarray(ib, np.intp)
    if mutual and ia_arr.size:
        back = matcher.match(b.descriptors, a.descriptors)
        best_a_for_b = np.full(len(b), -1, np.intp)
        for m in back:
            best_a_for_b[m.queryIdx] = m.trainIdx
        keep = best_a_for_b[ib_arr] == ia_arr
        ia_arr, ib_arr = ia_arr[keep], ib_arr[keep]
    return ia_arr, ib_arr
