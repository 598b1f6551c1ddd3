"""The coordinator: one Ray actor owns one run and executes its `Pipeline`; the driver side attaches and waits.

The actor is named after the run, its whole resolved config and the code version, so a second submission of
the same run attaches to it (and waits, then finds the work done), while any other setting meets a fresh one.
A lost actor is restarted and resumes from the stage manifests and the last checkpoint.
"""
from __future__ import annotations

import os
import threading
from typing import Any

from vdistill.config import Config
from vdistill.errors import UserError
from vdistill.lease import Owner
from vdistill.pipeline import Pipeline, run_identity
from vdistill.stages.dataset import point_at_demo_data
from vdistill.stages.evaluate import evaluate_standalone
from vdistill.storage import Storage, join
from vdistill.tracking import Tracker

NAMESPACE = "vdistill"


# ---- the actor and the driver side ------------------------------------------------------------------
def _coordinator_class():
    import ray

    @ray.remote
    class Coordinator:
        """Owns one run. `run` calls are serialised: a second submission waits, then finds the work done."""

        def __init__(self, cfg_data: dict, storage: Storage, threads: int) -> None:
            import torch

            self.cfg = Config.model_validate(cfg_data)
            self.storage = storage
            self.lock = threading.Lock()
            self.current = "idle"
            torch.set_num_threads(threads)  # Ray pins a 1-CPU actor to one thread; distillation wants them all

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


def coordinator_threads(cfg: Config) -> int:
    """Torch threads of the coordinator: every core of this machine when the driver started a local Ray (the
    coordinator's CPUs are logical extras there, see `connect_ray`), else what `run.coordinator_cpus` holds."""
    if os.environ.get("RAY_ADDRESS"):
        return max(1, int(cfg.run.coordinator_cpus))
    return os.cpu_count() or 1


def get_coordinator(cfg: Config, storage: Storage):
    """The run's coordinator actor, started unless it lives. It and everything it starts (Ray Train's controller
    and its PlacementGroupCleaner, which looks its cluster up by RAY_ADDRESS and otherwise scans this host and
    fails when another local Ray runs here) inherit this cluster's address."""
    import ray

    address = {"env_vars": {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}}
    return _coordinator_class().options(
        name=actor_name(cfg), namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        max_restarts=-1, max_concurrency=4, runtime_env=address,
        num_cpus=cfg.run.coordinator_cpus, num_gpus=cfg.run.coordinator_gpus,
    ).remote(cfg.model_dump(mode="json"), storage, coordinator_threads(cfg))


def run_pipeline(cfg: Config, *, until: str = "export", demo: bool = False, attempts: int = 3) -> dict[str, Any]:
    """Driver side: attach to (or start) the run's coordinator and wait; a restarted coordinator resumes."""
    import ray

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
    print(closing_lines(cfg, outputs, Tracker(cfg).ui_hint()), flush=True)
    return outputs


def closing_lines(cfg: Config, outputs: dict[str, Any], tracking_hint: str) -> str:
    """What a finished command prints: the results table and where everything went."""
    lines = []
    if "evaluate" in outputs:
        lines += ["", outputs["evaluate"]["table"], ""]
    lines += [line for name, out in outputs.items() if (line := _no_gain_line(name, out.get("validation")))]
    if "export" in outputs:
        art = outputs["export"]["artifact"]
        lines.append(f"distilled artifact: {art}   (vdistill.load_distilled(uri) -> torch Dataset)")
        if "method" in outputs["export"]:
            lines.append(f"                    {outputs['export']['method'].upper()}+S2D, {outputs['export']['why']}")
        lines.append(f"previews:           {join(art, 'previews')}   (vdistill show {art})")
    lines.append(f"run folder:         {cfg.run_uri}")
    lines.append(f"MLflow:             {tracking_hint}")
    return "\n".join(lines)


# How the closing lines name a distillation stage, and the settings to try when it did not gain.
_LABELS = {"static": ("the static stage", "static.iterations or a smaller static.lr"),
           "dynamic": ("{M}+S2D", "more iterations (dynamic.iterations, baselines.s2d_overrides) or smaller steps "
                                  "(dynamic.lr_dynamic, dynamic.lr_integrator)"),
           "pixels": ("{M} on pixels", "baselines.pixel_iterations or a smaller baselines.pixel_lr_{m}")}


def _no_gain_line(stage: str, validation: dict[str, Any] | None) -> str:
    """One line for a distillation stage that kept its starting set because nothing beat it on validation."""
    if not validation or validation.get("initial") is None or validation["improved"]:
        return ""
    kind, _, method = stage.partition("-")
    label, hint = (text.format(M=method.upper(), m=method) for text in _LABELS[kind])
    last = validation["scores"][-1][1]
    return (f"{label} did not improve on its starting set (validation {100 * validation['initial']:.1f}% -> "
            f"{100 * last:.1f}% at its last iterate); it keeps its starting set; try {hint}")


def evaluate_once(cfg: Config, *, synthetic: str | None, coreset: str | None, full: bool, vpc: int | None) -> str:
    return evaluate_standalone(cfg, Storage.from_config(cfg.storage), synthetic=synthetic, coreset_method=coreset,
                               full=full, vpc=vpc)
