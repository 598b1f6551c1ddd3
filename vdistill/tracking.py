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
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from vdistill.config import Config
from vdistill.errors import UserError
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


# Bounded MLflow client retries (MLflow's own default is 7 tries with backoff, ~4 min per call): a refused call
# gives up after ~3-5 s, a hung server after ~35 s; after that the tracker stops calling it (see `_Link`).
CLIENT_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
PROBE_EVERY_S = 30.0  # while the server is unreachable, how often a 2 s health probe asks whether it is back
BUFFER = "tracking-buffer.jsonl"
_TRANSPORT = re.compile(r"failed with (exception|error code 5\d\d)")
_ERRNO = re.compile(r"\[Errno -?\d+\] ([^\"'()]+)")


def _client(uri: str):
    """An MlflowClient bound to `uri` (no global tracking URI or active run); telemetry off first, MLflow's
    own "View run ... at: <uri>" lines off (they print the URI with its credentials; `ui_hint` prints it clean),
    and its retries bounded (CLIENT_RETRIES, unless the user set them)."""
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    for key, value in CLIENT_RETRIES.items():
        os.environ.setdefault(key, value)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _outage(exc: BaseException) -> str | None:
    """A short reason when `exc` says the tracking server cannot be reached or is failing, else None (a bad
    request is a bug, not an outage)."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        if not (_TRANSPORT.search(str(exc)) or exc.error_code == "TEMPORARILY_UNAVAILABLE"):
            return None
    elif not isinstance(exc, (requests.RequestException, OSError)):
        return None
    text = str(exc)
    errno = _ERRNO.search(text)
    return errno.group(1).strip() if errno else (text.splitlines() or [type(exc).__name__])[0][:160]


class TrackingUnreachable(UserError):
    """The tracking server did not answer when the run started: nothing was run yet."""


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


def _log_metrics(client: Any, run_id: str, entries: list) -> None:
    """`(key, value, timestamp ms, step)` entries to one run, in batches of MLflow's limit."""
    from mlflow.entities import Metric

    for batch in _chunks([Metric(*e) for e in entries], METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=batch)


# ---- the connection and its outage buffer ------------------------------------------------------
class _Link:
    """Every MLflow call of one tracker goes through `call`. When the server is unreachable it prints one line and
    goes offline: metrics and run ends are appended to a local buffer (JSON lines), other calls (params, tags,
    artifacts) are skipped, and no call waits on the server. Every PROBE_EVERY_S seconds (and when the tracker
    finishes) a 2 s health probe asks whether it is back; then the buffer is replayed, in order, and the tracker
    is online again. A buffer left by an earlier process is replayed when the next tracker of the run starts."""

    def __init__(self, client: Any, uri: str, experiment_id: str, buffer: Path) -> None:
        self.client, self.uri, self.experiment_id, self.buffer = client, uri, experiment_id, buffer
        self.online = True
        self._probed = 0.0

    def call(self, fn: Any, *args: Any) -> bool:
        """Run `fn(*args)` against the server; False (nothing raised) when it is, or just became, unreachable."""
        if not self.online and not self.probe():
            return False
        try:
            fn(*args)
            return True
        except Exception as exc:
            reason = _outage(exc)
            if reason is None:
                raise
            self._offline(reason)
            return False

    def keep(self, address: dict[str, str | None], entry: dict[str, Any]) -> None:
        """Append what could not be sent (metrics, a run's end) to the buffer, to be replayed in order."""
        self.buffer.parent.mkdir(parents=True, exist_ok=True)
        with open(self.buffer, "a") as f:
            f.write(json.dumps({**address, **entry}) + "\n")

    def _offline(self, reason: str) -> None:
        self.online, self._probed = False, time.monotonic()
        print(f"vdistill: MLflow at {redact_text(self.uri)} unreachable ({reason}); continuing, metrics buffered "
              f"to {self.buffer} (replayed when it answers again, or by running the same command again)",
              file=sys.stderr, flush=True)

    def probe(self, force: bool = False) -> bool:
        """Offline: is the server back (then replay the buffer)? At most every PROBE_EVERY_S unless `force`."""
        if not force and time.monotonic() - self._probed < PROBE_EVERY_S:
            return False
        self._probed = time.monotonic()
        url = urllib.parse.urlsplit(self.uri)
        if url.scheme in ("http", "https"):
            try:  # any HTTP answer (even 401) means the server is up
                host = f"{url.hostname}:{url.port}" if url.port else url.hostname  # no credentials
                urllib.request.urlopen(f"{url.scheme}://{host}{url.path.rstrip('/')}/health", timeout=2).close()
            except urllib.error.HTTPError:
                pass
            except OSError:
                return False
        sent = self.replay()
        if self.online:
            print(f"vdistill: MLflow at {redact_text(self.uri)} answers again; {sent} buffered entries replayed",
                  file=sys.stderr, flush=True)
        return self.online

    def replay(self) -> int:
        """Send the buffer's entries in order, dropping each once sent; -> how many were sent. Stops (offline) at the
        first that meets an outage again."""
        if not self.buffer.is_file():
            self.online = True
            return 0
        lines = [line for line in self.buffer.read_text().splitlines() if line.strip()]
        for i, line in enumerate(lines):
            entry = json.loads(line)
            try:
                self._apply(entry)
            except Exception as exc:
                reason = _outage(exc)
                if reason is None:
                    raise
                self.buffer.write_text("".join(f"{rest}\n" for rest in lines[i:]))
                if self.online:  # replaying at the start: the outage's one line
                    self._offline(reason)
                else:  # a probe that found it back too soon: still the same outage
                    self._probed = time.monotonic()
                return i
        self.buffer.unlink()
        self.online = True
        return len(lines)

    def _apply(self, entry: dict[str, Any]) -> None:
        run_id = entry["run"] or _stage_run(self.client, self.experiment_id, entry["parent"], entry["name"],
                                            entry["role"])
        _log_metrics(self.client, run_id, entry.get("metrics", []))
        if "status" in entry:
            self.client.set_terminated(run_id, entry["status"])


