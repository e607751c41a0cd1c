"""Parity of the exported ONNX encoder with the torch model (needs torch + onnx)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from deepalign_fast.match.learned import INPUT, OUTPUT  # noqa: E402
from deepalign_fast.onnx.session import create_session  # noqa: E402

pytestmark = pytest.mark.torch

# Float32 conv stacks in two runtimes differ by rounding only; features have unit norm.
RTOL, ATOL = 1e-4, 2e-5


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    from export.export_onnx import OPSET, export
    from export.models import SslUNet, UNetConfig
    from export.train_ssl import NORMALISATION

    torch.manual_seed(0)
    model = SslUNet(UNetConfig())
    # Non-trivial BatchNorm statistics, so the parity check covers their folding.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    model.eval()
    tmp = tmp_path_factory.mktemp("onnx")
    meta = {"config": model.cfg.to_dict(), "normalisation": NORMALISATION,
            "data": {"synthetic": {}}, "steps": 0, "train_seconds": 0, "date": "2000-01-01"}
    ckpt = tmp / "m.pt"
    torch.save({"state_dict": model.state_dict(), "meta": meta}, ckpt)
    out = export(ckpt, tmp / "enc.onnx")
    assert OPSET == 17
    return model, out


@pytest.mark.parametrize("shape", [(1, 1, 64, 64), (3, 1, 96, 160), (2, 1, 256, 132)])
def test_torch_vs_onnxruntime(exported: tuple[object, Path], shape: tuple[int, ...]) -> None:
    model, path = exported
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    with torch.no_grad():
        ref = model.encoder(torch.from_numpy(x)).numpy()  # type: ignore[attr-defined]
    sess = create_session(path, num_threads=1, inputs=(INPUT,), outputs=(OUTPUT,))
    (got,) = sess.run(["features"], {"image": x})
    assert got.shape == ref.shape == (shape[0], 64, shape[2] // 4, shape[3] // 4)
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)


def test_model_contract(exported: tuple[object, Path]) -> None:
    _, path = exported
    m = onnx.load(path)
    onnx.checker.check_model(m)
    assert m.opset_import[0].version == 17
    assert [i.name for i in m.graph.input] == ["image"]
    assert [o.name for o in m.graph.output] == ["features"]
    dims = m.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["N", 1, "H", "W"]
    props = {p.key: p.value for p in m.metadata_props}
    for key in ("model_version", "normalisation", "stride", "channels", "training_data",
                "export_date"):
        assert key in props
    assert props["stride"] == "4" and props["channels"] == "64"


def test_shipped_model_metadata() -> None:
    from deepalign_fast.match.learned import default_model_path

    m = onnx.load(default_model_path())
    onnx.checker.check_model(m)
    props = {p.key: p.value for p in m.metadata_props}
    assert props["opset"] == "17"
    assert "lucchi" in props["training_data"]


def test_train_and_export_smoke(tmp_path: Path, lucchi) -> None:
    """The documented commands run end to end (2 tiny steps) and give a loadable encoder."""
    from deepalign_fast.match.learned import LearnedExtractor

    from export import export_onnx, train_ssl

    out = tmp_path / "run"
    assert train_ssl.main(["--data", "lucchi", "--out", str(out), "--max-steps", "2",
                           "--batch", "2", "--crop", "64", "--points", "16",
                           "--val-batches", "1", "--threads", "1"]) == 0
    meta = (out / "meta.json").read_text()
    assert '"val_slices": [\n        132,\n        165\n      ]' in meta
    onnx_path = tmp_path / "enc.onnx"
    assert export_onnx.main([str(out / "ssl_unet.pt"), str(onnx_path)]) == 0
    f = LearnedExtractor(onnx_path, num_threads=1).extract(lucchi[0][140])
    assert f.descriptors.shape[1] == 64
