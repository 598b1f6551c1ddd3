"""A distillation stage on a Ray Train worker group (`run.distill_workers` > 1).

Each worker rebuilds the stage's loop (`Loop`, from the stage's own `build` function) and runs the same `distill`
on its part (`objectives.Shard`): DM / DC a block of classes, MTT a block of rows of every student step's batch.
The workers sum their shares (gloo on CPU, NCCL on GPU): DM / DC once per iteration, MTT at every student step,
so every worker takes the same step and the set does not depend on the number of workers (METHOD.md 5.4, 5.5a).
Rank 0 trains the validation networks and broadcasts the score, writes the checkpoints (with the real-clip pools
of every rank's classes) and sends progress to the coordinator through a queue, without a barrier. The stage body
then finishes from the group's last checkpoint exactly as a resumed stage does, so a stage started on N workers
resumes on any number, and a worker group that fails restarts from its checkpoint (`FailureConfig`).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from vdistill.checkpoint import load_state, save_state
from vdistill.config import Config, ModelConfig
from vdistill.data.clips import ClassSampler
from vdistill.device import resolve_device
from vdistill.distill.loop import (OnMetrics, Recipe, SnapshotReader, SyntheticSet, Validate, ValidationRecord,
                                   distill)
from vdistill.distill.objectives import Shard, class_blocks
from vdistill.stage import RunContext, validator
from vdistill.storage import Storage, join


@dataclass
class Loop:
    """A stage's loop as `distill` takes it: the set, its recipe, the generator the loop draws from, how the
    stage's validation sees the set (the static stage scores stills as videos that do not move), and for MTT the
    expert trajectories."""

    synset: SyntheticSet
    recipe: Recipe
    generator: torch.Generator
    num_classes: int
    scorer: Callable[[Validate | None], Validate | None] = field(default=lambda validate: validate)
    snapshot: SnapshotReader | None = None
    expert_ids: Sequence[int] = ()

    def run(self, sampler: ClassSampler, device: torch.device, model_cfg: ModelConfig, **hooks: Any
            ) -> ValidationRecord:
        """`distill` on this loop's set, recipe, generator and trajectories, drawing real clips from `sampler`;
        `hooks` are `distill`'s state, callbacks, validation and shard."""
        return distill(self.synset, self.recipe, sampler.sample, self.generator, device, num_classes=self.num_classes,
                       model_cfg=model_cfg, snapshot=self.snapshot, expert_ids=self.expert_ids, **hooks)


# `build(cfg, storage, sampler, device) -> Loop`: a module-level function (it travels to the workers by name).
Build = Callable[[Config, Storage, ClassSampler, torch.device], Loop]


@dataclass(frozen=True)
class LoopJob:
    """What a worker needs to rebuild a stage's loop: the run's config, storage, the stage, its cache and
    checkpoint, and the stage's `build`."""

    cfg: dict[str, Any]
    storage: Storage
    stage: str
    cache_uri: str
    checkpoint_uri: str
    build: Build


@dataclass
class Prepared:
    """Where a stage's inline `distill` call starts: the state to resume from, the checkpoint saver and the
    progress callback, with the iteration the stage resumed from, the workers that ran it and the iterations its
    worker group started from (more than one: a worker failed and the group restarted from its checkpoint)."""

    state: dict[str, Any] | None
    save: Callable[[dict[str, Any]], None]
    on_metrics: OnMetrics
    resumed_from: int
    workers: int
    group_starts: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """What the stage's manifest records of how its loop ran."""
        return {"resumed_from": self.resumed_from, "workers": self.workers, "group_starts": self.group_starts}


def prepare_loop(ctx: RunContext, name: str, loop: Loop, build: Build, cache_uri: str,
                 sampler: ClassSampler) -> Prepared:
    """Checkpoint and progress for a stage's loop. With `run.distill_workers` > 1 and a per-class objective, the
    loop first runs to its end on a worker group, and the state handed back is the group's last checkpoint: the
    stage's own `distill` call then only restores the best iterate, as when a finished loop resumes."""
    state, save = ctx.checkpointing(sampler)
    resumed_from = state["iteration"] if state else 0
    on_metrics = ctx.progress(name, loop.recipe.iterations, resumed_from)
    workers = ctx.cfg.run.distill_workers
    if workers > 1 and resumed_from < loop.recipe.iterations:
        part = ("of every student step's batch" if loop.recipe.method == "mtt"
                else f"{len(class_blocks(loop.num_classes, workers)[0])} classes each")
        ctx.log(f"[{name}] {workers} workers, {part}")
        job = LoopJob(ctx.cfg.model_dump(mode="json"), ctx.storage, name, cache_uri, ctx.checkpoint_uri(), build)

        def started(iteration: int) -> None:
            starts.append(iteration)
            if len(starts) > 1:
                ctx.log(f"[{name}] a worker failed: the group restarted from its checkpoint at iteration {iteration}")

        starts: list[int] = []
        run_on_workers(ctx.cfg, job, on_metrics, started)
        state, save = ctx.checkpointing(sampler)
        return Prepared(state, save, on_metrics, resumed_from, workers, starts)
    return Prepared(state, save, on_metrics, resumed_from, 1)


