"""The coordinator: one Ray actor owns one run and walks its stages in order, resumably.

Every stage reads only what earlier stages wrote under `<run_uri>/<stage>/` and writes its
`manifest.json` last, atomically. A stage whose manifest carries the same input hash is skipped,
and a running distillation stage restarts from its last checkpoint, so a crashed driver, a killed
coordinator or a re-submitted job continue where the run stopped. The actor is named after the run
and the code version, so a second submission of the same run attaches to it.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from vdistill.config import Config
from vdistill.errors import UserError
from vdistill.storage import Storage, join

STAGE_ORDER = ("dataset", "ingest", "experts", "static", "distill", "evaluate", "export")
NAMESPACE = "vdistill"


def code_version() -> str:
    """Hash of the package's source: an actor built from other code never serves this run."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


@dataclass(frozen=True)
class Stage:
    name: str
    group: str  # one of STAGE_ORDER: how `until=` cuts the plan
    inputs: tuple[str, ...]  # config sections whose values define the stage's result
    upstream: tuple[str, ...]  # stages whose outputs it reads
    body: Callable[[], dict[str, Any]]


class Pipeline:
    """The stages of one run, in data-flow order; `run(until)` executes the missing ones."""

    def __init__(self, cfg: Config, storage: Storage, *, demo: bool = False, log: Callable[[str], None] = print):
        from vdistill.tracking import Tracker

        self.cfg = cfg
        self.storage = storage
        self.demo = demo
        self.log = log
        self.tracker = Tracker(cfg)
        self.hashes: dict[str, str] = {}
        self.outputs: dict[str, dict[str, Any]] = {}
        self.current_hash = ""  # input hash of the running stage (names its checkpoint)
        self._splits: dict[str, Any] = {}

    def split(self, name: str):
        """A cache split in memory, loaded once per pipeline (evaluation and coresets share it)."""
        from vdistill.data.clips import load_split

        if name not in self._splits:
            self._splits[name] = load_split(self.storage, self.cfg.cache_uri, name)
        return self._splits[name]

    # ---- plan -----------------------------------------------------------------------------------
    def plan(self) -> list[Stage]:
        from vdistill import workflow as s

        cfg = self.cfg
        plan: list[Stage] = []
        if self.demo:
            plan.append(Stage("dataset", "dataset", ("demo",), (), lambda: s.make_demo_dataset(self)))
        ingest_up = ("dataset",) if self.demo else ()
        plan.append(Stage("ingest", "ingest", ("data", "decode"), ingest_up, lambda: s.ingest(self)))
        plan.append(Stage("experts-video", "experts", ("model", "train", "experts", "dynamic"), ("ingest",),
                          lambda: s.experts(self, "video")))
        static_up = ("ingest",)
        if cfg.static.method == "mtt":
            plan.append(Stage("experts-frame", "experts", ("model", "train", "experts", "static"), ("ingest",),
                              lambda: s.experts(self, "frame")))
            static_up = ("ingest", "experts-frame")
        plan.append(Stage("static", "static", ("model", "static", "dynamic"), static_up, lambda: s.static(self)))
        for method in cfg.s2d_methods:
            plan.append(Stage(f"dynamic-{method}", "distill", ("model", "train", "evaluate", f"dynamic:{method}"),
                              ("static", "experts-video"), lambda m=method: s.dynamic(self, m)))
        for method in cfg.baselines.pixel_methods:
            plan.append(Stage(f"pixels-{method}", "distill", ("model", "baselines", "dynamic"),
                              ("ingest", "experts-video"), lambda m=method: s.pixels(self, m)))
        distilled = tuple(f"dynamic-{m}" for m in cfg.s2d_methods) + tuple(
            f"pixels-{m}" for m in cfg.baselines.pixel_methods)
        plan.append(Stage("evaluate", "evaluate", ("model", "train", "evaluate", "baselines"),
                          ("ingest",) + distilled, lambda: s.evaluate(self)))
        plan.append(Stage("export", "export", (), ("evaluate", f"dynamic-{cfg.dynamic.method}"),
                          lambda: s.export(self)))
        return plan

    # ---- execution --------------------------------------------------------------------------------
    def stage_uri(self, name: str, *parts: str) -> str:
        return join(self.cfg.run_uri, name, *parts)

    def _input_hash(self, stage: Stage) -> str:
        payload = []
        for section in stage.inputs:
            if section.startswith("dynamic:"):
                payload.append(self.cfg.dynamic_for(section.split(":", 1)[1]).model_dump_json())
            else:
                payload.append(getattr(self.cfg, section).model_dump_json())
        payload += [self.hashes.get(up, "") for up in stage.upstream]
        payload.append(str(self.cfg.run.seed))
        return hashlib.sha256("\n".join(payload).encode()).hexdigest()[:16]

    def run(self, until: str = "export") -> dict[str, Any]:
        last = STAGE_ORDER.index(until)
        self.storage.write_json(join(self.cfg.run_uri, "config.json"), self.cfg.public_dict())
        with self.tracker:
            for stage in self.plan():
                if STAGE_ORDER.index(stage.group) > last:
                    break
                self._run_stage(stage)
        return self.outputs

    def _run_stage(self, stage: Stage) -> None:
        input_hash = self._input_hash(stage)
        manifest_uri = self.stage_uri(stage.name, "manifest.json")
        done = self.storage.read_json_or(manifest_uri)
        if done and done.get("input_hash") == input_hash:
            self.log(f"[{stage.name}] done earlier, skipped")
        else:
            self.log(f"[{stage.name}] running")
            start = time.time()
            self.current_hash = input_hash
            with self.tracker.stage(stage.name):
                outputs = stage.body()
                self.tracker.log_metrics({"stage_seconds": time.time() - start})
            done = {"stage": stage.name, "input_hash": input_hash, "code_version": code_version(),
                    "seconds": round(time.time() - start, 2), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "outputs": outputs}
            self.storage.write_json(manifest_uri, done)
            self.log(f"[{stage.name}] finished in {done['seconds']:.1f}s")
        self.hashes[stage.name] = input_hash
        self.outputs[stage.name] = done["outputs"]