# ---- one run ----------------------------------------------------------------------------------
class RunLogger:
    """Logging calls bound to one MLflow run; with no link (tracking off) every call does nothing. A stage run
    entered while the server was unreachable has no id yet: it is found or created when the server answers."""

    def __init__(self, link: _Link | None = None, run_id: str | None = None, parent_id: str | None = None,
                 name: str = "", role: str = "") -> None:
        self.link, self.run_id = link, run_id
        self.parent_id, self.name, self.role = parent_id, name, role

    @property
    def active(self) -> bool:
        return self.link is not None

    def _id(self) -> str:
        if self.run_id is None:
            self.run_id = _stage_run(self.link.client, self.link.experiment_id, self.parent_id, self.name, self.role)
        return self.run_id

    @property
    def _address(self) -> dict[str, str | None]:
        """How the buffer names this run: its id, or its parent and name when it has none yet."""
        return {"run": self.run_id, "parent": self.parent_id, "name": self.name, "role": self.role}

    def open(self) -> None:
        """Find or create the run now (so it shows while it runs), when the server answers."""
        if self.active:
            self.link.call(self._id)

    def end(self, status: str) -> None:
        if self.active and not self.link.call(lambda: self.link.client.set_terminated(self._id(), status)):
            self.link.keep(self._address, {"status": status})

    def log_params(self, params: dict[str, Any]) -> None:
        """Flattened params; on a resumed run, keys already logged keep their first value (MLflow
        params are immutable) and changed keys are listed in a tag instead."""
        if self.active:
            self.link.call(self._log_params, params)

    def _log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param, RunTag

        client, run_id = self.link.client, self._id()
        flat = flatten_params(params)
        existing = client.get_run(run_id).data.params
        changed = sorted(k for k, v in flat.items() if k in existing and existing[k] != v)
        if changed:
            log.warning("MLflow run %s: params changed since it was created, kept the first values: %s",
                        run_id, ", ".join(changed))
            client.log_batch(run_id, tags=[RunTag("vdistill.params_changed", ",".join(changed)[:8000])])
        new = [Param(k, v) for k, v in flat.items() if k not in existing]
        for batch in _chunks(new, PARAMS_PER_BATCH):
            client.log_batch(run_id, params=batch)

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.active:
            self.link.call(self._set_tags, tags)

    def _set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        for batch in _chunks([RunTag(k, str(v)) for k, v in tags.items()], PARAMS_PER_BATCH):
            self.link.client.log_batch(self._id(), tags=batch)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Sent now, or buffered while the server is unreachable (replayed later with their own time and step)."""
        if not self.active:
            return
        now = int(time.time() * 1000)
        entries = [(k, float(v), now, int(step or 0)) for k, v in metrics.items()]
        if not self.link.call(lambda: _log_metrics(self.link.client, self._id(), entries)):
            self.link.keep(self._address, {"metrics": entries})

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        if self.active:
            self.link.call(lambda: self.link.client.log_dict(self._id(), data, name))

    def log_artifact(self, source: str | Path | bytes, name: str | None = None,
                     artifact_path: str | None = None) -> None:
        """A local file or folder, or `bytes` stored as `name`, under `artifact_path` in the run."""
        if not self.active:
            return
        if isinstance(source, bytes) and not name:
            raise ValueError("log_artifact(bytes) needs a file name")
        self.link.call(self._log_artifact, source, name, artifact_path)

    def _log_artifact(self, source: str | Path | bytes, name: str | None, artifact_path: str | None) -> None:
        client = self.link.client
        if isinstance(source, bytes):
            with tempfile.TemporaryDirectory(prefix="vdistill-mlflow-") as tmp:
                path = Path(tmp) / str(name)
                path.write_bytes(source)
                client.log_artifact(self._id(), str(path), artifact_path)
        elif Path(source).is_dir():
            client.log_artifacts(self._id(), str(source), artifact_path)
        else:
            client.log_artifact(self._id(), str(source), artifact_path)

    def log_image(self, image: Any, name: str) -> None:
        """uint8 `(H, W, 3)` (numpy or torch) as the PNG artifact `name` (e.g. "grids/static.png")."""
        if self.active:
            pixels = np.asarray(image, dtype=np.uint8)
            self.link.call(lambda: self.link.client.log_image(self._id(), pixels, artifact_file=name))


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


def _stage_run(client: Any, experiment_id: str, parent_run_id: str, name: str, role: str) -> str:
    """The child `name` of `parent_run_id`, found (reopened) or created."""
    return _find_or_create_run(client, experiment_id, {PARENT_TAG: parent_run_id, NAME_TAG: name}, name,
                               {ROLE_TAG: role})


def _check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"run name {name!r} must match {_NAME.pattern} (letters, digits, . _ -)")
    return name


@contextmanager
def _child_run(parent: RunLogger, name: str, role: str) -> Iterator[RunLogger]:
    """Find-or-create the child `name` of `parent`; ends it FINISHED, or FAILED on an exception."""
    run = RunLogger(parent.link, None, parent.run_id, _check_name(name), role)
    run.open()
    try:
        yield run
    except BaseException:
        run.end("FAILED")
        raise
    run.end("FINISHED")


# ---- the pipeline's tracker -------------------------------------------------------------------
def local_run_folder(cfg: Config) -> Path:
    """The run folder when the run root is local, else `runs/<name>` here: where the embedded MLflow store and
    the tracking buffer live (both are local files)."""
    if "://" in cfg.run_uri and not cfg.run_uri.startswith("file://"):
        return Path("runs", cfg.run.name).resolve()
    return Path(cfg.run_uri.removeprefix("file://")).expanduser().resolve()


def resolve_tracking(cfg: Config) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment or None to let the server decide)."""
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        return uri, None
    folder = local_run_folder(cfg)
    if "://" in cfg.run_uri and not cfg.run_uri.startswith("file://"):
        log.warning("run root %s is not local and tracking.uri is empty: MLflow logs to the local store "
                    "sqlite:///%s/mlflow.db; set tracking.uri to a server to see runs from anywhere",
                    cfg.run_uri, folder)
    return f"sqlite:///{folder / 'mlflow.db'}", (folder / "mlflow-artifacts").as_uri()


