"""One run's stages in data-flow order, and the runner that executes the missing ones, resumably.

`plan` is the stage graph, written once: which stages a config needs and what each reads. The runner knows no
stage by name: it hashes each stage's declaration, skips a stage whose `manifest.json` (written last,
atomically) carries that hash, and hands the body a `RunContext`. A running distillation stage restarts from
its last checkpoint, so a crashed driver, a killed coordinator or a re-submitted job continue where the run
stopped.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

from vdistill.config import Config
from vdistill.data.decode import DecodeSpec
from vdistill.data.ingest import input_hash as ingest_hash
from vdistill.data.manifests import build_manifest
from vdistill.errors import UserError
from vdistill.experts import plan_experts, trajectory_dir
from vdistill.lease import Lease, Owner
from vdistill.stage import GROUPS, RunContext, Stage
from vdistill.stages import dataset, dynamic, evaluate, experts, export, ingest, pixels, static
from vdistill.storage import Storage, join
from vdistill.tracking import Tracker, flatten_params


def code_version() -> str:
    """Hash of the package's source: an actor built from other code never serves this run."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


def plan(cfg: Config, *, demo: bool = False) -> list[Stage]:
    """The stages `cfg` needs, in data-flow order; experts only where a stage reads them."""
    data = dataset.stage(cfg) if demo else None
    cache = ingest.stage(cfg, data)
    mtt_reads_videos = "mtt" in cfg.s2d_methods or "mtt" in cfg.baselines.pixel_methods
    kinds = [kind for kind, read in (("video", mtt_reads_videos or cfg.evaluate.coreset_embedder == "expert"),
                                     ("frame", cfg.static.method == "mtt")) if read]
    trained = experts.stages(cfg, cache, kinds)
    video_experts, frame_experts = trained.get("video"), trained.get("frame")
    stills = static.stage(cfg, cache, frame_experts)
    s2d = {m: dynamic.stage(cfg, m, cache, stills, video_experts) for m in cfg.s2d_methods}
    baselines = {m: pixels.stage(cfg, m, cache, video_experts) for m in cfg.baselines.pixel_methods}
    distilled = ([(f"{m.upper()} (pixels)", s) for m, s in baselines.items()]
                 + [(f"{m.upper()}+S2D", s) for m, s in s2d.items()])
    results = evaluate.stage(cfg, cache, distilled, video_experts)
    stages = [data, cache, video_experts, frame_experts, stills, *s2d.values(), *baselines.values(), results,
              export.stage(cfg, results, s2d)]
    return [s for s in stages if s is not None]


class RunConflict(UserError):
    """New settings that finished work cannot take; raised before anything is written."""


