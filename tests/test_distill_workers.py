"""`run.distill_workers`: the DM stages (static, DM+S2D, DM on pixels) on a Ray Train worker group with a block of
classes per worker make the set one worker makes, through the real pipeline."""
from __future__ import annotations

import pytest

from vdistill.config import load_config
from vdistill.coordinator import run_pipeline
from vdistill.stage import SCORES_FOLDER
from vdistill.stages.dataset import point_at_demo_data
from vdistill.storage import Storage, join

TINY = [
    "demo.classes=4", "demo.train_per_class=6", "demo.test_per_class=3", "demo.size=24", "demo.frames=8",
    "decode.frames=4", "decode.size=16", "model.width=8", "model.head=adaptive", "model.width_2d=8",
    "model.depth_2d=2", "static.iterations=20", "dynamic.method=dm", "dynamic.iterations=20",
    "dynamic.checkpoint_every=3", "baselines.s2d_methods=[]", "baselines.pixel_methods=[dm]",
    "baselines.pixel_iterations=20", "baselines.coresets=[random]", "baselines.full=false", "evaluate.epochs=2",
    "evaluate.num_eval=1", "validation.epochs=3", "tracking.enabled=false",
]
STAGES = ("static", "dynamic-dm", "pixels-dm")


@pytest.fixture(scope="module")
def runs(ray_session, tmp_path_factory):
    """One run per worker count on the same clip cache, without a validation split so that every stage ships its
    last iterate (with one, these tiny stages keep their starts and equal sets would prove nothing)."""
    root = tmp_path_factory.mktemp("runs")
    shared = [*TINY, f"run.root={root}", f"cache.uri={root}/cache", "data.val_fraction=0"]
    first = point_at_demo_data(load_config(None, [*shared, "run.name=w1", "run.distill_workers=1"]))
    out = {1: (first, run_pipeline(first, demo=True))}
    second = load_config(None, [*shared, "run.name=w2", "run.distill_workers=2", f"data.root={first.data.root}",
                                f"data.annotations={first.data.annotations}"])
    out[2] = (second, run_pipeline(second))
    return out


def _tensors(storage: Storage, outputs: dict, stage: str) -> dict:
    uri = outputs[stage]["static_memory"] if stage == "static" else outputs[stage]["set"]
    files = [uri] if uri.endswith(".safetensors") else [u for u in storage.list_files(uri) if u.endswith(".safetensors")]
    return {f"{f.rsplit('/', 1)[-1]}:{k}": v for f in files for k, v in storage.read_tensors(f).items()}


def test_two_workers_with_two_classes_each_make_the_set_of_one(runs):
    storage = Storage()
    (_, one), (_, two) = runs[1], runs[2]
    for stage in STAGES:
        assert (one[stage]["workers"], two[stage]["workers"]) == (1, 2), stage
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
    assert two["dynamic-dm"]["seconds_per_iteration"]["iterations"] == 20
    assert two["static"]["seconds_per_iteration"]["iterations"] == 20
    for stage in STAGES:
        assert not [u for u in storage.list_files(join(cfg.run_uri, stage), recursive=False) if "checkpoint-" in u]


def test_on_workers_rank_0_scores_the_set_on_validation_and_every_worker_keeps_the_same_best(ray_session, tmp_path):
    cfg = point_at_demo_data(load_config(None, [*TINY, f"run.root={tmp_path}", "run.distill_workers=2",
                                                "validation.every=10"]))
    static = run_pipeline(cfg, until="static", demo=True)["static"]
    assert static["workers"] == 2
    assert [s[0] for s in static["validation"]["scores"]] == [0, 10, 20]
    assert len(Storage().list_files(join(cfg.run_uri, SCORES_FOLDER))) >= 1
