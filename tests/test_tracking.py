"""MLflow as a sink: a real tracking server with S3 artifacts, the embedded sqlite default, disabled mode."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import free_port
from vdistill import render
from vdistill.config import load_config
from vdistill.tracking import Tracker, TrackingUnreachable, flatten_params, resolve_tracking


def _start_mlflow_server(folder, port: int, artifacts: str, env: dict | None = None) -> subprocess.Popen:
    """A real `mlflow server` on 127.0.0.1:`port` with its store in `folder`, once it answers /health."""
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
           **(env or {})}
    log = open(folder / "mlflow-server.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
         "--artifacts-destination", artifacts, "--serve-artifacts", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=folder)
    log.close()
    deadline = time.time() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(folder / 'mlflow-server.log').read_text()[-2000:]}")
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                return proc
        except OSError:
            if time.time() > deadline:
                _stop_mlflow_server(proc)
                raise
            time.sleep(0.5)


def _stop_mlflow_server(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Signal the server's whole process group (its workers too) and wait for it."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture
def mlflow_server(s3_server, tmp_path):
    """A real `mlflow server` on 127.0.0.1 whose artifacts go to a bucket on the S3 test server.

    Yields (tracking URI, bucket name); the server's process group is always terminated.
    """
    import boto3

    bucket = f"mlflow-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    port = free_port()
    proc = _start_mlflow_server(tmp_path, port, f"s3://{bucket}/mlflow", {
        "MLFLOW_S3_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1"})
    try:
        yield f"http://127.0.0.1:{port}", bucket
    finally:
        _stop_mlflow_server(proc)


def _cfg(tmp_path, *overrides: str):
    return load_config(None, [f"run.root={tmp_path}/runs", "run.name=exp1", *overrides])


def _children(client, experiment_id: str, parent_run_id: str) -> dict:
    runs = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    return {r.info.run_name: r for r in runs}


def test_tracker_logs_nested_stage_runs_metrics_and_previews_to_an_mlflow_server(mlflow_server, s3_server,
                                                                                  tmp_path):
    import boto3
    from mlflow.tracking import MlflowClient

    uri, bucket = mlflow_server
    cfg = _cfg(tmp_path, f"tracking.uri={uri}")
    frames = torch.randint(0, 256, (5, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with Tracker(cfg) as tracker:
        with tracker.stage("static"):
            for step in range(3):
                tracker.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
            tracker.log_image(np.full((20, 30, 3), 200, np.uint8), "grids/static_memory.png")
        with tracker.stage("dynamic"):
            tracker.log_metrics({"loss": 0.5}, step=0)
            pixels = render.upscale(frames, 128)
            for path, write in ((tmp_path / "class_000.gif", render.write_gif), (tmp_path / "class_000.mp4",
                                                                                render.write_mp4)):
                write(pixels, path, 4)
                tracker.log_artifact(path, artifact_path="previews")
        parent_id = tracker.parent_run_id

    client = MlflowClient(uri)
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.params["run.name"] == "exp1"
    stages = _children(client, parent.info.experiment_id, parent_id)
    assert set(stages) == {"static", "dynamic"}
    assert [(m.step, m.value) for m in client.get_metric_history(stages["static"].info.run_id, "loss")] == [
        (0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]
    dynamic_id = stages["dynamic"].info.run_id
    assert sorted(a.path for a in client.list_artifacts(dynamic_id, "previews")) == [
        "previews/class_000.gif", "previews/class_000.mp4"]
    with Image.open(client.download_artifacts(dynamic_id, "previews/class_000.gif", str(tmp_path))) as gif:
        assert gif.n_frames == 5 and gif.size == (128, 128)
    grid = client.download_artifacts(stages["static"].info.run_id, "grids/static_memory.png", str(tmp_path))
    assert np.asarray(Image.open(grid)).shape == (20, 30, 3)
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
            .list_objects_v2(Bucket=bucket)["Contents"]]
    assert any(k.endswith("previews/class_000.mp4") for k in keys)  # the server stored artifacts in S3


def test_embedded_default_is_a_sqlite_store_with_artifacts_in_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = _cfg(tmp_path)
    run_folder = tmp_path / "runs" / "exp1"
    with Tracker(cfg) as tracker:
        tracker.log_artifact(b'{"ok": true}', "notes.json")
        assert tracker.ui_hint() == f"mlflow ui --backend-store-uri sqlite:///{run_folder}/mlflow.db --host 127.0.0.1"
    assert (run_folder / "mlflow.db").is_file()
    assert list(run_folder.glob("mlflow-artifacts/*/artifacts/notes.json"))


def test_tracking_uri_falls_back_to_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert resolve_tracking(_cfg(tmp_path)) == ("http://127.0.0.1:1", None)
    assert resolve_tracking(_cfg(tmp_path, "tracking.uri=http://127.0.0.1:2"))[0] == "http://127.0.0.1:2"


def test_s3_run_root_without_a_tracking_uri_logs_to_a_local_store(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["run.root=s3://bucket/prefix", "run.name=exp1"])
    uri, artifacts = resolve_tracking(cfg)
    assert uri == f"sqlite:///{tmp_path}/runs/exp1/mlflow.db"
    assert artifacts == (tmp_path / "runs" / "exp1" / "mlflow-artifacts").as_uri()
    assert "not local" in caplog.text


def test_disabled_tracker_does_nothing(tmp_path):
    cfg = _cfg(tmp_path, "tracking.enabled=false")
    with Tracker(cfg) as tracker:
        with tracker.stage("static") as run:
            run.log_metrics({"loss": 1.0}, step=0)
            tracker.log_params({"a": 1})
            tracker.log_artifact(b"x", "x.txt")
            tracker.log_image(np.zeros((4, 4, 3), np.uint8), "x.png")
        assert tracker.parent_run_id is None
    assert not (tmp_path / "runs").exists()


def test_credentials_never_reach_mlflow_params(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = _cfg(tmp_path, "storage.access_key=AKIDSECRETVALUE", "storage.secret_key=TOPSECRETVALUE",
               "storage.endpoint_url=http://user:pa55word@127.0.0.1:9000")
    with Tracker(cfg) as tracker:
        parent_id = tracker.parent_run_id
    params = MlflowClient(tracker.uri).get_run(parent_id).data.params
    text = repr(params)
    assert "storage.endpoint_url" in params and "dynamic.vpc" in params
    assert not any(secret in text for secret in ("AKIDSECRETVALUE", "TOPSECRETVALUE", "pa55word"))


def test_params_are_flattened_and_cut_to_mlflow_limits():
    flat = flatten_params({"a": {"b": [1, 2], "c": {"d": "x" * 7000}}, "password": "p"})
    assert flat["a.b"] == "[1, 2]" and len(flat["a.c.d"]) == 6000 and "password" not in flat


def test_resumed_pipeline_reuses_its_parent_and_stage_runs(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = _cfg(tmp_path)
    ids = []
    for attempt in range(2):
        with Tracker(cfg) as tracker, tracker.stage("dynamic") as run:
            run.log_metrics({"loss": float(attempt)}, step=attempt)
            ids.append((tracker.parent_run_id, run.run_id))
    assert ids[0] == ids[1]
    client = MlflowClient(tracker.uri)
    assert [m.step for m in client.get_metric_history(ids[0][1], "loss")] == [0, 1]
    assert len(client.search_runs([client.get_run(ids[0][0]).info.experiment_id])) == 2


def test_a_failing_stage_marks_its_run_and_the_pipeline_run_failed(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = Tracker(_cfg(tmp_path))
    with pytest.raises(RuntimeError, match="boom"), tracker:
        parent_id = tracker.parent_run_id
        with tracker.stage("static") as run:
            raise RuntimeError("boom")
    client = MlflowClient(tracker.uri)
    assert client.get_run(run.run_id).info.status == "FAILED"
    assert client.get_run(parent_id).info.status == "FAILED"


def test_credentials_never_reach_the_mlflow_config_artifact(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = _cfg(tmp_path, "storage.secret_key=TOPSECRETVALUE", "storage.endpoint_url=http://KEY:pa55word@127.0.0.1:9")
    with Tracker(cfg) as tracker:
        parent_id = tracker.parent_run_id
    path = MlflowClient(tracker.uri).download_artifacts(parent_id, "config.json", str(tmp_path))
    text = open(path).read()
    assert "127.0.0.1:9" in text and "pa55word" not in text and "TOPSECRETVALUE" not in text


def test_the_console_never_shows_tracking_credentials(mlflow_server, tmp_path, capsys):
    uri, _ = mlflow_server
    cfg = _cfg(tmp_path, f"tracking.uri={uri.replace('http://', 'http://user:pa55word@')}")
    with Tracker(cfg) as tracker, tracker.stage("static"):
        pass
    hint = tracker.ui_hint()
    out = capsys.readouterr()
    assert "pa55word" not in out.out + out.err and "pa55word" not in hint and uri in hint


def test_a_tracking_server_that_goes_away_never_stalls_the_run_and_gets_the_metrics_later(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    port = free_port()
    server = _start_mlflow_server(tmp_path, port, str(tmp_path / "artifacts"))
    uri = f"http://127.0.0.1:{port}"
    cfg = _cfg(tmp_path, f"tracking.uri={uri}")
    buffer = tmp_path / "runs" / "exp1" / "tracking-buffer.jsonl"
    try:
        with Tracker(cfg) as tracker:
            with tracker.stage("dynamic"):
                tracker.log_metrics({"loss": 0.0}, step=0)
                _stop_mlflow_server(server, signal.SIGKILL)  # the server dies mid-stage
                start = time.monotonic()
                for step in range(1, 200):  # a distillation loop's per-iteration metrics
                    tracker.log_metrics({"loss": float(step)}, step=step)
            with tracker.stage("evaluate"):  # a stage entered while it is gone
                tracker.log_metrics({"top1": 0.5}, step=0)
            parent_id = tracker.parent_run_id
        assert time.monotonic() - start < 15  # one bounded call, then no call waits on the server
        notes = [line for line in capsys.readouterr().err.splitlines() if "MLflow" in line]
        assert notes == [f"vdistill: MLflow at {uri} unreachable (Connection refused); continuing, metrics buffered "
                         f"to {buffer} (replayed when it answers again, or by running the same command again)"]

        with pytest.raises(TrackingUnreachable, match=rf"^MLflow at {uri} \(tracking.uri\) unreachable "
                                                      r"\(Connection refused\); start it"):
            Tracker(cfg).start()  # a run started while it is still down stops before any work, in one line

        server = _start_mlflow_server(tmp_path, port, str(tmp_path / "artifacts"))
        with Tracker(cfg):  # the same command again: the buffer is replayed first
            pass
        assert not buffer.exists()
        client = MlflowClient(uri)
        stages = _children(client, client.get_run(parent_id).info.experiment_id, parent_id)
        dynamic, evaluate = stages["dynamic"].info.run_id, stages["evaluate"].info.run_id
        assert [(m.step, m.value) for m in client.get_metric_history(dynamic, "loss")] == [
            (step, float(step)) for step in range(200)]
        assert [m.value for m in client.get_metric_history(evaluate, "top1")] == [0.5]
        assert {stages[name].info.status for name in ("dynamic", "evaluate")} == {"FINISHED"}
    finally:
        _stop_mlflow_server(server)
