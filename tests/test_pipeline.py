"""The coordinator runs a whole (tiny) pipeline, survives being killed mid-stage, and skips finished work."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vdistill.config import load_config
from vdistill.coordinator import get_coordinator, run_pipeline
from vdistill.pipeline import RunConflict
from vdistill.stage import SCORES_FOLDER
from vdistill.storage import Storage, join
from vdistill.stages.dataset import point_at_demo_data

TINY = [
    "demo.classes=4", "demo.train_per_class=6", "demo.test_per_class=3", "demo.size=24", "demo.frames=8",
    "decode.frames=4", "decode.size=16", "model.width=8", "model.head=adaptive", "model.width_2d=8",
    "model.depth_2d=2", "experts.num_experts=2", "experts.batch_size=8", "static.iterations=3",
    "dynamic.method=mtt", "dynamic.syn_steps=2", "dynamic.max_start_epoch=2", "dynamic.checkpoint_every=5",
    "baselines.pixel_iterations=2", "baselines.pixel_methods=[dm]", "baselines.coresets=[random]",
    "evaluate.epochs=2", "evaluate.num_eval=2", "baselines.full=false", "run.coordinator_cpus=1", "dynamic.eval_every=100",
    "validation.epochs=5", "validation.every=50",
]
STAGES_BEFORE_DYNAMIC = ("dataset", "ingest", "experts-video", "static")
SUPERSEDED = "checkpoint-00000000000000ab.safetensors"


def manifest(storage: Storage, cfg, stage: str) -> dict:
    return storage.read_json(join(cfg.run_uri, stage, "manifest.json"))


@pytest.fixture(scope="module")
def another_ray_on_this_host():
    """A process that Ray's address discovery takes for the raylet of a second local cluster (cheaper than a real
    `ray start`: discovery reads only process command lines); -> the time it started."""
    proc = subprocess.Popen(["raylet", "-c", "import time; time.sleep(900)", "--gcs-address=127.0.0.1:1"],
                            executable=sys.executable)
    yield time.time()
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def interrupted_run(ray_session, tmp_path_factory, another_ray_on_this_host):
    """Start a run, kill its coordinator inside the dynamic stage, then run the same command again; another
    local Ray runs on the host all along."""
    root = tmp_path_factory.mktemp("runs")
    cfg = point_at_demo_data(load_config(None, [*TINY, f"run.root={root}", "dynamic.iterations=300"]))
    storage = Storage()
    checkpoint_dir = join(cfg.run_uri, "dynamic-mtt")
    coordinator = get_coordinator(cfg, storage)
    pending = coordinator.run.remote("export", True)
    deadline = time.time() + 240
    while not any("checkpoint-" in u for u in storage.list_files(checkpoint_dir)):
        assert time.time() < deadline, "the dynamic stage never wrote a checkpoint"
        ready, _ = ray_session.wait([pending], timeout=0.2)
        assert not ready, f"the run finished before it could be interrupted: {ray_session.get(pending)}"
    ray_session.kill(coordinator, no_restart=True)
    # What runs of other settings left: a checkpoint beside the running stage's own, one in a finished stage.
    for stage in ("dynamic-mtt", "static"):
        storage.write_tensors(join(cfg.run_uri, stage, SUPERSEDED), {"x": torch.zeros(1000)})
    before = {stage: manifest(storage, cfg, stage) for stage in STAGES_BEFORE_DYNAMIC}
    assert not storage.exists(join(cfg.run_uri, "dynamic-mtt", "manifest.json"))
    outputs = run_pipeline(cfg, demo=True)
    return cfg, storage, before, outputs


def test_killed_coordinator_resumes_the_dynamic_stage_from_its_checkpoint(interrupted_run):
    cfg, storage, _, outputs = interrupted_run
    resumed = outputs["dynamic-mtt"]["resumed_from"]
    assert resumed >= cfg.dynamic.checkpoint_every
    assert resumed < cfg.dynamic.iterations
    scores = outputs["dynamic-mtt"]["validation"]["scores"]
    assert scores[0][0] == 0 < resumed  # the validation record, best iterate included, came with the checkpoint


def test_ray_train_attaches_to_this_cluster_while_another_runs_on_the_host(interrupted_run, another_ray_on_this_host,
                                                                         ray_session):
    from ray._private.worker import global_worker

    logs = Path(global_worker.node.get_session_dir_path()) / "logs"
    written = [p for p in logs.glob("*") if p.is_file() and p.stat().st_mtime >= another_ray_on_this_host]
    assert written  # the experts' Ray Train run logged here
    assert not [p.name for p in written if "Found multiple active Ray instances" in p.read_text(errors="replace")]


def test_evaluations_during_distillation_are_collected(interrupted_run):
    _, _, _, outputs = interrupted_run
    best = outputs["dynamic-mtt"]["best"]
    assert best["iteration"] in (100, 200, 300) and 0.0 <= best["top1_mean"] <= 1.0


def test_stages_finished_before_the_kill_are_not_rerun(interrupted_run):
    cfg, storage, before, _ = interrupted_run
    for stage, old in before.items():
        assert manifest(storage, cfg, stage) == old, f"{stage} was run again"


def test_resumed_run_completes_with_results_and_an_artifact(interrupted_run):
    cfg, storage, _, outputs = interrupted_run
    rows = storage.read_json(join(cfg.run_uri, "evaluate", "results.json"))
    assert [r["method"] for r in rows] == ["random", "DM (pixels)", "MTT+S2D", "DM+S2D"]
    meta = storage.read_json(join(outputs["export"]["artifact"], "meta.json"))
    assert meta["kind"] == "s2d" and meta["layout"]["vpc"] == 1
    assert storage.is_file(join(outputs["export"]["artifact"], "static_memory.safetensors"))


def test_finished_stages_keep_no_checkpoint_and_other_settings_checkpoints_are_removed(interrupted_run):
    cfg, storage, _, outputs = interrupted_run
    assert outputs["dynamic-mtt"]["resumed_from"] > 0  # its own checkpoint served the resume, then went
    left = [u for stage in outputs for u in storage.list_files(join(cfg.run_uri, stage), recursive=False)
            if "checkpoint-" in u]
    assert left == []


def test_a_set_is_scored_on_validation_once_however_many_stages_start_from_it(interrupted_run):
    """MTT+S2D and DM+S2D start from the same set: the second reads the first's score (one file per set scored)."""
    cfg, storage, _, outputs = interrupted_run
    mtt, dm = outputs["dynamic-mtt"]["validation"], outputs["dynamic-dm"]["validation"]
    assert dm["scores"][0] == mtt["scores"][0] and dm["scores"][0][0] == 0
    scored = sum(len(out["validation"]["scores"]) for out in outputs.values() if out.get("validation"))
    assert len(storage.list_files(join(cfg.run_uri, SCORES_FOLDER))) == scored - 1


