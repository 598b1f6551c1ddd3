"""The one Stage type: a name, what it reads (config values and upstream stages), and a body.

A stage's identity is exactly what it declares: the hash of its `reads`, its upstream stages' hashes and the
run seed. The runner (`vdistill.pipeline`) skips a stage whose manifest carries that hash and knows no stage by
name; a body sees only a `RunContext`: the config, storage, its own folder, its upstream outputs and the sinks.
"""
from __future__ import annotations

import hashlib
import json
import re
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from pydantic import BaseModel

from vdistill.checkpoint import load_state, save_state
from vdistill.config import Config
from vdistill.data.clips import ClassSampler, read_manifest
from vdistill.data.stream import SplitStream
from vdistill.distill.loop import Validate, ValidationRecord
from vdistill.distill.synset import FrozenPixelSet, FrozenS2DSet
from vdistill.evaluate import validation_scorer
from vdistill.lease import Owner
from vdistill.storage import Storage, join
from vdistill.tracking import Tracker

SCORES_FOLDER = "validation-scores"  # under the run folder: validation top-1 of every set scored, by content
_CHECKPOINT = re.compile(r"^checkpoint-[0-9a-f]+\.safetensors$")

# Cut points of `vdistill <command>` / `Pipeline.run(until=...)`, in data-flow order.
GROUPS = ("dataset", "ingest", "experts", "static", "distill", "evaluate", "export")


@dataclass(frozen=True, eq=False)
class Stage:
    """One step of a run. `reads` maps dotted config names to the values the body uses (its identity);
    `upstream` are the stages whose outputs it reads; `body(ctx)` returns the JSON-able outputs that go
    into `<run>/<name>/manifest.json`."""

    name: str
    group: str  # one of GROUPS
    reads: Mapping[str, Any]
    upstream: tuple["Stage", ...]
    body: Callable[["RunContext"], dict[str, Any]] = field(repr=False)

    def __post_init__(self) -> None:
        if self.group not in GROUPS:
            raise ValueError(f"stage {self.name}: group must be one of {GROUPS} (got {self.group!r})")

    def input_hash(self, upstream_hashes: Mapping[str, str], seed: int) -> str:
        payload = {"reads": {k: _jsonable(v) for k, v in sorted(self.reads.items())},
                   "upstream": [upstream_hashes[up.name] for up in self.upstream], "seed": seed}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _jsonable(value: Any) -> Any:
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


def fields(section: BaseModel, *names: str, prefix: str) -> dict[str, Any]:
    """`{"prefix.name": value}` for some fields of a config section: a stage that reads only these."""
    return {f"{prefix}.{name}": getattr(section, name) for name in names}


# What scoring a set on the validation split reads of the evaluation protocol (its epochs are validation.epochs, so
# changing evaluate.epochs still re-runs only the evaluation).
_PROTOCOL = ("lr", "momentum", "weight_decay", "batch_size", "use_learned_lr", "models")


def validation_reads(cfg: Config) -> dict[str, Any]:
    """The config a distillation stage's validation guard reads: part of the stage's identity."""
    return {"validation": cfg.validation, "train": cfg.train, **fields(cfg.evaluate, *_PROTOCOL, prefix="evaluate")}


def validator(cfg: Config, storage: Storage, cache_uri: str) -> Validate | None:
    """`score(source) -> top-1` on the cache's validation split, or None when the cache has none
    (`data.val_fraction=0`). A set already scored under the same protocol is not trained
    again: its score is kept under the run folder by the set's content (MTT+S2D and DM+S2D start from the same
    set, and so do the two pixel baselines)."""
    manifest = read_manifest(storage, cache_uri)
    if cfg.data.val_split not in manifest.get("splits", []):
        return None
    score = validation_scorer(SplitStream(storage, cache_uri, cfg.data.val_split), cfg)
    protocol = json.dumps({"reads": {k: _jsonable(v) for k, v in validation_reads(cfg).items()},
                           "model": _jsonable(cfg.model), "device": cfg.run.device, "seed": cfg.run.seed,
                           "cache": manifest["input_hash"]}, sort_keys=True)

    def memoised(source: FrozenS2DSet | FrozenPixelSet) -> float:
        key = hashlib.sha256(f"{protocol}|{source.digest()}".encode()).hexdigest()[:32]
        uri = join(cfg.run_uri, SCORES_FOLDER, f"{key}.json")
        known = storage.read_json_or(uri)
        if known is not None:
            return float(known["top1"])
        value = score(source)
        storage.write_json(uri, {"top1": value})
        return value

    return memoised


