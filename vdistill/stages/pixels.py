"""The DM / MTT baselines on raw pixels (METHOD.md 7): what S2D must beat at equal videos per class."""
from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import torch

from vdistill.config import Config
from vdistill.data.clips import ClassSampler
from vdistill.device import resolve_device
from vdistill.distill.loop import Recipe
from vdistill.distill.synset import PixelSet
from vdistill.export import export_pixels
from vdistill.stage import RunContext, Stage, fields, validation_reads
from vdistill.stages.dynamic import SET_FOLDER, learned_lr
from vdistill.stages.experts import snapshot_reader
from vdistill.stages.static import MTT
from vdistill.stages.workers import Loop, prepare_loop
from vdistill.storage import Storage

# What the pixel loop reads from the method's dynamic settings besides the MTT knobs.
DYNAMIC = ("vpc", "batch_real", "checkpoint_every", "eval_every")


def stage(cfg: Config, method: str, ingest: Stage, video_experts: Stage | None) -> Stage:
    settings = cfg.dynamic_for(method)
    reads: dict[str, Any] = {"model": cfg.model, "cache.sampler_mb": cfg.cache.sampler_mb,
                             **fields(cfg.dynamic_for("mtt"), "lr_teacher", prefix="dynamic"),
                             **fields(cfg.baselines, "pixel_iterations", f"pixel_lr_{method}", prefix="baselines"),
                             **fields(cfg.baselines, "pixel_optimizer", prefix="baselines"),
                             **fields(settings, *DYNAMIC, *(MTT if method == "mtt" else ()), prefix="dynamic"),
                             **validation_reads(cfg)}
    upstream = (ingest, video_experts) if method == "mtt" else (ingest,)
    return Stage(f"pixels-{method}", "distill", reads, upstream,
                 lambda ctx: _distil(ctx, method, ingest, video_experts))


def build_loop(cfg: Config, storage: Storage, sampler: ClassSampler, device: torch.device, *, method: str,
               trajectories: Sequence[str] = ()) -> Loop:
    """Random real clips as the starting videos, the baseline's recipe, its loop generator and, for MTT, the video
    experts' `trajectories` (`workers.Build`)."""
    settings = cfg.dynamic_for(method)
    pixels = PixelSet.from_real(sampler.sample, sampler.num_classes, settings.vpc,
                                torch.Generator().manual_seed(cfg.run.seed), device,
                                syn_lr=cfg.dynamic_for("mtt").lr_teacher)
    snapshot, expert_ids = snapshot_reader(storage, list(trajectories)) if trajectories else (None, [])
    return Loop(pixels, Recipe.pixels(method, cfg.baselines, settings, cfg.validation),
                torch.Generator().manual_seed(cfg.run.seed), sampler.num_classes, snapshot=snapshot,
                expert_ids=expert_ids)


def _distil(ctx: RunContext, method: str, ingest: Stage, video_experts: Stage | None) -> dict[str, Any]:
    cfg, cache, device = ctx.cfg, ctx.output(ingest)["cache"], resolve_device(ctx.cfg.run.device)
    build = partial(build_loop, method=method,
                    trajectories=ctx.output(video_experts)["trajectories"] if method == "mtt" else ())
    with ctx.real_clips(cache) as sampler:
        loop = build(cfg, ctx.storage, sampler, device)
        pixels, recipe = loop.synset, loop.recipe
        run = prepare_loop(ctx, f"pixels-{method}", loop, build, cache, sampler)
        record = loop.run(sampler, device, cfg.model, state=run.state, on_checkpoint=run.save, log=ctx.log,
                          validate=loop.scorer(ctx.validator(cache)), on_metrics=run.on_metrics)
    videos, labels = pixels.all_videos()
    uri = ctx.uri(SET_FOLDER)
    meta = export_pixels(ctx.storage, uri, videos=videos, labels=labels, classes=sampler.classes, method=method,
                         syn_lr=learned_lr(pixels, recipe), config_hash=ctx.input_hash)
    return {"set": uri, "syn_lr": meta["syn_lr"], "storage": meta["storage"],
            "validation": ctx.report_validation(f"pixels-{method}", record), **run.summary(),
            "seconds_per_iteration": ctx.iteration_seconds(),
            "loss": ctx.loss_trend()}
