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
from vdistill.lease import Lease, Owner
from vdistill.storage import Storage, join

STAGE_ORDER = ("dataset", "ingest", "experts", "static", "distill", "evaluate", "export")
NAMESPACE = "vdistill"


def code_version() -> str:
    """Hash of the package's source: an actor built from other code never serves this run."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


# What the static stage reads from `dynamic`: the slot layout and the checkpoint period, plus, for
# static.method=mtt, the trajectory-matching settings (stages.MttSettings.from_config).
STATIC_READS_FROM_DYNAMIC = ("vpc", "statics_per_slot", "dynamics_per_slot", "checkpoint_every")
MTT_READS_FROM_DYNAMIC = ("syn_steps", "expert_epochs", "max_start_epoch", "batch_syn", "mtt_mode", "train_lr",
                          "lr_lr", "min_syn_lr")


@dataclass(frozen=True)
class Stage:
    name: str
    group: str  # one of STAGE_ORDER: how `until=` cuts the plan
    inputs: tuple[str, ...]  # the config it reads: sections, `section.field`s or `dynamic:<method>`
    upstream: tuple[str, ...]  # stages whose outputs it reads
    body: Callable[[], dict[str, Any]]


class Pipeline:
    """The stages of one run, in data-flow order; `run(until)` executes the missing ones."""

    def __init__(self, cfg: Config, storage: Storage, *, demo: bool = False, log: Callable[[str], None] = print,
                 owner: Owner | None = None):
        from vdistill.tracking import Tracker

        self.cfg = cfg
        self.storage = storage
        self.demo = demo
        self.log = log
        self.owner = owner or Owner()  # holds the run's lease (and the cache's while ingesting)
        self.tracker = Tracker(cfg)
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
        experts_reads = ("model", "train", "experts", "data.train_split", "data.test_split") + (
            () if cfg.experts.epochs else ("dynamic.max_start_epoch", "dynamic.expert_epochs"))  # epochs=0: MTT's
        plan.append(Stage("experts-video", "experts", experts_reads, ("ingest",), lambda: s.experts(self, "video")))
        static_up = ("ingest",)
        static_reads = ("model", "static") + tuple(f"dynamic.{f}" for f in STATIC_READS_FROM_DYNAMIC)
        if cfg.static.method == "mtt":
            plan.append(Stage("experts-frame", "experts", experts_reads, ("ingest",), lambda: s.experts(self, "frame")))
            static_up = ("ingest", "experts-frame")
            static_reads += tuple(f"dynamic.{f}" for f in MTT_READS_FROM_DYNAMIC)
        plan.append(Stage("static", "static", static_reads, static_up, lambda: s.static(self)))
        for method in cfg.s2d_methods:
            evaluates = ("train", "evaluate") if cfg.dynamic_for(method).eval_every else ()  # during distillation
            plan.append(Stage(f"dynamic-{method}", "distill", ("model", f"dynamic:{method}") + evaluates,
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

    def input_hashes(self) -> dict[str, str]:
        """Every planned stage's input hash, in plan order; known before anything runs."""
        hashes: dict[str, str] = {}
        for stage in self.plan():
            hashes[stage.name] = self._input_hash(stage, hashes)
        return hashes

    def _input_hash(self, stage: Stage, upstream: dict[str, str]) -> str:
        """What the stage reads: `section` (all of it), `section.field` (one value), `dynamic:<method>` (that
        method's settings), the upstream stages' hashes and the run seed."""
        payload = []
        for name in stage.inputs:
            if name.startswith("dynamic:"):
                payload.append(self.cfg.dynamic_for(name.split(":", 1)[1]).model_dump_json())
            elif "." in name:
                section, key = name.split(".", 1)
                payload.append(f"{name}={json.dumps(getattr(getattr(self.cfg, section), key))}")
            else:
                payload.append(getattr(self.cfg, name).model_dump_json())
        payload += [upstream.get(up, "") for up in stage.upstream]
        payload.append(str(self.cfg.run.seed))
        return hashlib.sha256("\n".join(payload).encode()).hexdigest()[:16]

    def run(self, until: str = "export") -> dict[str, Any]:
        """Hold the run's lease, check, then write config.json and run the missing stages up to `until`."""
        last = STAGE_ORDER.index(until)
        with Lease(self.storage, self.cfg.run_uri, "run", run_identity(self.cfg), self.owner):
            self.check()
            self.storage.write_json(join(self.cfg.run_uri, "config.json"), self.cfg.public_dict())
            hashes = self.input_hashes()
            with self.tracker:
                for stage in self.plan():
                    if STAGE_ORDER.index(stage.group) > last:
                        break
                    self._run_stage(stage, hashes[stage.name])
        return self.outputs

    # ---- the check pass -----------------------------------------------------------------------------
    def check(self) -> None:
        """Refuse, before anything is written (config.json, MLflow, the cache), what finished work cannot take.

        Reads only what exists: the annotation rows (every bad row named), the cache's manifest and the
        finished experts' manifest. Finished experts are never retrained in place, and a finished cache at
        an explicit `cache.uri` may serve other runs, so neither is redone with other settings; a stage
        that did not finish (no manifest) is free to run with new ones.
        """
        from vdistill.data.decode import DecodeSpec
        from vdistill.data.ingest import input_hash
        from vdistill.data.manifests import build_manifest

        cfg, storage = self.cfg, self.storage
        if self.demo and not storage.is_file(self.stage_uri("dataset", "manifest.json")):
            return  # the annotations do not exist yet: the dataset stage writes them
        rows = build_manifest(cfg.data, storage)
        cache = storage.read_json_or(join(cfg.cache_uri, "manifest.json"))
        cache_changes = bool(cache) and cache.get("input_hash") != input_hash(
            rows, DecodeSpec.from_config(cfg.decode, seed=cfg.run.seed))
        if cache_changes and cfg.cache.uri:
            changed = _changed_settings(storage, join(cfg.cache_uri, "config.json"), cfg, ("data", "decode"))
            raise RunConflict(f"cache {cfg.cache_uri} holds a finished ingest of other input ({changed}) and may "
                              "serve other runs; use another cache.uri, or delete that folder to re-ingest")
        for kind in ("video", "frame") if cfg.static.method == "mtt" else ("video",):
            self._check_experts(kind, cache_changes)

    def _check_experts(self, kind: str, cache_changes: bool) -> None:
        from vdistill.experts import plan_experts, trajectory_dir

        folder = trajectory_dir(self.cfg.run_uri, kind)
        finished = self.storage.read_json_or(join(folder, "manifest.json"))
        if not finished:
            return
        if not cache_changes:
            planned = {job.uri.rsplit("/", 1)[-1]: job.input_hash for job in plan_experts(self.cfg, self.storage, kind)}
            if all(finished["experts"].get(name, digest) == digest for name, digest in planned.items()):
                return
        changed = _changed_settings(self.storage, join(self.cfg.run_uri, "config.json"), self.cfg)
        raise RunConflict(f"run {self.cfg.run_uri}: the {kind} experts finished with other settings ({changed}); "
                          f"finished experts are never retrained in place: use another run.name, or delete "
                          f"{folder} to retrain them")

    def _run_stage(self, stage: Stage, input_hash: str) -> None:
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
        self.outputs[stage.name] = done["outputs"]


class RunConflict(UserError):
    """New settings that finished work cannot take; raised before anything is written."""


def _changed_settings(storage: Storage, config_uri: str, cfg: Config, sections: tuple[str, ...] = ()) -> str:
    """`a.b: old -> new, ...` between a config.json written earlier and `cfg` (public values only)."""
    from vdistill.tracking import flatten_params

    old = storage.read_json_or(config_uri)
    if old is None:
        return f"no {config_uri} to compare with"
    before, after = flatten_params(old), flatten_params(cfg.public_dict())
    keys = [k for k in sorted(set(before) | set(after)) if not sections or k.split(".", 1)[0] in sections]
    diff = [f"{k}: {before.get(k, '-')} -> {after.get(k, '-')}" for k in keys if before.get(k) != after.get(k)]
    return ", ".join(diff) or "the same settings, other code or data"


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
            import ray

            # Only one actor of this name lives in this cluster: a lease held in this scope is an earlier,
            # killed incarnation's, and is taken over.
            context = ray.get_runtime_context()
            owner = Owner(scope=f"{context.gcs_address}/{context.get_actor_name()}")
            with self.lock:
                pipeline = Pipeline(self.cfg, self.storage, demo=demo, log=self._log, owner=owner)
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
