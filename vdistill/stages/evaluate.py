"""Train fresh networks on every distilled set and on the real-clip baselines; the results table."""
from __future__ import annotations

import math
import time
from typing import Any

import torch

from vdistill.config import Config
from vdistill.coreset import random_choice, select_coreset
from vdistill.data.clips import ClipSet, load_class, read_manifest
from vdistill.data.stream import SplitStream
from vdistill.device import resolve_device
from vdistill.distill.synset import fp32_mb, storage_mb
from vdistill.evaluate import TensorSource, evaluate_set, format_results_table, launch_evaluation
from vdistill.experts import TrajectoryReader, list_trajectories
from vdistill.export import load_distilled
from vdistill.models import build_model, load_flat_
from vdistill.stage import RunContext, Stage
from vdistill.stages.dynamic import eval_lr
from vdistill.storage import Storage, join

RESULTS = "results.json"


def stage(cfg: Config, ingest: Stage, distilled: list[tuple[str, Stage]], video_experts: Stage | None) -> Stage:
    """`distilled`: (table label, stage) of every distilled set; `video_experts` embeds coresets when
    `evaluate.coreset_embedder=expert`."""
    reads = {"model": cfg.model, "train": cfg.train, "evaluate": cfg.evaluate, "baselines": cfg.baselines}
    embedder = video_experts if cfg.evaluate.coreset_embedder == "expert" else None
    upstream = (ingest, *(s for _, s in distilled)) + ((embedder,) if embedder else ())
    return Stage("evaluate", "evaluate", reads, upstream, lambda ctx: _evaluate(ctx, ingest, distilled, embedder))


def coreset(cfg: Config, storage: Storage, cache_uri: str, method: str, k: int, trajectory: str | None) -> ClipSet:
    """`k` real clips per class of the training split chosen by `method`, one class in memory at a time, embedded
    by a random ConvNet3D or, given a `trajectory`, by that expert's last snapshot."""
    manifest = read_manifest(storage, cache_uri)
    classes = list(manifest["classes"])
    embedder = build_model("convnet3d", len(classes), manifest["frames"], manifest["size"], cfg.model,
                           seed=cfg.run.seed)
    if trajectory is not None:
        reader = TrajectoryReader(storage, trajectory)
        load_flat_(embedder, reader.snapshot(reader.num_snapshots - 1))
    generator = torch.Generator().manual_seed(cfg.run.seed)
    return select_coreset(method, lambda c: load_class(storage, cache_uri, cfg.data.train_split, c), classes, k,
                          embedder, resolve_device(cfg.run.device), generator)


def coreset_sources(cfg: Config, storage: Storage, cache_uri: str, method: str, k: int, trajectory: str | None
                    ) -> tuple[list[TensorSource], float, int]:
    """(training sets, storage MB, clips) of a coreset row. Random selection gets a fresh draw per evaluation
    network (draw i from seed `run.seed + i`), so its row is the expected accuracy of picking `k` clips at random
    (one draw's luck moves it by several points at one clip per class); each class is read once for all draws.
    A deterministic method gets one set."""
    if method != "random":
        subset = coreset(cfg, storage, cache_uri, method, k, trajectory)
        return ([TensorSource(subset.videos, subset.labels)], storage_mb(subset.videos, as_float32=True),
                len(subset.labels))
    classes = read_manifest(storage, cache_uri)["classes"]
    generators = [torch.Generator().manual_seed(cfg.run.seed + draw) for draw in range(cfg.evaluate.num_eval)]
    picks: list[list[torch.Tensor]] = [[] for _ in generators]
    for c in range(len(classes)):
        members = load_class(storage, cache_uri, cfg.data.train_split, c)
        for picked, generator in zip(picks, generators):
            picked.append(members[random_choice(len(members), k, generator)].clone())
    labels = torch.arange(len(classes)).repeat_interleave(k)
    sets = [torch.cat(picked) for picked in picks]
    return [TensorSource(videos, labels) for videos in sets], storage_mb(sets[0], as_float32=True), len(labels)


