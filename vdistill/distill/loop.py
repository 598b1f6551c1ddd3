"""The one distillation loop: a synthetic set, a `Recipe` (objective, optimisers, schedule), resumable from one state.

The static stage, the dynamic stage and the pixel baselines differ only in their set and their recipe (built from
their config sections by `Recipe.static`, `Recipe.dynamic`, `Recipe.pixels`; optimisers per METHOD.md 5.1 / 7).
`distill` steps, clamps the learned lr, reports metrics, calls back for evaluation and hands out a checkpoint
`state` that resumes the run exactly (synthetic tensors, optimiser states, the generator state, the expert
cursor). All randomness comes from the CPU `torch.Generator` passed in; device tensors are created from the
indices it draws.
"""
from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import nn

from vdistill.config import BaselinesConfig, DynamicConfig, ModelConfig, StaticConfig, ValidationConfig
from vdistill.data.pixels import to_model_input
from vdistill.distill.objectives import MTT_MODES, Shard, dc_class_loss, dm_loss, mtt_plan, random_network
from vdistill.distill.synset import RealSampler, S2DSet, draw_seed, random_real_frames, substream
from vdistill.errors import UserError
from vdistill.models import build_model, seeded

# `snapshot(expert_id, epoch) -> (P,)` flat expert parameters (TrajectoryReader.snapshot behind an id).
SnapshotReader = Callable[[int, int], torch.Tensor]
OnCheckpoint = Callable[[dict[str, Any]], None]
OnMetrics = Callable[[int, dict[str, float]], None]
# `on_eval(iteration, source)`: `source` is a picklable snapshot of the set (an `evaluate.EpochSource`).
OnEval = Callable[[int, Callable], None]


class SyntheticSet(Protocol):
    """What the engine needs from S2DSet / PixelSet."""

    syn_lr: torch.Tensor

    def materialize(self, slots: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]: ...
    def all_videos(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]: ...
    def class_videos(self, c: int, generator: torch.Generator) -> torch.Tensor: ...
    def leaves(self) -> list[torch.Tensor]: ...
    def state_tensors(self) -> dict[str, torch.Tensor]: ...
    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None: ...
    def source(self) -> Callable: ...


@dataclass
class ExpertCursor:
    """A shuffled pass over *all* experts, reshuffled each pass (the original reads only its first file,
    METHOD.md W-1)."""

    expert_ids: list[int]
    order: list[int] = field(default_factory=list)
    position: int = 0

    def next(self, generator: torch.Generator) -> int:
        if not self.expert_ids:
            raise ValueError("MTT needs at least one expert trajectory; run the experts stage first")
        if self.position >= len(self.order):
            self.order = [self.expert_ids[i] for i in torch.randperm(len(self.expert_ids), generator=generator)]
            self.position = 0
        self.position += 1
        return self.order[self.position - 1]

    def state(self) -> dict[str, Any]:
        return {"expert_ids": list(self.expert_ids), "order": list(self.order), "position": self.position}


LossFn = Callable[[torch.Generator, ExpertCursor], torch.Tensor]


class Diverged(UserError, FloatingPointError):
    """A distillation stage met a non-finite loss, synthetic tensor or expert; the message names the key to lower."""


# `objective(net, c, real_c, syn_c) -> loss`: how one fresh random network compares the two sides of class c.
PerClassObjective = Callable[[nn.Module, int, torch.Tensor, torch.Tensor], torch.Tensor]
PER_CLASS_OBJECTIVES: dict[str, PerClassObjective] = {
    "dm": lambda net, c, real, syn: dm_loss(net.embed, [real], [syn]),
    "dc": dc_class_loss,
}


