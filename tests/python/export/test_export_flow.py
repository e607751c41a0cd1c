"""Flow network (export/): spatial transformer vs OpenCV, integration, ONNX parity, training.

Needs torch + onnx (skipped otherwise).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from deepalign_fast.onnx.session import create_session  # noqa: E402
from deepalign_fast.refine.flow import INPUTS, OUTPUTS  # noqa: E402
from deepalign_fast.warp import warp_displacement  # noqa: E402

pytestmark = pytest.mark.torch

# Float32 conv stacks + grid_sample in two runtimes differ by rounding only (fields in px).
RTOL, ATOL = 1e-4, 1e-4


def _smooth(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    import cv2

    return cv2.GaussianBlur(rng.random(shape).astype(np.float32), (0, 0), sigma)


@pytest.mark.parametrize("padding,fill_border", [("zeros", False), ("border", True)])
def test_warp_matches_cv2(rng: np.random.Generator, padding: str, fill_border: bool) -> None:
    import cv2

    from export.flow_models import warp

    h, w = 37, 53  # odd, non-square: catches x/y and pixel-centre mix-ups
    img = _smooth(rng, (h, w), 2.0)
    u = (rng.normal(size=(2, h, w)) * 3).astype(np.float32)
    got = warp(torch.from_numpy(img)[None, None], torch.from_numpy(u)[None],
               padding=padding)[0, 0].numpy()
    if fill_border:
        gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
        ref = cv2.remap(img, gx + u[0], gy + u[1], cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_REPLICATE)
    else:
        ref = warp_displacement(img, u)  # the runtime's warp (cv2.remap, constant 0)
    # cv2.remap quantises coordinates to 1/32 px; on this smooth image that is < 1e-3.
    np.testing.assert_allclose(got, ref, atol=1e-3)


def test_warp_integer_shift_is_exact() -> None:
    from export.flow_models import warp

    img = torch.arange(48.0).reshape(1, 1, 6, 8)
    u = torch.zeros(1, 2, 6, 8)
    u[:, 0] = 1.0  # sample one pixel to the right
    u[:, 1] = 2.0  # and two down
    out = warp(img, u, padding="zeros")[0, 0]
    np.testing.assert_allclose(out[:4, :7].numpy(), img[0, 0, 2:, 1:].numpy(), atol=1e-5)


def test_scaling_and_squaring() -> None:
    from export.flow_models import integrate

    v = torch.full((1, 2, 32, 32), 0.75)
    np.testing.assert_allclose(integrate(v, 6).numpy(), v.numpy(), atol=1e-5)  # exp(const)
    # A strongly compressive velocity: the raw field folds, its exponential does not.
    gen = torch.Generator().manual_seed(0)
    coarse = torch.randn(1, 2, 4, 4, generator=gen) * 12.0
    vel = torch.nn.functional.interpolate(coarse, size=(64, 64), mode="bicubic",
                                          align_corners=True)
    from deepalign_fast.fields import nonpositive_jacobian_fraction

    raw = nonpositive_jacobian_fraction(vel[0].numpy())
    inte = nonpositive_jacobian_fraction(integrate(vel, 7)[0].numpy())
    assert raw > 0.01
    assert inte < raw / 5


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    from export.export_flow_onnx import OPSET, export
    from export.flow_models import FlowConfig, FlowUNet
    from export.train_flow import NORMALISATION

    torch.manual_seed(0)
    model = FlowUNet(FlowConfig())
    with torch.no_grad():  # non-trivial weights, so the field is far from zero
        model.flow.weight.normal_(0.0, 1.0)
    model.eval()
    tmp = tmp_path_factory.mktemp("flow_onnx")
    meta = {"config": model.cfg.to_dict(), "normalisation": NORMALISATION, "loss": "ncc",
            "smooth": 1.0, "data": {"synthetic": {}}, "steps": 0, "train_seconds": 0,
            "date": "2000-01-01"}
    ckpt = tmp / "flow.pt"
    torch.save({"state_dict": model.state_dict(), "meta": meta}, ckpt)
    out = export(ckpt, tmp / "flow.onnx")
    assert OPSET == 17
    return model, out


@pytest.mark.parametrize("shape", [(1, 1, 64, 64), (2, 1, 96, 160), (1, 1, 256, 128)])
def test_torch_vs_onnxruntime(exported: tuple[object, Path], shape: tuple[int, ...]) -> None:
    model, path = exported
    r = np.random.default_rng(1)
    f = r.standard_normal(shape).astype(np.float32)
    m = r.standard_normal(shape).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(np.concatenate([f, m], 1))).numpy()  # type: ignore[operator]
    sess = create_session(path, num_threads=1, inputs=INPUTS, outputs=OUTPUTS)
    (got,) = sess.run(["flow"], {"fixed": f, "moving": m})
    assert got.shape == ref.shape == (shape[0], 2, shape[2], shape[3])
    assert np.abs(ref).max() > 0.1  # the check is not vacuous
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)


def test_model_contract(exported: tuple[object, Path]) -> None:
    _, path = exported
    m = onnx.load(path)
    onnx.checker.check_model(m, full_check=True)
    assert [i.name for i in m.graph.input] == ["fixed", "moving"]
    assert [o.name for o in m.graph.output] == ["flow"]
    assert m.opset_import[0].version == 17
    dims = [d.dim_param for d in m.graph.input[0].type.tensor_type.shape.dim]
    assert dims[0] and dims[2] and dims[3]  # N, H, W dynamic
    props = {p.key: p.value for p in m.metadata_props}
    for key in ("model_version", "normalisation", "multiple", "int_steps", "loss",
                "flow_convention", "training_data", "opset"):
        assert key in props
    assert props["multiple"] == "16"


def _tiny_stack(tmp_path: Path) -> Path:
    import tifffile

    r = np.random.default_rng(0)
    stack = np.stack([(255 * _smooth(r, (96, 96), 2.5)).astype(np.uint8) for _ in range(6)])
    path = tmp_path / "tiny.tif"
    tifffile.imwrite(path, stack)
    return path


@pytest.mark.parametrize("loss", ["ncc", "deepsim"])
def test_training_smoke(tmp_path: Path, loss: str) -> None:
    from export.export_flow_onnx import export
    from export.models import SslUNet, UNetConfig
    from export.train_flow import main

    torch.set_num_threads(1)
    args = ["--loss", loss, "--data", str(_tiny_stack(tmp_path)), "--out", str(tmp_path / "run"),
            "--max-steps", "3", "--batch", "2", "--crop", "32", "--val-batches", "1",
            "--eval-every", "2", "--artifact-prob", "0.5"]
    if loss == "deepsim":
        enc = SslUNet(UNetConfig())
        ckpt = tmp_path / "ssl.pt"
        torch.save({"state_dict": enc.state_dict(),
                    "meta": {"config": enc.cfg.to_dict()}}, ckpt)
        args += ["--encoder", str(ckpt)]
    assert main(args) == 0
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["steps"] == 3 and meta["loss"] == loss
    assert np.isfinite(meta["final"]["val_ncc"])
    out = export(tmp_path / "run" / "flow.pt", tmp_path / "flow.onnx")
    assert out.is_file()
