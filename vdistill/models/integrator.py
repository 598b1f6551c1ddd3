"""The integrator H ("hallucinator"): turns one still image and one dynamic clip into a video."""
from __future__ import annotations

import torch
from torch import nn


class Integrator(nn.Module):
    """Tile the static image over T, append the 1-channel dynamic clip, one Conv3d(4->3, k=3), no activation.

    static `(B, 3, H, W)` + dynamic `(B, T, 1, H, W)` -> video `(B, T, 3, H, W)`; 327 parameters.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(4, 3, kernel_size=3, padding=1)

    def forward(self, static: torch.Tensor, dynamic: torch.Tensor) -> torch.Tensor:
        frames = dynamic.shape[1]
        tiled = static.unsqueeze(2).expand(-1, -1, frames, -1, -1)
        x = torch.cat([tiled, dynamic.permute(0, 2, 1, 3, 4)], dim=1)
        return self.conv(x).permute(0, 2, 1, 3, 4)
