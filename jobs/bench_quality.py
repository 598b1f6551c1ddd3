"""Distillation quality on real camera footage: every method and the S2D ablations in one table.

Builds the real-footage development set (`vdistill.data.footage`: camera shots played forwards,
reversed and at double speed, so a single frame gives only a quarter of the label) or the procedural
demo set, runs the real pipeline up to the distillation stages, then trains `--num-eval` fresh
networks on every training set and prints top-1 mean ± std with each set's storage. Variants re-run
the pipeline with other settings in the same run folder: only the stages whose inputs changed run
again, so the ingest and the experts are shared.

    python jobs/bench_quality.py                       # the demo's footage set (playback motions, 12 classes)
    python jobs/bench_quality.py --motion camera       # another real-footage set (vdistill.data.footage)
    python jobs/bench_quality.py --kind procedural
    python jobs/bench_quality.py --rows base,ablations --set evaluate.epochs=300
"""
from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TQDM_DISABLE", "1")

from vdistill.config import Config, load_config  # noqa: E402
from vdistill.coordinator import connect_ray, run_pipeline  # noqa: E402
from vdistill.data.clips import load_split  # noqa: E402
from vdistill.distill.synset import storage_mb  # noqa: E402
from vdistill.evaluate import TensorSource, evaluate_set  # noqa: E402
from vdistill.export import S2DDataset, load_distilled  # noqa: E402
from vdistill.stages.evaluate import coreset_sources  # noqa: E402
from vdistill.storage import Storage  # noqa: E402

Transform = Callable[[S2DDataset], S2DDataset]


@dataclass(frozen=True)
class Row:
    label: str
    overrides: tuple[str, ...]  # on top of the bench's base config
    stage: str  # "coreset:<method>", a distillation stage name, or "full"
    transform: Transform | None = None


def zero_dynamics(ds: S2DDataset) -> S2DDataset:
    """Ablation: the dynamic memory carries nothing; what is left is the still images through the integrator."""
    return S2DDataset(ds.static_memory, torch.zeros_like(ds.dynamic_memory), ds.integrator.state_dict(), ds.layout,
                      ds.meta)


def shuffle_dynamics(ds: S2DDataset) -> S2DDataset:
    """Ablation: each class gets another class's dynamic memory (a derangement); costs accuracy iff it carries motion."""
    c = ds.dynamic_memory.shape[0]
    order = torch.roll(torch.arange(c), 1)
    return S2DDataset(ds.static_memory, ds.dynamic_memory[order], ds.integrator.state_dict(), ds.layout, ds.meta)


BASE_ROWS = [
    Row("random real clips", (), "coreset:random"),
    Row("herding", (), "coreset:herding"),
    Row("DM on pixels", (), "pixels-dm"),
    Row("MTT on pixels", (), "pixels-mtt"),
    Row("DM+S2D", (), "dynamic-dm"),
    Row("MTT+S2D", (), "dynamic-mtt"),
]
def dm(**settings: Any) -> str:
    """An override of the DM+S2D run only (`baselines.s2d_overrides.dm`), on top of its defaults."""
    values = {**Config().baselines.s2d_overrides["dm"], **settings}
    return "baselines.s2d_overrides={dm: {" + ", ".join(f"{k}: {v}" for k, v in values.items()) + "}}"


ABLATION_ROWS = [
    Row("DM+S2D, dynamic memory zeroed", (), "dynamic-dm", zero_dynamics),
    Row("DM+S2D, dynamics shuffled across classes", (), "dynamic-dm", shuffle_dynamics),
    Row("MTT+S2D, dynamics shuffled across classes", (), "dynamic-mtt", shuffle_dynamics),
    Row("DM+S2D, iteration 0 (real clips on real frames, nothing distilled)",
        ("static.iterations=0", dm(iterations=0)), "dynamic-dm"),
    Row("DM+S2D, statics = real frames (static.iterations=0)", ("static.iterations=0",), "dynamic-dm"),
    Row("DM+S2D, paper init (randn dynamics, default integrator)", (dm(init="randn", integrator_init="default"),),
        "dynamic-dm"),
    Row("DM+S2D, randn dynamics, identity integrator", (dm(init="randn", integrator_init="identity"),), "dynamic-dm"),
    Row("DM+S2D, 100 iterations", (dm(iterations=100),), "dynamic-dm"),
    Row("DM+S2D, 1,000 iterations", (dm(iterations=1000),), "dynamic-dm"),
]
STEP_ROWS = [  # what the step size of the memories does (METHOD.md 5.1a)
    Row("DM+S2D, iteration 0 (real clips on real frames, nothing distilled)",
        ("static.iterations=0", dm(iterations=0)), "dynamic-dm"),
    Row("DM+S2D, lr_dynamic 0.001", (dm(lr_dynamic=0.001),), "dynamic-dm"),
    Row("MTT+S2D, lr_dynamic 0.001", ("dynamic.lr_dynamic=0.001",), "dynamic-mtt"),
]
PAPER_LAYOUT = ("dynamic.statics_per_slot=2", "dynamic.dynamics_per_slot=2", "dynamic.scale=1",
                "dynamic.slots_per_video=1", "dynamic.init=real")
LAYOUT_ROWS = [  # what the layout of METHOD.md 5.2a adds over the paper's, both started from real clips
    Row("DM+S2D, iteration 0 (8 half-size real clips on real frames, nothing distilled)",
        ("static.iterations=0", dm(iterations=0)), "dynamic-dm"),
    Row("DM+S2D, paper layout (2 stills x 2 full-size real motions)", PAPER_LAYOUT, "dynamic-dm"),
    Row("MTT+S2D, paper layout (2 stills x 2 full-size real motions)", PAPER_LAYOUT, "dynamic-mtt"),
]
FULL_ROW = Row("full training set", (), "full")
GROUPS = {"base": BASE_ROWS, "ablations": ABLATION_ROWS, "steps": STEP_ROWS, "layout": LAYOUT_ROWS,
          "full": [FULL_ROW]}


