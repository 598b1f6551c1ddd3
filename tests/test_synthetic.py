"""The procedural demo dataset: real mp4, deterministic, classes that need motion, fast to generate."""
from __future__ import annotations

import csv
import io
import time

import numpy as np

from vdistill.config import DemoConfig
from vdistill.data.decode import DecodeSpec, decode_uri
from vdistill.data.synthetic import demo_classes, read_frame_index, render_video, write_demo_dataset, write_index_video
from vdistill.storage import Storage, join

SMALL = DemoConfig(classes=4, train_per_class=2, test_per_class=1, size=32, frames=8)


def _rows(storage: Storage, csv_uri: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(storage.read_text(csv_uri))))


def test_csv_lists_every_video_as_decodable_h264(tmp_path):
    storage = Storage()
    csv_uri = write_demo_dataset(storage, str(tmp_path), SMALL)
    rows = _rows(storage, csv_uri)
    assert len(rows) == 4 * 3 and {r["split"] for r in rows} == {"train", "test"}
    clip = decode_uri(storage, join(str(tmp_path), rows[0]["path"]), DecodeSpec(frames=8, size=32))
    assert clip.num_decoded == 8 and clip.frames.std() > 10


def test_same_seed_same_videos(tmp_path):
    """The same seed draws the same pixels and file list. The mp4 bytes are not compared: libx264 (inside PyAV)
    was seen to encode identical frames differently in one process once pyarrow or torch had been imported."""
    storage = Storage()
    a = write_demo_dataset(storage, str(tmp_path / "a"), SMALL)
    b = write_demo_dataset(storage, str(tmp_path / "b"), SMALL)
    assert [r["path"] for r in _rows(storage, a)] == [r["path"] for r in _rows(storage, b)]
    for cls in demo_classes(SMALL.classes):
        first, second = (render_video(cls, 8, 32, np.random.default_rng(7)) for _ in range(2))
        assert np.array_equal(first, second)


def test_default_set_generates_in_seconds(tmp_path):
    started = time.perf_counter()
    csv_uri = write_demo_dataset(Storage(), str(tmp_path), DemoConfig())
    assert time.perf_counter() - started < 30
    assert len(_rows(Storage(), csv_uri)) == 10 * 40


def _centroids(video: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """Object centre per frame `(T, 2)` (x, y) from pixels near the class colour."""
    near = (np.abs(video.astype(int) - np.array(colour)).max(axis=-1) < 45)
    ys, xs = np.mgrid[0:video.shape[1], 0:video.shape[2]]
    return np.stack([[(xs * m).sum() / max(m.sum(), 1), (ys * m).sum() / max(m.sum(), 1)] for m in near])


def test_left_and_right_share_appearance_and_differ_in_motion():
    left, right = demo_classes(2)
    assert (left.shape, left.color) == (right.shape, right.color) and left.motion != right.motion
    rng = np.random.default_rng(0)
    dx_left = [np.diff(_centroids(render_video(left, 12, 64, rng), left.color)[:, 0]).mean() for _ in range(5)]
    dx_right = [np.diff(_centroids(render_video(right, 12, 64, rng), right.color)[:, 0]).mean() for _ in range(5)]
    assert max(dx_left) < -0.5 and min(dx_right) > 0.5


def test_fast_and_slow_differ_only_in_speed():
    classes = demo_classes(10)
    fast, slow = classes[4], classes[5]
    assert (fast.shape, fast.color) == (slow.shape, slow.color)
    rng = np.random.default_rng(1)

    def speed(cls) -> float:
        c = _centroids(render_video(cls, 8, 64, rng)[:4], cls.color)  # early frames, before any border clipping
        return float(np.linalg.norm(np.diff(c, axis=0), axis=1).mean())

    assert min(speed(fast) for _ in range(4)) > 2 * max(speed(slow) for _ in range(4))


def test_appearance_classes_differ_in_shape_or_colour():
    classes = demo_classes(10)
    looks = {(c.shape, c.color) for c in classes}
    assert len(looks) == 6  # 4 motion pairs share a look each, 2 appearance classes


def test_index_video_encodes_frame_numbers_exactly(tmp_path):
    storage = Storage()
    uri = str(tmp_path / "idx.mp4")
    write_index_video(storage, uri, 70)
    clip = decode_uri(storage, uri, DecodeSpec(frames=70, size=64))
    assert [read_frame_index(f) for f in clip.frames] == list(range(70))
