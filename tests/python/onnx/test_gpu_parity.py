"""GPU parity: the learned encoder and the flow network on onnxruntime's CUDA (and TensorRT)
provider agree with the CPU provider within ``benchmarks.gpu_check.TOLERANCES``.

Runs only where onnxruntime offers ``CUDAExecutionProvider`` (onnxruntime-gpu installed);
skipped everywhere else, CI included. ``benchmarks/gpu_check.sh`` runs it on a GPU machine.
Where CUDA is offered but does not load (driver, CUDA or cuDNN libraries missing), onnxruntime
would silently run on the CPU: that fails here. TensorRT is optional: its tests skip when its
libraries do not load.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np
import onnxruntime as ort
import pytest

pytestmark = pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers(),
    reason="onnxruntime offers no CUDAExecutionProvider (install onnxruntime-gpu)")

SIZE = 1280  # > the 1024 px tiles of both models: the tiled, blended code paths run


@pytest.fixture(scope="module")
def gc() -> ModuleType:
    import benchmarks.gpu_check as gc

    return gc


@pytest.fixture(scope="module")
def pair(gc: ModuleType) -> tuple[np.ndarray, np.ndarray]:
    fixed, moving = gc.sample_pair(SIZE)
    return fixed, moving


def _require(gc: ModuleType, provider: str) -> None:
    """Fail if CUDA is offered but not used; skip TensorRT where its libraries don't load."""
    from deepalign_fast.onnx.session import PROVIDERS

    want = PROVIDERS[provider][0]
    try:
        used = gc.active_providers(provider)
    except Exception as exc:
        if provider == "tensorrt":
            pytest.skip(f"TensorRT unavailable: {exc}")
        raise
    if used[0] != want:
        if provider == "tensorrt":
            pytest.skip(f"TensorRT libraries did not load (onnxruntime used {used})")
        pytest.fail(f"onnxruntime offers {want} but ran on {used}: CUDA/cuDNN libraries or the "
                    "driver did not load")


def test_cuda_provider_is_used(gc: ModuleType) -> None:
    _require(gc, "cuda")


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_encoder_parity(gc: ModuleType, pair: tuple[np.ndarray, np.ndarray],
                        provider: str) -> None:
    from deepalign_fast.match.learned import LearnedExtractor

    _require(gc, provider)
    fixed = pair[0]
    cpu = LearnedExtractor(provider="cpu")
    gpu = LearnedExtractor(provider=provider)
    measured = gc.feature_parity(cpu.feature_map(fixed), gpu.feature_map(fixed))
    assert gc.within(measured, "fp32"), (measured, gc.TOLERANCES["fp32"])
    # Keypoints come from the CPU detector: identical; descriptors within the same bound.
    a, b = cpu.extract(fixed), gpu.extract(fixed)
    np.testing.assert_array_equal(a.keypoints, b.keypoints)
    assert gc.within(gc.feature_parity(a.descriptors, b.descriptors), "fp32")


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_flow_parity(gc: ModuleType, pair: tuple[np.ndarray, np.ndarray],
                     provider: str) -> None:
    from deepalign_fast.refine.flow import FlowPredictor

    _require(gc, provider)
    fixed, moving = pair
    ref = FlowPredictor(provider="cpu").predict(fixed, moving)
    got = FlowPredictor(provider=provider).predict(fixed, moving)
    assert got.shape == (2, SIZE, SIZE) and got.dtype == np.float32
    measured = gc.flow_parity(ref, got)
    assert gc.within(measured, "fp32"), (measured, gc.TOLERANCES["fp32"])
    # The field is not trivially zero: the check compares real displacements.
    assert np.abs(ref).max() > 0.5
