"""Export the trained registration network to ONNX.

    python -m export.export_flow_onnx runs/flow_deepsim/flow.pt \\
        python/deepalign_fast/models/flow.onnx

Contract of the file (checked again at load time by ``deepalign_fast.refine.flow.FlowPredictor``):

* opset :data:`OPSET`; inputs ``fixed`` and ``moving`` ``(N, 1, H, W)`` float32, each slice
  normalised with ``deepalign_fast.onnx.normalise.normalise_slice``; H and W multiples of
  :data:`~export.flow_models.MULTIPLE` (16); N, H, W dynamic;
* output ``flow`` ``(N, 2, H, W)`` float32: displacement in pixels, ``dx`` then ``dy``, pull
  convention ``aligned(p) = moving(p + flow(p))`` (scaling-and-squaring integration, if the
  model was trained with it, is inside the graph);
* metadata props: model version, loss, normalisation, multiple, integration steps, training
  data and held-out slices, steps, seconds, dates.
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
from .flow_models import MULTIPLE, FlowConfig, FlowExport, FlowUNet

OPSET = 17
MODEL_VERSION = "flow-1"
INPUT_NAMES = ("fixed", "moving")
OUTPUT_NAME = "flow"


def load_flow(ckpt: Path) -> tuple[FlowUNet, dict[str, object]]:
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    meta = state["meta"]
    model = FlowUNet(FlowConfig.from_dict(meta["config"]))
    model.load_state_dict(state["state_dict"])
    model.eval()
    return model, meta


def export_model(model: FlowUNet, meta: dict[str, object], out: Path) -> Path:
    """Write ``model`` to ``out`` with the contract above; returns ``out``."""
    wrapper = FlowExport(model).eval()
    dummy = (torch.zeros(1, 1, 64, 96), torch.zeros(1, 1, 64, 96))
    buf = io.BytesIO()
    # As in export_onnx.py: the TorchScript exporter (dynamo=False) and its DeprecationWarnings.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            wrapper, dummy, buf, opset_version=OPSET, input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME], dynamo=False,
            dynamic_axes={INPUT_NAMES[0]: {0: "N", 2: "H", 3: "W"},
                          INPUT_NAMES[1]: {0: "N", 2: "H", 3: "W"},
                          OUTPUT_NAME: {0: "N", 2: "H", 3: "W"}},
        )
    onx = onnx.load_from_string(buf.getvalue())
    cfg = model.cfg
    props = {
        "model_version": MODEL_VERSION,
        "loss": str(meta.get("loss")),
        "smoothness_weight": str(meta.get("smooth")),
        "normalisation": str(meta.get("normalisation")),
        "multiple": str(MULTIPLE),
        "int_steps": str(cfg.int_steps),
        "flow_convention": "pull: aligned(p) = moving(p + flow(p)); dx, dy in pixels; "
                           "origin at the centre of the top-left pixel",
        "config": json.dumps(cfg.to_dict()),
        "training_data": json.dumps(meta.get("data")),
        "training_steps": str(meta.get("steps")),
        "training_seconds": str(meta.get("train_seconds")),
        "trained_date": str(meta.get("date")),
        "export_date": time.strftime("%Y-%m-%d"),
        "torch_version": torch.__version__,
        "opset": str(OPSET),
    }
    onnx.helper.set_model_props(onx, props)
    onx.producer_name = "deepalign-fast export/export_flow_onnx.py"
    onnx.checker.check_model(onx, full_check=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(onx, out)
    return out


def export(ckpt: Path, out: Path) -> Path:
    model, meta = load_flow(ckpt)
    return export_model(model, meta, out)


def main(argv: list[str] | None = None) -> int:
    return export_main("python -m export.export_flow_onnx", __doc__, "export.train_flow",
                       export, argv)


if __name__ == "__main__":
    raise SystemExit(main())