# ---- the actor and the driver side ------------------------------------------------------------------
def _coordinator_class():
    import ray

    @ray.remote
    class Coordinator:
        """Owns one run. `run` calls are serialised: a second submission waits, then finds the work done."""

        def __init__(self, cfg_data: dict, storage: Storage) -> None:
            import torch

            self.cfg = Config.model_validate(cfg_data)
            self.storage = storage
            self.lock = threading.Lock()
            self.current = "idle"
            torch.set_num_threads(max(1, int(self.cfg.run.coordinator_cpus) or os.cpu_count() or 1))

        def run(self, until: str, demo: bool) -> dict[str, Any]:
            with self.lock:
                pipeline = Pipeline(self.cfg, self.storage, demo=demo, log=self._log)
                return pipeline.run(until)

        def _log(self, line: str) -> None:
            self.current = line
            print(line, flush=True)

        def status(self) -> str:
            return self.current

    return Coordinator


def run_identity(cfg: Config) -> str:
    """Hash of everything that defines a run: the whole resolved config (without credentials) and the code.

    Two submissions with the same identity are the same run (they share a coordinator and a run lease);
    any other setting or code means another coordinator, so a fixed re-submission never meets an old one.
    """
    payload = json.dumps({"config": cfg.public_dict(), "code": code_version()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def actor_name(cfg: Config) -> str:
    return f"vdistill:{cfg.run.name}:{run_identity(cfg)}"


def connect_ray(cfg: Config) -> None:
    """Join the cluster a job runs in (RAY_ADDRESS), or start a local Ray on loopback."""
    import ray

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):  # inside `ray job submit`: the job's runtime_env applies
        ray.init()
        return
    env = {"env_vars": {"MLFLOW_DISABLE_TELEMETRY": "true"}}
    # The coordinator waits while experts and evaluations run, so its CPUs are logical extras locally.
    cpus = (os.cpu_count() or 1) + int(cfg.run.coordinator_cpus + 0.999)
    ray.init(num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1", runtime_env=env)


def get_coordinator(cfg: Config, storage: Storage):
    return _coordinator_class().options(
        name=actor_name(cfg), namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        max_restarts=-1, max_concurrency=4,
        num_cpus=cfg.run.coordinator_cpus, num_gpus=cfg.run.coordinator_gpus,
    ).remote(cfg.model_dump(mode="json"), storage)


def run_pipeline(cfg: Config, *, until: str = "export", demo: bool = False, attempts: int = 3) -> dict[str, Any]:
    """Driver side: attach to (or start) the run's coordinator and wait; a restarted coordinator resumes."""
    import ray

    from vdistill.workflow import point_at_demo_data

    if demo:
        point_at_demo_data(cfg)
    storage = Storage.from_config(cfg.storage)
    coordinator = None
    try:
        for attempt in range(1, attempts + 1):
            coordinator = get_coordinator(cfg, storage)
            try:
                outputs = ray.get(coordinator.run.remote(until, demo))
                break
            except ray.exceptions.RayActorError as exc:
                if attempt == attempts:
                    raise
                print(f"coordinator lost ({exc.__class__.__name__}); resuming from the last checkpoint "
                      f"(attempt {attempt + 1}/{attempts})", flush=True)
            except ray.exceptions.RayTaskError as exc:
                if isinstance(exc.cause, UserError):  # the user's message, without the Ray traceback
                    raise exc.cause from None
                raise
    finally:  # a failed run's coordinator must not serve the next submission with its old state
        if coordinator is not None:
            ray.kill(coordinator, no_restart=True)
    from vdistill.tracking import Tracker
    from vdistill.workflow import closing_lines

    print(closing_lines(cfg, outputs, Tracker(cfg).ui_hint()), flush=True)
    return outputs


def evaluate_once(cfg: Config, *, synthetic: str | None, coreset: str | None, full: bool, vpc: int | None) -> str:
    from vdistill.workflow import evaluate_standalone

    return evaluate_standalone(cfg, Storage.from_config(cfg.storage), synthetic=synthetic, coreset=coreset,
                               full=full, vpc=vpc)
