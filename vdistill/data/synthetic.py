"""A procedural action dataset written as real H.264 mp4, so the demo runs the real pipeline anywhere.

Classes come in pairs that look the same and differ only in motion (left vs right, clockwise vs
counter-clockwise rotation, fast vs slow, oscillating vs linear), plus classes that differ in shape or
colour. Positions, scales, phases and the textured, noisy background are random, so one frame cannot
tell the paired classes apart: a model has to use time. Everything is drawn from `demo_cfg.seed`.
"""
from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import av
import numpy as np

from vdistill.storage import join


@dataclass(frozen=True)
class ActionClass:
    """How one class looks (shape, RGB colour) and moves."""

    name: str
    shape: str  # square | disk | lshape | triangle | ring | bar
    color: tuple[int, int, int]
    motion: str  # left | right | cw | ccw | fast | slow | oscillate | linear | drift


_PALETTE = [(220, 50, 50), (50, 200, 70), (60, 90, 230), (230, 210, 40), (200, 60, 200), (40, 200, 210),
            (240, 140, 30), (245, 245, 245)]
# (shape, motion) pairs: the first 8 are motion-only pairs, the last 2 appearance-only classes.
_TEMPLATE = [("square", "left"), ("square", "right"), ("lshape", "cw"), ("lshape", "ccw"),
             ("triangle", "fast"), ("triangle", "slow"), ("disk", "oscillate"), ("disk", "linear"),
             ("ring", "drift"), ("bar", "drift")]


