"""The DC ConvNet for still images: the static stage distils single frames with it (METHOD.md 2.3)."""
from __future__ import annotations

import torch
from torch import nn


class ConvNet2D(nn.Module):
    """`depth` x [Conv3x3 -> instance norm (GroupNorm(w, w)) -> ReLU -> AvgPool2], then a linear head.

    Input `(B, 3, H, W)`; also accepts one-frame clips `(B, 1, 3, H, W)`.
    """

    def __init__(self, num_classes: int, size: int, width: int = 128, depth: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for _ in range(depth):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.GroupNorm(width, width, affine=True),
                       nn.ReLU(), nn.AvgPool2d(2, 2)]
            channels = width
            size //= 2
        if size < 1:
            raise ValueError(f"ConvNet2D depth {depth} pools a {size}-px image to nothing; lower model.depth_2d")
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * size * size, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 5:
            x = x.flatten(0, 1)
        return self.body(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))