def _training_sets(ctx: RunContext, cache: str, distilled: list[tuple[str, Stage]], embedder: Stage | None
                   ) -> list[tuple[str, int, Any, float, int]]:
    """(method label, vpc, source, storage MB, clips) for every row of the results table."""
    cfg, vpc = ctx.cfg, ctx.cfg.dynamic.vpc
    trajectory = ctx.output(embedder)["trajectories"][0] if embedder else None
    rows = []
    for method in cfg.baselines.coresets:
        sources, mb, clips = coreset_sources(cfg, ctx.storage, cache, method, vpc, trajectory)
        rows.append((method, vpc, sources, mb, clips))
    for label, stage in distilled:
        dataset = load_distilled(ctx.output(stage)["set"], ctx.storage, seed=cfg.run.seed)
        rows.append((label, vpc, dataset, dataset.meta["storage"]["total_mb"], len(dataset)))
    if cfg.baselines.full:
        train = ctx.split(cache, cfg.data.train_split)
        rows.append(("full data", 0, train, split_mb(train), len(train)))
    return rows


def split_mb(split: SplitStream) -> float:
    """Storage of a whole split counted as fp32, like every real-clip row of the table."""
    return fp32_mb(len(split) * math.prod(split.clip_shape))


def _evaluate(ctx: RunContext, ingest: Stage, distilled: list[tuple[str, Stage]], embedder: Stage | None
              ) -> dict[str, Any]:
    cfg, cache = ctx.cfg, ctx.output(ingest)["cache"]
    test = ctx.split(cache, cfg.data.test_split)
    jobs = []
    for label, vpc, source, mb, clips in _training_sets(ctx, cache, distilled, embedder):
        epochs = cfg.baselines.full_epochs if label == "full data" else None
        jobs.append((label, vpc, launch_evaluation(source, test, cfg, lr=eval_lr(cfg, source), storage_mb=mb,
                                                   clips=clips, epochs=epochs)))
    validation = {label: ctx.output(stage).get("validation") for label, stage in distilled}
    rows = []
    for label, vpc, job in jobs:  # all sets train concurrently; collect in table order
        result = job.result()
        rows.append({"method": label, "vpc": vpc if vpc else "all", **result,
                     **({"validation": validation[label]} if validation.get(label) else {})})
        key = label.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "_")
        for model, s in result["models"].items():
            if not s["failed"]:
                ctx.tracker.log_metrics({f"eval/{key}/{model}/top1_mean": s["top1_mean"],
                                         f"eval/{key}/{model}/top1_std": s["top1_std"],
                                         f"eval/{key}/{model}/top5_mean": s["top5_mean"],
                                         f"eval/{key}/storage_mb": result["storage_mb"]})
    table = format_results_table(rows)
    ctx.storage.write_json(ctx.uri(RESULTS), rows)
    ctx.storage.write_text(ctx.uri("results.txt"), table + "\n")
    ctx.tracker.log_artifact(table.encode(), "results.txt")
    ctx.log(table)
    return {"results": ctx.uri(RESULTS), "table": table}


def evaluate_standalone(cfg: Config, storage: Storage, *, synthetic: str | None, coreset_method: str | None,
                        full: bool, vpc: int | None) -> str:
    """`vdistill evaluate`: one training set -> table; the JSON is written next to the input."""
    test = SplitStream(storage, cfg.cache_uri, cfg.data.test_split)
    k = vpc or cfg.dynamic.vpc
    if synthetic:
        dataset = load_distilled(synthetic, storage, seed=cfg.run.seed)
        label, source, mb, clips, out = (dataset.meta.get("kind", "synthetic"), dataset,
                                         dataset.meta["storage"]["total_mb"], len(dataset), join(synthetic, RESULTS))
    elif coreset_method:
        trajectory = (list_trajectories(storage, cfg.run_uri, "video")[0]
                      if cfg.evaluate.coreset_embedder == "expert" else None)
        source, mb, clips = coreset_sources(cfg, storage, cfg.cache_uri, coreset_method, k, trajectory)
        label = coreset_method
        out = join(cfg.cache_uri, "evaluations", f"{coreset_method}-vpc{k}-seed{cfg.run.seed}.json")
    else:
        train = SplitStream(storage, cfg.cache_uri, cfg.data.train_split)
        label, source, mb, clips = "full data", train, split_mb(train), len(train)
        out = join(cfg.cache_uri, "evaluations", f"full-seed{cfg.run.seed}.json")
    start = time.time()
    result = evaluate_set(source, test, cfg, storage_mb=mb, clips=clips, lr=eval_lr(cfg, source))
    row = {"method": label, "vpc": k if not full else "all", **result, "seconds": round(time.time() - start, 1)}
    storage.write_json(out, row)
    return format_results_table([row]) + f"\n\nwritten: {out}"
