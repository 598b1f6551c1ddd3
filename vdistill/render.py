"""Previews people can look at: synthetic clips and memories as GIF, MP4 and PNG grids.

Everything here takes uint8 `(..., H, W, 3)` pixels (use `vdistill.data.pixels.to_uint8` on normalised
tensors first) and writes local files; callers upload them through Storage or log them to MLflow.
"""
from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from torchvision.utils import make_grid

ArrayLike = np.ndarray | torch.Tensor


def _as_tensor(x: ArrayLike) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x)) if isinstance(x, np.ndarray) else x.detach().cpu()
    if t.dtype != torch.uint8 or t.shape[-1] != 3:
        raise ValueError(f"expected uint8 (..., H, W, 3) pixels, got {tuple(t.shape)} {t.dtype}")
    return t


def upscale(pixels: ArrayLike, min_size: int = 128) -> torch.Tensor:
    """Nearest-neighbour enlargement by an integer factor so the shorter side reaches `min_size`.

    Tiny demo frames (16-64 px) are unreadable in a browser; integer factors keep pixels crisp.
    `(..., H, W, 3)` -> `(..., H*f, W*f, 3)`.
    """
    t = _as_tensor(pixels)
    factor = max(1, math.ceil(min_size / min(t.shape[-3], t.shape[-2])))
    if factor == 1:
        return t
    return t.repeat_interleave(factor, dim=-3).repeat_interleave(factor, dim=-2)


def image_grid(images: ArrayLike, nrow: int, padding: int = 2) -> torch.Tensor:
    """uint8 `(N, H, W, 3)` -> one uint8 image `(H', W', 3)` with `nrow` images per row."""
    t = _as_tensor(images)
    grid = make_grid(t.permute(0, 3, 1, 2), nrow=max(1, nrow), padding=padding, pad_value=0)
    return grid.permute(1, 2, 0).contiguous()


def video_grid(videos: ArrayLike, nrow: int, padding: int = 2) -> torch.Tensor:
    """uint8 `(N, T, H, W, 3)` -> uint8 `(T, H', W', 3)`: the same grid layout on every frame."""
    t = _as_tensor(videos)
    return torch.stack([image_grid(t[:, i], nrow, padding) for i in range(t.shape[1])])


def grayscale_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Unbounded single-channel float `(..., 1, H, W)` (dynamic memory) -> uint8 `(..., H, W, 3)`.

    The dynamic memory has no pixel range, so it is min-max scaled over the whole tensor.
    """
    x = x.detach().float().cpu()
    lo, hi = x.min(), x.max()
    scaled = (x - lo) / (hi - lo).clamp_min(1e-12)
    return (scaled * 255).round().to(torch.uint8).movedim(-3, -1).expand(*x.shape[:-3], *x.shape[-2:], 3)


def write_png(image: ArrayLike, path: str | Path) -> None:
    """uint8 `(H, W, 3)` -> PNG file."""
    from PIL import Image

    Image.fromarray(_as_tensor(image).numpy()).save(path, format="PNG")


def write_gif(frames: ArrayLike, path: str | Path, fps: int = 8) -> None:
    """uint8 `(T, H, W, 3)` -> looping GIF (Pillow; identical consecutive frames may be merged)."""
    from PIL import Image

    arr = _as_tensor(frames).numpy()
    images = [Image.fromarray(f) for f in arr]
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:],
                   duration=max(1, round(1000 / fps)), loop=0)


def write_mp4(frames: ArrayLike, path: str | Path, fps: int = 8, crf: int = 18) -> None:
    """uint8 `(T, H, W, 3)` -> H.264 yuv420p MP4 that browsers play; odd sizes are padded to even."""
    import av

    t = _as_tensor(frames)
    pad_h, pad_w = t.shape[1] % 2, t.shape[2] % 2
    if pad_h or pad_w:
        t = torch.nn.functional.pad(t.permute(0, 3, 1, 2), (0, pad_w, 0, pad_h), mode="replicate").permute(0, 2, 3, 1)
    arr = t.contiguous().numpy()
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height = arr.shape[2], arr.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in arr:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
