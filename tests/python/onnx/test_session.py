from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from deepalign_fast import DeepAlignError
from deepalign_fast.match.learned import INPUT, OUTPUT, default_model_path
from deepalign_fast.onnx.session import TensorSpec, create_session


@pytest.fixture(scope="module")
def model_path() -> Path:
    path = default_model_path()
    if not path.is_file():  # pragma: no cover - the wheel and the repo both ship it
        pytest.fail(f"shipped model missing: {path}")
    return path


def test_cpu_session_checks_and_runs(model_path: Path) -> None:
    sess = create_session(model_path, num_threads=1, inputs=(INPUT,), outputs=(OUTPUT,))
    assert sess.get_providers() == ["CPUExecutionProvider"]
    x = np.zeros((2, 1, 64, 96), np.float32)
    (y,) = sess.run(["features"], {"image": x})
    assert y.shape[0] == 2 and y.shape[2:] == (16, 24)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-4)


def test_threads_are_explicit(model_path: Path) -> None:
    sess = create_session(model_path, num_threads=1)
    opts = sess.get_session_options()
    assert opts.intra_op_num_threads == 1
    assert opts.inter_op_num_threads == 1


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DeepAlignError, match="not found"):
        create_session(tmp_path / "nope.onnx")


def test_corrupted_file(tmp_path: Path, model_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf" * 10)
    with pytest.raises(DeepAlignError, match="corrupted"):
        create_session(bad)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(model_path.read_bytes()[:5000])
    with pytest.raises(DeepAlignError, match="corrupted"):
        create_session(truncated)


def test_wrong_io_spec_is_caught_at_load(model_path: Path) -> None:
    with pytest.raises(DeepAlignError, match="inputs are"):
        create_session(model_path, inputs=(TensorSpec("pixels", 4),))
    with pytest.raises(DeepAlignError, match="rank 4"):
        create_session(model_path, inputs=(TensorSpec("image", 3),))
    with pytest.raises(DeepAlignError, match="tensor\\(double\\)"):
        create_session(model_path, outputs=(TensorSpec("features", 4, "tensor(double)"),))


def test_wrong_model_for_learned_extractor(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime this package supports
    path = tmp_path / "relu.onnx"
    onnx.save(model, path)
    from deepalign_fast.match.learned import LearnedExtractor

    with pytest.raises(DeepAlignError, match="not the model this code expects"):
        LearnedExtractor(path)


def test_wrong_input_shape_at_run(model_path: Path) -> None:
    from deepalign_fast.match.learned import LearnedExtractor

    ex = LearnedExtractor(model_path, num_threads=1)
    with pytest.raises(DeepAlignError, match="2-D slice"):
        ex.extract(np.zeros((2, 64, 64), np.uint8))
    with pytest.raises(DeepAlignError, match="2-D slice"):
        ex.extract(np.zeros((4, 64), np.uint8))
    with pytest.raises(DeepAlignError, match="mask shape"):
        ex.extract(np.zeros((64, 64), np.uint8), mask=np.ones((32, 32), np.uint8))


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_unavailable_gpu_provider_names_the_package(provider: str, model_path: Path) -> None:
    needed = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}[provider]
    if needed in ort.get_available_providers():
        sess = create_session(model_path, provider=provider)
        assert sess.get_providers()[0] == needed
        return
    with pytest.raises(DeepAlignError, match="onnxruntime-gpu"):
        create_session(model_path, provider=provider)


def test_unknown_provider_and_bad_threads(model_path: Path) -> None:
    with pytest.raises(DeepAlignError, match="unknown provider"):
        create_session(model_path, provider="tpu")
    with pytest.raises(DeepAlignError, match="num_threads"):
        create_session(model_path, num_threads=-1)
