"""Decode the annotated videos into the Parquet clip cache (Ray Data + PyAV), once per cache."""
from __future__ import annotations

from typing import Any

from vdistill.config import Config
from vdistill.data.ingest import format_summary, run_ingest
from vdistill.stage import RunContext, Stage
from vdistill.storage import join


def stage(cfg: Config, dataset: Stage | None) -> Stage:
    # data.allow_outside_root only permits rows, it changes no clip: no part of the identity (nor of finished runs')
    data = cfg.data.model_dump(mode="json", exclude={"allow_outside_root"})
    return Stage("ingest", "ingest", {"data": data, "decode": cfg.decode}, (dataset,) if dataset else (), _ingest)


def _ingest(ctx: RunContext) -> dict[str, Any]:
    summary = run_ingest(ctx.cfg, ctx.storage, owner=ctx.owner)
    if not summary["skipped"]:  # the resolved config travels with what it produced
        ctx.storage.write_json(join(ctx.cfg.cache_uri, "config.json"), ctx.cfg.public_dict())
    ctx.log(format_summary(summary))
    ctx.tracker.log_metrics({"ingest/clips": summary["num_clips"], "ingest/quarantined": summary["quarantined"],
                             "ingest/clips_per_s": summary["throughput"]["clips_per_s"]})
    return {"cache": ctx.cfg.cache_uri, "input_hash": summary["input_hash"], "clips": summary["num_clips"],
            "quarantined": summary["quarantined"]}
