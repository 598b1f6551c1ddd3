"""Shared test infrastructure: one local Ray per session, an S3 server on 127.0.0.1, loopback only."""
from __future__ import annotations

import os
import socket
import uuid

import pytest

# Must be set before Ray or MLflow start: keep Ray on loopback, no telemetry threads.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
# One intra-op thread: tests use tiny nets, and on a shared 2-core machine OpenMP barriers between two
# threads made a 0.3 s training run take 40 s under load (1 thread: 3.7 s). Must be set before torch loads.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole session (workers pay ~5 s of torch import each)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": {"MLFLOW_DISABLE_TELEMETRY": "true", "TQDM_DISABLE": "1"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 HTTP endpoint (moto server mode) on 127.0.0.1; tests reach it only through the S3 API."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in creds}
    os.environ.update(creds)
    yield f"http://127.0.0.1:{port}"
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_storage(s3_server):
    """(Storage, bucket URI) for a fresh bucket on the test server."""
    import boto3

    from vdistill.storage import Storage

    bucket = f"test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    storage = Storage(endpoint_url=s3_server, region="us-east-1", access_key="testing", secret_key="testing")
    return storage, f"s3://{bucket}"
