"""The evaluation protocol: train fresh networks on a (synthetic or coreset) set, score them on the real test split.

Every number in a results table comes from here, so the protocol is pinned in one place
(METHOD.md section 6):

- `num_eval` fresh networks per architecture, each seeded explicitly (seeds recorded), trained as
  independent Ray tasks. The test split streams from the clip cache (`SplitStream.in_order`) and so does the
  full-data baseline (`SplitStream.epoch`, shuffled from the network's seed): no task holds a split, so an
  evaluation's memory does not grow with the dataset (Kinetics-400's 241k clips included).
- SGD (momentum, weight decay from `cfg.evaluate`), cross-entropy, dropout on, batch `batch_size`.
- With E = `epochs` (501 in configs/_paper.yaml, i.e. the paper's epochs 0..500), the learning rate
  drops x0.1 after the epoch with index `(E - 1) // 2 + 1` (251) by RE-CREATING the optimizer, which
  resets momentum, exactly as the original does.
- The source is asked for a fresh `(videos, labels)` every epoch (an S2D set re-pairs statics and
  dynamics each epoch).
- The test split is scored once, after the LAST epoch (never the best epoch on test, METHOD.md W-9), with
  `test_passes` passes and random flips when `test_flip` (paper: 3 passes, flips; the original also
  re-draws each test clip's start frame, our cached clips are fixed). Top-1 and top-5 are separate
  fields (METHOD.md W-3); the table reports mean ± population std over seeds.
- Callers pass each set's storage (`synset.storage_mb`: stored bytes, or fp32 like the paper's
  accounting of synthetic sets with `as_float32=True`); it is reported next to the accuracies.

`launch_evaluation` submits the tasks and returns at once; `evaluate_set` waits for them.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from vdistill.augment import ClipAugment
from vdistill.data.stream import SplitStream
from vdistill.device import resolve_device
from vdistill.models import build_model
from vdistill.train import Batch, accuracy, shuffled, train_batches

if TYPE_CHECKING:
    from vdistill.config import Config, EvaluateConfig, ModelConfig, TrainConfig

EVAL_SEED_STREAM = 6  # tags the evaluation seeds so they never coincide with expert or distillation seeds
VALIDATION_SEED_STREAM = 7  # the validation networks' seeds: neither the evaluation's nor the experts'


class EpochSource(Protocol):
    """What evaluation trains on: called once per epoch, returns `(videos, labels)`.

    `videos` is float normalised `(N, T, 3, H, W)` or uint8 `(N, T, H, W, 3)`; `labels` int64 `(N,)`.
    Implementations must be picklable (they ship to Ray tasks). A whole cache split trains as a `SplitStream`
    instead (the full-data baseline): its epochs stream, shuffled within a bounded buffer.
    """

    def __call__(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]: ...


class TestSplit(Protocol):
    """What evaluation tests on: a `SplitStream` of the cache's test split, or a `ClipSet` in memory."""

    classes: list[str]
    clip_shape: tuple[int, int, int, int]  # (T, H, W, 3)

    def in_order(self, batch_size: int) -> Iterator[Batch]: ...


TrainSource = EpochSource | SplitStream


