"""Export the trained encoder to ONNX (encoder only; the decoder is a training aid).

    python -m export.export_onnx runs/ssl/ssl_unet.pt python/deepalign_fast/models/ssl_encoder.onnx

Contract of the file (checked again at load time by ``deepalign_fast.onnx.session``):

* opset :data:`OPSET`; input ``image`` ``(N, 1, H, W)`` float32, normalised with
  ``deepalign_fast.onnx.normalise.normalise_slice``; H and W multiples of 4; N, H, W dynamic;
* output ``features`` ``(N, C, H/4, W/4)`` float32, unit L2 norm along C;
* metadata props: model version, normalisation, stride, channels, training data, date, ...
"""

from __future__ import annotations

import io
import json
import time
import warnings
from pathlib import Path

import onnx
import torch

from ._cli import export_main
from .models import STRIDE, SslUNet, UNetConfig

OPSET = 17
MODEL_VERSION = "ssl-encoder-1"
INPUT_NAME = "image"
OUTPUT_NAME = "features"


def load_encoder(ckpt: Path) -> tuple[torch.nn.Module, dict[str, object]]:
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    meta = state["meta"]
    model = SslUNet(UNetConfig.from_dict(meta["config"]))
    model.load_state_dict(state["state_dict"])
    model.eval()
    return model.encoder, meta


def export(ckpt: Path, out: Path) -> Path:
    encoder, meta = load_encoder(ckpt)
    dummy = torch.zeros(1, 1, 64, 64)
    buf = io.BytesIO()
    # The TorchScript exporter is deprecated in favour of dynamo, which needs onnxscript and
    # gives no benefit for this plain conv net; it (and torch internals it calls) emit
    # DeprecationWarnings, silenced for this call only.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            encoder, (dummy,), buf, opset_version=OPSET, input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], dynamo=False,
            dynamic_axes={INPUT_NAME: {0: "N", 2: "H", 3: "W"},
                          OUTPUT_NAME: {0: "N", 2: "H_div_4", 3: "W_div_4"}},
        )
    model = onnx.load_from_string(buf.getvalue())
    cfg = meta["config"]
    props = {
        "model_version": MODEL_VERSION,
        "normalisation": str(meta["normalisation"]),
        "stride": str(STRIDE),
        "channels": str(cfg["feature_dim"]),  # type: ignore[index]
        "unet_channels": json.dumps(cfg["channels"]),  # type: ignore[index]
        "training_data": json.dumps(meta["data"]),
        "training_steps": str(meta["steps"]),
        "training_seconds": str(meta["train_seconds"]),
        "trained_date": str(meta["date"]),
        "export_date": time.strftime("%Y-%m-%d"),
        "torch_version": torch.__version__,
        "opset": str(OPSET),
    }
    onnx.helper.set_model_props(model, props)
    model.producer_name = "deepalign-fast export/export_onnx.py"
    onnx.checker.check_model(model, full_check=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, out)
    return out


def main(argv: list[str] | None = None) -> int:
    return export_main("python -m export.export_onnx", __doc__, "export.train_ssl", export, argv)


if __name__ == "__main__":
    raise SystemExit(main())
