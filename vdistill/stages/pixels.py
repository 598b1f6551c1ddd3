"""The DM / MTT baselines on raw pixels (METHOD.md 7): what S2D must beat at equal videos per class."""
from __future__ import annotations

from typing import Any

import torch

from vdistill.config import Config
from vdistill.device import resolve_device
from vdistill.distill.loop import Recipe, distill
from vdistill.distill.synset import PixelSet
from vdistill.export import export_pixels
from vdistill.stage import RunContext, Stage, fields, validation_reads
from vdistill.stages.dynamic import SET_FOLDER, learned_lr
from vdistill.stages.experts import snapshot_reader
from vdistill.stages.static import MTT

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


def _distil(ctx: RunContext, method: str, ingest: Stage, video_experts: Stage | None) -> dict[str, Any]:
    cfg, settings = ctx.cfg, ctx.cfg.dynamic_for(method)
    device, generator = resolve_device(cfg.run.device), torch.Generator().manual_seed(cfg.run.seed)
    snapshot, expert_ids = (snapshot_reader(ctx.storage, ctx.output(video_experts)["trajectories"])
                            if method == "mtt" else (None, []))
    recipe = Recipe.pixels(method, cfg.baselines, settings, cfg.validation)
    with ctx.real_clips(ctx.output(ingest)["cache"]) as sampler:
        pixels = PixelSet.from_real(sampler.sample, sampler.num_classes, settings.vpc, generator, device,
                                    syn_lr=cfg.dynamic_for("mtt").lr_teacher)
        state, save = ctx.checkpointing(sampler)
        record = distill(pixels, recipe, sampler.sample, torch.Generator().manual_seed(cfg.run.seed), device,
                         num_classes=sampler.num_classes, model_cfg=cfg.model, snapshot=snapshot,
                         expert_ids=expert_ids, state=state, on_checkpoint=save, log=ctx.log,
                         validate=ctx.validator(ctx.output(ingest)["cache"]),
                         on_metrics=ctx.progress(f"pixels-{method}", recipe.iterations,
                                                 state["iteration"] if state else 0))
    videos, labels = pixels.all_videos()
    uri = ctx.uri(SET_FOLDER)
    meta = export_pixels(ctx.storage, uri, videos=videos, labels=labels, classes=sampler.classes, method=method,
                         syn_lr=learned_lr(pixels, recipe), config_hash=ctx.input_hash)
    return {"set": uri, "syn_lr": meta["syn_lr"], "storage": meta["storage"],
            "validation": ctx.report_validation(f"pixels-{method}", record),
            "seconds_per_iteration": ctx.iteration_seconds(),
            "loss": ctx.loss_trend()}