class Pipeline:
    """The stages of one run; `run(until)` executes the missing ones up to the group `until`."""

    def __init__(self, cfg: Config, storage: Storage, *, demo: bool = False, log: Callable[[str], None] = print,
                 owner: Owner | None = None):
        self.cfg, self.storage, self.demo, self.log = cfg, storage, demo, log
        self.owner = owner or Owner()
        self.stages = plan(cfg, demo=demo)

    def input_hashes(self) -> dict[str, str]:
        """Every planned stage's input hash, in plan order; known before anything runs."""
        hashes: dict[str, str] = {}
        for stage in self.stages:
            hashes[stage.name] = stage.input_hash(hashes, self.cfg.run.seed)
        return hashes

    def run(self, until: str = "export") -> dict[str, Any]:
        """Hold the run's lease, check, then write config.json and run the missing stages up to `until`."""
        last = GROUPS.index(until)
        outputs: dict[str, dict[str, Any]] = {}
        with Lease(self.storage, self.cfg.run_uri, "run", run_identity(self.cfg), self.owner):
            self.check()
            self.storage.write_json(join(self.cfg.run_uri, "config.json"), self.cfg.public_dict())
            hashes = self.input_hashes()
            with Tracker(self.cfg) as tracker:
                for stage in self.stages:
                    if GROUPS.index(stage.group) > last:
                        break
                    ctx = RunContext(self.cfg, self.storage, tracker, self.owner, self.log,
                                     join(self.cfg.run_uri, stage.name), hashes[stage.name], outputs)
                    outputs[stage.name] = self._run_stage(stage, ctx)
        return outputs

    def _run_stage(self, stage: Stage, ctx: RunContext) -> dict[str, Any]:
        manifest_uri = ctx.uri("manifest.json")
        done = self.storage.read_json_or(manifest_uri)
        if done and done.get("input_hash") == ctx.input_hash:
            self.log(f"[{stage.name}] done earlier, skipped")
            ctx.remove_checkpoints(own=True)
            return done["outputs"]
        self.log(f"[{stage.name}] running")
        ctx.remove_checkpoints(own=False)
        start = time.time()
        with ctx.tracker.stage(stage.name):
            outputs = stage.body(ctx)
            ctx.tracker.log_metrics({"stage_seconds": time.time() - start})
        done = {"stage": stage.name, "input_hash": ctx.input_hash, "code_version": code_version(),
                "seconds": round(time.time() - start, 2), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "outputs": outputs}
        self.storage.write_json(manifest_uri, done)
        ctx.remove_checkpoints(own=True)
        self.log(f"[{stage.name}] finished in {done['seconds']:.1f}s")
        return outputs

    # ---- the check pass -----------------------------------------------------------------------------
    def check(self) -> None:
        """Refuse, before anything is written (config.json, MLflow, the cache), what finished work cannot take.

        Reads only what exists: the annotation rows (every bad row named), the cache's manifest and the
        finished experts' manifest. Finished experts are never retrained in place, and a finished cache at
        an explicit `cache.uri` may serve other runs, so neither is redone with other settings; a stage
        that did not finish (no manifest) is free to run with new ones.
        """
        cfg, storage = self.cfg, self.storage
        if self.demo and not storage.is_file(join(cfg.run_uri, "dataset", "manifest.json")):
            return  # the annotations do not exist yet: the dataset stage writes them
        rows = build_manifest(cfg.data, storage)
        cache = storage.read_json_or(join(cfg.cache_uri, "manifest.json"))
        cache_changes = bool(cache) and cache.get("input_hash") != ingest_hash(
            rows, DecodeSpec.from_config(cfg.decode, seed=cfg.run.seed))
        if cache_changes and cfg.cache.uri:
            changed = _changed_settings(storage, join(cfg.cache_uri, "config.json"), cfg, ("data", "decode"))
            raise RunConflict(f"cache {cfg.cache_uri} holds a finished ingest of other input ({changed}) and may "
                              "serve other runs; use another cache.uri, or delete that folder to re-ingest")
        for stage in self.stages:
            if stage.group == "experts":
                self._check_experts(stage.name.split("-", 1)[1], cache_changes)

    def _check_experts(self, kind: str, cache_changes: bool) -> None:
        folder = trajectory_dir(self.cfg.run_uri, kind)
        finished = self.storage.read_json_or(join(folder, "manifest.json"))
        if not finished:
            return
        if not cache_changes:
            planned = {job.uri.rsplit("/", 1)[-1]: job.input_hash for job in plan_experts(self.cfg, self.storage, kind)}
            if all(finished["experts"].get(name, digest) == digest for name, digest in planned.items()):
                return
        changed = _changed_settings(self.storage, join(self.cfg.run_uri, "config.json"), self.cfg)
        raise RunConflict(f"run {self.cfg.run_uri}: the {kind} experts finished with other settings ({changed}); "
                          f"finished experts are never retrained in place: use another run.name, or delete "
                          f"{folder} to retrain them")


def _changed_settings(storage: Storage, config_uri: str, cfg: Config, sections: tuple[str, ...] = ()) -> str:
    """`a.b: old -> new, ...` between a config.json written earlier and `cfg` (public values only)."""
    old = storage.read_json_or(config_uri)
    if old is None:
        return f"no {config_uri} to compare with"
    before, after = flatten_params(old), flatten_params(cfg.public_dict())
    keys = [k for k in sorted(set(before) | set(after)) if not sections or k.split(".", 1)[0] in sections]
    diff = [f"{k}: {before.get(k, '-')} -> {after.get(k, '-')}" for k in keys if before.get(k) != after.get(k)]
    return ", ".join(diff) or "the same settings, other code or data"


def run_identity(cfg: Config) -> str:
    """Hash of everything that defines a run: the whole resolved config (without credentials) and the code.

    Two submissions with the same identity are the same run (they share a coordinator and a run lease);
    any other setting or code means another coordinator, so a fixed re-submission never meets an old one.
    """
    payload = json.dumps({"config": cfg.public_dict(), "code": code_version()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