class Tracker:
    """The pipeline's MLflow sink. `with Tracker(cfg) as tracker:` opens (or reopens, on resume) the
    parent run tagged with `cfg.run_uri` and logs the flattened public config as params;
    `with tracker.stage("dynamic"):` nests a stage run; logging calls go to the innermost open run.

    Tracking is never on the work's critical path: a server unreachable at the start stops the run in one line
    (TrackingUnreachable, before any work); one that goes away later costs one bounded call, then the run goes
    on with metrics buffered to `<run folder>/tracking-buffer.jsonl` and replayed when it is back (`_Link`).
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.enabled = cfg.tracking.enabled
        self.uri, self.artifact_location = resolve_tracking(cfg) if self.enabled else ("", None)
        self.client: Any = None
        self.experiment_id: str | None = None
        self._link: _Link | None = None
        self._runs: list[RunLogger] = []

    # -- lifecycle
    def start(self) -> "Tracker":
        if not self.enabled or self._runs:
            return self
        if self.uri.startswith("sqlite:///"):
            Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.client = _client(self.uri)
        run_key = hashlib.sha256(self.cfg.run_uri.encode()).hexdigest()[:32]
        try:
            self.experiment_id = self._experiment_id()
            run_id = _find_or_create_run(self.client, self.experiment_id,
                                         {RUN_KEY_TAG: run_key, ROLE_TAG: "pipeline"}, self.cfg.run.name,
                                         {RUN_URI_TAG: redact_text(self.cfg.run_uri)})
            self._link = _Link(self.client, self.uri, self.experiment_id, local_run_folder(self.cfg) / BUFFER)
            self._link.replay()  # what an earlier process buffered during an outage
        except Exception as exc:
            reason = _outage(exc)
            if reason is None:
                raise
            raise TrackingUnreachable(
                f"MLflow at {redact_text(self.uri)} (tracking.uri) unreachable ({reason}); start it, point "
                "tracking.uri at a running server, or set tracking.enabled=false to run without tracking") from None
        run = RunLogger(self._link, run_id)
        self._runs.append(run)
        public = self.cfg.public_dict()
        run.log_params(public)
        run.log_dict(public, "config.json")
        return self

    def finish(self, status: str = "FINISHED") -> None:
        """End the pipeline run; while the server is unreachable, probe it once more so the buffer goes out now
        if it is back."""
        if self._runs:
            self._runs[0].end(status)
            self._runs.clear()
            if not self._link.online:
                self._link.probe(force=True)

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
        with _child_run(self.run, name, "stage") as run:
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
