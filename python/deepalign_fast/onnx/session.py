"""The one place where onnxruntime sessions are created.

Every ONNX model the package runs goes through :func:`create_session`, so execution providers,
thread counts and input/output checks are decided once:

* ``provider="cpu"`` (default) uses ``CPUExecutionProvider`` only.
* ``provider="cuda"`` / ``"tensorrt"`` ask for ``CUDAExecutionProvider`` /
  ``TensorrtExecutionProvider`` (TensorRT falls back to CUDA, then CPU, for nodes it cannot
  take). If the installed onnxruntime does not offer the provider a :class:`DeepAlignError`
  names what to install (``onnxruntime-gpu``; TensorRT libraries for ``tensorrt``) instead of
  silently running on the CPU.
* Intra-op threads are set explicitly and inter-op threads to 1, so inference does not
  oversubscribe the cores the C++ core's thread pool also uses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime as ort

from .._errors import DeepAlignError

__all__ = ["PROVIDERS", "TensorSpec", "create_session"]

#: Provider name accepted by :func:`create_session` -> onnxruntime provider chain.
PROVIDERS: dict[str, list[str]] = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}

_INSTALL_HINT = {
    "cuda": "install `onnxruntime-gpu` (in place of `onnxruntime`) matching your CUDA/cuDNN",
    "tensorrt": "install `onnxruntime-gpu` and NVIDIA TensorRT (its libraries on the library "
                "path)",
}

_ONNX_FLOAT = "tensor(float)"


@dataclass(frozen=True)
class TensorSpec:
    """Expected name, rank and element type of one model input or output."""

    name: str
    rank: int
    dtype: str = _ONNX_FLOAT


def create_session(
    model_path: str | os.PathLike[str],
    *,
    provider: str = "cpu",
    num_threads: int = 0,
    inputs: tuple[TensorSpec, ...] = (),
    outputs: tuple[TensorSpec, ...] = (),
) -> ort.InferenceSession:
    """Open an ONNX model with onnxruntime.

    Parameters
    ----------
    model_path : path
        The ``.onnx`` file.
    provider : {"cpu", "cuda", "tensorrt"}
        Execution provider. GPU providers must be available in the installed onnxruntime.
    num_threads : int
        Intra-op threads; 0 = onnxruntime's default (one per physical core). Lower it when the
        C++ core runs other slices in parallel, since both pools compete for the same cores.
    inputs, outputs : tuple of TensorSpec
        The model's inputs/outputs must be exactly these (names in order, rank, element type);
        empty = do not check.

    Returns
    -------
    onnxruntime.InferenceSession

    Raises
    ------
    DeepAlignError
        Missing or unreadable model file, unknown or unavailable provider, or a model whose
        inputs/outputs do not match ``inputs``/``outputs``.
    """
    if provider not in PROVIDERS:
        raise DeepAlignError(f"unknown provider {provider!r}; choose one of {sorted(PROVIDERS)}")
    if not isinstance(num_threads, int) or num_threads < 0:
        raise DeepAlignError(f"num_threads must be an int >= 0, got {num_threads!r}")
    path = Path(model_path)
    if not path.is_file():
        raise DeepAlignError(f"ONNX model file not found: {path}")
    available = ort.get_available_providers()
    chain = PROVIDERS[provider]
    if chain[0] not in available:
        raise DeepAlignError(
            f"provider {provider!r} needs onnxruntime's {chain[0]}, which this onnxruntime "
            f"({ort.__version__}) does not offer (available: {available}); "
            f"{_INSTALL_HINT.get(provider, '')}, or use provider='cpu'"
        )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = num_threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # warnings from onnxruntime are not errors for the caller
    try:
        session = ort.InferenceSession(str(path), sess_options=opts,
                                       providers=[p for p in chain if p in available])
    except Exception as exc:  # onnxruntime raises its own (non-ValueError) exception types
        raise DeepAlignError(
            f"cannot load ONNX model {path}: the file is corrupted or not an ONNX model "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); re-install the package "
            "or re-export the model"
        ) from exc
    _check_io(path, "input", session.get_inputs(), inputs)
    _check_io(path, "output", session.get_outputs(), outputs)
    return session


def _check_io(path: Path, kind: str, actual: list[Any], expected: tuple[TensorSpec, ...]) -> None:
    if not expected:
        return
    names = [a.name for a in actual]
    if names != [e.name for e in expected]:
        raise DeepAlignError(
            f"ONNX model {path}: {kind}s are {names}, expected {[e.name for e in expected]}; "
            "this file is not the model this code expects"
        )
    for a, e in zip(actual, expected, strict=False):
        if len(a.shape) != e.rank or a.type != e.dtype:
            raise DeepAlignError(
                f"ONNX model {path}: {kind} {a.name!r} is {a.type} of rank {len(a.shape)} "
                f"(shape {a.shape}), expected {e.dtype} of rank {e.rank}"
            )
