"""A run's coordinator: named after everything that defines the run, gone after a failure, user errors as one line."""
from __future__ import annotations

import pytest
import yaml

from vdistill.cli import main
from vdistill.config import DemoConfig, load_config
from vdistill.coordinator import NAMESPACE, actor_name
from vdistill.data.synthetic import write_demo_dataset
from vdistill.storage import Storage, join

SECRET = "S3CR3TPA55"


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    """A tiny local dataset with one corrupt video (1 of 7 quarantined) and a preset that ingests it."""
    tmp = tmp_path_factory.mktemp("coordinator")
    storage = Storage()
    data = str(tmp / "data")
    csv_uri = write_demo_dataset(storage, data, DemoConfig(classes=2, train_per_class=2, test_per_class=1, size=16,
                                                           frames=4))
    storage.write_bytes(join(data, "broken.mp4"), b"not a video" * 100)
    storage.write_text(csv_uri, storage.read_text(csv_uri) + "broken.mp4,c0,train\n")
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "run": {"name": "fixme", "root": str(tmp / "runs")}, "data": {"root": data, "annotations": csv_uri},
        "decode": {"frames": 4, "size": 16}, "cache": {"videos_per_task": 4}, "tracking": {"enabled": False},
        "storage": {"endpoint_url": f"http://KEY:{SECRET}@127.0.0.1:9"}}))
    return str(path)


@pytest.fixture(scope="module")
def failed_then_fixed(preset, ray_session):
    """`vdistill ingest` refused for too many quarantined videos, then re-submitted with the limit raised."""
    failed = _main_with_stderr(["ingest", preset, "cache.max_quarantine_fraction=0"])
    named_after_failure = [a["name"] for a in ray_session.util.list_named_actors(all_namespaces=True)
                           if a["namespace"] == NAMESPACE]
    fixed = _main_with_stderr(["ingest", preset, "cache.max_quarantine_fraction=0.5"])
    return failed, named_after_failure, fixed


def _main_with_stderr(argv: list[str]) -> tuple[int, str]:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


def test_a_quarantine_failure_is_one_line_and_exit_code_2(failed_then_fixed):
    (code, err), _, _ = failed_then_fixed
    assert code == 2
    assert err.startswith("vdistill: 1 of 7 videos quarantined (14.3% > cache.max_quarantine_fraction=0.0%)")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_failed_run_leaves_no_coordinator_behind(failed_then_fixed):
    _, named, _ = failed_then_fixed
    assert not [name for name in named if name.startswith("vdistill:fixme:")]


def test_a_fixed_resubmission_runs_with_the_fixed_config(failed_then_fixed, preset):
    _, _, (code, err) = failed_then_fixed
    assert (code, err) == (0, "")
    cfg = load_config(preset, ["cache.max_quarantine_fraction=0.5"])
    assert Storage().read_json(join(cfg.cache_uri, "manifest.json"))["num_clips"] == 6


def test_run_and_cache_config_files_have_no_url_credentials(failed_then_fixed, preset):
    cfg = load_config(preset, ["cache.max_quarantine_fraction=0.5"])
    for uri in (join(cfg.run_uri, "config.json"), join(cfg.cache_uri, "config.json")):
        text = Storage().read_text(uri)
        assert "127.0.0.1:9" in text and SECRET not in text, uri


def test_the_coordinator_name_covers_every_setting_and_the_code():
    base = load_config(None, [])
    assert actor_name(base) == actor_name(load_config(None, []))
    assert actor_name(base) != actor_name(load_config(None, ["cache.max_quarantine_fraction=0.5"]))
    assert actor_name(base) != actor_name(load_config(None, ["data.annotations=/fixed.csv"]))



# ---- each stage's identity is exactly what it reads ---------------------------------------------------------
def _hashes(*overrides: str) -> dict[str, str]:
    from vdistill.pipeline import Pipeline

    return Pipeline(load_config(None, ["tracking.enabled=false", *overrides]), Storage()).input_hashes()