def _per_class_loss_fn(objective: PerClassObjective, synset: SyntheticSet,
                       real_batch: Callable[[int, torch.Generator], torch.Tensor], build_net: Callable[[], nn.Module],
                       classes: Sequence[int], dtype: torch.dtype, device: torch.device, shard: Shard | None = None
                       ) -> LossFn:
    """DM / DC: a fresh random network per iteration, every synthetic item of `classes` vs a real batch per class;
    with `shard` (`classes` being this worker's), the loss and gradients then summed over the workers.

    The loss is a sum over classes, so its gradient is accumulated class by class: peak memory holds one
    class's real batch and graph, whatever the number of classes (400 for Kinetics). An iteration takes one
    seed from the loop's generator: it seeds the network, and each class draws its real batch and its items'
    stills from its own substream of it, so a class's term is the same whichever other classes are computed
    with it: the gradients of disjoint blocks of classes add up to the whole loss's.
    """

    def loss_fn(generator: torch.Generator, cursor: ExpertCursor) -> torch.Tensor:
        seed = draw_seed(generator)
        net = random_network(build_net, seed, device, dtype)
        total = torch.zeros((), device=device)
        for c in classes:
            draws = substream(seed, c)
            loss = objective(net, c, real_batch(c, draws).to(dtype), synset.class_videos(c, draws))
            loss.backward()
            total += loss.detach()
        return total if shard is None else _sum_over_workers(total, synset.leaves(), shard)

    return loss_fn


def _mtt_loss_fn(synset: SyntheticSet, num_items: int, batch: int, snapshot: SnapshotReader,
                 build_student: Callable[[], nn.Module], mtt: DynamicConfig, dtype: torch.dtype, device: torch.device,
                 shard: Shard | None) -> LossFn:
    """MTT: next expert from the cursor, random start epoch in [0, max_start_epoch), `syn_steps` student steps of
    `batch` of the `num_items` synthetic videos (with `shard`, this worker's rows of each step's batch)."""
    objective = MTT_MODES[mtt.mtt_mode]
    # Only the architecture matters (weights come from the flat vectors); seeded so the global RNG is not consumed.
    student = seeded(0, build_student).to(device=device, dtype=dtype).train()

    def loss_fn(generator: torch.Generator, cursor: ExpertCursor) -> torch.Tensor:
        expert = cursor.next(generator)
        start_epoch = int(torch.randint(mtt.max_start_epoch, (1,), generator=generator))
        start = snapshot(expert, start_epoch).to(device=device, dtype=dtype)
        target = snapshot(expert, start_epoch + mtt.expert_epochs).to(device=device, dtype=dtype)
        _check_trajectory(expert, start_epoch, start_epoch + mtt.expert_epochs, start, target)
        plan = mtt_plan(num_items, mtt.syn_steps, batch, generator)
        return objective(student, start, target, synset.syn_lr, synset.materialize, plan, synset.leaves(), shard)

    return loss_fn


def _check_trajectory(expert: int, start_epoch: int, target_epoch: int, start: torch.Tensor,
                      target: torch.Tensor) -> None:
    """An expert segment MTT can match: finite, and the weights moved between the two snapshots."""
    if not (torch.isfinite(start).all() and torch.isfinite(target).all()):
        raise Diverged(
            f"expert {expert} has non-finite weights at epoch {start_epoch} or {target_epoch}: it diverged while "
            "training; retrain the experts with a lower experts.lr")
    if torch.equal(start, target):
        raise ValueError(
            f"expert {expert}: the snapshots of epochs {start_epoch} and {target_epoch} are identical, so there is "
            "no trajectory to match; the expert did not train (check experts.lr) or its file was written wrongly")



