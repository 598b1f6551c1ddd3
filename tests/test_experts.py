"""Expert trajectories: Ray Train workers train independent experts of both kinds in one run, taking them from a
shared queue, resume after a crash, skip finished work."""
from __future__ import annotations

import os
import sys
import time

import numpy as np
import pytest
import torch

from vdistill.config import load_config
from vdistill.data.stream import SplitStream
from vdistill.data.ingest import MANIFEST, _write_part
from vdistill.experts import (ExpertJob, ExpertsFailed, TrajectoryReader, list_trajectories, plan_experts,
                              run_experts, snapshot_name, train_expert)
from vdistill.storage import Storage, join

CLASSES = ["a", "b", "c", "d"]
EPOCHS = 3
FAIL_EXPERT, FAIL_EPOCH = 1, 2


class FailOnce:
    """`on_epoch` hook: raises at the start of (expert, epoch), once: its marker file outlives the restarted worker."""

    def __init__(self, marker: str, expert: int, epoch: int) -> None:
        self.marker, self.expert, self.epoch = marker, expert, epoch

    def __call__(self, job: ExpertJob, epoch: int) -> None:
        if (job.index, epoch) == (self.expert, self.epoch) and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            raise RuntimeError(f"injected failure: expert {job.index} epoch {epoch}")