def run_on_workers(cfg: Config, job: LoopJob, on_metrics: OnMetrics, on_start: Callable[[int], None]) -> None:
    """Run the stage's loop to its end on `run.distill_workers` Ray Train workers; the last checkpoint holds the
    result. Progress reaches `on_metrics` here, from rank 0, while the group runs, and `on_start(iteration)` each
    time the group (re)starts."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Empty, Queue

    r = cfg.run
    use_gpu = r.distill_gpus_per_worker > 0
    resources = {"CPU": r.distill_cpus_per_worker, **({"GPU": r.distill_gpus_per_worker} if use_gpu else {})}
    fs, path = job.storage.resolve(join(cfg.run_uri, job.stage, "_ray_train"))
    queue = Queue(actor_options={"num_cpus": 0})  # unbounded: rank 0 never waits on the coordinator
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"job": job, "queue": queue, "use_gpu": use_gpu,
                           "threads": max(1, int(r.distill_cpus_per_worker))},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=r.distill_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=f"{job.stage}-{int(time.time())}", storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=cfg.experts.max_failures),
                             worker_runtime_env={"env_vars": {"MLFLOW_DISABLE_TELEMETRY": "true"}}),
    )
    done = threading.Event()

    def drain() -> None:
        while not (done.is_set() and queue.empty()):
            try:
                kind, *message = queue.get(timeout=0.5)
            except Empty:
                continue
            (on_start if kind == "start" else on_metrics)(*message)

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    try:
        trainer.fit()
    finally:
        done.set()
        thread.join()
        queue.shutdown()


def _merged_pools(states: list[tuple[list[int], dict[str, dict[int, int]]]]) -> dict[str, dict[int, int]]:
    """Every rank's real-clip pool counters for its own classes, in one sampler state."""
    merged: dict[str, dict[int, int]] = {"rotation": {}, "drawn": {}}
    for classes, state in states:
        for key in merged:
            merged[key].update({c: n for c, n in state[key].items() if int(c) in classes})
    return merged


def _worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    job: LoopJob = config["job"]
    cfg = Config.model_validate(job.cfg)
    torch.set_num_threads(config["threads"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if config["use_gpu"] else resolve_device(cfg.run.device)
    with ClassSampler(job.storage, job.cache_uri, cfg.data.train_split, memory_mb=cfg.cache.sampler_mb,
                      seed=cfg.run.seed) as sampler:
        loop = job.build(cfg, job.storage, sampler, device)
        state = load_state(job.storage, job.checkpoint_uri)
        if state is not None:
            sampler.load_state(state.pop("sampler"))
        mine = list(class_blocks(loop.num_classes, world)[rank])
        sampler.retain(mine if loop.recipe.method != "mtt" else ())  # MTT reads real clips only to build its start
        scorer = loop.scorer(validator(cfg, job.storage, job.cache_uri))

        def shared_score(source: Any) -> float:  # rank 0 trains the networks, every rank gets the score
            value = torch.tensor([scorer(source) if rank == 0 else 0.0], dtype=torch.float64, device=device)
            dist.broadcast(value, 0)
            return float(value)

        def save(checkpoint: dict[str, Any]) -> None:
            pools: list[Any] = [None] * world
            dist.all_gather_object(pools, (mine, sampler.state()))
            if rank == 0:
                save_state(job.storage, job.checkpoint_uri, {**checkpoint, "sampler": _merged_pools(pools)})

        def progress(iteration: int, metrics: dict[str, float]) -> None:
            if rank == 0:
                config["queue"].put_nowait(("metrics", iteration, metrics))

        if rank == 0:
            config["queue"].put_nowait(("start", state["iteration"] if state else 0))

        loop.run(sampler, device, cfg.model, state=state, on_checkpoint=save, on_metrics=progress,
                 validate=shared_score if scorer is not None else None,
                 shard=Shard(rank, world, lambda flat: dist.all_reduce(flat)),
                 log=print if rank == 0 else lambda _: None)


__all__ = ["Build", "Loop", "LoopJob", "Prepared", "prepare_loop", "run_on_workers"]