def _changed(overrides: tuple[str, ...], change: str) -> set[str]:
    before, after = _hashes(*overrides), _hashes(*overrides, change)
    return {stage for stage in before if before[stage] != after[stage]}


def test_evaluate_settings_leave_dynamic_stages_that_do_not_evaluate_alone():
    assert _changed(("dynamic.eval_every=0",), "evaluate.epochs=7") == {"evaluate", "export"}


def test_evaluate_settings_change_dynamic_stages_that_evaluate_while_distilling():
    changed = _changed(("dynamic.eval_every=10", "baselines.s2d_overrides={dm: {eval_every: 0}}"), "evaluate.epochs=7")
    assert {"dynamic-mtt", "evaluate"} <= changed and "dynamic-dm" not in changed


def test_dynamic_learning_rates_leave_the_static_stage_the_experts_and_the_pixel_baselines_alone():
    # DM+S2D takes dynamic.lr_dynamic too: its baselines.s2d_overrides default sets only its iterations
    assert _changed((), "dynamic.lr_dynamic=5") == {"dynamic-mtt", "dynamic-dm", "evaluate", "export"}


def test_a_pixel_baseline_setting_changes_that_baseline_only():
    assert _changed((), "baselines.pixel_lr_dm=3") == {"pixels-dm", "evaluate", "export"}


def test_a_dm_only_run_trains_no_experts():
    dm_only = ("dynamic.method=dm", "baselines.s2d_methods=[]", "baselines.pixel_methods=[dm]")
    assert not any(name.startswith("experts") for name in _hashes(*dm_only))
    assert "experts-video" in _hashes()


def test_allowing_rows_outside_data_root_is_no_part_of_any_stage_identity():
    assert _changed((), "data.allow_outside_root=true") == set()


def test_the_slot_layout_changes_the_static_stage():
    assert "static" in _changed((), "dynamic.statics_per_slot=3")


def test_mtt_settings_change_a_static_mtt_stage_only():
    assert "static" not in _changed((), "dynamic.syn_steps=3")
    assert "static" in _changed(("static.method=mtt",), "dynamic.syn_steps=3")


def test_a_finished_shared_cache_is_not_reingested_with_other_decode_settings(failed_then_fixed, preset):
    from vdistill.pipeline import Pipeline, RunConflict

    storage = Storage()
    cache = load_config(preset, ["cache.max_quarantine_fraction=0.5"]).cache_uri
    cfg = load_config(preset, ["run.name=other", f"cache.uri={cache}", "cache.max_quarantine_fraction=0.5",
                               "decode.interpolation=area"])
    before = {uri: storage.read_bytes(uri) for uri in storage.list_files(cache)}
    with pytest.raises(RunConflict, match=rf"cache {cache} holds a finished ingest of other input "
                                          r"\(decode.interpolation: bilinear -> area\) and may serve other runs"):
        Pipeline(cfg, storage).run("ingest")
    assert {uri: storage.read_bytes(uri) for uri in storage.list_files(cache)} == before
    assert not storage.exists(cfg.run_uri + "/config.json")


def test_bad_annotation_rows_are_refused_before_the_run_writes_anything(tmp_path):
    from vdistill.pipeline import Pipeline
    from vdistill.data.manifests import AnnotationError

    storage = Storage()
    storage.write_text(str(tmp_path / "ann.csv"), "a.mp4,cat,train,abc\n")
    cfg = load_config(None, [f"run.root={tmp_path}/runs", f"data.annotations={tmp_path}/ann.csv",
                             f"data.root={tmp_path}", "tracking.enabled=false"])
    with pytest.raises(AnnotationError, match=r"ann.csv:1: column 4 \(start\)"):
        Pipeline(cfg, storage).run("ingest")
    assert storage.list_files(f"{tmp_path}/runs") == []
