"""The cluster path: `ray start --head` on loopback, then `ray job submit` of jobs/distill.py, as users run it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import free_port
from vdistill.config import load_config
from vdistill.data.synthetic import write_demo_dataset
from vdistill.storage import Storage, join

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
TINY = [
    "decode.frames=4", "decode.size=16", "model.width=8", "model.head=adaptive", "experts.num_experts=2",
    "experts.num_workers=1", "experts.batch_size=8", "static.iterations=2", "dynamic.method=dm",
    "dynamic.iterations=3", "dynamic.batch_real=4", "dynamic.max_start_epoch=1", "baselines.pixel_methods=[]",
    "baselines.coresets=[random]", "baselines.full=false", "evaluate.epochs=2", "evaluate.num_eval=1",
    "model.width_2d=8", "model.depth_2d=2", "validation.epochs=5",
]


def _stop_cluster(*marks: str) -> None:
    """Stop only this cluster's processes (`ray stop` would also stop the test session's Ray)."""
    roots = [p for p in psutil.process_iter(["cmdline"])
             if any(mark in " ".join(p.info["cmdline"] or []) for mark in marks)]
    victims = {p for root in roots for p in [root, *root.children(recursive=True)]}
    for proc in victims:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(victims), timeout=30)


@pytest.fixture
def head_node():
    """A throwaway head node on 127.0.0.1 with its own ports and temp dir; yields the dashboard address."""
    temp_dir = tempfile.mkdtemp(prefix="vdray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    dashboard, gcs = free_port(), free_port()
    # Every service port of its own: the test session's Ray already holds the defaults (52365, 10001, ...).
    ports = [f"--{flag}={free_port()}" for flag in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "ray-client-server-port", "node-manager-port", "object-manager-port")]
    subprocess.run([RAY, "start", "--head", f"--port={gcs}", f"--dashboard-port={dashboard}", *ports,
                    "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", "--num-cpus=4",
                    f"--temp-dir={temp_dir}", "--disable-usage-stats", "--include-dashboard=true",
                    "--object-store-memory=300000000"], env=env, check=True, capture_output=True, timeout=120)
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        _stop_cluster(temp_dir, f"127.0.0.1:{gcs}")
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_the_pipeline_to_an_artifact(head_node, tmp_path):
    address, env = head_node
    storage = Storage()
    data = str(tmp_path / "data")
    cfg = load_config(None, ["demo.classes=3", "demo.train_per_class=4", "demo.test_per_class=2", "demo.size=24"])
    csv_uri = write_demo_dataset(storage, data, cfg.demo)
    runtime_env = {"working_dir": str(REPO), "excludes": ["runs/", ".git/", "*.egg-info/", ".pytest_cache/"],
                   "env_vars": {"MLFLOW_DISABLE_TELEMETRY": "true", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}}
    command = [RAY, "job", "submit", "--address", address, "--runtime-env-json", json.dumps(runtime_env), "--",
               "python", "jobs/distill.py", "configs/demo.yaml", *TINY, f"run.root={tmp_path / 'runs'}",
               f"data.root={data}", f"data.annotations={csv_uri}"]
    for _ in range(30):  # the job agent comes up a few seconds after `ray start` returns
        submit = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        log = submit.stdout + submit.stderr
        if "No available agent" not in log:
            break
        time.sleep(2)
    assert submit.returncode == 0, log[-3000:]
    assert "succeeded" in log
    artifact = join(str(tmp_path / "runs"), "demo", "artifact")
    meta = storage.read_json(join(artifact, "meta.json"))
    assert meta["kind"] == "s2d" and len(meta["classes"]) == 3
    assert "DM+S2D" in meta["metrics"]
