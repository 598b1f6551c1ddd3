"""The run's deliverable: the best S2D set with its results, config and previews under `<run>/artifact`."""
from __future__ import annotations

from typing import Any

from vdistill.config import Config
from vdistill.distill.synset import SlotLayout
from vdistill.export import export_s2d
from vdistill.stage import RunContext, Stage
from vdistill.storage import join


def stage(cfg: Config, evaluate: Stage, s2d: dict[str, Stage]) -> Stage:
    """`s2d`: the S2D stage of every method run, dynamic.method first; `export.method` picks one or `auto` the
    best on the validation split."""
    return Stage("export", "export", {"export.method": cfg.export.method}, (evaluate, *s2d.values()),
                 lambda ctx: _export(ctx, evaluate, s2d))


def choose(method: str, outputs: dict[str, dict[str, Any]]) -> tuple[str, str]:
    """(method, why): the named one, or the S2D set scoring highest on validation (ties: the first listed)."""
    if method != "auto":
        return method, "export.method"
    scores = {m: (out.get("validation") or {}).get("best") for m, out in outputs.items()}
    if any(v is None for v in scores.values()):
        first = next(iter(outputs))
        return first, "no validation split (data.val_fraction=0): dynamic.method"
    best = max(scores, key=lambda m: scores[m])
    listed = ", ".join(f"{m.upper()}+S2D {100 * v:.1f}%" for m, v in scores.items())
    return best, f"best on the validation split ({listed})"


def artifact_uri(cfg: Config) -> str:
    return join(cfg.run_uri, "artifact")


def _export(ctx: RunContext, evaluate: Stage, s2d: dict[str, Stage]) -> dict[str, Any]:
    method, why = choose(ctx.cfg.export.method, {m: ctx.output(s) for m, s in s2d.items()})
    ctx.log(f"[export] artifact = {method.upper()}+S2D: {why}")
    storage, source = ctx.storage, ctx.output(s2d[method])["set"]
    meta = storage.read_json(join(source, "meta.json"))
    tensors = {name: storage.read_tensors(join(source, f"{name}.safetensors"))
               for name in ("static_memory", "dynamic_memory", "integrator")}
    rows = storage.read_json(ctx.output(evaluate)["results"])
    metrics = {row["method"]: {m: {k: v for k, v in s.items() if k != "runs"} for m, s in row["models"].items()}
               for row in rows}
    uri, layout = artifact_uri(ctx.cfg), meta["layout"]
    meta = export_s2d(storage, uri, static_memory=tensors["static_memory"]["static_memory"],
                      dynamic_memory=tensors["dynamic_memory"]["dynamic_memory"],
                      integrator_state=tensors["integrator"],
                      layout=SlotLayout(len(meta["classes"]), layout["vpc"], layout["statics_per_slot"],
                                        layout["dynamics_per_slot"], layout["scale"], layout["slots_per_video"]),
                      classes=meta["classes"], syn_lr=meta.get("syn_lr"), config_hash=ctx.input_hash,
                      metrics=metrics)
    storage.write_json(join(uri, "config.json"), ctx.cfg.public_dict())
    for name in meta["previews"]:
        ctx.tracker.log_artifact(storage.read_bytes(join(uri, name)), name.rsplit("/", 1)[-1], "previews")
    for name in ("meta.json", "config.json", "static_memory.safetensors", "dynamic_memory.safetensors",
                 "integrator.safetensors"):
        ctx.tracker.log_artifact(storage.read_bytes(join(uri, name)), name, "artifact")
    return {"artifact": uri, "previews": [join(uri, n) for n in meta["previews"]], "storage": meta["storage"],
            "method": method, "why": why}
