"""Decode one video into a fixed-size uint8 clip with PyAV, once, sequentially, resized inside FFmpeg.

This is the per-video function the ingest UDF wraps; it knows nothing of Ray or of the cache layout.
Header frame counts and durations are never trusted: frames are counted as they are decoded and the
sample indices are chosen afterwards. To keep memory bounded on long videos only resized frames are
kept, and when they outgrow `DecodeSpec.max_buffer_mb` every other kept frame is dropped (the kept
grid doubles its step), so a very long video is sampled to the nearest kept frame instead of exactly.

Short videos (fewer decoded frames than a clip needs), by `short_video`:
- ``loop``: indices wrap around (0, 1, .., n-1, 0, 1, ..);
- ``pad``: the last frame is repeated;
- ``quarantine``: `DecodeError("too_short")`.
Videos with fewer than `min_frames` decoded frames are always quarantined as too short.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable

import av
import numpy as np
import pyarrow.fs as pafs

REASONS = ("missing", "empty", "corrupt", "no_video_stream", "too_short", "decode_error")
_IO_BUFFER = 1 << 20  # PyAV read size: one S3 range request per MiB instead of per 32 KiB
_WHOLE_OBJECT = 64 << 20  # objects up to this size are fetched with one GET; larger ones stream in _IO_BUFFER ranges


class DecodeError(Exception):
    """A video that cannot become a clip; `reason` is one of REASONS (the quarantine key)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown decode error reason {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class DecodeSpec:
    """Everything that decides a clip's pixels (mirrors config `decode`, plus the run seed)."""

    frames: int = 8
    size: int = 64
    resize: str = "squash"  # squash | short_side_crop
    sampling: str = "uniform"  # uniform | stride
    stride: int = 4
    start: str = "center"  # center | random (stride windows)
    short_video: str = "loop"  # loop | pad | quarantine
    min_frames: int = 1
    interpolation: str = "bilinear"
    seed: int = 0
    threads: int = 1  # codec threads; Ray tasks are the parallelism
    max_buffer_mb: int = 256

    @classmethod
    def from_config(cls, decode_cfg: Any, seed: int = 0) -> "DecodeSpec":
        fields = ("frames", "size", "resize", "sampling", "stride", "start", "short_video", "min_frames",
                  "interpolation")
        return cls(**{f: getattr(decode_cfg, f) for f in fields}, seed=seed)


@dataclass(frozen=True)
class DecodedClip:
    """`frames` uint8 `(T, H, W, 3)`; `indices` the source frame numbers (within the window) used."""

    frames: np.ndarray
    indices: np.ndarray
    num_decoded: int
    exact: bool  # False when the memory bound forced nearest-kept-frame sampling


def sample_indices(n: int, spec: DecodeSpec, key: str = "") -> np.ndarray:
    """Frame numbers `(T,)` to take from a video of `n` decoded frames (pure; seeded by spec.seed and key)."""
    t = spec.frames
    if n < max(spec.min_frames, 1):
        raise DecodeError("too_short", f"{n} frames decoded, min_frames={spec.min_frames}")
    if n < t:
        if spec.short_video == "quarantine":
            raise DecodeError("too_short", f"{n} frames decoded, clip needs {t}")
        steps = np.arange(t)
        return steps % n if spec.short_video == "loop" else np.minimum(steps, n - 1)
    if spec.sampling == "uniform":
        return np.round(np.linspace(0, n - 1, t)).astype(np.int64)
    # stride: the paper's UCF/HMDB rule, with the step shrunk to n // T when the window does not fit
    stride = spec.stride if (t - 1) * spec.stride + 1 <= n else max(n // t, 1)
    slack = n - ((t - 1) * stride + 1)
    if spec.start == "random":
        digest = hashlib.sha256(f"{spec.seed}:{key}".encode()).digest()
        start = int(np.random.default_rng(int.from_bytes(digest[:8], "little")).integers(0, slack + 1))
    else:
        start = slack // 2
    return start + stride * np.arange(t, dtype=np.int64)


class _KeptFrames:
    """Resized frames on a grid of step `step`; the grid coarsens by 2 when over `capacity` frames."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(capacity, 2)
        self.step = 1
        self.frames: list[np.ndarray] = []

    def offer(self, index: int, convert: Callable[[], np.ndarray]) -> None:
        if index % self.step:
            return
        self.frames.append(convert())
        if len(self.frames) > self.capacity:
            self.frames = self.frames[::2]
            self.step *= 2

    def take(self, indices: np.ndarray) -> np.ndarray:
        slots = np.minimum(np.round(indices / self.step).astype(np.int64), len(self.frames) - 1)
        return np.stack([self.frames[i] for i in slots])


def _converter(frame: av.VideoFrame, spec: DecodeSpec) -> Callable[[], np.ndarray]:
    interp = spec.interpolation.upper()
    size = spec.size
    if spec.resize == "squash":
        return lambda: frame.to_ndarray(width=size, height=size, format="rgb24", interpolation=interp)

    def short_side_crop() -> np.ndarray:
        w, h = frame.width, frame.height
        scale = size / min(w, h)
        rw, rh = max(size, round(w * scale)), max(size, round(h * scale))
        img = frame.to_ndarray(width=rw, height=rh, format="rgb24", interpolation=interp)
        top, left = (rh - size) // 2, (rw - size) // 2
        return np.ascontiguousarray(img[top:top + size, left:left + size])

    return short_side_crop


def decode_clip(source: BinaryIO | str, spec: DecodeSpec, *, start_s: float | None = None,
                end_s: float | None = None, key: str = "") -> DecodedClip:
    """One video (seekable file-like or local path) -> `DecodedClip`, or `DecodeError` with a reason.

    `start_s`/`end_s` restrict decoding to a time window (by presentation time, after a backward seek).
    """
    capacity = spec.max_buffer_mb * (1 << 20) // (spec.size * spec.size * 3)
    kept = _KeptFrames(capacity)
    try:
        container = av.open(source, mode="r", buffer_size=_IO_BUFFER)
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise DecodeError("corrupt", f"cannot open container: {exc}") from None
    with container:
        if not container.streams.video:
            raise DecodeError("no_video_stream", f"streams: {[s.type for s in container.streams]}")
        stream = container.streams.video[0]
        stream.thread_count = spec.threads
        n = 0
        try:
            if start_s:
                container.seek(int(start_s / stream.time_base), stream=stream, backward=True)
            for frame in container.decode(stream):
                t = frame.time
                if start_s is not None and t is not None and t < start_s - 1e-6:
                    continue
                if end_s is not None and t is not None and t >= end_s - 1e-6:
                    break
                kept.offer(n, _converter(frame, spec))
                n += 1
        except av.error.FFmpegError as exc:
            raise DecodeError("decode_error", f"after {n} frames: {exc}") from None
    indices = sample_indices(n, spec, key)
    return DecodedClip(frames=kept.take(indices), indices=indices, num_decoded=n, exact=kept.step == 1)


def decode_uri(storage: Any, uri: str, spec: DecodeSpec, *, start_s: float | None = None,
               end_s: float | None = None, key: str = "", size: int | None = None) -> DecodedClip:
    """Decode a video straight from storage (local or s3://; no local copy) with as few requests as possible.

    A local file is opened by path, so FFmpeg reads it without a Python I/O callback per read. An object of a
    known `size` (from the dataset's one listing, `Manifest.sizes`) up to `_WHOLE_OBJECT` bytes is fetched whole
    (`Storage.read_bytes`: one GET) and decoded from memory. Otherwise pyarrow opens it (a HEAD, which also tells
    missing and empty apart), then one GET, or range requests of `_IO_BUFFER` for larger objects, never one
    request per PyAV read.
    """
    fs, path = storage.resolve(uri)
    key = key or uri
    if isinstance(fs, pafs.LocalFileSystem):
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            raise DecodeError("missing", uri)
        if info.size == 0:
            raise DecodeError("empty", "0 bytes")
        return decode_clip(path, spec, start_s=start_s, end_s=end_s, key=key)
    if size == 0:
        raise DecodeError("empty", "0 bytes")
    try:
        if size is not None and size <= _WHOLE_OBJECT:
            data = storage.read_bytes(uri)
        else:
            with fs.open_input_file(path) as f:
                if f.size() == 0:
                    raise DecodeError("empty", "0 bytes")
                if f.size() > _WHOLE_OBJECT:
                    return decode_clip(f, spec, start_s=start_s, end_s=end_s, key=key)
                data = f.read()
    except FileNotFoundError:  # never there, or gone since the listing
        raise DecodeError("missing", uri) from None
    return decode_clip(io.BytesIO(data), spec, start_s=start_s, end_s=end_s, key=key)
