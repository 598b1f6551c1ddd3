"""What each pipeline stage does: read earlier stages' outputs, call the library, write its own outputs.

The coordinator decides *whether* a stage runs (manifests, input hashes); these bodies decide *what*
it does. Each returns the small JSON-able dict that goes into the stage's manifest.
"""
from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING, Any

import torch

from vdistill.config import Config
from vdistill.storage import Storage, join

if TYPE_CHECKING:
    from vdistill.coordinator import Pipeline

SET_FOLDER = "set"
RESULTS = "results.json"


# ---- demo data ---------------------------------------------------------------------------------------
def demo_data_uri(cfg: Config) -> str:
    return join(cfg.run_uri, "demo-data")


def point_at_demo_data(cfg: Config) -> Config:
    """The demo reads the dataset it generates: data.root/annotations default to the run's demo-data/."""
    if not cfg.data.root:
        cfg.data.root = demo_data_uri(cfg)
        cfg.data.annotations = join(demo_data_uri(cfg), "demo.csv")
    return cfg


def make_demo_dataset(p: Pipeline) -> dict[str, Any]:
    """The procedural shapes or the real-footage set (`demo.kind`), as mp4 files + a generic_csv annotation."""
    if p.cfg.demo.kind == "footage":
        from vdistill.data.footage import write_footage_dataset as write
    else:
        from vdistill.data.synthetic import write_demo_dataset as write
    csv_uri = write(p.storage, demo_data_uri(p.cfg), p.cfg.demo)
    return {"annotations": csv_uri, "classes": p.cfg.demo.num_classes, "kind": p.cfg.demo.kind}


# ---- ingest and experts --------------------------------------------------------------------------------
def ingest(p: Pipeline) -> dict[str, Any]:
    from vdistill.data.ingest import format_summary, run_ingest

    summary = run_ingest(p.cfg, p.storage, owner=p.owner)
    if not summary["skipped"]:  # the resolved config travels with what it produced
        p.storage.write_json(join(p.cfg.cache_uri, "config.json"), p.cfg.public_dict())
    p.log(format_summary(summary))
    p.tracker.log_metrics({"ingest/clips": summary["num_clips"], "ingest/quarantined": summary["quarantined"],
                           "ingest/clips_per_s": summary["throughput"]["clips_per_s"]})
    return {"cache": p.cfg.cache_uri, "input_hash": summary["input_hash"], "clips": summary["num_clips"],
            "quarantined": summary["quarantined"]}


def experts(p: Pipeline, kind: str) -> dict[str, Any]:
    from vdistill.experts import TrajectoryReader, run_experts

    uris = run_experts(p.cfg, p.storage, kind)
    for k, uri in enumerate(uris):
        history = TrajectoryReader(p.storage, uri).meta.get("history", [])
        if history and "top1" in history[-1]:
            p.tracker.log_metrics({f"experts/{kind}/test_top1": history[-1]["top1"],
                                   f"experts/{kind}/train_acc": history[-1]["acc"]}, step=k)
    return {"trajectories": uris}


# ---- distillation ------------------------------------------------------------------------------------
def _train_sampler(p: Pipeline):
    from vdistill.data.clips import ClassSampler

    return ClassSampler(p.storage, p.cfg.cache_uri, p.cfg.data.train_split)


def _snapshot_reader(p: Pipeline, kind: str) -> tuple[Any, list[int]]:
    """`snapshot(expert_id, epoch)` over the stage's trajectories, with a small cache of recent snapshots."""
    from vdistill.experts import TrajectoryReader, list_trajectories

    readers = [TrajectoryReader(p.storage, uri) for uri in list_trajectories(p.storage, p.cfg.run_uri, kind)]

    @functools.lru_cache(maxsize=32)
    def snapshot(expert_id: int, epoch: int) -> torch.Tensor:
        return readers[expert_id].snapshot(epoch)

    return snapshot, list(range(len(readers)))


def _checkpointing(p: Pipeline, stage: str):
    """(state to resume from or None, callback that saves one) for the running stage's input hash."""
    from vdistill.checkpoint import load_state, save_state

    uri = p.stage_uri(stage, f"checkpoint-{p.current_hash}.safetensors")
    state = load_state(p.storage, uri)
    if state is not None:
        p.log(f"[{stage}] resuming from iteration {state['iteration']}")
    return state, lambda s: save_state(p.storage, uri, s)


