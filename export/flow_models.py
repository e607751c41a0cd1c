"""Lightweight VoxelMorph-like 2-D registration network and a differentiable warp.

:class:`FlowUNet` takes a (fixed, moving) pair of slices, both normalised with
``deepalign_fast.onnx.normalise.normalise_slice`` and stacked as 2 channels ``(N, 2, H, W)``, and
returns a dense displacement field ``(N, 2, H, W)`` float32 in pixels, ``dx`` then ``dy``,
in the package's **pull** convention: ``warped(p) = moving(p + u(p))`` aligns ``moving`` to
``fixed``. Points are ``(x, y)`` with the origin at the centre of the top-left pixel.

Architecture (``FlowConfig``): a U-Net with stride-2 convolutions down to 1/16 (so H and W
must be multiples of :data:`MULTIPLE`; the runtime pads), a decoder back to 1/2 resolution
that outputs a field there, then

* ``int_steps > 0`` (diffeomorphic, as in Dalca et al. 2018 / VoxelMorph-diff): the half-
  resolution output is a stationary velocity field ``v``, integrated by scaling and squaring
  (``u = v / 2**K``; ``K`` times ``u <- u + u o (id + u)``), which gives a transform without
  folds in the continuous limit;
* ``int_steps == 0``: the output is the displacement itself;

and finally a bilinear x2 upsampling (pixel-centre aligned, values x2) to full resolution.

:func:`warp` is the spatial transformer: ``F.grid_sample`` with ``align_corners=True``, where
normalised coordinate -1 / +1 is the centre of the first / last pixel, which is exactly the
package's pixel-centre convention (``g = 2 x / (W - 1) - 1``). It matches ``cv2.remap`` with
``map = identity + u`` (tested in ``tests/python/test_flow.py``). The grid is built from the
input tensor itself (``cumsum`` of ones), so the ONNX export keeps H and W dynamic.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

#: H and W of the network input must be multiples of this (four stride-2 levels).
MULTIPLE = 16


@dataclass(frozen=True)
class FlowConfig:
    enc: tuple[int, ...] = (16, 32, 32, 32, 32)
    dec: tuple[int, ...] = (32, 32, 32, 16)
    int_steps: int = 5

    def to_dict(self) -> dict[str, object]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @staticmethod
    def from_dict(d: dict[str, object]) -> FlowConfig:
        return FlowConfig(enc=tuple(int(c) for c in d["enc"]),  # type: ignore[attr-defined]
                          dec=tuple(int(c) for c in d["dec"]),  # type: ignore[attr-defined]
                          int_steps=int(d["int_steps"]))  # type: ignore[call-overload]


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1),
                         nn.LeakyReLU(0.2, inplace=True))


def pixel_grid(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel coordinates ``x`` ``(1, 1, W)`` and ``y`` ``(1, H, 1)`` of a ``(N, C, H, W)`` tensor.

    Built with ``cumsum`` from the tensor so an ONNX export keeps H and W dynamic.
    """
    ones = torch.ones_like(like[:1, 0])  # (1, H, W)
    x = ones[:, :1, :].cumsum(dim=2) - 1.0
    y = ones[:, :, :1].cumsum(dim=1) - 1.0
    return x, y


def warp(image: torch.Tensor, flow: torch.Tensor, *, padding: str = "border",
         mode: str = "bilinear") -> torch.Tensor:
    """Pull-warp ``image`` (N, C, H, W) by ``flow`` (N, 2, H, W): ``out(p) = image(p + u(p))``.

    ``padding``: ``"zeros"`` (samples outside are 0, like ``cv2.BORDER_CONSTANT``) or
    ``"border"`` (clamp, like ``cv2.BORDER_REPLICATE``).
    """
    x, y = pixel_grid(flow)
    h = y[:, -1:, :] + 1.0  # (1, 1, 1): H and W as tensors (dynamic in ONNX)
    w = x[:, :, -1:] + 1.0
    gx = 2.0 * (x + flow[:, 0]) / (w - 1.0) - 1.0
    gy = 2.0 * (y + flow[:, 1]) / (h - 1.0) - 1.0
    grid = torch.stack([gx, gy], dim=-1)
    return F.grid_sample(image, grid, mode=mode, padding_mode=padding, align_corners=True)


def integrate(velocity: torch.Tensor, steps: int) -> torch.Tensor:
    """Scaling and squaring: displacement of ``exp(v)`` for a stationary velocity ``v``."""
    u = velocity / float(2**steps)
    for _ in range(steps):
        u = u + warp(u, u, padding="border")
    return u


def upsample_flow(flow: torch.Tensor) -> torch.Tensor:
    """x2 bilinear, pixel-centre aligned (half-res pixel i has centre 2i + 0.5), values x2."""
    return 2.0 * F.interpolate(flow, scale_factor=2.0, mode="bilinear", align_corners=False)


class FlowUNet(nn.Module):
    """(fixed, moving) ``(N, 2, H, W)`` -> displacement ``(N, 2, H, W)`` (see module docstring)."""

    def __init__(self, cfg: FlowConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or FlowConfig()
        enc, dec = self.cfg.enc, self.cfg.dec
        if len(enc) != 5 or len(dec) != 4:
            raise ValueError("FlowConfig: enc needs 5 widths (strides 1..16), dec 4")
        self.enc = nn.ModuleList([_conv(2, enc[0])] + [
            _conv(enc[i - 1], enc[i], stride=2) for i in range(1, 5)])
        # decoder: 1/16 -> 1/8 (+enc3) -> 1/4 (+enc2) -> 1/2 (+enc1), then one more conv at 1/2
        self.dec = nn.ModuleList([
            _conv(enc[4] + enc[3], dec[0]),
            _conv(dec[0] + enc[2], dec[1]),
            _conv(dec[1] + enc[1], dec[2]),
            _conv(dec[2], dec[3]),
        ])
        self.flow = nn.Conv2d(dec[3], 2, 3, padding=1)
        # Start near identity (VoxelMorph initialises the flow layer with N(0, 1e-5)).
        nn.init.normal_(self.flow.weight, std=1e-5)
        nn.init.zeros_(self.flow.bias)

    def forward_half(self, pair: torch.Tensor) -> torch.Tensor:
        """Half-resolution output of the decoder (velocity or displacement, half-res pixels)."""
        skips = []
        x = pair
        for layer in self.enc:
            x = layer(x)
            skips.append(x)
        x = skips[4]
        for i, skip in enumerate((skips[3], skips[2], skips[1])):
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            x = self.dec[i](torch.cat([x, skip], dim=1))
        x = self.dec[3](x)
        return self.flow(x)

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        half = self.forward_half(pair)
        if self.cfg.int_steps > 0:
            half = integrate(half, self.cfg.int_steps)
        return upsample_flow(half)


class FlowExport(nn.Module):
    """ONNX wrapper: named inputs ``fixed``, ``moving`` ``(N, 1, H, W)`` -> ``flow``."""

    def __init__(self, net: FlowUNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([fixed, moving], dim=1))


def smoothness(flow: torch.Tensor) -> torch.Tensor:
    """Mean squared forward difference of the field (VoxelMorph's ``Grad('l2')``)."""
    dx = flow[:, :, :, 1:] - flow[:, :, :, :-1]
    dy = flow[:, :, 1:, :] - flow[:, :, :-1, :]
    return 0.5 * ((dx * dx).mean() + (dy * dy).mean())
