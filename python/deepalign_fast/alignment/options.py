"""The options of an alignment (:class:`AlignOptions`): one frozen dataclass, checked once."""

from __future__ import annotations

import functools
import json
import numbers
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import numpy as np

from .._errors import DeepAlignError
from ..estimate import MODELS
from ..match import FEATURES
from .solve import SLOW_DRIFT

__all__ = ["CANVAS", "FEATURES", "MAX_OFFSET", "MODES", "PROVIDERS", "AlignOptions",
           "load_options_file", "option_docs"]

Features = Literal["blocks", "sift", "learned"]
ModelName = Literal["translation", "rigid", "similarity", "affine"]
SlowDrift = Literal["keep", "follow", "none"]
Canvas = Literal["reference", "union"]
Provider = Literal["cpu", "cuda", "tensorrt"]
Mode = Literal["affine", "expected-affine", "elastic"]
#: The per-slice rigid prior's strength: a number, or "auto" (measured on the stack).
Strength = float | Literal["auto"]
MODES: tuple[str, ...] = get_args(Mode)
CANVAS: tuple[str, ...] = get_args(Canvas)
PROVIDERS: tuple[str, ...] = get_args(Provider)
assert get_args(Features) == FEATURES and get_args(SlowDrift) == SLOW_DRIFT
assert get_args(ModelName) == MODELS

#: The farthest offset: the matcher keeps ``max(offsets)`` prepared slices in memory.
MAX_OFFSET = 1024


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
        At most 1024 (:data:`MAX_OFFSET`: the ``max(offsets)`` most recent prepared slices are
        kept).
    threshold : float
        Inlier threshold in pixels of the per-pair RANSAC.
    min_matches : int
        A pair with fewer consistent correspondences is not used.
    min_pair_score : float
        A pair whose median block correlation (after alignment) is below this is not used
        (0 = all plausible pairs are used). Neighbouring FIB-SEM slices correlate at
        0.8-0.95, thick or 50-nm sections at 0.3-0.4.
    regularise : float or "auto"
        Strength of the per-slice prior toward a rigid map (``model="affine"``), relative to
        a slice's match weight: 0 = free affine per slice; larger values trust the matches'
        scale/shear less. ``"auto"`` (default): measured on the stack, from the spread of
        scale and shear its slices show (0.05 near slices that cannot measure their own,
        such as damaged ones, and on stacks of fewer than 16 slices).
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
        the affine solve by expected-affine fields toward its two neighbours' affine renders
        (a slice with damage in ``masks`` the whole way, never a clean one toward a damaged
        one), matched with ``refine_features``
        (:class:`deepalign_fast.refine.expected_affine.StackRefiner`); or ``"elastic"``: each
        slice moved by the learned flow network toward its two neighbours' affine renders
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
    regularise: Strength = "auto"
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
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name))
        if self.masks is not None:  # a Path too; kept as text (the options are JSON records)
            object.__setattr__(self, "masks", os.fspath(self.masks))
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
        if max(offsets) > MAX_OFFSET:
            raise ValueError(f"offsets must be at most {MAX_OFFSET} (the matcher keeps that many "
                             f"prepared slices in memory), got {max(offsets)}")
        object.__setattr__(self, "offsets", tuple(sorted(offsets)))
        for name in ("threshold", "drift_sigma"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        if self.regularise != "auto" and not (np.isfinite(self.regularise)
                                               and self.regularise >= 0):
            raise ValueError(f"regularise must be \"auto\" or a finite number >= 0, "
                             f"got {self.regularise}")
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


def _expected_type(hint: Any) -> tuple[str, Any]:
    """What a field of type ``hint`` takes, in words, and a test of a value."""
    def real(v: Any) -> bool:
        return isinstance(v, numbers.Real) and not isinstance(v, bool)

    def integer(v: Any) -> bool:
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    if get_origin(hint) is Literal:
        choices = get_args(hint)
        return f"one of {', '.join(choices)}", lambda v: isinstance(v, str)
    if hint == tuple[int, ...]:
        return ("a list of integers", lambda v: isinstance(v, (list, tuple))
                and all(integer(x) for x in v))
    if hint is int:
        return "an integer", integer
    if hint is float:
        return "a number", real
    if hint == Strength:
        return '"auto" or a number', lambda v: v == "auto" or real(v)
    return "a path (text) or null", lambda v: v is None or isinstance(v, (str, os.PathLike))


@functools.cache
def _hints() -> dict[str, Any]:
    return get_type_hints(AlignOptions, globals())


def _check_type(name: str, value: Any) -> None:
    """TypeError naming the option and the type it takes, for a value of another type
    (a list for a number, a number for a choice, ``true`` for a number: bool is not one)."""
    expected, ok = _expected_type(_hints()[name])
    if not ok(value):
        import reprlib

        shape = getattr(value, "shape", None)  # an array in full would be pages long
        got = f"an array of shape {shape}" if isinstance(shape, tuple) else reprlib.repr(value)
        raise TypeError(f"{name} must be {expected}, got {got} ({type(value).__name__})")


def load_options_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The :class:`AlignOptions` fields set by a config file, checked.

    The file is JSON (a transforms file, whose ``options`` are that run's, or a plain object
    of fields, as ``deepalign-fast config --defaults`` prints) or, for ``.yaml``/``.yml``,
    YAML (needs PyYAML). Any problem (unreadable or binary file, syntax, unknown keys, a value
    of the wrong type or out of range) is a one-line :class:`DeepAlignError` naming the file
    and the option.
    """
    where = f"{path}: (--config)"
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise DeepAlignError(f"{where} cannot read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DeepAlignError(f"{where} not a JSON or YAML config file (binary data, not "
                             "text); pass the config file, or a transforms file") from None
    data: Any
    if Path(path).suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise DeepAlignError(f"{where} YAML needs PyYAML (pip install pyyaml); or use "
                                 "JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise DeepAlignError(f"{where} not valid YAML: {exc}") from None
    else:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise DeepAlignError(f"{where} not valid JSON: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("options"), dict):
        data = data["options"]  # a transforms file: the options of that run
    if not isinstance(data, dict):
        raise DeepAlignError(f"{where} expected an object of align options")
    known = {f.name for f in fields(AlignOptions)}
    unknown = sorted(str(k) for k in set(data) - known)
    if unknown:
        raise DeepAlignError(f"{where} unknown option(s) {', '.join(unknown)}; known: "
                             f"{', '.join(sorted(known))}")
    try:
        AlignOptions(**data)  # every value's type and range, before any flag overrides it
    except (TypeError, ValueError) as exc:
        raise DeepAlignError(f"{where} {exc}") from None
    if isinstance(data.get("offsets"), list):
        data["offsets"] = tuple(data["offsets"])
    masks = data.get("masks")
    if isinstance(masks, str) and not os.path.isabs(masks):
        # relative to the config file's folder (where it was written for), unless only the
        # current folder holds it
        beside = Path(path).parent / masks
        if beside.exists() or not os.path.exists(masks):
            data["masks"] = str(beside)
    return dict(data)


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
