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