@dataclass(frozen=True)
class Recipe:
    """How one loop optimises its set: the method, the update rule and a step size per parameter group of the set
    (with the config key that sets it, named when the loop diverges or backs off), the schedule, the MTT section
    when the method matches trajectories, and the validation settings that guard the loop."""

    name: str  # "dynamic stage (dm)": how errors and logs name the loop
    method: str  # "dm", "dc" (still images only) or "mtt"
    lrs: dict[str, tuple[float, str]]  # parameter group -> (lr, config key)
    momentum: float
    iterations: int
    batch_real: int
    checkpoint_every: int
    eval_every: int = 0
    frames_only: bool = False  # the static stage matches single frames of the real clips
    mtt: DynamicConfig | None = None  # syn_steps, expert_epochs, max_start_epoch, batch_syn, mtt_mode, lr_lr, ...
    syn_lr_momentum: float = 0.9  # METHOD.md 5.1 (S2D); 0.5 for the pixel baseline (7)
    optimizer: str = "sgd"  # "adam": scale-free steps, cosine-decayed (METHOD.md 5.1a); "sgd": the paper's, constant
    validation: ValidationConfig | None = None  # scoring period and instability back-off (METHOD.md 5.9)

    @classmethod
    def static(cls, static: StaticConfig, dynamic: DynamicConfig,
               validation: ValidationConfig | None = None) -> "Recipe":
        """Stage 1 (METHOD.md 4): `static.optimizer` on the images; MTT reads `dynamic`'s trajectory settings,
        checkpoints follow `dynamic.checkpoint_every`."""
        if static.method not in ("dm", "dc", "mtt"):
            raise ValueError(f"static.method must be 'dm', 'dc' or 'mtt' (got {static.method!r})")
        return cls(f"static stage ({static.method})", static.method, {"pixels": (static.lr, "static.lr")},
                   static.momentum, static.iterations, static.batch_real, dynamic.checkpoint_every,
                   frames_only=True, mtt=dynamic if static.method == "mtt" else None, optimizer=static.optimizer,
                   validation=validation)

    @classmethod
    def dynamic(cls, dynamic: DynamicConfig, validation: ValidationConfig | None = None) -> "Recipe":
        """Stage 2 (METHOD.md 5.1): `dynamic.optimizer` on the dynamic memory, the integrator and, with
        `train_static`, the static memory."""
        lrs = {"dynamic": (dynamic.lr_dynamic, "dynamic.lr_dynamic"),
               "integrator": (dynamic.lr_integrator, "dynamic.lr_integrator")}
        if dynamic.train_static:
            lrs["static"] = (dynamic.lr_static, "dynamic.lr_static")
        return cls(f"dynamic stage ({dynamic.method})", dynamic.method, lrs, dynamic.momentum, dynamic.iterations,
                   dynamic.batch_real, dynamic.checkpoint_every, dynamic.eval_every,
                   mtt=dynamic if dynamic.method == "mtt" else None, optimizer=dynamic.optimizer,
                   validation=validation)

    @classmethod
    def pixels(cls, method: str, baselines: BaselinesConfig, dynamic: DynamicConfig,
               validation: ValidationConfig | None = None) -> "Recipe":
        """DM / MTT on raw pixels (METHOD.md 7): `baselines.pixel_optimizer` on the videos (sgd: momentum 0.5),
        MTT's lr with momentum 0.5; `dynamic` supplies batch_real, the MTT knobs and the checkpoint / evaluation
        periods."""
        if method not in ("dm", "mtt"):
            raise ValueError(f"baselines.pixel_methods entries must be 'dm' or 'mtt' (got {method!r})")
        key = f"baselines.pixel_lr_{method}"
        return cls(f"pixel baseline ({method})", method, {"pixels": (getattr(baselines, f"pixel_lr_{method}"), key)},
                   0.5, baselines.pixel_iterations, dynamic.batch_real, dynamic.checkpoint_every, dynamic.eval_every,
                   mtt=dynamic if method == "mtt" else None, syn_lr_momentum=0.5, optimizer=baselines.pixel_optimizer,
                   validation=validation)

    @property
    def learns_lr(self) -> bool:
        return self.mtt is not None and self.mtt.train_lr

    def lr_keys(self) -> str:
        keys = [key for _, key in self.lrs.values()] + (["dynamic.lr_lr"] if self.learns_lr else [])
        return " or ".join(keys)

    def step_size(self, group: str, iteration: int, scale: float) -> float:
        """The lr of `group` at `iteration`: adam decays it on a cosine to 0 over the loop, sgd keeps it; `scale`
        is what instability back-offs left of it."""
        base = self.lrs[group][0] * scale
        if self.optimizer == "sgd":
            return base
        return base * 0.5 * (1.0 + math.cos(math.pi * iteration / max(self.iterations, 1)))


