"""MLflow as a sink: a parent run per pipeline run, a nested run per stage, params, metrics, previews.

Nothing reads configuration back from the tracker; with `tracking.enabled: false` every call is a
no-op. The tracking URI comes from `tracking.uri`, then MLFLOW_TRACKING_URI, then an embedded
`sqlite:///<run folder>/mlflow.db` with artifacts beside it. Runs are found again by tags, so a
resumed pipeline keeps logging into the same parent and stage runs.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from vdistill.config import Config
from vdistill.redact import CREDENTIAL_KEY, redact_text

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
RUN_KEY_TAG = "vdistill.run_key"
RUN_URI_TAG = "vdistill.run_uri"
ROLE_TAG = "vdistill.role"
NAME_TAG = "vdistill.name"
PARAMS_PER_BATCH = 100  # mlflow.utils.validation.MAX_PARAMS_TAGS_PER_BATCH
METRICS_PER_BATCH = 1000  # MAX_METRICS_PER_BATCH
MAX_PARAM_VALUE = 6000  # MAX_PARAM_VAL_LENGTH
MAX_KEY = 250  # MAX_ENTITY_KEY_LENGTH
_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def _client(uri: str):
    """An MlflowClient bound to `uri` (no global tracking URI or active run); telemetry off first, and MLflow's
    own "View run ... at: <uri>" lines off (they print the URI with its credentials; `ui_hint` prints it clean)."""
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


# ---- params -----------------------------------------------------------------------------------
def flatten_params(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> `{"section.key": "value"}` for MLflow: lists as JSON, credentials dropped,
    `user:password@` removed from URLs, keys and values cut to MLflow's limits."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if CREDENTIAL_KEY.search(str(key)):
            continue
        if isinstance(value, dict):
            out.update(flatten_params(value, f"{name}."))
            continue
        text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
        out[name[:MAX_KEY]] = redact_text(text)[:MAX_PARAM_VALUE]
    return out


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# ---- one run ----------------------------------------------------------------------------------
class RunLogger:
    """Logging calls bound to one MLflow run; with no client every call does nothing."""

    def __init__(self, client: Any = None, run_id: str | None = None) -> None:
        self.client, self.run_id = client, run_id

    @property
    def active(self) -> bool:
        return self.client is not None

    def log_params(self, params: dict[str, Any]) -> None:
        """Flattened params; on a resumed run, keys already logged keep their first value (MLflow
        params are immutable) and changed keys are listed in a tag instead."""
        if not self.active:
            return
        from mlflow.entities import Param, RunTag

        flat = flatten_params(params)
        existing = self.client.get_run(self.run_id).data.params
        changed = sorted(k for k, v in flat.items() if k in existing and existing[k] != v)
        if changed:
            log.warning("MLflow run %s: params changed since it was created, kept the first values: %s",
                        self.run_id, ", ".join(changed))
            self.client.log_batch(self.run_id, tags=[RunTag("vdistill.params_changed", ",".join(changed)[:8000])])
        new = [Param(k, v) for k, v in flat.items() if k not in existing]
        for batch in _chunks(new, PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=batch)

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.active:
            from mlflow.entities import RunTag

            for batch in _chunks([RunTag(k, str(v)) for k, v in tags.items()], PARAMS_PER_BATCH):
                self.client.log_batch(self.run_id, tags=batch)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [Metric(k, float(v), now, int(step or 0)) for k, v in metrics.items()]
        for batch in _chunks(entries, METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=batch)

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        if self.active:
            self.client.log_dict(self.run_id, data, name)

    def log_artifact(self, source: str | Path | bytes, name: str | None = None,
                     artifact_path: str | None = None) -> None:
        """A local file or folder, or `bytes` stored as `name`, under `artifact_path` in the run."""
        if not self.active:
            return
        if isinstance(source, bytes):
            if not name:
                raise ValueError("log_artifact(bytes) needs a file name")
            with tempfile.TemporaryDirectory(prefix="vdistill-mlflow-") as tmp:
                path = Path(tmp) / name
                path.write_bytes(source)
                self.client.log_artifact(self.run_id, str(path), artifact_path)
            return
        if Path(source).is_dir():
            self.client.log_artifacts(self.run_id, str(source), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(source), artifact_path)

    def log_image(self, image: Any, name: str) -> None:
        """uint8 `(H, W, 3)` (numpy or torch) as the PNG artifact `name` (e.g. "grids/static.png")."""
        if self.active:
            self.client.log_image(self.run_id, np.asarray(image, dtype=np.uint8), artifact_file=name)


def _find_or_create_run(client: Any, experiment_id: str, match: dict[str, str], run_name: str,
                        tags: dict[str, str]) -> str:
    """The run whose tags equal `match` (reopened if it had ended), else a new one with `match` + `tags`."""
    filter_string = " and ".join(f"tags.`{k}` = '{v}'" for k, v in match.items())
    found = client.search_runs([experiment_id], filter_string=filter_string, max_results=1,
                               order_by=["attributes.start_time ASC"])
    if found:
        run = found[0]
        if run.info.status != "RUNNING":
            client.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id
    return client.create_run(experiment_id, tags={**match, **tags}, run_name=run_name).info.run_id


def _check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"run name {name!r} must match {_NAME.pattern} (letters, digits, . _ -)")
    return name


@contextmanager
def _child_run(client: Any, experiment_id: str, parent_run_id: str, name: str, role: str) -> Iterator[RunLogger]:
    """Find-or-create the child `name` of `parent_run_id`; ends it FINISHED, or FAILED on an exception."""
    run_id = _find_or_create_run(client, experiment_id, {PARENT_TAG: parent_run_id, NAME_TAG: _check_name(name)},
                                 name, {ROLE_TAG: role})
    try:
        yield RunLogger(client, run_id)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")


# ---- the pipeline's tracker -------------------------------------------------------------------
def resolve_tracking(cfg: Config) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment or None to let the server decide)."""
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        return uri, None
    if "://" in cfg.run_uri and not cfg.run_uri.startswith("file://"):
        folder = Path("runs", cfg.run.name).resolve()
        log.warning("run root %s is not local and tracking.uri is empty: MLflow logs to the local store "
                    "sqlite:///%s/mlflow.db; set tracking.uri to a server to see runs from anywhere",
                    cfg.run_uri, folder)
    else:
        folder = Path(cfg.run_uri.removeprefix("file://")).expanduser().resolve()
    return f"sqlite:///{folder / 'mlflow.db'}", (folder / "mlflow-artifacts").as_uri()


