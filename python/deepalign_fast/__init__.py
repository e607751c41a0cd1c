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

from importlib.metadata import PackageNotFoundError, version

from ._errors import DeepAlignError

try:
    from . import _core  # noqa: F401
except ImportError as exc:  # pragma: no cover - only hit in a broken install
    raise ImportError(
        "deepalign_fast._core (the compiled C++ core) could not be imported. Install the "
        "package with `pip install .` (which compiles it), or for development build it in place "
        "with `cmake -S . -B build -DDEEPALIGN_INPLACE=ON && cmake --build build`."
    ) from exc

from .alignment import Aligner, AlignOptions, AlignResult  # noqa: E402
from .api import align, estimate_transforms  # noqa: E402
from .estimate import MODELS, RansacResult, estimate_transform, fit_transform  # noqa: E402
from .fields import (  # noqa: E402
    compose_affine_displacement,
    compose_displacements,
    jacobian_determinant,
    nonpositive_jacobian_fraction,
)
from .io import open_stack  # noqa: E402
from .transforms import TransformSet  # noqa: E402
from .warp import warp_affine, warp_displacement  # noqa: E402

try:
    __version__ = version("deepalign-fast")
except PackageNotFoundError:  # running from a source tree (PYTHONPATH=python)
    __version__ = "0.0.0+source"

__all__ = [
    "MODELS",
    "AlignOptions",
    "AlignResult",
    "Aligner",
    "align",
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