def test_resubmitting_a_finished_run_is_a_no_op(interrupted_run):
    cfg, storage, _, outputs = interrupted_run
    stages = [s for s in outputs]
    manifests = {stage: manifest(storage, cfg, stage) for stage in stages}
    again = run_pipeline(cfg, demo=True)
    assert again == outputs
    assert {stage: manifest(storage, cfg, stage) for stage in stages} == manifests


def _pipeline_run_status(cfg) -> str:
    from mlflow.tracking import MlflowClient

    from vdistill.tracking import ROLE_TAG, resolve_tracking

    client = MlflowClient(resolve_tracking(cfg)[0])
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    (run,) = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'pipeline'")
    return run.info.status


def _same_run_with(cfg, *overrides: str):
    return point_at_demo_data(load_config(None, [*TINY, f"run.root={cfg.run.root}", "dynamic.iterations=300",
                                                 *overrides]))


def test_a_changed_expert_setting_is_refused_before_config_or_mlflow_change(interrupted_run):
    cfg, storage, _, _ = interrupted_run
    config_before = storage.read_bytes(join(cfg.run_uri, "config.json"))
    with pytest.raises(RunConflict, match=r"the video experts finished with other settings \(.*experts.lr: 0.01 -> "
                                          r"0.05\); finished experts are never retrained in place"):
        run_pipeline(_same_run_with(cfg, "experts.lr=0.05"), demo=True)
    assert storage.read_bytes(join(cfg.run_uri, "config.json")) == config_before
    assert _pipeline_run_status(cfg) == "FINISHED"


def test_a_changed_decode_setting_is_refused_before_the_cache_is_reingested(interrupted_run):
    cfg, storage, _, _ = interrupted_run
    cache_before = {uri: storage.read_bytes(uri) for uri in storage.list_files(cfg.cache_uri)}
    with pytest.raises(RunConflict, match=r"decode.interpolation: bilinear -> area"):
        run_pipeline(_same_run_with(cfg, "decode.interpolation=area"), demo=True)
    assert {uri: storage.read_bytes(uri) for uri in storage.list_files(cfg.cache_uri)} == cache_before
