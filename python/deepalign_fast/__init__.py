"""deepalign-fast: fast, artifact-robust alignment of volume-EM image stacks.

Conventions used throughout the package (written once, here):

- Arrays are indexed ``(z, y, x)``; a single slice is ``(y, x)``.
- Points are ``(x, y)`` in pixels, with the origin at the *centre* of the top-left pixel.
- A transform maps **output (reference) coordinates to input (moving) coordinates**: it is the
  pull map a warp samples with, ``out[y, x] = moving[T(x, y)]``.
- Affines are 2x3 ``float64`` arrays ``[[a, b, tx], [c, d, ty]]`` acting on ``(x, y, 1)``.
- Displacement fields are ``(2, H, W)`` ``float32`` in pixels, ``dx`` then ``dy``.
- Errors: a wrong argument (type, shape, option value) raises ``ValueError`` or ``TypeError``
  naming the argument; bad data or files (an unreadable file, a broken slice, a transforms
  file that does not match) raise :class:`DeepAlignError` (a ``ValueError``) naming the file,
  the slice and the problem. The CLI prints either as one line and exits with status 2.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from ._errors import DeepAlignError

try:
    from . import _core  # noqa: F401  (3 ms, no numpy)
except ImportError as exc:  # pragma: no cover - only hit in a broken install
    raise ImportError(
        "deepalign_fast._core (the compiled C++ core) could not be imported. Install the "
        "package with `pip install .` (which compiles it), or for development build it in "
        "place with `cmake -S . -B build -DDEEPALIGN_INPLACE=ON && cmake --build build`."
    ) from exc

if TYPE_CHECKING:
    from .alignment import Aligner, AlignOptions, AlignResult, apply_transforms
    from .api import align, estimate_transforms
    from .estimate import MODELS, RansacResult, estimate_transform, fit_transform
    from .fields import (
        compose_affine_displacement,
        compose_displacements,
        jacobian_determinant,
        nonpositive_jacobian_fraction,
    )
    from .io import open_stack
    from .transforms import TransformSet
    from .warp import warp_affine, warp_displacement

    __version__: str

# The public names load on first use (PEP 562), so `import deepalign_fast` and the command
# line start at once: the CLI imports numpy, OpenCV and the rest inside its own error
# handling, where a Ctrl-C is one line, not a traceback.
_HOMES = {
    "Aligner": "alignment", "AlignOptions": "alignment", "AlignResult": "alignment",
    "apply_transforms": "alignment",
    "align": "api", "estimate_transforms": "api",
    "MODELS": "estimate", "RansacResult": "estimate", "estimate_transform": "estimate",
    "fit_transform": "estimate",
    "compose_affine_displacement": "fields", "compose_displacements": "fields",
    "jacobian_determinant": "fields", "nonpositive_jacobian_fraction": "fields",
    "open_stack": "io", "TransformSet": "transforms",
    "warp_affine": "warp", "warp_displacement": "warp",
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("deepalign-fast")
    except PackageNotFoundError:  # running from a source tree (PYTHONPATH=python)
        return "0.0.0+source"


if not TYPE_CHECKING:  # (type checkers see the imports above: a misspelt name is an error)
    def __getattr__(name: str) -> Any:
        if name == "__version__":
            value = _version()
        elif name in _HOMES:
            value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
        elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}"):
            value = importlib.import_module(f".{name}", __name__)  # a subpackage or module
        else:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        globals()[name] = value  # looked up once
        return value


__all__ = [
    "MODELS",
    "AlignOptions",
    "AlignResult",
    "Aligner",
    "align",
    "apply_transforms",
    "estimate_transforms",
    "TransformSet",
    "open_stack",
    "DeepAlignError",
    "RansacResult",
    "estimate_transform",
    "fit_transform",
    "__version__",
    "warp_affine",
    "warp_displacement",
    "compose_affine_displacement",
    "compose_displacements",
    "jacobian_determinant",
    "nonpositive_jacobian_fraction",
]


def __dir__() -> list[str]:
    return __all__
