"""Expert trajectories on Ray Train: video experts for MTT on videos, frame experts for a static MTT stage."""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from vdistill.config import Config
from vdistill.experts import TrajectoryReader, run_experts
from vdistill.stage import RunContext, Stage, fields
from vdistill.storage import Storage


def stages(cfg: Config, ingest: Stage, kinds: Sequence[str]) -> dict[str, Stage]:
    """One stage per expert kind the run reads (`experts-<kind>`), trained together in one Ray Train run.

    Each stage keeps its own identity and manifest, so a setting or a deleted folder redoes only its kind's
    stage. The first of them to run also trains the experts of the kinds whose stages have not run yet in
    this invocation: both read the same settings, so this is exactly the work those stages would do, done in
    one Ray Train start-up with workers kept busy across kinds; those stages then find their experts finished.
    """
    reads: dict[str, Any] = {"model": cfg.model, "train": cfg.train, "experts": cfg.experts,
                             **fields(cfg.data, "train_split", "test_split", prefix="data")}
    if not cfg.experts.epochs:  # epochs=0: as many as MTT reads
        reads.update(fields(cfg.dynamic, "max_start_epoch", "expert_epochs", prefix="dynamic"))
    return {kind: Stage(f"experts-{kind}", "experts", reads, (ingest,),
                        functools.partial(_train, kind=kind, kinds=kinds)) for kind in kinds}


def _train(ctx: RunContext, *, kind: str, kinds: Sequence[str]) -> dict[str, Any]:
    together = [k for k in kinds if k == kind or f"experts-{k}" not in ctx.outputs]
    uris = run_experts(ctx.cfg, ctx.storage, together)[kind]
    for k, uri in enumerate(uris):
        history = TrajectoryReader(ctx.storage, uri).meta.get("history", [])
        if history and "top1" in history[-1]:
            ctx.tracker.log_metrics({f"experts/{kind}/test_top1": history[-1]["top1"],
                                     f"experts/{kind}/train_acc": history[-1]["acc"]}, step=k)
    return {"trajectories": uris}


def snapshot_reader(storage: Storage, trajectories: list[str]) -> tuple[Callable[[int, int], torch.Tensor], list[int]]:
    """`snapshot(expert_id, epoch)` over an experts stage's trajectories (a small cache of recent snapshots),
    and the expert ids."""
    readers = [TrajectoryReader(storage, uri) for uri in trajectories]

    @functools.lru_cache(maxsize=32)
    def snapshot(expert_id: int, epoch: int) -> torch.Tensor:
        return readers[expert_id].snapshot(epoch)

    return snapshot, list(range(len(readers)))