def demo_classes(n: int) -> list[ActionClass]:
    """The first `n` classes; pairs share shape and colour, the template repeats with new colours."""
    out = []
    for i in range(n):
        shape, motion = _TEMPLATE[i % len(_TEMPLATE)]
        colour_slot = (i // 2) if i % len(_TEMPLATE) < 8 else i
        colour = _PALETTE[(colour_slot + 3 * (i // len(_TEMPLATE))) % len(_PALETTE)]
        out.append(ActionClass(f"{i:02d}_{shape}_{motion}", shape, colour, motion))
    return out


def _mask(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of a shape of radius `r` in object coordinates (u, v), `(H, W)`."""
    if shape == "square":
        return (np.abs(u) < r) & (np.abs(v) < r)
    if shape == "disk":
        return u * u + v * v < r * r
    if shape == "ring":
        d = u * u + v * v
        return (d < r * r) & (d > (0.55 * r) ** 2)
    if shape == "bar":
        return (np.abs(u) < r) & (np.abs(v) < 0.35 * r)
    if shape == "triangle":
        return (v < 0.6 * r) & (v > -r + 1.6 * np.abs(u))
    if shape == "lshape":  # no rotational symmetry, so the rotation direction is visible
        return ((np.abs(u) < r) & (v > 0.4 * r) & (v < r)) | ((u > -r) & (u < -0.4 * r) & (np.abs(v) < r))
    raise ValueError(f"unknown shape {shape!r}")


def _trajectory(motion: str, frames: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Centres x, y and angles `(T,)` for one video."""
    t = np.arange(frames, dtype=np.float64)
    x0, y0 = rng.uniform(0.2 * size, 0.8 * size, 2)
    angle0 = rng.uniform(0, 2 * np.pi)
    angles = np.full(frames, angle0)
    direction = rng.uniform(0, 2 * np.pi)
    speed = size / frames * rng.uniform(0.5, 0.8)
    dx, dy = np.cos(direction), np.sin(direction)
    if motion in ("left", "right"):
        sign = -1.0 if motion == "left" else 1.0
        dx, dy = sign, rng.uniform(-0.15, 0.15)
    elif motion in ("cw", "ccw"):
        speed = size / frames * 0.1
        angles = angle0 + (1 if motion == "cw" else -1) * rng.uniform(0.2, 0.35) * t
    elif motion == "fast":
        speed = size / frames * rng.uniform(0.9, 1.2)
    elif motion == "slow":
        speed = size / frames * rng.uniform(0.1, 0.25)
    if motion == "oscillate":
        amplitude = size * rng.uniform(0.15, 0.25)
        phase = rng.uniform(0, 2 * np.pi)
        offset = amplitude * np.sin(2 * np.pi * t / rng.uniform(5, 8) + phase)
        return x0 + dx * offset, y0 + dy * offset, angles
    # start so the path stays roughly centred
    xs = x0 + dx * speed * (t - frames / 2)
    ys = y0 + dy * speed * (t - frames / 2)
    return np.clip(xs, 0, size - 1), np.clip(ys, 0, size - 1), angles


def _background(frames: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Textured float background `(T, H, W, 3)`: smooth random blobs + a static grain + per-frame noise."""
    coarse = rng.uniform(40, 170, (5, 5, 3))
    ramp = np.linspace(0, 4, size)
    i0 = np.minimum(ramp.astype(int), 3)
    w = (ramp - i0)[:, None]
    rows = coarse[i0] * (1 - w[..., None]) + coarse[i0 + 1] * w[..., None]  # (H, 5, 3)
    smooth = rows[:, i0] * (1 - w.T[..., None]) + rows[:, i0 + 1] * w.T[..., None]  # (H, W, 3)
    grain = rng.normal(0, 12, (size, size, 1))
    noise = rng.normal(0, 6, (frames, size, size, 1))
    return smooth[None] + grain[None] + noise


def render_video(cls: ActionClass, frames: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One video of class `cls` as uint8 `(T, H, W, 3)`."""
    video = _background(frames, size, rng)
    xs, ys, angles = _trajectory(cls.motion, frames, size, rng)
    radius = size * rng.uniform(0.12, 0.2)
    colour = np.clip(np.array(cls.color) + rng.normal(0, 12, 3), 0, 255)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    for f in range(frames):
        c, s = np.cos(angles[f]), np.sin(angles[f])
        du, dv = xx - xs[f], yy - ys[f]
        video[f][_mask(cls.shape, c * du + s * dv, -s * du + c * dv, radius)] = colour
    return np.clip(video, 0, 255).astype(np.uint8)


def encode_mp4(video: np.ndarray, fps: int, crf: int = 18) -> bytes:
    """uint8 `(T, H, W, 3)` (even H, W) -> H.264 yuv420p mp4 bytes."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height = video.shape[2], video.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast", "threads": "1"}
        for img in video:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")))
        out.mux(stream.encode(None))
    return buf.getvalue()


def write_clip_dataset(storage: Any, root_uri: str, clips: Iterable[tuple[str, str, np.ndarray]], fps: int) -> str:
    """Write each `(label, split, uint8 video (T, H, W, 3))` as `<root>/videos/<label>/<split>_<i>.mp4`, plus
    `<root>/demo.csv` (path,label,split) listing them in order; returns the CSV URI."""
    lines, counts = ["path,label,split"], Counter()
    for label, split, video in clips:
        rel = f"videos/{label}/{split}_{counts[label, split]:04d}.mp4"
        counts[label, split] += 1
        storage.write_bytes(join(root_uri, rel), encode_mp4(video, fps))
        lines.append(f"{rel},{label},{split}")
    csv_uri = join(root_uri, "demo.csv")
    storage.write_text(csv_uri, "\n".join(lines) + "\n")
    return csv_uri


def write_demo_dataset(storage: Any, root_uri: str, demo_cfg: Any) -> str:
    """The procedural set as mp4 files + `demo.csv` under `root_uri`; returns the CSV URI."""
    classes = demo_classes(demo_cfg.num_classes)
    rng = np.random.default_rng(demo_cfg.seed)
    clips = ((cls.name, split, render_video(cls, demo_cfg.frames, demo_cfg.size, rng))
             for split, count in (("train", demo_cfg.train_per_class), ("test", demo_cfg.test_per_class))
             for cls in classes for _ in range(count))
    return write_clip_dataset(storage, root_uri, clips, demo_cfg.fps)


# ---- exact-sampling fixture: the frame number is written into the pixels -------------------------
_GRID = 4  # 4x4 blocks = 16 bits


def index_frame(index: int, size: int = 64) -> np.ndarray:
    """uint8 `(size, size, 3)` whose 4x4 black/white blocks spell `index` in binary (row-major, LSB first)."""
    bits = (index >> np.arange(_GRID * _GRID)) & 1
    blocks = np.where(bits.reshape(_GRID, _GRID), 235, 20).astype(np.uint8)
    cell = size // _GRID
    return np.repeat(np.repeat(blocks, cell, 0), cell, 1)[..., None].repeat(3, axis=2)


def read_frame_index(frame: np.ndarray) -> int:
    """Inverse of `index_frame` for a decoded (possibly resized) frame `(H, W, 3)`."""
    h, w = frame.shape[:2]
    gray = frame.astype(np.float64).mean(axis=2)
    bits = [gray[(2 * r + 1) * h // (2 * _GRID), (2 * c + 1) * w // (2 * _GRID)] > 128
            for r in range(_GRID) for c in range(_GRID)]
    return int(sum(int(b) << i for i, b in enumerate(bits)))


def write_index_video(storage: Any, uri: str, frames: int, size: int = 64, fps: int = 25) -> None:
    """An mp4 whose frame k shows the number k (see `read_frame_index`), for exact sampling tests."""
    storage.write_bytes(uri, encode_mp4(np.stack([index_frame(k, size) for k in range(frames)]), fps))
