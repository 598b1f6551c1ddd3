"""Networks: ConvNet3D (distillation + evaluation), ConvNet2D (still images), the integrator, and a factory."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from vdistill.models.convnet2d import ConvNet2D
from vdistill.models.convnet3d import ConvNet3D
from vdistill.models.functional import flat_params, functional_forward, load_flat_, param_names, unflatten
from vdistill.models.integrator import Integrator

__all__ = ["ConvNet2D", "ConvNet3D", "Integrator", "build_model", "flat_params", "functional_forward",
           "load_flat_", "param_names", "seeded", "unflatten"]


def seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """Build a module whose default initialisation draws from `seed`, leaving the global RNG untouched
    (METHOD.md W-10)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def build_model(name: str, num_classes: int, frames: int, size: int, model_cfg=None,
                seed: int | None = None) -> nn.Module:
    """Network by registry name; `model_cfg` is a ModelConfig (width, head, dropout, 2-D width/depth).

    Video models take `(B, T, 3, H, W)`; `convnet2d` takes `(B, 3, H, W)`. With `seed`, the initial
    weights depend only on that seed: the global CPU RNG is forked, seeded and restored around the
    construction, so callers' random streams are untouched (METHOD.md W-10).
    """
    if seed is not None:
        return seeded(seed, lambda: build_model(name, num_classes, frames, size, model_cfg))
    width = getattr(model_cfg, "width", 128)
    if name == "convnet3d":
        return ConvNet3D(num_classes, frames, size, width=width, head=getattr(model_cfg, "head", "paper"),
                         dropout=getattr(model_cfg, "dropout", 0.5))
    if name == "convnet2d":
        return ConvNet2D(num_classes, size, width=getattr(model_cfg, "width_2d", 128),
                         depth=getattr(model_cfg, "depth_2d", 3))
    from vdistill.models.video_zoo import build_torchvision_video_model

    return build_torchvision_video_model(name, num_classes)
