"""The real-footage demo set: camera shots whose classes need motion (the whole pipeline on it: test_demo_quality)."""
from __future__ import annotations

import csv
import io

import numpy as np

from vdistill.config import load_config
from vdistill.data.decode import DecodeSpec, decode_uri
from vdistill.data.footage import MOTIONS, write_footage_dataset
from vdistill.storage import Storage, join


def test_footage_classes_are_shots_played_forwards_reversed_and_fast(tmp_path):
    cfg = load_config(None, ["demo.kind=footage", "demo.classes=8", "demo.train_per_class=2", "demo.test_per_class=1"])
    storage = Storage()
    csv_uri = write_footage_dataset(storage, str(tmp_path), cfg.demo)
    rows = list(csv.DictReader(io.StringIO(storage.read_text(csv_uri))))
    labels = sorted({r["label"] for r in rows})
    assert len(labels) == 8 and {label.split("_", 1)[1] for label in labels} == set(MOTIONS)
    assert sum(r["split"] == "train" for r in rows) == 16 and sum(r["split"] == "test" for r in rows) == 8
    clip = decode_uri(storage, join(str(tmp_path), rows[0]["path"]), DecodeSpec(frames=cfg.demo.frames, size=32))
    assert clip.num_decoded == cfg.demo.frames
    frames = clip.frames.astype(np.float64)
    assert np.abs(frames[-1] - frames[0]).mean() > 5  # real footage moves


def test_the_same_shot_reversed_is_the_forward_clip_backwards(tmp_path):
    """What makes forward/reverse classes need time: their frames are the same set, in the opposite order."""
    from vdistill.data.footage import SHOTS, _decode_all, footage_dir, render_clip

    shot = SHOTS[0]
    source = _decode_all(f"{footage_dir()}/{shot.file}")
    forward = render_clip(source, shot, "forward", 8, 32, np.random.default_rng(3))
    reverse = render_clip(source, shot, "reverse", 8, 32, np.random.default_rng(3))
    assert np.array_equal(forward[::-1], reverse)
