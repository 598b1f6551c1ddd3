"""The run's deliverable: the main S2D set with its results, config and previews under `<run>/artifact`."""
from __future__ import annotations

from typing import Any

from vdistill.config import Config
from vdistill.export import export_s2d
from vdistill.stage import RunContext, Stage
from vdistill.storage import join


def stage(evaluate: Stage, main_set: Stage) -> Stage:
    return Stage("export", "export", {}, (evaluate, main_set), lambda ctx: _export(ctx, evaluate, main_set))


def artifact_uri(cfg: Config) -> str:
    return join(cfg.run_uri, "artifact")


def _export(ctx: RunContext, evaluate: Stage, main_set: Stage) -> dict[str, Any]:
    storage, source = ctx.storage, ctx.output(main_set)["set"]
    meta = storage.read_json(join(source, "meta.json"))
    tensors = {name: storage.read_tensors(join(source, f"{name}.safetensors"))
               for name in ("static_memory", "dynamic_memory", "integrator")}
    rows = storage.read_json(ctx.output(evaluate)["results"])
    metrics = {row["method"]: {m: {k: v for k, v in s.items() if k != "runs"} for m, s in row["models"].items()}
               for row in rows}
    uri, layout = artifact_uri(ctx.cfg), meta["layout"]
    meta = export_s2d(storage, uri, static_memory=tensors["static_memory"]["static_memory"],
                      dynamic_memory=tensors["dynamic_memory"]["dynamic_memory"],
                      integrator_state=tensors["integrator"], vpc=layout["vpc"],
                      statics_per_slot=layout["statics_per_slot"], dynamics_per_slot=layout["dynamics_per_slot"],
                      classes=meta["classes"], syn_lr=meta.get("syn_lr"), config_hash=ctx.input_hash,
                      metrics=metrics)
    storage.write_json(join(uri, "config.json"), ctx.cfg.public_dict())
    for name in meta["previews"]:
        ctx.tracker.log_artifact(storage.read_bytes(join(uri, name)), name.rsplit("/", 1)[-1], "previews")
    for name in ("meta.json", "config.json", "static_memory.safetensors", "dynamic_memory.safetensors",
                 "integrator.safetensors"):
        ctx.tracker.log_artifact(storage.read_bytes(join(uri, name)), name, "artifact")
    return {"artifact": uri, "previews": [join(uri, n) for n in meta["previews"]], "storage": meta["storage"]}
