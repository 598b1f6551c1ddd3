"""Differentiable clip augmentation (DSA-style), so synthetic pixels can be learned through it.

One parameter draw per clip, shared by all of its frames: a clip is flipped, cropped, scaled, rotated
and recoloured as a whole, never frame by frame (that would inject fake motion). Parameters come
from an explicit `torch.Generator`; every op is differentiable in the input (affine_grid /
grid_sample for geometry, arithmetic for colour). Works on clips `(B, T, 3, H, W)` and frames
`(B, 3, H, W)` in the normalised model space. Ranges follow DSA's defaults (Zhao & Bilen 2021).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

SCALE = 1.2  # scale factors in [1/1.2, 1.2]
ROTATE_DEG = 15.0  # rotation in [-15, 15] degrees
CROP = 0.125  # translation up to 1/8 of the side (zero padding, like DSA's crop)
BRIGHTNESS = 1.0  # additive shift in [-0.5, 0.5]
SATURATION = 2.0  # channel-mean blend factor in [0, 2]
CONTRAST = 0.5  # global-mean blend factor in [0.5, 1.5]


def _uniform(generator: torch.Generator, n: int, low: float, high: float, like: torch.Tensor) -> torch.Tensor:
    """`(n,)` draws from the generator's device, moved to `like`'s device and dtype."""
    u = torch.rand(n, generator=generator, device=generator.device)
    return (u * (high - low) + low).to(device=like.device, dtype=like.dtype)


def _per_clip(values: torch.Tensor) -> torch.Tensor:
    """`(B,)` -> `(B, 1, 1, 1, 1)` to broadcast over `(B, T, C, H, W)`."""
    return values.view(-1, 1, 1, 1, 1)


def _warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Apply one `(B, 2, 3)` affine per clip to every frame of `(B, T, C, H, W)`."""
    frames = x.flatten(0, 1)
    grid = F.affine_grid(theta.repeat_interleave(x.shape[1], dim=0), list(frames.shape), align_corners=True)
    return F.grid_sample(frames, grid, align_corners=True).view_as(x)


def _affine(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor,
            tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    theta = torch.stack([torch.stack([a, b, tx], dim=1), torch.stack([c, d, ty], dim=1)], dim=1)
    return _warp(x, theta)


def flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    mask = _uniform(g, x.shape[0], 0.0, 1.0, x) < 0.5
    return torch.where(_per_clip(mask), x.flip(-1), x)


def crop(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    one, zero = torch.ones(n, device=x.device, dtype=x.dtype), torch.zeros(n, device=x.device, dtype=x.dtype)
    tx, ty = _uniform(g, n, -2 * CROP, 2 * CROP, x), _uniform(g, n, -2 * CROP, 2 * CROP, x)
    return _affine(x, one, zero, zero, one, tx, ty)


def scale(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    zero = torch.zeros(n, device=x.device, dtype=x.dtype)
    sx, sy = _uniform(g, n, 1 / SCALE, SCALE, x), _uniform(g, n, 1 / SCALE, SCALE, x)
    return _affine(x, sx, zero, zero, sy, zero, zero)


def rotate(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    angle = _uniform(g, n, -ROTATE_DEG, ROTATE_DEG, x) * (math.pi / 180)
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros(n, device=x.device, dtype=x.dtype)
    return _affine(x, cos, -sin, sin, cos, zero, zero)


def color(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Brightness, then saturation (blend with the channel mean), then contrast (blend with the clip mean)."""
    n = x.shape[0]
    x = x + _per_clip(_uniform(g, n, -BRIGHTNESS / 2, BRIGHTNESS / 2, x))
    gray = x.mean(dim=2, keepdim=True)
    x = (x - gray) * _per_clip(_uniform(g, n, 0.0, SATURATION, x)) + gray
    mean = x.mean(dim=(1, 2, 3, 4), keepdim=True)
    return (x - mean) * _per_clip(_uniform(g, n, 1 - CONTRAST, 1 + CONTRAST, x)) + mean


OPS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "crop": crop, "flip": flip, "scale": scale, "rotate": rotate, "color": color,
}


class ClipAugment:
    """`augment(x, generator)` with a strategy like `"crop_flip_scale_rotate_color"`.

    `mode="one"` applies one op per batch, drawn from the strategy (DSA/MTT's default `aug_mode='S'`);
    `mode="all"` applies every op in order. Picklable (it holds only strings), so it can ship to Ray tasks.
    """

    def __init__(self, strategy: str = "crop_flip_scale_rotate_color", mode: str = "one") -> None:
        self.ops = [op for op in strategy.split("_") if op]
        unknown = [op for op in self.ops if op not in OPS]
        if unknown or not self.ops:
            raise ValueError(f"augmentation strategy {strategy!r}: unknown ops {unknown}; "
                             f"use {sorted(OPS)} joined by _")
        if mode not in ("one", "all"):
            raise ValueError(f"augmentation mode must be 'one' or 'all', got {mode!r}")
        self.strategy, self.mode = strategy, mode

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """`(B, T, 3, H, W)` or `(B, 3, H, W)` -> the same shape, augmented."""
        clips = x if x.dim() == 5 else x.unsqueeze(1)
        ops = self.ops
        if self.mode == "one":
            ops = [ops[int(torch.randint(len(ops), (1,), generator=generator, device=generator.device))]]
        for op in ops:
            clips = OPS[op](clips, generator)
        return clips if x.dim() == 5 else clips.squeeze(1)

    def __repr__(self) -> str:
        return f"ClipAugment({self.strategy!r}, mode={self.mode!r})"