def _network(synset: SyntheticSet, num_classes: int, model_cfg: ModelConfig | None) -> Callable[[], nn.Module]:
    """The architecture the objective trains: ConvNet2D for still images `(N, 3, H, W)`, else ConvNet3D."""
    if isinstance(synset, S2DSet):
        return lambda: build_model("convnet3d", num_classes, synset.frames, synset.size, model_cfg)
    videos = synset.videos
    if videos.dim() == 4:
        return lambda: build_model("convnet2d", num_classes, 1, videos.shape[-1], model_cfg)
    return lambda: build_model("convnet3d", num_classes, videos.shape[1], videos.shape[-1], model_cfg)


def _items(synset: SyntheticSet, batch_syn: int) -> tuple[int, int]:
    """(items MTT draws its student batches from, items per student step): `batch_syn` 0 is `C * vpc`, the paper's
    batch, however many clips the set stores in that budget (METHOD.md 5.2)."""
    if isinstance(synset, S2DSet):
        return synset.layout.num_items, batch_syn or synset.layout.num_classes * synset.layout.vpc
    return synset.num_slots, batch_syn or synset.num_slots


def _loss_fn(recipe: Recipe, synset: SyntheticSet, sample_real: RealSampler, build: Callable[[], nn.Module],
             num_classes: int, shard: Shard | None, snapshot: SnapshotReader | None, device: torch.device) -> LossFn:
    dtype = synset.leaves()[0].dtype
    if recipe.method == "mtt":
        if snapshot is None:
            raise ValueError("method mtt needs expert trajectories: pass `snapshot` and `expert_ids`")
        return _mtt_loss_fn(synset, *_items(synset, recipe.mtt.batch_syn), snapshot, build, recipe.mtt, dtype, device,
                            shard)
    if recipe.method not in PER_CLASS_OBJECTIVES or (recipe.method == "dc" and not recipe.frames_only):
        raise ValueError(f"{recipe.name}: unknown method {recipe.method!r}")

    def real(c: int, g: torch.Generator) -> torch.Tensor:
        if recipe.frames_only:
            return to_model_input(random_real_frames(sample_real, c, recipe.batch_real, g), device)
        return to_model_input(sample_real(c, recipe.batch_real, g), device)

    classes = range(num_classes) if shard is None else shard.classes(num_classes)
    return _per_class_loss_fn(PER_CLASS_OBJECTIVES[recipe.method], synset, real, build, classes, dtype, device, shard)


def _sum_over_workers(loss: torch.Tensor, leaves: Sequence[torch.Tensor], shard: Shard) -> torch.Tensor:
    """The workers' losses and gradients summed, in one collective on one flat buffer; -> the summed loss."""
    for leaf in leaves:
        if leaf.grad is None:  # a worker whose classes do not reach a leaf still takes part in the sum
            leaf.grad = torch.zeros_like(leaf)
    tensors = [loss.reshape(1), *(leaf.grad.reshape(-1) for leaf in leaves)]
    flat = torch.cat(tensors)
    shard.all_reduce(flat)
    for leaf, part in zip(leaves, flat[1:].split([leaf.numel() for leaf in leaves])):
        leaf.grad.copy_(part.view_as(leaf))
    return flat[0]


# `validate(source) -> top-1` of a frozen snapshot of the set on the validation split (the same network seeds at
# every call, so two iterates are compared on equal terms).
Validate = Callable[[Callable], float]


