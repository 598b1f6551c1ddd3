"""Stage 1: distil still images per class from single real frames (the static memory, METHOD.md 4)."""
from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import torch

from vdistill.config import Config
from vdistill.data.clips import ClassSampler
from vdistill.data.pixels import to_uint8
from vdistill.device import resolve_device
from vdistill.distill.loop import Recipe, Validate
from vdistill.distill.synset import FrozenPixelSet, PixelSet, SlotLayout, init_static_memory
from vdistill.render import image_grid
from vdistill.stage import RunContext, Stage, fields, validation_reads
from vdistill.stages.experts import snapshot_reader
from vdistill.stages.workers import Loop, prepare_loop
from vdistill.storage import Storage

# What the static stage reads from `dynamic`: the slot layout (how many stills per class) and the checkpoint
# period, plus, for static.method=mtt, the trajectory-matching settings.
LAYOUT = ("vpc", "statics_per_slot", "dynamics_per_slot", "scale", "slots_per_video", "checkpoint_every")
MTT = ("syn_steps", "expert_epochs", "max_start_epoch", "batch_syn", "mtt_mode", "train_lr", "lr_lr", "min_syn_lr")


def stage(cfg: Config, ingest: Stage, frame_experts: Stage | None) -> Stage:
    reads = {"model": cfg.model, "static": cfg.static, "cache.sampler_mb": cfg.cache.sampler_mb,
             **fields(cfg.dynamic, *LAYOUT, prefix="dynamic"), **validation_reads(cfg)}
    if frame_experts is not None:
        reads.update(fields(cfg.dynamic, *MTT, prefix="dynamic"))
    upstream = (ingest, frame_experts) if frame_experts else (ingest,)
    return Stage("static", "static", reads, upstream,
                 lambda ctx: _distil(ctx, ingest, frame_experts))


def build_loop(cfg: Config, storage: Storage, sampler: ClassSampler, device: torch.device, *,
               trajectories: Sequence[str] = ()) -> Loop:
    """Real frames as the starting stills, the stage's recipe, its loop generator and, for static.method=mtt, the
    frame experts' `trajectories` (`workers.Build`)."""
    generator = torch.Generator().manual_seed(cfg.run.seed)
    layout = SlotLayout.from_config(sampler.num_classes, cfg.dynamic, sampler.manifest["frames"])
    images = init_static_memory(layout, sampler.manifest["size"], cfg.static.init, generator, sampler.sample, device)
    snapshot, expert_ids = snapshot_reader(storage, list(trajectories)) if trajectories else (None, [])
    return Loop(PixelSet(images, layout.num_classes), Recipe.static(cfg.static, cfg.dynamic, cfg.validation),
                generator, layout.num_classes, scorer=partial(_as_still_videos, frames=sampler.manifest["frames"]),
                snapshot=snapshot, expert_ids=expert_ids)


def _distil(ctx: RunContext, ingest: Stage, frame_experts: Stage | None) -> dict[str, Any]:
    cfg, cache = ctx.cfg, ctx.output(ingest)["cache"]
    build = partial(build_loop, trajectories=ctx.output(frame_experts)["trajectories"] if frame_experts else ())
    device = resolve_device(cfg.run.device)
    with ctx.real_clips(cache) as sampler:
        loop = build(cfg, ctx.storage, sampler, device)
        stills = loop.synset
        layout = SlotLayout.from_config(sampler.num_classes, cfg.dynamic, sampler.manifest["frames"])
        run = prepare_loop(ctx, "static", loop, build, cache, sampler)
        record = loop.run(sampler, device, cfg.model, state=run.state, on_checkpoint=run.save,
                          validate=loop.scorer(ctx.validator(cache)), on_metrics=run.on_metrics, log=ctx.log)
    images = stills.videos.detach()
    uri = ctx.uri("static_memory.safetensors")
    ctx.storage.write_tensors(uri, {"static_memory": images}, {
        "classes": ",".join(sampler.classes), "normalisation": "imagenet", "layout": str(layout.to_dict())})
    ctx.tracker.log_image(image_grid(to_uint8(images), nrow=layout.spc), "static_memory.png")  # a row per class
    return {"static_memory": uri, "shape": list(images.shape), "classes": sampler.classes,
            "normalisation": "imagenet", "class_order": "class-major", "spc": layout.spc,
            "validation": ctx.report_validation("static", record), **run.summary(),
            "seconds_per_iteration": ctx.iteration_seconds(),
            "loss": ctx.loss_trend()}


def _as_still_videos(validate: Validate | None, frames: int) -> Validate | None:
    """Score still images as videos that do not move (each image tiled over `frames`): what they give a video
    network on their own, before the dynamic stage adds motion."""
    if validate is None:
        return None

    def score(source: FrozenPixelSet) -> float:
        images, labels = source()
        return validate(FrozenPixelSet(images.unsqueeze(1).expand(-1, frames, -1, -1, -1).contiguous(), labels))

    return score
