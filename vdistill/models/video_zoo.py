"""torchvision video ResNets for cross-architecture evaluation, speaking our clip layout `(B, T, 3, H, W)`.

The networks are built with `weights=None` (random init, nothing downloaded). They end in an adaptive
average pool, so small demo clips (8 frames at 32 px) run; a clip must keep at least one value per
channel after the four stride-2 stages, i.e. T >= 1 and H = W >= 16.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models import video

BUILDERS = {"r3d_18": video.r3d_18, "mc3_18": video.mc3_18, "r2plus1d_18": video.r2plus1d_18}


class TorchvisionVideo(nn.Module):
    """A torchvision `VideoResNet` as the submodule `net`; `embed` is the pooled 512-d feature before `fc`.

    Keeping the network as a submodule (not re-implementing its forward) means `functional_forward`
    and flat-parameter trajectories work unchanged; BatchNorm statistics stay module buffers.
    """

    def __init__(self, name: str, num_classes: int) -> None:
        super().__init__()
        if name not in BUILDERS:
            raise ValueError(f"unknown torchvision video model {name!r}; choose from {sorted(BUILDERS)}")
        self.net = BUILDERS[name](weights=None, num_classes=num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """`(B, T, 3, H, W)` -> `(B, 512)`."""
        net = self.net
        x = net.stem(x.permute(0, 2, 1, 3, 4))
        x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
        return net.avgpool(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.fc(self.embed(x))


def build_torchvision_video_model(name: str, num_classes: int) -> TorchvisionVideo:
    """`r3d_18`, `mc3_18` or `r2plus1d_18`, randomly initialised, taking `(B, T, 3, H, W)` clips."""
    return TorchvisionVideo(name, num_classes)
