"""The options of an alignment (:class:`AlignOptions`): one frozen dataclass, checked once."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from ..estimate import MODELS
from ..match import FEATURES
from .solve import SLOW_DRIFT

__all__ = ["CANVAS", "FEATURES", "MODES", "PROVIDERS", "AlignOptions", "option_docs"]

Features = Literal["blocks", "sift", "learned"]
ModelName = Literal["translation", "rigid", "similarity", "affine"]
SlowDrift = Literal["keep", "follow", "none"]
Canvas = Literal["reference", "union"]
Provider = Literal["cpu", "cuda", "tensorrt"]
Mode = Literal["affine", "expected-affine", "elastic"]
MODES: tuple[str, ...] = get_args(Mode)
CANVAS: tuple[str, ...] = get_args(Canvas)
PROVIDERS: tuple[str, ...] = get_args(Provider)
assert get_args(Features) == FEATURES and get_args(SlowDrift) == SLOW_DRIFT
assert get_args(ModelName) == MODELS


@dataclass(frozen=True)
class AlignOptions:
    """Options of :class:`Aligner` (all keyword). The ``align`` flags are generated from
    these fields: same names (``--drift-sigma``; ``num_threads`` is ``--threads``), same
    defaults, and the help below.

    Parameters
    ----------
    features : {"blocks", "sift", "learned"}
        How slices are matched: dense NCC block matching on the raw slices (default),
        SIFT keypoints on the raw slices, or keypoints on the learned feature maps.
    model : {"translation", "rigid", "similarity", "affine"}
        Transform model of each slice; ``"affine"`` (default) is regularised toward rigid by
        ``regularise``, the others are enforced.
    offsets : tuple of int
        Slice z is matched with its predecessors at these ranks (1 = nearest non-blank
        slice); all pairs enter one global solve. More and farther offsets average out
        per-pair noise and tie each slice to both sides; each costs one finest-level match.
    threshold : float
        Inlier threshold in pixels of the per-pair RANSAC.
    min_matches : int
        A pair with fewer consistent correspondences is not used.
    min_pair_score : float
        A pair whose median block correlation (after alignment) is below this is not used
        (0 = all plausible pairs are used). Neighbouring FIB-SEM slices correlate at
        0.8-0.95, thick or 50-nm sections at 0.3-0.4.
    regularise : float
        Strength of the per-slice prior toward a rigid map (``model="affine"``), relative to
        a slice's match weight: 0 = free affine per slice; larger values trust the matches'
        scale/shear less.
    slow_drift : {"keep", "follow", "none"}
        Slow motion: ``"keep"`` the input's (default; an aligned stack stays where it is,
        jitter and per-slice errors are removed; for FIB-SEM translation what is slow is
        measured on the stack, otherwise it is what is slower than ``drift_sigma`` slices),
        ``"follow"`` what the matches see (corrects slow stage drift too, but also follows
        the apparent motion of oblique anatomy: several px over hundreds of slices), or
        ``"none"``: the raw solve (follows slow rotation, scale and shear as well).
    drift_sigma : float
        Gaussian sigma (slices) separating slow motion from jitter for ``slow_drift="keep"``
        (rotation, scale and shear; translation where the content changes between slices,
        with fewer than 16 trusted slices, and in ``stream``).
    canvas : {"reference", "union"}
        Output frame: that of the first slice (same shape as the input), or the bounding box
        of all aligned slices.
    num_threads : int
        Threads of the C++ kernels (0 = all cores).
    provider : {"cpu", "cuda", "tensorrt"}
        onnxruntime execution provider for ``features="learned"``; asking for a GPU provider
        that is not installed is an error naming the package to install.
    mode : {"affine", "expected-affine", "elastic"}
        Rendering: one affine per slice; or (damaged serial sections) each slice refined after
        the affine solve by an expected-affine field against the previous output slice,
        matched with ``refine_features``
        (:class:`deepalign_fast.refine.expected_affine.StackRefiner`); or ``"elastic"``: each
        slice refined by the learned flow network against the previous output slice
        (:class:`deepalign_fast.refine.elastic.ElasticRefiner`). The fields of both are kept
        beside the transforms file, so ``apply`` reproduces the render (labels included).
    refine_features : {"learned", "blocks", "sift"}
        Matcher of the expected-affine refinement (``mode="expected-affine"``): learned
        keypoints (default; the only matcher that beats a single global affine on both real
        fold pairs), dense blocks (many more matches on small or low-contrast slices) or SIFT.
    masks : path, optional
        Damage masks for ``mode="expected-affine"`` (stack or folder, non-zero = damage).
    max_folding : float
        ``mode="elastic"``: largest accepted fraction of non-positive Jacobian determinants
        per slice (a field that folds more is damped, or dropped and reported).
    field_stride : int
        ``mode="elastic"``: the fields are stored every ``field_stride`` output pixels.
    """

    features: Features = "blocks"
    model: ModelName = "affine"
    offsets: tuple[int, ...] = (1, 2, 4, 8)
    threshold: float = 2.0
    min_matches: int = 12
    min_pair_score: float = 0.0
    regularise: float = 0.05
    slow_drift: SlowDrift = "keep"
    drift_sigma: float = 16.0
    canvas: Canvas = "reference"
    num_threads: int = 0
    provider: Provider = "cpu"
    mode: Mode = "affine"
    refine_features: Features = "learned"
    masks: str | None = None
    max_folding: float = 0.001
    field_stride: int = 4

    def __post_init__(self) -> None:
        checks = [("features", self.features, FEATURES), ("model", self.model, MODELS),
                  ("refine_features", self.refine_features, FEATURES),
                  ("mode", self.mode, MODES), ("provider", self.provider, PROVIDERS),
                  ("slow_drift", self.slow_drift, SLOW_DRIFT), ("canvas", self.canvas, CANVAS)]
        for name, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        offsets = tuple(int(k) for k in self.offsets)
        if not offsets or min(offsets) < 1 or len(set(offsets)) != len(offsets):
            raise ValueError(f"offsets must be distinct integers >= 1, got {self.offsets!r}")
        object.__setattr__(self, "offsets", tuple(sorted(offsets)))
        for name in ("threshold", "drift_sigma"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        if not (np.isfinite(self.regularise) and self.regularise >= 0):
            raise ValueError(f"regularise must be a finite number >= 0, got {self.regularise}")
        if self.min_matches < 3:
            raise ValueError(f"min_matches must be >= 3, got {self.min_matches}")
        if not (np.isfinite(self.min_pair_score) and -1 <= self.min_pair_score <= 1):
            raise ValueError(f"min_pair_score must be in [-1, 1], got {self.min_pair_score}")
        if self.num_threads < 0:
            raise ValueError(f"num_threads must be >= 0, got {self.num_threads}")
        if not 0 <= self.max_folding < 1:
            raise ValueError(f"max_folding must be in [0, 1), got {self.max_folding}")
        if self.field_stride < 1:
            raise ValueError(f"field_stride must be >= 1, got {self.field_stride}")


def option_docs() -> dict[str, str]:
    """Each option's description from the :class:`AlignOptions` docstring (plain text, one
    line): the single source of the CLI's help."""
    doc = AlignOptions.__doc__ or ""
    body = doc.split("----------", 1)[1]
    docs: dict[str, str] = {}
    name = None
    for line in body.splitlines():
        m = re.match(r"^    (\w+) : ", line)
        if m:
            name = m.group(1)
            docs[name] = ""
        elif name is not None and line.startswith("        "):
            docs[name] += " " + line.strip()
    return {k: re.sub(r"``([^`]*)``|:\w+:`~?([^`]*)`", lambda m: m.group(1) or m.group(2),
                      v).strip() for k, v in docs.items()}