class Tracker:
    """The pipeline's MLflow sink. `with Tracker(cfg) as tracker:` opens (or reopens, on resume) the
    parent run tagged with `cfg.run_uri` and logs the flattened public config as params;
    `with tracker.stage("dynamic"):` nests a stage run; logging calls go to the innermost open run.
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.enabled = cfg.tracking.enabled
        self.uri, self.artifact_location = resolve_tracking(cfg) if self.enabled else ("", None)
        self.client: Any = None
        self.experiment_id: str | None = None
        self._runs: list[RunLogger] = []

    # -- lifecycle
    def start(self) -> "Tracker":
        if not self.enabled or self._runs:
            return self
        if self.uri.startswith("sqlite:///"):
            Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.client = _client(self.uri)
        self.experiment_id = self._experiment_id()
        run_key = hashlib.sha256(self.cfg.run_uri.encode()).hexdigest()[:32]
        run_id = _find_or_create_run(self.client, self.experiment_id, {RUN_KEY_TAG: run_key, ROLE_TAG: "pipeline"},
                                     self.cfg.run.name, {RUN_URI_TAG: redact_text(self.cfg.run_uri)})
        run = RunLogger(self.client, run_id)
        self._runs.append(run)
        public = self.cfg.public_dict()
        run.log_params(public)
        run.log_dict(public, "config.json")
        return self

    def finish(self, status: str = "FINISHED") -> None:
        if self._runs:
            self.client.set_terminated(self._runs[0].run_id, status)
            self._runs.clear()

    def __enter__(self) -> "Tracker":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish("FAILED" if exc_type else "FINISHED")

    def _experiment_id(self) -> str:
        name = self.cfg.tracking.experiment
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        return self.client.create_experiment(name, artifact_location=self.artifact_location)

    # -- runs
    @property
    def run(self) -> RunLogger:
        """The innermost open run (a no-op logger when tracking is off or not started)."""
        return self._runs[-1] if self._runs else RunLogger()

    @property
    def parent_run_id(self) -> str | None:
        return self._runs[0].run_id if self._runs else None

    @contextmanager
    def stage(self, name: str) -> Iterator[RunLogger]:
        """Nested run for one stage, reused when a resumed pipeline enters the same stage again."""
        if not self._runs:
            yield RunLogger()
            return
        with _child_run(self.client, self.experiment_id, self.run.run_id, name, "stage") as run:
            self._runs.append(run)
            try:
                yield run
            finally:
                self._runs.pop()

    # -- logging (innermost run)
    def log_params(self, params: dict[str, Any]) -> None:
        self.run.log_params(params)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.run.set_tags(tags)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.run.log_metrics(metrics, step)

    def log_artifact(self, source: str | Path | bytes, name: str | None = None,
                     artifact_path: str | None = None) -> None:
        self.run.log_artifact(source, name, artifact_path)

    def log_image(self, image: Any, name: str) -> None:
        self.run.log_image(image, name)

    def ui_hint(self) -> str:
        """How to look at the runs: the `mlflow ui` command for a local store, the server URL otherwise."""
        if not self.enabled:
            return "tracking is off (tracking.enabled=false)"
        if self.uri.startswith("sqlite:"):
            return f"mlflow ui --backend-store-uri {self.uri} --host 127.0.0.1"
        return "open " + redact_text(self.uri) + " in a browser"
