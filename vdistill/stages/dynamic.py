"""Stage 2: learn the dynamic memory and the integrator around the static memory (DM or MTT, METHOD.md 5)."""
from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import torch

from vdistill.config import Config
from vdistill.data.clips import ClassSampler
from vdistill.device import resolve_device
from vdistill.distill.loop import Recipe
from vdistill.distill.synset import S2DSet, SlotLayout
from vdistill.evaluate import PendingEvaluation, launch_evaluation
from vdistill.export import export_s2d
from vdistill.stage import RunContext, Stage, validation_reads
from vdistill.stages.experts import snapshot_reader
from vdistill.stages.workers import Loop, prepare_loop
from vdistill.storage import Storage

SET_FOLDER = "set"


def stage(cfg: Config, method: str, ingest: Stage, static: Stage, video_experts: Stage | None) -> Stage:
    settings = cfg.dynamic_for(method)
    reads: dict[str, Any] = {"model": cfg.model, "dynamic": settings, "cache.sampler_mb": cfg.cache.sampler_mb,
                             **validation_reads(cfg)}
    if settings.eval_every:  # evaluations during distillation are part of the outputs
        reads.update(train=cfg.train, evaluate=cfg.evaluate)
    upstream = (ingest, static) + ((video_experts,) if method == "mtt" else ())
    return Stage(f"dynamic-{method}", "distill", reads, upstream,
                 lambda ctx: _distil(ctx, method, ingest, static, video_experts))


def eval_lr(cfg: Config, source: Any) -> float | None:
    """MTT's learned lr when `evaluate.use_learned_lr`, else None (evaluate.lr)."""
    learned = getattr(source, "syn_lr", None)
    return float(learned) if cfg.evaluate.use_learned_lr and learned is not None else None


def learned_lr(synset: Any, recipe: Recipe) -> float | None:
    """The synthetic lr travels with a set only when MTT learned it; DM never touches it."""
    return float(synset.syn_lr.detach()) if recipe.learns_lr else None


def build_loop(cfg: Config, storage: Storage, sampler: ClassSampler, device: torch.device, *, method: str,
               static_uri: str, trajectories: Sequence[str] = ()) -> Loop:
    """The stage's set around the static memory, its recipe, its loop generator and, for MTT, the video experts'
    `trajectories` (`workers.Build`)."""
    settings = cfg.dynamic_for(method)
    static_memory = storage.read_tensors(static_uri)["static_memory"]
    layout = SlotLayout.from_config(sampler.num_classes, settings, sampler.manifest["frames"])
    synset = S2DSet.create(layout, static_memory.to(device), sampler.manifest["frames"],
                           torch.Generator().manual_seed(cfg.run.seed), syn_lr=settings.lr_teacher,
                           train_static=settings.train_static, integrator_init=settings.integrator_init,
                           dynamic_init=settings.init, sample_real=sampler.sample)
    snapshot, expert_ids = snapshot_reader(storage, list(trajectories)) if trajectories else (None, [])
    return Loop(synset, Recipe.dynamic(settings, cfg.validation), torch.Generator().manual_seed(cfg.run.seed),
                layout.num_classes, snapshot=snapshot, expert_ids=expert_ids)


def _distil(ctx: RunContext, method: str, ingest: Stage, static: Stage, video_experts: Stage | None
            ) -> dict[str, Any]:
    cfg, settings = ctx.cfg, ctx.cfg.dynamic_for(method)
    cache, device = ctx.output(ingest)["cache"], resolve_device(cfg.run.device)
    static_uri = ctx.output(static)["static_memory"]
    pending: list[tuple[int, PendingEvaluation]] = []

    def on_eval(iteration: int, source: Any) -> None:  # evaluations run as Ray tasks, collected at the end
        test = ctx.split(cache, cfg.data.test_split)
        pending.append((iteration, launch_evaluation(source, test, cfg, lr=eval_lr(cfg, source))))

    build = partial(build_loop, method=method, static_uri=static_uri,
                    trajectories=ctx.output(video_experts)["trajectories"] if method == "mtt" else ())
    with ctx.real_clips(cache) as sampler:
        loop = build(cfg, ctx.storage, sampler, device)
        synset, recipe, layout = loop.synset, loop.recipe, loop.synset.layout
        run = prepare_loop(ctx, f"dynamic-{method}", loop, build, cache, sampler)
        record = loop.run(sampler, device, cfg.model, state=run.state, on_checkpoint=run.save,
                          on_metrics=run.on_metrics, on_eval=on_eval if settings.eval_every else None,
                          validate=loop.scorer(ctx.validator(cache)), log=ctx.log)
    best = _log_evaluations(ctx, f"dynamic-{method}", pending)
    t = synset.state_tensors()
    uri = ctx.uri(SET_FOLDER)
    meta = export_s2d(ctx.storage, uri, static_memory=t["static_memory"], dynamic_memory=t["dynamic_memory"],
                      integrator_state=synset.integrator.state_dict(), layout=layout,
                      classes=sampler.classes, syn_lr=learned_lr(synset, recipe), config_hash=ctx.input_hash,
                      metrics={"best_during_distillation": best, "validation": record.to_dict()})
    return {"set": uri, "syn_lr": meta["syn_lr"], "storage": meta["storage"], "best": best,
            "validation": ctx.report_validation(f"dynamic-{method}", record),
            **run.summary(), "seconds_per_iteration": ctx.iteration_seconds(),
            "loss": ctx.loss_trend()}


def _log_evaluations(ctx: RunContext, name: str, pending: list[tuple[int, PendingEvaluation]]) -> dict[str, Any]:
    best: dict[str, Any] = {}
    for iteration, job in pending:
        result = job.result()
        summary = result["models"][ctx.cfg.evaluate.models[0]]
        if summary["failed"]:
            ctx.log(f"[{name}] evaluation at iteration {iteration}: {summary['failed']} network(s) diverged")
            continue
        ctx.tracker.log_metrics({f"{name}/eval_top1": summary["top1_mean"],
                                 f"{name}/eval_top5": summary["top5_mean"]}, step=iteration)
        if summary["top1_mean"] > best.get("top1_mean", -1):
            best = {"iteration": iteration, "top1_mean": summary["top1_mean"], "top1_std": summary["top1_std"]}
    return best