@dataclass
class ValidationRecord:
    """What the validation guard knows of a loop: its score at the start, the best iterate (exported), every
    score and every back-off. Travels in the checkpoint, so a resumed loop keeps the best iterate found so far."""

    initial: float | None = None
    best: float | None = None
    best_iteration: int = 0
    scores: list[list[float]] = field(default_factory=list)  # [iteration, top-1]
    backoffs: list[dict[str, Any]] = field(default_factory=list)  # {"iteration", "reason", "reloaded", "scale"}
    lr_scale: float = 1.0
    stopped_early: str = ""  # why the loop ended before its last iteration (instability it could not back off)

    @property
    def improved(self) -> bool:
        return self.best is not None and self.initial is not None and self.best > self.initial

    def to_dict(self) -> dict[str, Any]:
        return {"initial": self.initial, "best": self.best, "best_iteration": self.best_iteration,
                "scores": [list(s) for s in self.scores], "backoffs": [dict(b) for b in self.backoffs],
                "lr_scale": self.lr_scale,
                "stopped_early": self.stopped_early, "improved": self.improved}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ValidationRecord":
        return cls(d["initial"], d["best"], d["best_iteration"], [list(x) for x in d["scores"]],
                   list(d["backoffs"]), d["lr_scale"], d["stopped_early"])


class _Instability:
    """The back-off rule (METHOD.md 5.9): the median loss of the last `window` iterations above the median of the
    first `window` since the loop (re)started by more than noise, or a learned lr at its floor for `window`
    iterations in a row.

    DM draws a fresh random network and MTT a fresh expert segment every iteration, so one iteration's loss
    scatters by tens of percent and the rule is checked at every iteration: a fixed 5% margin fired on noise
    (pixel DM backed off at step sizes of 0.0009). A rise must exceed `SIGNIFICANCE` standard errors of the
    difference of two window medians, the scatter estimated robustly from the first window (its MAD).
    """

    RISE = 1.05  # never call less than 5% a rise
    SIGNIFICANCE = 3.0  # standard errors of the difference of two medians of `window` losses

    def __init__(self, window: int) -> None:
        self.window = window
        self.first: list[float] = []
        self.recent: list[float] = []
        self.pinned = 0

    def threshold(self) -> float:
        """The median of the last `window` losses above which the loss has risen."""
        start = statistics.median(self.first)
        sigma = 1.4826 * statistics.median(abs(x - start) for x in self.first)  # one loss's scatter, robustly
        se_diff = math.sqrt(2.0) * 1.2533 * sigma / math.sqrt(self.window)  # two medians of `window` losses
        return max(self.RISE * start, start + self.SIGNIFICANCE * se_diff)

    def observe(self, loss: float, lr_pinned: bool) -> str:
        """'' while stable, else why not."""
        if len(self.first) < self.window:
            self.first.append(loss)
        self.recent = (self.recent + [loss])[-self.window:]
        self.pinned = self.pinned + 1 if lr_pinned else 0
        if self.pinned >= self.window:
            return f"the learned lr sat at its floor (dynamic.min_syn_lr) for {self.pinned} iterations"
        if len(self.first) == self.window and len(self.recent) == self.window:
            start, now = statistics.median(self.first), statistics.median(self.recent)
            if now > self.threshold():
                return f"the matching loss rose from {start:.4g} to {now:.4g} (medians of {self.window} iterations)"
        return ""


