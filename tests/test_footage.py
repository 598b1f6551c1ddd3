"""The real-footage demo set: camera shots whose classes need motion, and the whole pipeline on it with the defaults."""
from __future__ import annotations

import csv
import io

import numpy as np
import pytest
import torch

from vdistill.config import load_config
from vdistill.coordinator import run_pipeline
from vdistill.data.decode import DecodeSpec, decode_uri
from vdistill.data.footage import MOTIONS, write_footage_dataset
from vdistill.experts import TrajectoryReader, list_trajectories
from vdistill.storage import Storage, join
from vdistill.stages.dataset import point_at_demo_data


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


@pytest.mark.slow
def test_footage_demo_with_the_defaults_trains_finite_experts_above_chance_and_finishes(ray_session, tmp_path):
    classes = 8
    cfg = point_at_demo_data(load_config(None, [
        "demo.kind=footage", f"demo.classes={classes}", "demo.train_per_class=30", "demo.test_per_class=8",
        f"run.root={tmp_path}", "run.name=footage", "tracking.enabled=false", "experts.num_experts=2",
        "static.iterations=5", "dynamic.iterations=5", "baselines.pixel_methods=[]", "baselines.coresets=[random]",
        "baselines.full=false", "evaluate.epochs=20", "evaluate.num_eval=2", "validation.epochs=5",
        "baselines.s2d_overrides={dm: {iterations: 5}}"]))
    outputs = run_pipeline(cfg, demo=True)
    storage = Storage()
    uris = list_trajectories(storage, cfg.run_uri, "video")
    assert len(uris) == 2
    for uri in uris:
        reader = TrajectoryReader(storage, uri)
        assert all(torch.isfinite(t).all() for t in storage.read_tensors(uri).values())
        assert reader.meta["history"][-1]["top1"] > 1 / classes, reader.meta["history"][-1]
    rows = storage.read_json(join(cfg.run_uri, "evaluate", "results.json"))
    assert [r["method"] for r in rows] == ["random", "MTT+S2D", "DM+S2D"]
    assert storage.is_file(join(outputs["export"]["artifact"], "meta.json"))
