"""The integrator H ("hallucinator"): turns one still image and one dynamic clip into a video."""
from __future__ import annotations

import torch
from torch import nn


class Integrator(nn.Module):
    """Tile the static image over T, append the 1-channel dynamic clip, one Conv3d(4->3, k=3), no activation.

    static `(B, 3, H, W)` + dynamic `(B, T, 1, H, W)` -> video `(B, T, 3, H, W)`; 327 parameters.
    `init="default"` is PyTorch's initialisation, as in the paper. `init="identity"` starts as "the
    still image, tiled, plus a faint trace of the dynamic clip" (centre tap 1 per colour channel,
    dynamic weights scaled by 0.1, no bias), so short schedules start from the distilled stills
    instead of a random colour mix of them. `init="residual"` is exactly "still image + dynamic clip"
    on every colour channel (centre taps 1, all else 0): with a dynamic memory that holds a real
    clip's temporal residual (`S2DSet.create(dynamic_init="real")`), iteration 0 reproduces the clip.
    """

    def __init__(self, init: str = "default") -> None:
        super().__init__()
        self.conv = nn.Conv3d(4, 3, kernel_size=3, padding=1)
        if init == "residual":
            with torch.no_grad():
                self.conv.weight.zero_()
                self.conv.bias.zero_()
                for c in range(3):
                    self.conv.weight[c, c, 1, 1, 1] = 1.0
                    self.conv.weight[c, 3, 1, 1, 1] = 1.0
        elif init == "identity":
            with torch.no_grad():
                dynamic = self.conv.weight[:, 3:].clone()
                self.conv.weight.zero_()
                self.conv.weight[:, 3:] = 0.1 * dynamic
                for c in range(3):
                    self.conv.weight[c, c, 1, 1, 1] = 1.0
                self.conv.bias.zero_()
        elif init != "default":
            raise ValueError(f"dynamic.integrator_init must be 'default', 'identity' or 'residual' (got {init!r})")

    def forward(self, static: torch.Tensor, dynamic: torch.Tensor) -> torch.Tensor:
        frames = dynamic.shape[1]
        tiled = static.unsqueeze(2).expand(-1, -1, frames, -1, -1)
        x = torch.cat([tiled, dynamic.permute(0, 2, 1, 3, 4)], dim=1)
        return self.conv(x).permute(0, 2, 1, 3, 4)
