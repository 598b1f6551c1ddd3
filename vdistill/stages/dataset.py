"""The `demo` command's first stage: generate a small dataset of real mp4 files and a generic_csv annotation."""
from __future__ import annotations

from typing import Any

from vdistill.config import Config
from vdistill.stage import RunContext, Stage
from vdistill.storage import join


def demo_data_uri(cfg: Config) -> str:
    return join(cfg.run_uri, "demo-data")


def point_at_demo_data(cfg: Config) -> Config:
    """The demo reads the dataset it generates: data.root/annotations default to the run's demo-data/."""
    if not cfg.data.root:
        cfg.data.root = demo_data_uri(cfg)
        cfg.data.annotations = join(demo_data_uri(cfg), "demo.csv")
    return cfg


def stage(cfg: Config) -> Stage:
    return Stage("dataset", "dataset", {"demo": cfg.demo}, (), _make)


def _make(ctx: RunContext) -> dict[str, Any]:
    """The procedural shapes or the real-footage set (`demo.kind`)."""
    if ctx.cfg.demo.kind == "footage":
        from vdistill.data.footage import write_footage_dataset as write
    else:
        from vdistill.data.synthetic import write_demo_dataset as write
    csv_uri = write(ctx.storage, demo_data_uri(ctx.cfg), ctx.cfg.demo)
    return {"annotations": csv_uri, "classes": ctx.cfg.demo.num_classes, "kind": ctx.cfg.demo.kind}