def base_config(args: argparse.Namespace, overrides: tuple[str, ...]) -> Config:
    """One run folder for every variant: the demo data, cache and experts are made once."""
    return load_config(None, [
        f"demo.kind={args.kind}", f"demo.motion={args.motion}", f"demo.classes={args.classes}",
        f"demo.train_per_class={args.train_per_class}", f"demo.test_per_class={args.test_per_class}",
        f"run.root={args.root}", f"run.name=bench-{args.kind}-{args.motion}-{args.classes}",
        "tracking.enabled=false", "baselines.pixel_methods=[dm,mtt]", "baselines.s2d_methods=[dm]",
        f"evaluate.num_eval={args.num_eval}", *args.set, *overrides])


def training_set(cfg: Config, storage: Storage, row: Row, outputs: dict[str, Any]):
    """(source, storage MB) of one row: coresets and the full split as uint8 clips counted as fp32, like the paper;
    random selection as one fresh draw per evaluation network, like the run's results table."""
    if row.stage == "full":
        train = load_split(storage, cfg.cache_uri, cfg.data.train_split)
        return TensorSource(train.videos, train.labels), storage_mb(train.videos, as_float32=True)
    if row.stage.startswith("coreset:"):
        sources, mb, _ = coreset_sources(cfg, storage, cfg.cache_uri, row.stage.split(":", 1)[1], cfg.dynamic.vpc,
                                         None)
        return sources, mb
    dataset = load_distilled(outputs[row.stage]["set"], storage, seed=cfg.run.seed)
    if row.transform is not None:
        dataset = row.transform(dataset)
    return dataset, dataset.meta["storage"]["total_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=["footage", "procedural"], default="footage")
    parser.add_argument("--motion", choices=["playback", "camera", "rotation"], default="playback",
                        help="footage: what tells the classes apart")
    parser.add_argument("--classes", type=int, default=12)
    parser.add_argument("--train-per-class", type=int, default=30)
    parser.add_argument("--test-per-class", type=int, default=10)
    parser.add_argument("--num-eval", type=int, default=5, help="fresh networks per row (mean ± std)")
    parser.add_argument("--rows", default="base,ablations,full", help=f"comma list of {sorted(GROUPS)}")
    parser.add_argument("--root", default="runs/bench-quality")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides for every row, e.g. evaluate.epochs=300")
    args = parser.parse_args()
    rows = [row for group in args.rows.split(",") for row in GROUPS[group]]

    storage = Storage()
    cfg = base_config(args, ())
    connect_ray(cfg)
    test = load_split(storage, cfg.cache_uri, cfg.data.test_split) if storage.exists(cfg.cache_uri) else None
    results = []
    for row in rows:
        row_cfg = base_config(args, row.overrides)
        start = time.time()
        outputs = run_pipeline(row_cfg, until="distill", demo=True)
        test = test or load_split(storage, row_cfg.cache_uri, row_cfg.data.test_split)
        source, mb = training_set(row_cfg, storage, row, outputs)
        epochs = row_cfg.baselines.full_epochs if row.stage == "full" else None
        summary = evaluate_set(source, test, row_cfg, storage_mb=mb, epochs=epochs,
                               lr=getattr(source, "syn_lr", None) if row_cfg.evaluate.use_learned_lr else None)
        s = summary["models"][row_cfg.evaluate.models[0]]
        cell = "failed" if s["failed"] else f"{100 * s['top1_mean']:.1f} ± {100 * s['top1_std']:.1f}"
        v = outputs.get(row.stage, {}).get("validation") or {}
        loss = outputs.get(row.stage, {}).get("loss") or {}
        kept = (f"{100 * v['initial']:.1f} -> {100 * v['best']:.1f} (it {v['best_iteration']}, "
                f"{len(v['backoffs'])} back-offs)" if v.get("initial") is not None else "")
        kept += f"; loss {loss['first']:.3g} -> {loss['last']:.3g}" if loss else ""
        results.append((row.label, f"{mb:.2f}", cell, kept))
        print(f"{row.label}: {cell} top-1 %, {mb:.2f} MB, validation {kept or '-'} ({time.time() - start:.0f} s)",
              flush=True)

    ev, train = cfg.evaluate, cfg.train
    print(f"\n{args.kind} set ({args.motion}): {args.classes} classes, {args.train_per_class} train / {args.test_per_class} test clips "
          f"per class, {cfg.decode.frames} frames at {cfg.decode.size}x{cfg.decode.size}; chance "
          f"{100 / args.classes:.2f}%")
    print(f"protocol: {args.num_eval} fresh ConvNet3D (width {cfg.model.width}) per row, {ev.epochs} epochs (full set "
          f"{cfg.baselines.full_epochs}), SGD lr {ev.lr} momentum {ev.momentum} wd {ev.weight_decay}, batch "
          f"{ev.batch_size}, standardize={train.standardize}, augment={train.augment}, learned lr="
          f"{ev.use_learned_lr}; top-1 after the last epoch, mean ± population std\n")
    width = max(len(r[0]) for r in results)
    print(f"{'method':{width}} | storage MB | top-1 %     | validation top-1 %: start -> kept")
    print(f"{'-' * width}-+------------+-------------+-----------------------------------")
    for label, mb, cell, kept in results:
        print(f"{label:{width}} | {mb:>10} | {cell:<11} | {kept}")


if __name__ == "__main__":
    main()
