"""Small 2-D U-Net whose encoder gives artifact-invariant feature maps.

The network is trained (``export/train_ssl.py``) to restore clean EM crops from synthetically
corrupted ones (the decoder's job) while its encoder output at stride 4 is pushed, by a
contrastive term, to be the same at the same tissue location under different corruptions and
in neighbouring sections. Alignment only uses the encoder (:class:`SslEncoder`), which is what
``export/export_onnx.py`` writes to ONNX.

Input: ``(N, 1, H, W)`` float32, normalised with
``deepalign_fast.onnx.normalise.normalise_slice`` (percentiles 0.5/99.5 -> 0/1, then
(x - 0.5) / 0.25).
H and W must be multiples of :data:`STRIDE` (the runtime pads).
Features: ``(N, C, H/4, W/4)`` float32, unit L2 norm along C. Feature cell ``(i, j)`` covers
pixels ``4i..4i+3`` x ``4j..4j+3``; its centre is pixel ``(4j + 1.5, 4i + 1.5)`` (x, y).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

STRIDE = 4


@dataclass(frozen=True)
class UNetConfig:
    channels: tuple[int, int, int] = (16, 32, 64)
    feature_dim: int = 64

    def to_dict(self) -> dict[str, object]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @staticmethod
    def from_dict(d: dict[str, object]) -> UNetConfig:
        channels = tuple(int(c) for c in d["channels"])  # type: ignore[attr-defined]
        dim = int(d["feature_dim"])  # type: ignore[call-overload]
        return UNetConfig(channels=channels, feature_dim=dim)  # type: ignore[arg-type]


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SslEncoder(nn.Module):
    """Encoder: three levels (stride 1, 2, 4) plus dilated context convolutions at stride 4.

    ``forward`` returns ``(features, skips)``; ``features`` are L2-normalised descriptors.
    """

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        c1, c2, c3 = cfg.channels
        self.inc = _block(1, c1)
        self.down1 = _block(c1, c2)
        self.down2 = _block(c2, c3)
        # Dilated context: widens the receptive field (~100 px) cheaply, which matters on
        # 50-nm serial sections where small structures change between neighbouring sections.
        self.context = nn.Sequential(
            nn.Conv2d(c3, c3, 3, padding=2, dilation=2, bias=False), nn.BatchNorm2d(c3),
            nn.ReLU(inplace=True),
            nn.Conv2d(c3, c3, 3, padding=4, dilation=4, bias=False), nn.BatchNorm2d(c3),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Conv2d(c3, cfg.feature_dim, 1)

    def trunk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        e1 = self.inc(x)
        e2 = self.down1(F.max_pool2d(e1, 2))
        e3 = self.down2(F.max_pool2d(e2, 2))
        e3 = e3 + self.context(e3)
        return e1, e2, e3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, e3 = self.trunk(x)
        return F.normalize(self.head(e3), dim=1)


class SslUNet(nn.Module):
    """Encoder + decoder restoring the clean (normalised) image."""

    def __init__(self, cfg: UNetConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or UNetConfig()
        c1, c2, c3 = self.cfg.channels
        self.encoder = SslEncoder(self.cfg)
        self.up2 = nn.ConvTranspose2d(c3, c2, 2, stride=2)
        self.dec2 = _block(2 * c2, c2)
        self.up1 = nn.ConvTranspose2d(c2, c1, 2, stride=2)
        self.dec1 = _block(2 * c1, c1)
        self.out = nn.Conv2d(c1, 1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(restored image, encoder features)``."""
        e1, e2, e3 = self.encoder.trunk(x)
        feats = F.normalize(self.encoder.head(e3), dim=1)
        d2 = self.dec2(torch.cat([self.up2(e3), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.out(d1), feats