def write_tiny_cache(storage: Storage, cache_uri: str, per_class: dict[str, int], frames: int = 8,
                     size: int = 32) -> None:
    """A clip cache in the ingest layout: class c is brighter in one colour channel, plus noise."""
    rng = np.random.default_rng(0)
    for split, n in per_class.items():
        for label in range(len(CLASSES)):
            clips = rng.integers(0, 120, (n, frames, size, size, 3), dtype=np.uint8)
            clips[..., label % 3] += np.uint8(60 * (1 + label // 3))
            _write_part(storage, cache_uri, split, label,
                        [(f"{split}-{label}-{i:03d}", f"mem://{split}/{label}/{i}", clips[i]) for i in range(n)])
    storage.write_json(join(cache_uri, MANIFEST), {
        "classes": CLASSES, "frames": frames, "size": size, "splits": sorted(per_class),
        "counts": {s: {str(c): n for c in range(len(CLASSES))} for s, n in per_class.items()},
    })


def tiny_config(root: str, name: str, *extra: str):
    return load_config(None, [
        f"run.root={root}", f"run.name={name}", f"cache.uri={root}/cache", "run.device=cpu",
        "model.width=8", "model.head=adaptive", "model.width_2d=8", "model.depth_2d=2",
        "dynamic.max_start_epoch=2", "dynamic.expert_epochs=1", f"experts.epochs={EPOCHS}",
        "experts.batch_size=8", "experts.lr=0.01", "experts.test_every=1", *extra,
    ])


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("experts"))
    write_tiny_cache(Storage(), f"{root}/cache", {"train": 6, "test": 2})
    return root


@pytest.fixture(scope="module")
def video_run(ray_session, cache_root):
    """2 workers x 2 experts, with expert 1 crashing once at the start of epoch 2 (Ray Train restarts it)."""
    from ray import cloudpickle

    # By value: Ray gives workers only the driver's working directory on sys.path, so by reference the hook
    # would unpickle only when pytest was started in the repo root (and never on a cluster).
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cfg = tiny_config(cache_root, "video", "experts.num_experts=4", "experts.num_workers=2")
    fail = FailOnce(f"{cache_root}/fail-marker", FAIL_EXPERT, FAIL_EPOCH)
    return cfg, run_experts(cfg, Storage(), ["video"], progress=False, on_epoch=fail)["video"]


def test_each_expert_gets_a_file_with_init_plus_one_snapshot_per_epoch(video_run):
    cfg, uris = video_run
    storage = Storage()
    assert uris == list_trajectories(storage, cfg.run_uri, "video")
    assert [os.path.basename(u) for u in uris] == [f"expert_{k:03d}.safetensors" for k in range(4)]
    for uri in uris:
        assert storage.tensor_names(uri) == [snapshot_name(e) for e in range(EPOCHS + 1)]
    assert storage.list_files(join(cfg.run_uri, "experts", "video", "partial")) == []


def test_snapshots_are_copies_that_change_every_epoch(video_run):
    _, uris = video_run
    snapshots = Storage().read_tensors(uris[0])
    for e in range(EPOCHS):
        assert not torch.equal(snapshots[snapshot_name(e)], snapshots[snapshot_name(e + 1)])


def test_experts_start_from_different_inits(video_run):
    _, uris = video_run
    inits = [TrajectoryReader(Storage(), u).snapshot(0) for u in uris]
    assert not torch.equal(inits[0], inits[1]) and not torch.equal(inits[0], inits[2])


def test_metadata_records_spec_and_per_epoch_accuracy(video_run):
    cfg, uris = video_run
    meta = TrajectoryReader(Storage(), uris[2]).meta
    assert meta["model"]["name"] == "convnet3d" and meta["model"]["width"] == 8
    assert meta["classes"] == CLASSES and meta["clip_shape"] == [8, 32, 32, 3]
    assert meta["lr"] == 0.01 and meta["batch_size"] == 8 and meta["index"] == 2
    assert sum(np.prod(s) for s in meta["param_shapes"]) == TrajectoryReader(Storage(), uris[2]).snapshot(0).numel()
    assert [h["epoch"] for h in meta["history"]] == list(range(1, EPOCHS + 1))
    assert all(0 <= h["acc"] <= 1 and 0 <= h["top1"] <= h["top5"] <= 1 for h in meta["history"])


def test_crashed_expert_resumes_from_its_last_finished_epoch(video_run, cache_root):
    cfg, uris = video_run
    assert os.path.exists(f"{cache_root}/fail-marker")
    metas = [TrajectoryReader(Storage(), u).meta for u in uris]
    assert metas[FAIL_EXPERT]["attempts"] == [0, FAIL_EPOCH - 1]
    assert metas[FAIL_EXPERT]["resumed_from_epoch"] == FAIL_EPOCH - 1
    # The teardown kills the other worker wherever it is, possibly right after it wrote a new expert's epoch-0
    # state: that expert resumes from 0 again. What always holds: no resume point goes backwards, and every
    # epoch was recorded once, in order (an epoch in flight at the crash is retrained, never recorded twice).
    for meta in metas:
        attempts = meta["attempts"]
        assert attempts[0] == 0 and attempts == sorted(attempts) and attempts[-1] < EPOCHS and len(attempts) <= 2
        assert [h["epoch"] for h in meta["history"]] == list(range(1, EPOCHS + 1))


def test_second_invocation_is_a_noop(video_run):
    cfg, uris = video_run
    storage = Storage()
    folder = join(cfg.run_uri, "experts", "video")
    before = {p: os.stat(p).st_mtime_ns for p in storage.list_files(folder)}
    assert run_experts(cfg, storage, ["video"], progress=False) == {"video": uris}
    assert {p: os.stat(p).st_mtime_ns for p in storage.list_files(folder)} == before


def test_reader_snapshot_equals_the_written_tensor(video_run):
    _, uris = video_run
    written = Storage().read_tensors(uris[3])
    reader = TrajectoryReader(Storage(), uris[3])
    assert reader.num_snapshots == EPOCHS + 1
    for e in range(reader.num_snapshots):
        assert reader.snapshot(e).dtype == torch.float32
        assert torch.equal(reader.snapshot(e), written[snapshot_name(e)])
    with pytest.raises(IndexError):
        reader.snapshot(EPOCHS + 1)


class WaitForTheOthers:
    """`on_epoch` hook: video expert 0 waits at its first epoch until every other expert has finished, which
    happens only if the other worker takes all of them while this one is busy (a fixed share per rank would
    leave one of them queued behind the waiting expert)."""

    def __init__(self, others: list[str], timeout_s: float = 120.0) -> None:
        self.others, self.timeout_s = others, timeout_s

    def __call__(self, job: ExpertJob, epoch: int) -> None:
        if (job.kind, job.index, epoch) != ("video", 0, 1):
            return
        deadline = time.monotonic() + self.timeout_s
        while not all(os.path.exists(uri) for uri in self.others):
            if time.monotonic() > deadline:
                raise RuntimeError("the other experts never finished while video expert 0 waited")
            time.sleep(0.2)


def ray_train_runs(cfg) -> int:
    return len(os.listdir(join(cfg.run_uri, "experts", "_ray_train")))


@pytest.fixture(scope="module")
def mixed_run(ray_session, cache_root):
    """2 video + 2 frame experts in one run of 2 workers; video expert 0 waits until the three others are done."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cfg = tiny_config(cache_root, "mixed", "experts.num_experts=2", "experts.num_workers=2", "experts.max_failures=0")
    others = [job.uri for kind in ("video", "frame") for job in plan_experts(cfg, Storage(), kind)][1:]
    return cfg, run_experts(cfg, Storage(), ["video", "frame"], progress=False, on_epoch=WaitForTheOthers(others))


def test_video_and_frame_experts_train_in_one_ray_train_run(mixed_run):
    cfg, uris = mixed_run
    storage = Storage()
    assert ray_train_runs(cfg) == 1
    for kind in ("video", "frame"):
        assert uris[kind] == list_trajectories(storage, cfg.run_uri, kind) and len(uris[kind]) == 2
        assert storage.is_file(join(cfg.run_uri, "experts", kind, "manifest.json"))


def test_a_free_worker_takes_the_next_expert_while_another_is_busy(mixed_run):
    _, uris = mixed_run
    finished = {uri: TrajectoryReader(Storage(), uri).meta["history"] for uri in uris["video"] + uris["frame"]}
    waited = finished.pop(uris["video"][0])
    assert max(history[-1]["finished_at"] for history in finished.values()) < waited[0]["finished_at"]


def test_frame_experts_train_a_2d_network_on_single_frames(mixed_run):
    _, uris = mixed_run
    reader = TrajectoryReader(Storage(), uris["frame"][0])
    assert reader.meta["model"]["name"] == "convnet2d" and reader.num_snapshots == EPOCHS + 1
    assert not torch.equal(reader.snapshot(0), reader.snapshot(EPOCHS))
    assert 0 <= reader.meta["history"][-1]["top1"] <= 1


def test_the_first_experts_stage_trains_every_planned_kind_and_the_next_finds_its_experts_finished(
        ray_session, cache_root):
    from vdistill.lease import Owner
    from vdistill.stage import RunContext, Stage
    from vdistill.stages.experts import stages
    from vdistill.tracking import Tracker

    storage = Storage()
    cfg = tiny_config(cache_root, "stages", "experts.num_experts=1", "experts.num_workers=2", "tracking.enabled=false")
    planned = stages(cfg, Stage("ingest", "ingest", {}, (), lambda ctx: {}), ["video", "frame"])
    assert [stage.name for stage in planned.values()] == ["experts-video", "experts-frame"]
    outputs: dict[str, dict] = {}
    for stage in planned.values():
        ctx = RunContext(cfg, storage, Tracker(cfg), Owner(), print, join(cfg.run_uri, stage.name), "hash", outputs)
        outputs[stage.name] = stage.body(ctx)
        assert len(list_trajectories(storage, cfg.run_uri, "frame")) == 1  # already after the video stage
    assert ray_train_runs(cfg) == 1
    for kind in ("video", "frame"):
        assert outputs[f"experts-{kind}"]["trajectories"] == list_trajectories(storage, cfg.run_uri, kind)


def test_resumed_expert_is_bit_identical_to_an_uninterrupted_one(cache_root, tmp_path):
    storage = Storage()
    # A buffer of 4 clips, smaller than the split: the shuffle buffer's draws are part of what must repeat.
    train, test = (SplitStream(storage, f"{cache_root}/cache", s, buffer_mb=0.1) for s in ("train", "test"))
    trajectories = []
    for name, fail in (("straight", False), ("resumed", True)):
        cfg = tiny_config(str(tmp_path), name, f"cache.uri={cache_root}/cache", "experts.num_experts=1",
                          "experts.momentum=0.9", "model.dropout=0.5")
        (job,) = plan_experts(cfg, storage, "video")
        if fail:
            with pytest.raises(RuntimeError, match="injected failure"):
                train_expert(job, storage, train, test, torch.device("cpu"), FailOnce(f"{tmp_path}/marker", 0, EPOCHS))
            assert storage.is_file(join(job.partial_uri, "state.safetensors"))
        trajectories.append(storage.read_tensors(train_expert(job, storage, train, test, torch.device("cpu"))))
    assert trajectories[0].keys() == trajectories[1].keys()
    assert all(torch.equal(trajectories[0][k], trajectories[1][k]) for k in trajectories[0])


def test_input_hash_covers_the_settings_that_shape_the_trajectory_and_only_those(cache_root):
    storage = Storage()

    def hashes(name: str, *extra: str) -> dict[str, list[str]]:
        cfg = tiny_config(cache_root, name, *extra)
        return {kind: [job.input_hash for job in plan_experts(cfg, storage, kind)][:2] for kind in ("video", "frame")}

    base = hashes("hash", "experts.num_experts=2")
    assert base["video"][0] != base["video"][1] and base["video"][0] != base["frame"][0]
    assert hashes("other", "experts.num_experts=3", "experts.test_every=5", "experts.num_workers=1") == base
    assert hashes("hash", "experts.num_experts=2", "model.width_2d=16")["video"] == base["video"]
    assert hashes("hash", "experts.num_experts=2", "model.width=16")["frame"] == base["frame"]
    for setting in ("experts.lr=0.02", "experts.batch_size=4", "train.standardize=true", "run.seed=1"):
        changed = hashes("hash", "experts.num_experts=2", setting)
        assert all(changed[k][i] != base[k][i] for k in base for i in range(2)), setting


def test_a_diverging_lr_fails_the_stage_naming_the_expert_and_the_key_then_a_sane_lr_finishes(ray_session, cache_root):
    storage = Storage()
    diverging = tiny_config(cache_root, "diverge", "experts.num_experts=2", "experts.num_workers=1", "experts.lr=1e20")
    with pytest.raises(ExpertsFailed, match=r"2 of 2 video experts did not finish") as failure:
        run_experts(diverging, storage, ["video"], progress=False)
    message = str(failure.value)
    assert "video expert 0 diverged in epoch" in message and "video expert 1 diverged" in message
    assert "experts.lr=1e+20" in message and "lower experts.lr" in message
    assert list_trajectories(storage, diverging.run_uri, "video") == []  # nothing non-finite marked finished
    assert not storage.exists(join(diverging.run_uri, "experts", "video", "manifest.json"))

    sane = tiny_config(cache_root, "diverge", "experts.num_experts=2", "experts.num_workers=1")
    uris = run_experts(sane, storage, ["video"], progress=False)["video"]
    assert len(list_trajectories(storage, sane.run_uri, "video")) == 2
    for uri in uris:
        assert all(torch.isfinite(t).all() for t in storage.read_tensors(uri).values())


def test_experts_of_an_unfinished_stage_are_retrained_with_new_settings_but_a_finished_stage_refuses(
        ray_session, cache_root):
    storage = Storage()
    first = tiny_config(cache_root, "relr", "experts.num_experts=1", "experts.num_workers=1")
    (uri,) = run_experts(first, storage, ["video"], progress=False)["video"]
    changed = tiny_config(cache_root, "relr", "experts.num_experts=1", "experts.num_workers=1", "experts.lr=0.02")
    with pytest.raises(ValueError, match="trained with other settings"):
        run_experts(changed, storage, ["video"], progress=False)
    storage.delete(join(first.run_uri, "experts", "video", "manifest.json"))  # as if the stage had failed
    assert run_experts(changed, storage, ["video"], progress=False) == {"video": [uri]}
    assert TrajectoryReader(storage, uri).meta["lr"] == 0.02
