"""ConvNet3D: the network every number in the paper is measured with (METHOD.md 2.1)."""
from __future__ import annotations

import torch
from torch import nn


class ConvNet3D(nn.Module):
    """Three Conv3d(k=(3,7,7), s=(1,2,2)) + ReLU + max-pool blocks, a 1x1x1 conv head, max over time.

    Input `(B, T, 3, H, W)`, logits `(B, classes)`. `head="paper"` is the exact original (valid for
    T>=8 and H=W in [43, 64] or >= 107); `head="adaptive"` pools with ceil_mode and an adaptive
    average pool so that any size >= 8 px runs (used by the small demo). Parameters are declared in
    the trajectory order conv0, conv1, conv2, logit (weight then bias).
    """

    def __init__(
        self,
        num_classes: int,
        frames: int,
        size: int,
        width: int = 128,
        head: str = "paper",
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if head not in ("paper", "adaptive"):
            raise ValueError(f"model.head must be 'paper' or 'adaptive', got {head!r}")
        if head == "paper" and (frames < 8 or not (43 <= size <= 64 or size >= 107)):
            raise ValueError(
                f"ConvNet3D with model.head=paper needs frames >= 8 and size in 43..64 or >= 107 "
                f"(got frames={frames}, size={size}); set model.head=adaptive for other clip shapes"
            )
        conv = dict(kernel_size=(3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3))
        ceil = head == "adaptive"
        self.conv0 = nn.Conv3d(3, width // 2, **conv)
        self.conv1 = nn.Conv3d(width // 2, width, **conv)
        self.conv2 = nn.Conv3d(width, width, **conv)
        self.pool0 = nn.MaxPool3d((1, 2, 2), (1, 2, 2), ceil_mode=ceil)
        self.pool1 = nn.MaxPool3d(2, 2, ceil_mode=ceil)
        self.pool2 = nn.MaxPool3d(2, 2, ceil_mode=ceil)
        self.head_pool: nn.Module = (
            nn.AdaptiveAvgPool3d((None, 1, 1))
            if ceil
            else nn.AvgPool3d((2, 2, 2) if size > 64 else (2, 1, 1), stride=1)
        )
        self.dropout = nn.Dropout(dropout)
        self.logit = nn.Conv3d(width, num_classes, kernel_size=1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """`(B, T, 3, H, W)` -> the last pooled block `(B, width, T', H', W')`.

        The convolutions run channels-last (NDHWC): oneDNN's 3-D convolutions were 1.5x faster that way on a
        CPU (DM's real-clip embeddings at 16x64², width 128) and the layers keep the format. Clips normalised
        from uint8 storage `(B, T, H, W, 3)` are already laid out so, which makes the conversion a no-op.
        """
        x = x.permute(0, 2, 1, 3, 4).contiguous(memory_format=torch.channels_last_3d)
        x = self.pool0(torch.relu(self.conv0(x)))
        x = self.pool1(torch.relu(self.conv1(x)))
        return self.pool2(torch.relu(self.conv2(x)))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened features, no head: what DM and the coresets compare (2048-d at 16x112², 256-d at 8x64²)."""
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.logit(self.dropout(self.head_pool(self.features(x))))
        return h.flatten(2).amax(dim=2)