def _metrics_logger(p: Pipeline, prefix: str, total: int, start: int):
    """Per-iteration callback: MLflow metrics plus a progress bar (loss, syn_lr) in the coordinator's log."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=start, desc=prefix, unit="it", mininterval=5)

    def log(iteration: int, metrics: dict[str, float]) -> None:
        p.tracker.log_metrics({f"{prefix}/{k}": v for k, v in metrics.items()}, step=iteration)
        bar.set_postfix(loss=f"{metrics['loss']:.4g}", syn_lr=f"{metrics['syn_lr']:.3g}", refresh=False)
        bar.update(1)
        if iteration + 1 == total:
            bar.close()
    return log


def _layout(cfg: Config, num_classes: int, method: str | None = None):
    from vdistill.distill.synset import SlotLayout

    return SlotLayout.from_config(num_classes, cfg.dynamic_for(method) if method else cfg.dynamic)


def static(p: Pipeline) -> dict[str, Any]:
    from vdistill.device import resolve_device
    from vdistill.distill.stages import MttSettings, run_static_stage

    cfg, sampler = p.cfg, _train_sampler(p)
    layout = _layout(cfg, sampler.num_classes)
    snapshot, expert_ids = _snapshot_reader(p, "frame") if cfg.static.method == "mtt" else (None, [])
    state, save = _checkpointing(p, "static")
    images = run_static_stage(
        cfg.static.method, sampler.sample, cfg.static, layout, sampler.manifest["size"],
        resolve_device(cfg.run.device), cfg.run.seed, model_cfg=cfg.model, snapshot=snapshot, expert_ids=expert_ids,
        mtt=MttSettings.from_config(cfg.dynamic), state=state, on_checkpoint=save,
        on_metrics=_metrics_logger(p, "static", cfg.static.iterations, state["iteration"] if state else 0),
        checkpoint_every=cfg.dynamic.checkpoint_every)
    uri = p.stage_uri("static", "static_memory.safetensors")
    p.storage.write_tensors(uri, {"static_memory": images}, {
        "classes": ",".join(sampler.classes), "normalisation": "imagenet", "layout": str(layout.to_dict())})
    _log_static_grid(p, images, layout.spc)
    return {"static_memory": uri, "shape": list(images.shape), "classes": sampler.classes,
            "normalisation": "imagenet", "class_order": "class-major", "spc": layout.spc}


def _log_static_grid(p: Pipeline, images: torch.Tensor, per_row: int) -> None:
    from vdistill.data.pixels import to_uint8
    from vdistill.render import image_grid

    p.tracker.log_image(image_grid(to_uint8(images), nrow=per_row), "static_memory.png")  # a row per class


def _async_evaluations(p: Pipeline, pending: list):
    """on_eval hook: launch the evaluation as Ray tasks and return at once; results are collected later."""
    from vdistill.evaluate import launch_evaluation

    test = p.split(p.cfg.data.test_split)

    def on_eval(iteration: int, source) -> None:
        pending.append((iteration, launch_evaluation(source, test, p.cfg, lr=_eval_lr(p.cfg, source))))
    return on_eval


def _eval_lr(cfg: Config, source) -> float | None:
    learned = getattr(source, "syn_lr", None)
    return float(learned) if cfg.evaluate.use_learned_lr and learned is not None else None


def _log_evaluations(p: Pipeline, name: str, pending: list) -> dict[str, Any]:
    best: dict[str, Any] = {}
    for iteration, job in pending:
        result = job.result()
        summary = result["models"][p.cfg.evaluate.models[0]]
        if summary["failed"]:
            p.log(f"[{name}] evaluation at iteration {iteration}: {summary['failed']} network(s) diverged")
            continue
        p.tracker.log_metrics({f"{name}/eval_top1": summary["top1_mean"], f"{name}/eval_top5": summary["top5_mean"]},
                              step=iteration)
        if summary["top1_mean"] > best.get("top1_mean", -1):
            best = {"iteration": iteration, "top1_mean": summary["top1_mean"], "top1_std": summary["top1_std"]}
    return best


def _learned_lr(synset, dcfg, method: str) -> float | None:
    """The synthetic lr travels with a set only when MTT learned it; DM never touches it."""
    return float(synset.syn_lr.detach()) if method == "mtt" and dcfg.train_lr else None


def dynamic(p: Pipeline, method: str) -> dict[str, Any]:
    from vdistill.device import resolve_device
    from vdistill.distill.stages import run_dynamic_stage
    from vdistill.distill.synset import S2DSet
    from vdistill.export import export_s2d

    cfg, sampler, device = p.cfg, _train_sampler(p), resolve_device(p.cfg.run.device)
    dcfg = cfg.dynamic_for(method)
    layout = _layout(cfg, sampler.num_classes, method)
    static_memory = p.storage.read_tensors(p.stage_uri("static", "static_memory.safetensors"))["static_memory"]
    generator = torch.Generator().manual_seed(cfg.run.seed)
    synset = S2DSet.create(layout, static_memory.to(device), sampler.manifest["frames"], generator,
                           syn_lr=dcfg.lr_teacher, train_static=dcfg.train_static,
                           integrator_init=dcfg.integrator_init, dynamic_init=dcfg.init, sample_real=sampler.sample)
    snapshot, expert_ids = _snapshot_reader(p, "video") if method == "mtt" else (None, [])
    state, save = _checkpointing(p, f"dynamic-{method}")
    resumed_from = state["iteration"] if state else 0
    pending: list = []
    run_dynamic_stage(method, synset, sampler.sample, dcfg, device, cfg.run.seed, model_cfg=cfg.model,
                      snapshot=snapshot, expert_ids=expert_ids, state=state, on_checkpoint=save,
                      on_metrics=_metrics_logger(p, f"dynamic-{method}", dcfg.iterations, resumed_from),
                      on_eval=_async_evaluations(p, pending) if dcfg.eval_every else None)
    best = _log_evaluations(p, f"dynamic-{method}", pending)
    t = synset.state_tensors()
    uri = p.stage_uri(f"dynamic-{method}", SET_FOLDER)
    meta = export_s2d(p.storage, uri, static_memory=t["static_memory"], dynamic_memory=t["dynamic_memory"],
                      integrator_state=synset.integrator.state_dict(), vpc=layout.vpc,
                      statics_per_slot=layout.statics_per_slot, dynamics_per_slot=layout.dynamics_per_slot,
                      classes=sampler.classes, syn_lr=_learned_lr(synset, dcfg, method), config_hash=p.current_hash,
                      metrics={"best_during_distillation": best})
    return {"set": uri, "syn_lr": meta["syn_lr"], "storage": meta["storage"], "best": best,
            "resumed_from": resumed_from}


def pixels(p: Pipeline, method: str) -> dict[str, Any]:
    from vdistill.device import resolve_device
    from vdistill.distill.stages import run_pixel_baseline
    from vdistill.distill.synset import PixelSet
    from vdistill.export import export_pixels

    cfg, sampler, device = p.cfg, _train_sampler(p), resolve_device(p.cfg.run.device)
    generator = torch.Generator().manual_seed(cfg.run.seed)
    pixel_set = PixelSet.from_real(sampler.sample, sampler.num_classes, cfg.dynamic.vpc, generator, device,
                                   syn_lr=cfg.dynamic_for("mtt").lr_teacher)
    snapshot, expert_ids = _snapshot_reader(p, "video") if method == "mtt" else (None, [])
    state, save = _checkpointing(p, f"pixels-{method}")
    lr = cfg.baselines.pixel_lr_mtt if method == "mtt" else cfg.baselines.pixel_lr_dm
    run_pixel_baseline(method, pixel_set, sampler.sample, cfg.dynamic_for(method), lr, cfg.baselines.pixel_iterations,
                       device, cfg.run.seed, model_cfg=cfg.model, snapshot=snapshot, expert_ids=expert_ids,
                       state=state, on_checkpoint=save,
                       on_metrics=_metrics_logger(p, f"pixels-{method}", cfg.baselines.pixel_iterations,
                                                  state["iteration"] if state else 0))
    videos, labels = pixel_set.all_videos()
    uri = p.stage_uri(f"pixels-{method}", SET_FOLDER)
    meta = export_pixels(p.storage, uri, videos=videos, labels=labels, classes=sampler.classes, method=method,
                         syn_lr=_learned_lr(pixel_set, cfg.dynamic_for(method), method), config_hash=p.current_hash)
    return {"set": uri, "syn_lr": meta["syn_lr"], "storage": meta["storage"]}


# ---- evaluation and export -------------------------------------------------------------------------------
def _coreset(cfg: Config, storage: Storage, train, method: str, k: int):
    """`k` real clips per class of `train` chosen by `method`, embedded by a random or an expert ConvNet3D."""
    from vdistill.coreset import select_coreset
    from vdistill.device import resolve_device
    from vdistill.models import build_model, load_flat_

    frames, size = train.videos.shape[1], train.videos.shape[2]
    embedder = build_model("convnet3d", len(train.classes), frames, size, cfg.model, seed=cfg.run.seed)
    if cfg.evaluate.coreset_embedder == "expert":
        from vdistill.experts import TrajectoryReader, list_trajectories

        reader = TrajectoryReader(storage, list_trajectories(storage, cfg.run_uri, "video")[0])
        load_flat_(embedder, reader.snapshot(reader.num_snapshots - 1))
    generator = torch.Generator().manual_seed(cfg.run.seed)
    return select_coreset(method, train, k, embedder, resolve_device(cfg.run.device), generator)


def _training_sets(p: Pipeline) -> list[tuple[str, int, Any, float, int]]:
    """(method label, vpc, source, storage MB, clips) for every row of the results table."""
    from vdistill.evaluate import TensorSource, storage_mb
    from vdistill.export import load_distilled

    cfg, vpc = p.cfg, p.cfg.dynamic.vpc
    rows = []
    for method in cfg.baselines.coresets:
        subset = _coreset(cfg, p.storage, p.split(cfg.data.train_split), method, vpc)
        rows.append((method, vpc, TensorSource(subset.videos, subset.labels),
                     storage_mb(subset.videos, as_float32=True), len(subset.labels)))
    stage_sets = [(f"{m.upper()} (pixels)", f"pixels-{m}") for m in cfg.baselines.pixel_methods]
    stage_sets += [(f"{m.upper()}+S2D", f"dynamic-{m}") for m in cfg.s2d_methods]
    for label, stage in stage_sets:
        dataset = load_distilled(p.outputs[stage]["set"], p.storage, seed=cfg.run.seed)
        rows.append((label, vpc, dataset, dataset.meta["storage"]["total_mb"], len(dataset)))
    if cfg.baselines.full:
        train = p.split(cfg.data.train_split)
        rows.append(("full data", 0, TensorSource(train.videos, train.labels),
                     storage_mb(train.videos, as_float32=True), len(train.labels)))
    return rows


def evaluate(p: Pipeline) -> dict[str, Any]:
    from vdistill.evaluate import format_results_table, launch_evaluation

    test = p.split(p.cfg.data.test_split)
    jobs = []
    for label, vpc, source, mb, clips in _training_sets(p):
        epochs = p.cfg.baselines.full_epochs if label == "full data" else None
        jobs.append((label, vpc, launch_evaluation(source, test, p.cfg, lr=_eval_lr(p.cfg, source), storage_mb=mb,
                                                   clips=clips, epochs=epochs)))
    rows = []
    for label, vpc, job in jobs:  # all sets train concurrently; collect in table order
        result = job.result()
        rows.append({"method": label, "vpc": vpc if vpc else "all", **result})
        for model, s in result["models"].items():
            if s["failed"]:
                continue
            key = label.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "_")
            p.tracker.log_metrics({f"eval/{key}/{model}/top1_mean": s["top1_mean"],
                                   f"eval/{key}/{model}/top1_std": s["top1_std"],
                                   f"eval/{key}/{model}/top5_mean": s["top5_mean"],
                                   f"eval/{key}/storage_mb": result["storage_mb"]})
    table = format_results_table(rows)
    p.storage.write_json(p.stage_uri("evaluate", RESULTS), rows)
    p.storage.write_text(p.stage_uri("evaluate", "results.txt"), table + "\n")
    p.tracker.log_artifact(table.encode(), "results.txt")
    p.log(table)
    return {"results": p.stage_uri("evaluate", RESULTS), "table": table}


def export(p: Pipeline) -> dict[str, Any]:
    from vdistill.export import export_s2d

    method = p.cfg.dynamic.method
    source = p.outputs[f"dynamic-{method}"]["set"]
    meta = p.storage.read_json(join(source, "meta.json"))
    tensors = {name: p.storage.read_tensors(join(source, f"{name}.safetensors"))
               for name in ("static_memory", "dynamic_memory", "integrator")}
    rows = p.storage.read_json(p.stage_uri("evaluate", RESULTS))
    metrics = {row["method"]: {m: {k: v for k, v in s.items() if k != "runs"} for m, s in row["models"].items()}
               for row in rows}
    uri = join(p.cfg.run_uri, "artifact")
    layout = meta["layout"]
    meta = export_s2d(p.storage, uri, static_memory=tensors["static_memory"]["static_memory"],
                      dynamic_memory=tensors["dynamic_memory"]["dynamic_memory"],
                      integrator_state=tensors["integrator"], vpc=layout["vpc"],
                      statics_per_slot=layout["statics_per_slot"], dynamics_per_slot=layout["dynamics_per_slot"],
                      classes=meta["classes"], syn_lr=meta.get("syn_lr"), config_hash=p.current_hash,
                      metrics=metrics)
    p.storage.write_json(join(uri, "config.json"), p.cfg.public_dict())
    for name in meta["previews"]:
        p.tracker.log_artifact(p.storage.read_bytes(join(uri, name)), name.rsplit("/", 1)[-1], "previews")
    for name in ("meta.json", "config.json", "static_memory.safetensors", "dynamic_memory.safetensors",
                 "integrator.safetensors"):
        p.tracker.log_artifact(p.storage.read_bytes(join(uri, name)), name, "artifact")
    return {"artifact": uri, "previews": [join(uri, n) for n in meta["previews"]], "storage": meta["storage"]}


def closing_lines(cfg: Config, outputs: dict[str, Any], tracking_hint: str) -> str:
    lines = []
    if "evaluate" in outputs:
        lines += ["", outputs["evaluate"]["table"], ""]
    if "export" in outputs:
        art = outputs["export"]
        lines.append(f"distilled artifact: {art['artifact']}   (vdistill.load_distilled(uri) -> torch Dataset)")
        lines.append(f"previews:           {join(art['artifact'], 'previews')}   (vdistill show {art['artifact']})")
    lines.append(f"run folder:         {cfg.run_uri}")
    lines.append(f"MLflow:             {tracking_hint}")
    return "\n".join(lines)


def evaluate_standalone(cfg: Config, storage: Storage, *, synthetic: str | None, coreset: str | None, full: bool,
                        vpc: int | None) -> str:
    """`vdistill evaluate`: one training set -> table; JSON written next to the input."""
    from vdistill.data.clips import load_split
    from vdistill.evaluate import TensorSource, evaluate_set, format_results_table, storage_mb
    from vdistill.export import load_distilled

    test = load_split(storage, cfg.cache_uri, cfg.data.test_split)
    k = vpc or cfg.dynamic.vpc
    if synthetic:
        dataset = load_distilled(synthetic, storage, seed=cfg.run.seed)
        label, source, mb, clips, out = (dataset.meta.get("kind", "synthetic"), dataset,
                                         dataset.meta["storage"]["total_mb"], len(dataset), join(synthetic, RESULTS))
    elif coreset:
        subset = _coreset(cfg, storage, load_split(storage, cfg.cache_uri, cfg.data.train_split), coreset, k)
        label, source, mb, clips = coreset, TensorSource(subset.videos, subset.labels), storage_mb(
            subset.videos, as_float32=True), len(subset.labels)
        out = join(cfg.cache_uri, "evaluations", f"{coreset}-vpc{k}-seed{cfg.run.seed}.json")
    else:
        train = load_split(storage, cfg.cache_uri, cfg.data.train_split)
        label, source, mb, clips = "full data", TensorSource(train.videos, train.labels), storage_mb(
            train.videos, as_float32=True), len(train.labels)
        out = join(cfg.cache_uri, "evaluations", f"full-seed{cfg.run.seed}.json")
    start = time.time()
    result = evaluate_set(source, test, cfg, storage_mb=mb, clips=clips, lr=_eval_lr(cfg, source))
    row = {"method": label, "vpc": k if not full else "all", **result, "seconds": round(time.time() - start, 1)}
    storage.write_json(out, row)
    return format_results_table([row]) + f"\n\nwritten: {out}"
