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

