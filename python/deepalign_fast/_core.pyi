"""Type stubs for the compiled core (hand-written; keep in sync with csrc/bindings)."""

from typing import Any

import numpy as np
import numpy.typing as npt

def hardware_threads() -> int: ...

# bind_ransac.cpp
def ransac(
    src: npt.NDArray[np.float64],
    dst: npt.NDArray[np.float64],
    model: str,
    threshold: float,
    confidence: float,
    max_iterations: int,
    seed: int,
    num_threads: int,
    refine: bool,
) -> dict[str, Any]: ...
def fit_transform(
    src: npt.NDArray[np.float64],
    dst: npt.NDArray[np.float64],
    model: str,
    weights: npt.NDArray[np.float64] | None = None,
) -> npt.NDArray[np.float64] | None: ...

# csrc/bindings/bind_warp.cpp: writes into `dst` (same dtype as `src`, C-contiguous).
def warp_affine(
    src: npt.NDArray[np.uint8] | npt.NDArray[np.uint16] | npt.NDArray[np.float32],
    dst: npt.NDArray[np.uint8] | npt.NDArray[np.uint16] | npt.NDArray[np.float32],
    matrix: npt.NDArray[np.float64],
    interpolation: int,
    border: int,
    fill: float,
    num_threads: int,
) -> None: ...
