"""Type stubs for the compiled core (hand-written; keep in sync with csrc/bindings)."""

import enum
from typing import Any

import numpy as np
import numpy.typing as npt

def hardware_threads() -> int: ...

# bind_types.cpp: enums (their names are accepted wherever one is expected) and RANSAC types
class Interpolation(enum.Enum):
    nearest = 0
    linear = 1
    def __init__(self, value: int | str) -> None: ...

class Border(enum.Enum):
    constant = 0
    replicate = 1
    def __init__(self, value: int | str) -> None: ...

class TransformModel(enum.Enum):
    translation = 0
    rigid = 1
    similarity = 2
    affine = 3
    def __init__(self, value: int | str) -> None: ...

_Interpolation = Interpolation | str
_Border = Border | str
_Model = TransformModel | str

class RansacOptions:
    model: TransformModel
    threshold: float
    confidence: float
    max_iterations: int
    seed: int
    num_threads: int
    refine: bool
    def __init__(self) -> None: ...

class RansacResult:
    @property
    def success(self) -> bool: ...
    @property
    def reason(self) -> str: ...
    @property
    def num_inliers(self) -> int: ...
    @property
    def iterations(self) -> int: ...
    @property
    def rms(self) -> float: ...
    @property
    def matrix(self) -> npt.NDArray[np.float64]: ...
    @property
    def inliers(self) -> npt.NDArray[np.bool_]: ...
    def __bool__(self) -> bool: ...

# bind_ransac.cpp
def ransac(
    src: npt.NDArray[np.float64],
    dst: npt.NDArray[np.float64],
    options: RansacOptions,
) -> RansacResult: ...
def fit_transform(
    src: npt.NDArray[np.float64],
    dst: npt.NDArray[np.float64],
    model: _Model,
    weights: npt.NDArray[np.float64] | None = None,
) -> npt.NDArray[np.float64] | None: ...

# csrc/bindings/bind_warp.cpp: writes into `dst` (same dtype as `src`, C-contiguous).
def warp_affine(
    src: npt.NDArray[np.uint8] | npt.NDArray[np.uint16] | npt.NDArray[np.float32],
    dst: npt.NDArray[np.uint8] | npt.NDArray[np.uint16] | npt.NDArray[np.float32],
    matrix: npt.NDArray[np.float64],
    interpolation: _Interpolation,
    border: _Border,
    fill: float,
    num_threads: int,
) -> None: ...

# csrc/bindings/bind_displacement.cpp: fields are (2, H, W) C-contiguous (dx, dy).
def warp_displacement(
    src: npt.NDArray[np.uint8] | npt.NDArray[np.uint16] | npt.NDArray[np.float32],
    dst: npt.NDArray[np.uint8] | npt.NDArray[np.uint16] | npt.NDArray[np.float32],
    displacement: npt.NDArray[np.float32],
    affine: npt.NDArray[np.float64] | None,
    interpolation: _Interpolation,
    border: _Border,
    fill: float,
    num_threads: int,
) -> None: ...
def compose_affine_displacement(
    affine: npt.NDArray[np.float64],
    displacement: npt.NDArray[np.float32],
    out: npt.NDArray[np.float32],
    num_threads: int,
) -> None: ...
def compose_displacements(
    first: npt.NDArray[np.float32],
    second: npt.NDArray[np.float32],
    out: npt.NDArray[np.float32],
    border: _Border,
    num_threads: int,
) -> None: ...
def jacobian_determinant(
    displacement: npt.NDArray[np.float32] | npt.NDArray[np.float64],
    out: npt.NDArray[np.float32] | npt.NDArray[np.float64],
    num_threads: int,
) -> None: ...
def nonpositive_jacobian_count(
    displacement: npt.NDArray[np.float32] | npt.NDArray[np.float64],
    mask: npt.NDArray[np.bool_] | npt.NDArray[np.uint8] | None = None,
    num_threads: int = 0,
) -> tuple[int, int]: ...

# csrc/bindings/bind_expected_affine.cpp
def grid_size(n: int, step: int) -> int: ...
def coarsen_mask(
    mask: npt.NDArray[np.uint8], step: int, num_threads: int
) -> npt.NDArray[np.uint8]: ...
def knn_grid(
    points: npt.NDArray[np.float64], rows: int, cols: int, step: float, k: int,
    blocked: npt.NDArray[np.uint8] | None = None, num_threads: int = 0,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int32], npt.NDArray[np.uint8]]: ...
def expected_affine_field(
    knn_index: npt.NDArray[np.int32], step: float, labels: npt.NDArray[np.int32],
    affines: npt.NDArray[np.float64], global_affine: npt.NDArray[np.float64],
    blocked: npt.NDArray[np.uint8] | None, out_rows: int, out_cols: int, out_step: float,
    iterations: int, num_threads: int,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...
def warp_affine_field(
    src: npt.NDArray[Any], dst: npt.NDArray[Any], field: npt.NDArray[np.float64], step: float,
    interpolation: _Interpolation, border: _Border, fill: float, num_threads: int,
) -> None: ...

# csrc/bindings/bind_block_sums.cpp: images C-contiguous float32 of one size; x0, y0 int64.
def lk_block_sums(
    ref: npt.NDArray[np.float32],
    mov: npt.NDArray[np.float32],
    gx: npt.NDArray[np.float32],
    gy: npt.NDArray[np.float32],
    x0: npt.NDArray[np.int64],
    y0: npt.NDArray[np.int64],
    block: int,
    num_threads: int,
) -> npt.NDArray[np.float64]: ...
