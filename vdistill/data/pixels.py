"""One place for pixel conventions: clips are stored uint8 and normalised on the device.

Storage layout `(..., T, H, W, 3)` uint8; model layout `(..., T, 3, H, W)` float in ImageNet-normalised
space (METHOD.md 1.2), which is also where synthetic data lives.
"""
from __future__ import annotations

import torch

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (3, 1, 1)
    return (torch.tensor(MEAN, device=x.device, dtype=torch.float32).view(shape),
            torch.tensor(STD, device=x.device, dtype=torch.float32).view(shape))


def to_model_input(clips: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 `(B, T, H, W, 3)` (or `(B, H, W, 3)` frames) -> normalised float `(B, T, 3, H, W)` on `device`.

    The uint8 tensor is moved first so only a quarter of the bytes cross the bus.
    """
    x = clips.to(device) if device is not None else clips
    x = x.movedim(-1, -3).float().div_(255.0)
    mean, std = _stats(x)
    return (x - mean) / std


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Normalised float `(..., 3, H, W)` -> uint8 `(..., H, W, 3)` for previews and exports."""
    mean, std = _stats(x)
    return ((x.detach().float() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8).movedim(-3, -1).cpu()


def standardize(x: torch.Tensor) -> torch.Tensor:
    """The original code's per-batch global standardisation (x - mean) / std (METHOD.md 1.2, W-14)."""
    return (x - x.mean()) / x.std().clamp_min(1e-8)
