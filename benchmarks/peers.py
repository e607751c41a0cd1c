"""Peer aligners run by the benchmarks, each returning pull maps in the package convention.

Every function takes a ``(z, y, x)`` stack and returns ``(z, 2, 3)`` float64 affines:
``affines[z]`` maps output (aligned) pixel coordinates ``(x, y, 1)`` to coordinates of input
slice ``z``, pixel centres at integers (``deepalign_fast.transforms``). Each peer registers
every slice to the previous one and chains the estimates, the usual way; slice 0 is the
reference (identity).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np
from deepalign_fast.geometry import compose

__all__ = ["PEERS", "available", "elastix_chain", "pystackreg_chain", "sift_chain", "to_uint8"]

_EYE = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


def to_uint8(stack: np.ndarray) -> np.ndarray:
    """The stack as uint8 (unchanged if it is; else its 0.5-99.5 percentile range mapped to
    0-255), for peers that need 8-bit input."""
    if stack.dtype == np.uint8:
        return stack
    lo, hi = (float(v) for v in np.percentile(stack, [0.5, 99.5]))
    out = (stack.astype(np.float32) - lo) * (255.0 / max(hi - lo, 1e-6))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def sift_chain(stack: np.ndarray, model: str, max_features: int = 0) -> np.ndarray:
    """The seed's baseline: SIFT + ratio test + RANSAC to the previous slice, chained.

    ``model``: ``"affine"`` (``cv2.estimateAffine2D``) or anything else for a similarity
    (``cv2.estimateAffinePartial2D``). A pair without 3 consistent matches keeps the previous
    slice's transform. ``max_features`` > 0 caps the keypoints (used at 2048^2, where unlimited
    SIFT finds tens of thousands and brute-force matching becomes quadratic: the cap only makes
    the baseline faster)."""
    sift = cv2.SIFT.create(nfeatures=max_features)
    matcher = cv2.BFMatcher(cv2.NORM_L2)
    out = [_EYE.copy()]
    prev = None
    for img in to_uint8(stack):
        kp, des = sift.detectAndCompute(img, None)
        cur = (np.array([k.pt for k in kp], np.float64), des)
        if prev is not None:
            m = None
            if cur[1] is not None and prev[1] is not None and len(kp) >= 3:
                good = [p[0] for p in matcher.knnMatch(prev[1], cur[1], k=2)
                        if len(p) == 2 and p[0].distance < 0.75 * p[1].distance]
                if len(good) >= 3:
                    src = prev[0][[g.queryIdx for g in good]]
                    dst = cur[0][[g.trainIdx for g in good]]
                    est = cv2.estimateAffine2D if model == "affine" else cv2.estimateAffinePartial2D
                    m, _ = est(src, dst, ransacReprojThreshold=2.0)
            m = _EYE.copy() if m is None else m  # m: previous-slice coords -> this slice's
            out.append(compose(m, out[-1]))
        prev = cur
    return np.stack(out)


def pystackreg_chain(stack: np.ndarray, model: str) -> np.ndarray:
    """pystackreg (TurboReg) to the previous slice; its matrices are already pull maps
    (output -> slice, ``(x, y)``, pixel centres at integers), as ``skimage.transform.warp``
    takes them."""
    from pystackreg import StackReg

    kind = {"affine": StackReg.AFFINE, "rigid": StackReg.RIGID_BODY,
            "translation": StackReg.TRANSLATION}[model]
    tmats = StackReg(kind).register_stack(stack.astype(np.float64), axis=0,
                                              reference="previous")
    return np.ascontiguousarray(tmats[:, :2, :], dtype=np.float64)


def elastix_chain(stack: np.ndarray, model: str) -> np.ndarray:
    """itk-elastix (default parameter maps, 3 resolutions, advanced Mattes MI) registering each
    slice to the previous one, chained; its result is the same pull map as ours (elastix maps
    fixed = previous-slice points to moving = this slice's points)."""
    with warnings.catch_warnings():  # see _import_itk
        warnings.simplefilter("ignore", DeprecationWarning)
        return _elastix_chain(stack, model)


def _elastix_chain(stack: np.ndarray, model: str) -> np.ndarray:
    itk = _import_itk()
    po = itk.ParameterObject.New()
    po.AddParameterMap(po.GetDefaultParameterMap("rigid" if model == "rigid" else "affine", 3))
    out = [_EYE.copy()]
    for z in range(1, len(stack)):
        _, rp = itk.elastix_registration_method(
            itk.image_view_from_array(np.ascontiguousarray(stack[z - 1], np.float32)),
            itk.image_view_from_array(np.ascontiguousarray(stack[z], np.float32)),
            parameter_object=po, log_to_console=False)
        p = [float(v) for v in rp.GetParameter(0, "TransformParameters")]
        c = np.array([float(v) for v in rp.GetParameter(0, "CenterOfRotationPoint")])
        if model == "rigid":  # EulerTransform: angle, tx, ty
            a = np.array([[np.cos(p[0]), -np.sin(p[0])], [np.sin(p[0]), np.cos(p[0])]])
            t = np.array(p[1:3])
        else:  # AffineTransform: a11 a12 a21 a22 tx ty
            a = np.array([[p[0], p[1]], [p[2], p[3]]])
            t = np.array(p[4:6])
        m = np.hstack([a, (c - a @ c + t)[:, None]])  # x -> A (x - c) + c + t
        out.append(compose(m, out[-1]))
    return np.stack(out)


def _import_itk() -> Any:
    """``import itk`` with its import-time DeprecationWarnings silenced: its SWIG modules emit
    them while loading, and turned into errors (pytest's filterwarnings=error) they crash the
    interpreter."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import itk

        itk.ParameterObject  # noqa: B018 - itk loads lazily: load the elastix module now
    return itk


def _sift(model: str) -> Callable[[np.ndarray], np.ndarray]:
    def run(stack: np.ndarray) -> np.ndarray:
        # unlimited SIFT on 2048^2 slices matches tens of thousands of keypoints pairwise
        cap = 8000 if stack.shape[1] * stack.shape[2] > 1500**2 else 0
        return sift_chain(stack, model, max_features=cap)
    return run


#: name -> (python module it needs, function of the stack)
PEERS: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]] = {
    "pystackreg-rigid": ("pystackreg", lambda s: pystackreg_chain(s, "rigid")),
    "pystackreg-affine": ("pystackreg", lambda s: pystackreg_chain(s, "affine")),
    "sift-similarity": ("cv2", _sift("similarity")),
    "sift-affine": ("cv2", _sift("affine")),
    "elastix-rigid": ("itk", lambda s: elastix_chain(s, "rigid")),
    "elastix-affine": ("itk", lambda s: elastix_chain(s, "affine")),
}


def available(name: str) -> bool:
    """Whether peer ``name``'s package can be imported here."""
    try:
        if PEERS[name][0] == "itk":
            _import_itk()
        else:
            __import__(PEERS[name][0])
        return True
    except ImportError:
        return False