@dataclass
class RunContext:
    """What a stage body gets; it never sees the runner or other stages' folders except through `output`."""

    cfg: Config
    storage: Storage
    tracker: Tracker
    owner: Owner  # holds the run's lease (and the cache's while ingesting)
    log: Callable[[str], None]
    folder: str  # <run>/<stage name>
    input_hash: str
    outputs: Mapping[str, dict[str, Any]]  # every finished stage's outputs, by name
    _splits: dict[tuple[str, str], SplitStream] = field(default_factory=dict, repr=False)
    _seconds: list[float] = field(default_factory=list, repr=False)
    _losses: list[float] = field(default_factory=list, repr=False)

    def uri(self, *parts: str) -> str:
        return join(self.folder, *parts)

    def output(self, stage: Stage) -> dict[str, Any]:
        """The outputs of an upstream stage."""
        return self.outputs[stage.name]

    def split(self, cache_uri: str, name: str) -> SplitStream:
        """A cache split as a stream (never held whole), listed once per stage: every evaluation shares it."""
        if (cache_uri, name) not in self._splits:
            self._splits[cache_uri, name] = SplitStream(self.storage, cache_uri, name)
        return self._splits[cache_uri, name]

    def real_clips(self, cache_uri: str) -> ClassSampler:
        """The training split's real clips for a distillation loop, within `cache.sampler_mb`."""
        return ClassSampler(self.storage, cache_uri, self.cfg.data.train_split, memory_mb=self.cfg.cache.sampler_mb,
                            seed=self.cfg.run.seed)

    def validator(self, cache_uri: str) -> Validate | None:
        """`score(source) -> top-1` on the cache's validation split, or None when the cache has none
        (`data.val_fraction=0`): the stage then keeps its last iterate."""
        return validator(self.cfg, self.storage, cache_uri)

    def report_validation(self, prefix: str, record: ValidationRecord) -> dict[str, Any]:
        """Log a loop's validation scores (MLflow, and one line when it did not beat its start); -> manifest entry."""
        for iteration, score in record.scores:
            self.tracker.log_metrics({f"{prefix}/val_top1": score}, step=int(iteration))
        if record.scores and not record.improved:
            self.log(f"[{prefix}] no iterate beat the starting set on validation ({100 * record.initial:.1f}%): the "
                     "stage keeps its starting set")
        elif record.scores:
            self.log(f"[{prefix}] validation top-1 {100 * record.initial:.1f}% at iteration 0 -> "
                     f"{100 * record.best:.1f}% at iteration {record.best_iteration} (kept)")
        return record.to_dict()

    def checkpointing(self, sampler: ClassSampler) -> tuple[dict[str, Any] | None, Callable[[dict[str, Any]], None]]:
        """(loop state to resume from or None, callback that saves one), named by the stage's input hash; the
        sampler's pools travel with the loop state. Call it after the set is built, right before the loop."""
        uri = self.checkpoint_uri()
        state = load_state(self.storage, uri)
        if state is not None:
            self.log(f"[{self.folder.rsplit('/', 1)[-1]}] resuming from iteration {state['iteration']}")
            sampler.load_state(state.pop("sampler"))
        return state, lambda s: save_state(self.storage, uri, {**s, "sampler": sampler.state()})

    def checkpoint_uri(self) -> str:
        return self.uri(f"checkpoint-{self.input_hash}.safetensors")

    def remove_checkpoints(self, *, own: bool) -> None:
        """Delete the stage's checkpoints of other settings (another input hash), and with `own` its own too (once
        its manifest is written, nothing resumes from it): each holds memories plus optimiser state. Logs the
        space freed."""
        sizes = self.storage.list_file_sizes(self.folder, recursive=False)
        doomed = {uri: size for uri, size in sizes.items() if _CHECKPOINT.match(uri.rsplit("/", 1)[-1])
                  and (own or uri != self.checkpoint_uri())}
        for uri in doomed:
            self.storage.delete(uri)
        if doomed:
            whose = "finished and superseded" if own else "other settings'"
            self.log(f"[{self.folder.rsplit('/', 1)[-1]}] removed {len(doomed)} {whose} checkpoint(s), "
                     f"{sum(doomed.values()) / 1e6:.1f} MB freed")

    def iteration_seconds(self) -> dict[str, float]:
        """Median and fastest seconds per iteration of this stage's loop so far (for its manifest)."""
        if not self._seconds:
            return {}
        ordered = sorted(self._seconds)
        return {"median": ordered[len(ordered) // 2], "best": ordered[0], "iterations": len(ordered)}

    def loss_trend(self, window: int = 10) -> dict[str, float]:
        """Median matching loss of this stage's first and last `window` iterations run here (for its manifest:
        whether the objective fell)."""
        if not self._losses:
            return {}
        return {"first": statistics.median(self._losses[:window]), "last": statistics.median(self._losses[-window:])}

    def progress(self, prefix: str, total: int, start: int) -> Callable[[int, dict[str, float]], None]:
        """Per-iteration callback: MLflow metrics plus a progress bar (loss, syn_lr) in the log."""
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start, desc=prefix, unit="it", mininterval=5)

        def log(iteration: int, metrics: dict[str, float]) -> None:
            self._seconds.append(metrics["seconds"])
            self._losses.append(metrics["loss"])
            self.tracker.log_metrics({f"{prefix}/{k}": v for k, v in metrics.items()}, step=iteration)
            bar.set_postfix(loss=f"{metrics['loss']:.4g}", syn_lr=f"{metrics['syn_lr']:.3g}", refresh=False)
            bar.update(1)
            if iteration + 1 == total:
                bar.close()
        return log