@dataclass(frozen=True, eq=False)
class TensorSource:
    """A fixed set of clips (pixel baselines, coresets, the full training split): the same tensors every epoch."""

    videos: torch.Tensor
    labels: torch.Tensor

    def __call__(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return self.videos, self.labels


def eval_seeds(run_seed: int, count: int) -> list[int]:
    """`count` independent network seeds derived from the run seed (recorded with every result)."""
    return [int(s) for s in np.random.SeedSequence([run_seed, EVAL_SEED_STREAM]).generate_state(count)]


def lr_decay_epoch(epochs: int) -> int:
    """Index of the epoch after which the lr drops x0.1: the paper's `Epoch // 2 + 1` with Epoch = epochs - 1.

    For the paper's 501 epochs (0..500) that is 251; runs of 3 epochs or fewer never train at the lower rate.
    """
    return (epochs - 1) // 2 + 1


def train_and_test(
    source: TrainSource,
    test_set: TestSplit,
    *,
    model_name: str,
    num_classes: int,
    frames: int,
    size: int,
    model_cfg: ModelConfig,
    eval_cfg: EvaluateConfig,
    train_cfg: TrainConfig,
    lr: float,
    seed: int,
    device: torch.device | str,
) -> dict[str, Any]:
    """Train one fresh network on `source` for `eval_cfg.epochs`, then test it once.

    `seed` fixes everything random in the run: initial weights, dropout masks, shuffling, the epoch
    source's draws and test-time flips (the global RNG is forked, so callers are unaffected).

    Returns `top1`, `top5` (last epoch), `seed`, `epochs`, `seconds`, and the last epoch's `train_loss`/`train_acc`.
    """
    start = time.perf_counter()
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # dropout draws from the global RNG: seed it for this run only, restored on exit
        result = _train_then_test(source, test_set, build_model(model_name, num_classes, frames, size, model_cfg)
                                  .to(device), eval_cfg, train_cfg, lr, seed, device)
    return {**result, "seed": seed, "epochs": eval_cfg.epochs, "seconds": time.perf_counter() - start}


def _epoch_batches(source: TrainSource, epoch: int, seed: int, batch_size: int, generator: torch.Generator
                   ) -> Iterable[Batch]:
    """One epoch of training batches: streamed from the cache in an order drawn from (seed, epoch), or the set the
    source hands out this epoch, shuffled by `generator`."""
    if isinstance(source, SplitStream):
        return source.epoch(seed, epoch, batch_size)
    with torch.no_grad():
        videos, labels = source(generator)
    return shuffled(videos.detach(), labels, batch_size, generator)


def _train_then_test(source: TrainSource, test_set: TestSplit, model: torch.nn.Module, eval_cfg: EvaluateConfig,
                     train_cfg: TrainConfig, lr: float, seed: int, device: torch.device) -> dict[str, float]:
    generator = torch.Generator().manual_seed(seed)
    augment = ClipAugment() if train_cfg.augment else None

    def sgd(rate: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=rate, momentum=eval_cfg.momentum,
                               weight_decay=eval_cfg.weight_decay)

    optimizer = sgd(lr)
    decay_after = lr_decay_epoch(eval_cfg.epochs)
    stats: dict[str, float] = {}
    for epoch in range(eval_cfg.epochs):
        batches = _epoch_batches(source, epoch, seed, eval_cfg.batch_size, generator)
        stats = train_batches(model, batches, optimizer, device=device, generator=generator,
                              standardize=train_cfg.standardize, augment=augment)
        if not math.isfinite(stats["loss"]):  # a diverged network scores nothing: report it, never a number
            return {"top1": None, "top5": None, "train_loss": stats["loss"], "train_acc": stats["acc"],
                    "failed": f"training loss {stats['loss']} in epoch {epoch + 1}/{eval_cfg.epochs} at lr {lr:g}; "
                              "lower evaluate.lr"}
        if epoch == decay_after:
            optimizer = sgd(lr * 0.1)  # a NEW optimizer (momentum reset), as the paper's code does
    # Every test batch is scored `test_passes` times in a row (its own flips each time): one read of the split.
    passes = (batch for batch in test_set.in_order(eval_cfg.batch_size) for _ in range(eval_cfg.test_passes))
    scores = accuracy(model, passes, device=device, flip=eval_cfg.test_flip,
                      generator=torch.Generator().manual_seed(seed), standardize=train_cfg.standardize)
    return {**scores, "train_loss": stats["loss"], "train_acc": stats["acc"]}


def _train_and_test_task(source: TrainSource, test_set: TestSplit, device_name: str, **kwargs: Any) -> dict[str, Any]:
    """Ray task body: resolve the device where the task runs (Ray sets the visible GPUs)."""
    return train_and_test(source, test_set, device=resolve_device(device_name), **kwargs)


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± population std over seeds; any diverged run makes the whole row failed (None), never a number."""
    failed = sum(1 for r in runs if r.get("failed"))
    if failed:
        return {"top1_mean": None, "top1_std": None, "top5_mean": None, "top5_std": None, "failed": failed,
                "runs": runs}
    top1 = np.array([r["top1"] for r in runs])
    top5 = np.array([r["top5"] for r in runs])
    return {"top1_mean": float(top1.mean()), "top1_std": float(top1.std()),
            "top5_mean": float(top5.mean()), "top5_std": float(top5.std()), "failed": 0, "runs": runs}


@dataclass
class PendingEvaluation:
    """Evaluation tasks in flight (one list of seeds per model); `result()` waits and aggregates."""

    refs: dict[str, list[Any]]
    storage_mb: float | None
    clips: int | None
    lr: float
    epochs: int

    def result(self) -> dict[str, Any]:
        import ray

        return {"storage_mb": self.storage_mb, "clips": self.clips, "lr": self.lr, "epochs": self.epochs,
                "models": {name: _summary(ray.get(refs)) for name, refs in self.refs.items()}}


def launch_evaluation(
    source: TrainSource | tuple[torch.Tensor, torch.Tensor] | list[TrainSource],
    test_set: TestSplit,
    cfg: Config,
    *,
    storage_mb: float | None = None,
    clips: int | None = None,
    lr: float | None = None,
    models: list[str] | None = None,
    epochs: int | None = None,
) -> PendingEvaluation:
    """Submit `cfg.evaluate.num_eval` seeds x each model in `models` (default `cfg.evaluate.models`) as Ray
    tasks and return at once, so evaluation stays off the distillation's critical path (METHOD.md W-17d).

    `source` is an EpochSource, a `(videos, labels)` pair or a `SplitStream` (the full-data baseline, streamed by
    every task), or a list of sources handed to the networks in turn (one random draw per network); `test_set` a
    `SplitStream` (or a small `ClipSet`); `lr` overrides `cfg.evaluate.lr` (e.g. a
    learned synthetic lr); `epochs` overrides `cfg.evaluate.epochs` (e.g. the full-data baseline).
    Source and test split go to the object store once per launch (a stream travels as its list of row groups).
    """
    import ray

    if isinstance(source, tuple):
        source = TensorSource(*source)
    ev = cfg.evaluate if epochs is None else cfg.evaluate.model_copy(update={"epochs": epochs})
    rate = ev.lr if lr is None else lr
    frames, size = test_set.clip_shape[0], test_set.clip_shape[1]
    task = ray.remote(_train_and_test_task).options(num_cpus=ev.cpus_per_task, num_gpus=ev.gpus_per_task)
    sources = source if isinstance(source, list) else [source]
    source_refs, test_ref = [ray.put(s) for s in sources], ray.put(test_set)
    refs = {
        name: [task.remote(source_refs[i % len(sources)], test_ref, cfg.run.device, model_name=name,
                           num_classes=len(test_set.classes),
                           frames=frames, size=size, model_cfg=cfg.model, eval_cfg=ev, train_cfg=cfg.train,
                           lr=rate, seed=seed)
               for i, seed in enumerate(eval_seeds(cfg.run.seed, ev.num_eval))]
        for name in (models or ev.models)
    }
    return PendingEvaluation(refs, storage_mb, clips, rate, ev.epochs)


def evaluate_set(
    source: TrainSource | tuple[torch.Tensor, torch.Tensor] | list[TrainSource],
    test_set: TestSplit,
    cfg: Config,
    *,
    storage_mb: float | None = None,
    clips: int | None = None,
    lr: float | None = None,
    models: list[str] | None = None,
    epochs: int | None = None,
) -> dict[str, Any]:
    """`launch_evaluation(...).result()`: `{"storage_mb", "clips", "lr", "epochs", "models": {name: {top1_mean,
    top1_std, top5_mean, top5_std, runs}}}`, population std over seeds."""
    return launch_evaluation(source, test_set, cfg, storage_mb=storage_mb, clips=clips, lr=lr, models=models,
                             epochs=epochs).result()


def validation_scorer(val_split: TestSplit, cfg: Config) -> Callable[[EpochSource], float]:
    """`score(source) -> top-1` on the validation split, in this process: `cfg.validation.num_nets` fresh networks
    trained `cfg.validation.epochs` epochs by the evaluation protocol (`cfg.evaluate`, one test pass, no flips).

    The networks' seeds are the same at every call, so two iterates of a set are compared on the same
    initialisations, dropout masks and batch orders: the difference between their scores is the sets' own.
    A network that diverges scores 0: a set that makes training diverge is not the better one.
    """
    ev = cfg.evaluate.model_copy(update={"epochs": cfg.validation.epochs, "test_passes": 1, "test_flip": False})
    seeds = [int(s) for s in np.random.SeedSequence([cfg.run.seed, VALIDATION_SEED_STREAM]).generate_state(
        cfg.validation.num_nets)]
    frames, size = val_split.clip_shape[0], val_split.clip_shape[1]
    device = resolve_device(cfg.run.device)

    def score(source: EpochSource) -> float:
        lr = getattr(source, "syn_lr", None) if cfg.evaluate.use_learned_lr else None
        runs = [train_and_test(source, val_split, model_name=cfg.evaluate.models[0], num_classes=len(val_split.classes),
                               frames=frames, size=size, model_cfg=cfg.model, eval_cfg=ev, train_cfg=cfg.train,
                               lr=lr or ev.lr, seed=seed, device=device) for seed in seeds]
        return float(np.mean([r["top1"] or 0.0 for r in runs]))

    return score


def format_results_table(rows: list[dict[str, Any]]) -> str:
    """Rows of `{"method", "vpc", **evaluate_set(...)}` -> a plain-text table, one line per (method, model).

    Accuracies are percentages, mean ± population std over seeds, scored after the last epoch; a row
    with diverged networks reads `failed (k/N diverged)`. A distilled set's row also shows its validation
    top-1 at iteration 0 and at the iterate it kept (`validation`, from its stage).
    """
    header = ("method", "vpc", "model", "storage MB", "clips", "top-1 %", "top-5 %", "validation: start -> kept")
    lines = [header]
    for row in rows:
        mb = "?" if row["storage_mb"] is None else f"{row['storage_mb']:.2f}"
        v = row.get("validation") or {}
        kept = (f"{100 * v['initial']:.1f} -> {100 * v['best']:.1f} (it {v['best_iteration']})"
                if v.get("initial") is not None else "")
        for model, s in row["models"].items():
            if s.get("failed"):
                cells = (f"failed ({s['failed']}/{len(s['runs'])} diverged)", "-")
            else:
                cells = (f"{100 * s['top1_mean']:.1f} ± {100 * s['top1_std']:.1f}",
                         f"{100 * s['top5_mean']:.1f} ± {100 * s['top5_std']:.1f}")
            lines.append((str(row["method"]), str(row["vpc"]), model, mb, str(row["clips"]), *cells, kept))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [" | ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in lines]
    text.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(text)