def _optimizers(synset: SyntheticSet, recipe: Recipe, iteration: int, scale: float) -> dict[str, torch.optim.Optimizer]:
    """Fresh optimisers for the set's parameter groups (and the learned lr), at the schedule's step sizes."""
    def make(group: str, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        lr = recipe.step_size(group, iteration, scale)
        if recipe.optimizer == "adam":
            return torch.optim.Adam(params, lr=lr)
        return torch.optim.SGD(params, lr=lr, momentum=recipe.momentum)

    optimizers = {group: make(group, params) for group, params in synset.trainable().items()}
    if recipe.learns_lr:
        optimizers["syn_lr"] = torch.optim.SGD([synset.syn_lr], lr=recipe.mtt.lr_lr * scale,
                                               momentum=recipe.syn_lr_momentum)
    return optimizers


def distill(synset: SyntheticSet, recipe: Recipe, sample_real: RealSampler, generator: torch.Generator,
            device: torch.device | str, *, num_classes: int, model_cfg: ModelConfig | None = None,
            snapshot: SnapshotReader | None = None, expert_ids: Sequence[int] = (), state: dict | None = None,
            on_checkpoint: OnCheckpoint | None = None, on_metrics: OnMetrics | None = None,
            on_eval: OnEval | None = None, validate: Validate | None = None, shard: Shard | None = None,
            log: Callable[[str], None] = print) -> ValidationRecord:
    """Optimise `synset` in place by `recipe`; resumes from `state` (a checkpoint handed to `on_checkpoint`).

    Per iteration: zero grads, the objective's loss (DM / DC: a fresh random network, every synthetic item vs a
    real batch per class; MTT: the next expert, a random start epoch, `syn_steps` student steps), step, clamp the
    learned lr to `>= min_syn_lr`, report. `on_eval(n, source)` fires after every `eval_every` completed
    iterations and after the last one, before that iteration's checkpoint.

    With `validate` and `recipe.validation`, the set is scored at iteration 0, every `validation.every`
    iterations and after the last, and the loop ends holding its BEST iterate, which may be its start; an
    unstable loop (`_Instability`, or a non-finite loss or set) reloads the best iterate with smaller steps, at
    most `validation.backoffs` times; after that a non-finite loop stops, an unstable one goes on. Without them, a non-finite loss or synthetic tensor stops the
    loop with `Diverged` naming the loop, the iteration and the config keys to lower, before anything non-finite
    can be checkpointed or exported. Returns the validation record (empty without validation).

    With `shard`, this is one of several workers running the loop in lock-step: DM / DC compute the terms of the
    worker's classes, MTT its rows of every student step's batch, and the loss and gradients are summed over the
    workers before every step (`Shard`), so every worker holds the same set; `validate` must then return the same
    score on every worker.
    """
    device = torch.device(device)
    guard = recipe.validation if validate is not None else None
    if recipe.mtt is not None:
        synset.syn_lr.requires_grad_(recipe.mtt.train_lr)
    loss_fn = _loss_fn(recipe, synset, sample_real, _network(synset, num_classes, model_cfg), num_classes, shard,
                       snapshot, device)
    cursor = ExpertCursor(list(expert_ids))
    record, best_tensors, start = ValidationRecord(), synset.state_tensors(), 0
    optimizers = _optimizers(synset, recipe, 0, 1.0)
    if state is not None:
        synset.load_state_tensors(state["tensors"])
        if "validation" in state:
            record, best_tensors = ValidationRecord.from_dict(state["validation"]), state["best_tensors"]
        optimizers = _optimizers(synset, recipe, state["iteration"], record.lr_scale)
        for name, opt in optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        generator.set_state(state["generator"])
        cursor.order, cursor.position = list(state["cursor"]["order"]), state["cursor"]["position"]
        start = state["iteration"]

    def score(iteration: int) -> None:
        nonlocal best_tensors
        value = validate(synset.source())
        record.scores.append([iteration, value])
        if record.initial is None:
            record.initial = value
        if record.best is None or value > record.best:
            record.best, record.best_iteration, best_tensors = value, iteration, synset.state_tensors()

    def checkpoint(iteration: int) -> dict[str, Any]:
        out = {"iteration": iteration, "tensors": synset.state_tensors(),
               "optimizers": {name: copy.deepcopy(opt.state_dict()) for name, opt in optimizers.items()},
               "generator": generator.get_state(), "cursor": cursor.state()}
        if guard is not None:
            out.update(validation=record.to_dict(), best_tensors=best_tensors)
        return out

    def back_off(it: int, reason: str, broken: bool) -> bool:
        """Reload the best iterate with smaller steps; once the back-offs are spent, a broken (non-finite) loop stops
        (False) and an unstable one goes on unwatched, keeping its best iterate either way."""
        nonlocal optimizers, watch
        if len(record.backoffs) >= guard.backoffs:
            if not broken:
                log(f"[{recipe.name}] {reason} at iteration {it} after {len(record.backoffs)} back-off(s): going on; "
                    f"the stage keeps its best iterate. Lower {recipe.lr_keys()}")
                watch = None
                return True
            record.stopped_early = f"{reason} at iteration {it} after {len(record.backoffs)} back-off(s)"
            log(f"[{recipe.name}] {record.stopped_early}: stopping; the set is its best iterate ({record.best_iteration})"
                f". Lower {recipe.lr_keys()}")
            return False
        record.lr_scale *= guard.backoff_factor
        record.backoffs.append({"iteration": it, "reason": reason, "reloaded": record.best_iteration,
                                "scale": record.lr_scale})
        synset.load_state_tensors(best_tensors)
        optimizers, watch = _optimizers(synset, recipe, it, record.lr_scale), _Instability(guard.window)
        log(f"[{recipe.name}] back-off {len(record.backoffs)}/{guard.backoffs} at iteration {it}: {reason}; reloaded "
            f"iteration {record.best_iteration}, steps x{record.lr_scale:.3g}. To make it permanent lower "
            f"{recipe.lr_keys()}")
        return True

    if guard is not None and not record.scores:
        score(start)
    watch = _Instability(guard.window) if guard is not None else None
    for it in range(start, recipe.iterations):
        tic = time.perf_counter()
        for group, opt in optimizers.items():
            for param_group in opt.param_groups:
                if group != "syn_lr":
                    param_group["lr"] = recipe.step_size(group, it, record.lr_scale)
            opt.zero_grad(set_to_none=True)
        loss = loss_fn(generator, cursor)  # with a shard, already summed over the workers
        finite = bool(torch.isfinite(loss))
        if finite:
            for opt in optimizers.values():
                opt.step()
        broken = "" if finite else f"the distillation loss became {loss.item()}"
        if finite and not all(bool(torch.isfinite(t).all()) for t in synset.leaves()):
            broken = f"the synthetic set became non-finite (loss {loss.item():.4g})"
        if broken and guard is None:
            raise Diverged(f"{recipe.name}: {broken} at iteration {it}; lower {recipe.lr_keys()}")
        if recipe.learns_lr and not broken:
            with torch.no_grad():
                synset.syn_lr.clamp_(min=recipe.mtt.min_syn_lr)
        if on_metrics is not None:
            on_metrics(it, {"loss": float(loss), "syn_lr": float(synset.syn_lr.detach()),
                            "seconds": time.perf_counter() - tic})
        if guard is not None and (broken or watch is not None):
            pinned = recipe.learns_lr and float(synset.syn_lr.detach()) <= recipe.mtt.min_syn_lr * (1 + 1e-6)  # fp32 floor
            reason = broken or watch.observe(float(loss), pinned)
            if reason and not back_off(it + 1, reason, bool(broken)):
                break
        done = it + 1
        if guard is not None and (done == recipe.iterations or (guard.every and done % guard.every == 0)):
            score(done)
        if on_eval is not None and (done == recipe.iterations or (recipe.eval_every and done % recipe.eval_every == 0)):
            on_eval(done, synset.source())
        if on_checkpoint is not None and (done == recipe.iterations or done % recipe.checkpoint_every == 0):
            on_checkpoint(checkpoint(done))
    if on_eval is not None and start == recipe.iterations == 0:
        on_eval(0, synset.source())
    if guard is not None:
        synset.load_state_tensors(best_tensors)  # the loop hands back its best iterate
    return record


__all__ = ["Diverged", "ExpertCursor", "Recipe", "Shard", "SnapshotReader", "Validate", "ValidationRecord", "distill"]
