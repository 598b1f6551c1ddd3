"""`run.distill_workers`: the distillation stages (static, DM+S2D, MTT+S2D) on a Ray Train worker
group make the set one worker makes, through the real pipeline; a killed worker restarts the group from its
checkpoint, and a stage checkpointed on two workers resumes on one, with the same set."""
from __future__ import annotations

import os
import signal
import time

import pytest

from vdistill.config import load_config
from vdistill.coordinator import get_coordinator, run_pipeline
from vdistill.stages.dataset import point_at_demo_data
from vdistill.storage import Storage, join

TINY = [
    "demo.classes=4", "demo.train_per_class=6", "demo.test_per_class=3", "demo.size=24", "demo.frames=8",
    "decode.frames=4", "decode.size=16", "model.width=8", "model.head=adaptive", "model.width_2d=8",
    "model.depth_2d=2", "static.iterations=20", "dynamic.method=dm", "dynamic.iterations=20",
    "dynamic.checkpoint_every=3", "baselines.s2d_methods=[]", "baselines.pixel_methods=[]",
    "baselines.pixel_iterations=20", "baselines.coresets=[random]", "baselines.full=false", "evaluate.epochs=2",
    "evaluate.num_eval=1", "validation.epochs=3", "tracking.enabled=false",
]
MTT = ["baselines.s2d_methods=[mtt]", "baselines.s2d_overrides={}", "experts.num_experts=1", "experts.batch_size=8",
       "dynamic.syn_steps=2", "dynamic.max_start_epoch=2"]
STAGES = ("static", "dynamic-dm", "dynamic-mtt")


@pytest.fixture(scope="module")
def runs(ray_session, tmp_path_factory):
    """One run per worker count on the same clip cache, up to the distillation stages, without a validation split
    so that every stage ships its last iterate (with one, these tiny stages keep their starts and equal sets would
    prove nothing)."""
    root = tmp_path_factory.mktemp("runs")
    shared = [*TINY, *MTT, f"run.root={root}", f"cache.uri={root}/cache", "data.val_fraction=0"]
    first = point_at_demo_data(load_config(None, [*shared, "run.name=w1", "run.distill_workers=1"]))
    out = {1: (first, run_pipeline(first, until="distill", demo=True))}
    second = load_config(None, [*shared, "run.name=w2", "run.distill_workers=2", f"data.root={first.data.root}",
                                f"data.annotations={first.data.annotations}"])
    out[2] = (second, run_pipeline(second, until="distill"))
    return out


def _tensors(storage: Storage, outputs: dict, stage: str) -> dict:
    uri = outputs[stage]["static_memory"] if stage == "static" else outputs[stage]["set"]
    files = [uri] if uri.endswith(".safetensors") else [u for u in storage.list_files(uri) if u.endswith(".safetensors")]
    return {f"{f.rsplit('/', 1)[-1]}:{k}": v for f in files for k, v in storage.read_tensors(f).items()}


def test_two_workers_make_the_set_of_one_in_every_distillation_stage(runs):
    storage = Storage()
    (_, one), (_, two) = runs[1], runs[2]
    for stage in STAGES:
        assert (one[stage]["workers"], two[stage]["workers"]) == (1, 2), stage
        assert (one[stage]["group_starts"], two[stage]["group_starts"]) == ([], [0]), stage
        a, b = _tensors(storage, one, stage), _tensors(storage, two, stage)
        assert a.keys() == b.keys() and a, stage
        for name, tensor in a.items():
            scale = tensor.float().abs().max().clamp_min(1e-12)
            assert (b[name].float() - tensor.float()).abs().max() / scale <= 1e-4, (stage, name)
        assert one[stage]["loss"]["first"] != one[stage]["loss"]["last"], stage  # the set moved
        assert two[stage]["loss"] == pytest.approx(one[stage]["loss"], rel=1e-4), stage


def test_the_worker_group_reports_every_iteration_and_leaves_no_checkpoint(runs):
    storage = Storage()
    cfg, two = runs[2]
    for stage in ("static", "dynamic-dm", "dynamic-mtt"):
        assert two[stage]["seconds_per_iteration"]["iterations"] == 20, stage
    for stage in STAGES:
        assert not [u for u in storage.list_files(join(cfg.run_uri, stage), recursive=False) if "checkpoint-" in u]


LONG = [*TINY, "static.iterations=200", "dynamic.checkpoint_every=5", "data.val_fraction=0"]


@pytest.fixture(scope="module")
def long_static(ray_session, tmp_path_factory):
    """A static stage long enough to be interrupted after its first checkpoint, run through on one worker: the set
    every interrupted run must end with; -> (settings for more runs on its data, that set)."""
    root = tmp_path_factory.mktemp("long")
    shared = [*LONG, f"run.root={root}", f"cache.uri={root}/cache"]
    cfg = point_at_demo_data(load_config(None, [*shared, "run.name=straight"]))
    static = run_pipeline(cfg, until="static", demo=True)["static"]
    shared += [f"data.root={cfg.data.root}", f"data.annotations={cfg.data.annotations}"]
    return shared, Storage().read_tensors(static["static_memory"])


def _start_and_await_a_checkpoint(ray_session, cfg, storage: Storage):
    """The run's coordinator working on the static stage, once that stage has written a checkpoint."""
    coordinator = get_coordinator(cfg, storage)
    pending = coordinator.run.remote("static", False)
    deadline = time.time() + 240
    while not any("checkpoint-" in u for u in storage.list_files(join(cfg.run_uri, "static"))):
        assert time.time() < deadline, "the static stage never wrote a checkpoint"
        ready, _ = ray_session.wait([pending], timeout=0.2)
        assert not ready, f"the run finished before it could be interrupted: {ray_session.get(pending)}"
    return coordinator, pending


def _assert_same_set(storage: Storage, output: dict, expected: dict) -> None:
    got = storage.read_tensors(output["static_memory"])
    for name, tensor in expected.items():
        scale = tensor.float().abs().max().clamp_min(1e-12)
        assert (got[name].float() - tensor.float()).abs().max() / scale <= 1e-4, name


def test_a_killed_worker_restarts_the_group_from_its_checkpoint_and_the_set_is_unchanged(long_static, ray_session):
    from ray.util.state import list_actors

    shared, expected = long_static
    cfg, storage = load_config(None, [*shared, "run.name=killed-worker", "run.distill_workers=2"]), Storage()
    _, pending = _start_and_await_a_checkpoint(ray_session, cfg, storage)
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    assert len(workers) == 2, workers
    os.kill(workers[1]["pid"], signal.SIGKILL)  # a preempted node
    static = ray_session.get(pending)["static"]
    assert static["workers"] == 2 and len(static["group_starts"]) == 2, static["group_starts"]
    assert 0 < static["group_starts"][1] < 200 and static["group_starts"][1] % 5 == 0
    _assert_same_set(storage, static, expected)


def test_a_stage_checkpointed_on_two_workers_resumes_on_one_with_the_same_set(long_static, ray_session):
    shared, expected = long_static
    storage = Storage()
    two = load_config(None, [*shared, "run.name=two-then-one", "run.distill_workers=2"])
    coordinator, _ = _start_and_await_a_checkpoint(ray_session, two, storage)
    ray_session.kill(coordinator, no_restart=True)  # the driver's node is gone, its worker group with it
    one = load_config(None, [*shared, "run.name=two-then-one", "run.distill_workers=1"])
    static = run_pipeline(one, until="static")["static"]
    assert static["workers"] == 1 and 5 <= static["resumed_from"] < 200
    _assert_same_set(storage, static, expected)
