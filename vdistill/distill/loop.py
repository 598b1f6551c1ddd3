"""The distillation loops (static stage, dynamic stage, pixel baselines), resumable from one state dict.

Each loop is one recipe over a synthetic set: a loss function (DM, DC or MTT, picked by name), the optimisers of
method.md 5.1 / 7, and a shared iteration engine that reports metrics, calls back for evaluation, and hands out a
checkpoint `state` that resumes the run exactly (synthetic tensors, optimiser states, the generator state, the
expert cursor, the coordinator's best metrics). All randomness comes from one CPU `torch.Generator` seeded with
`seed`; device tensors are created from the indices it draws.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import nn

from vdistill.data.pixels import to_model_input
from vdistill.errors import UserError
from vdistill.distill.objectives import MTT_MODES, dc_loss, dm_loss, mtt_plan, random_network
from vdistill.distill.synset import (PixelSet, RealSampler, S2DSet, SlotLayout, draw_seed, init_static_memory,
                                     random_real_frames)
from vdistill.models import build_model, seeded

# `snapshot(expert_id, epoch) -> (P,)` flat expert parameters (TrajectoryReader.snapshot behind an id).
SnapshotReader = Callable[[int, int], torch.Tensor]
OnCheckpoint = Callable[[dict[str, Any]], None]
OnMetrics = Callable[[int, dict[str, float]], None]
# `on_eval(iteration, source)`; may return the coordinator's best-so-far metrics, kept in the checkpoint state.
OnEval = Callable[[int, Callable], "dict | None"]


class SyntheticSet(Protocol):
    """What the engine needs from S2DSet / PixelSet."""

    syn_lr: torch.Tensor

    def materialize(self, slots: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]: ...
    def all_videos(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]: ...
    def leaves(self) -> list[torch.Tensor]: ...
    def state_tensors(self) -> dict[str, torch.Tensor]: ...
    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None: ...
    def source(self) -> Callable: ...


@dataclass(frozen=True)
class MttSettings:
    """Trajectory-matching knobs shared by every stage that uses MTT (method.md 5.5, 7)."""

    syn_steps: int = 10
    expert_epochs: int = 1
    max_start_epoch: int = 10
    batch_syn: int = 0
    mode: str = "constant"
    train_lr: bool = True
    lr_lr: float = 1e-5
    lr_momentum: float = 0.9
    min_syn_lr: float = 1e-3

    @classmethod
    def from_config(cls, dynamic_cfg, lr_momentum: float = 0.9) -> "MttSettings":
        """From a DynamicConfig; `lr_momentum` is 0.9 for S2D (5.1) and 0.5 for the pixel baseline (7)."""
        d = dynamic_cfg
        return cls(d.syn_steps, d.expert_epochs, d.max_start_epoch, d.batch_syn, d.mtt_mode, d.train_lr, d.lr_lr,
                   lr_momentum, d.min_syn_lr)


@dataclass
class ExpertCursor:
    """A shuffled pass over *all* experts, reshuffled each pass (the original reads only its first file, W-1)."""

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


# `objective(net, real_by_class, syn_by_class) -> loss`: how one fresh random network compares the two sides.
PerClassObjective = Callable[[nn.Module, list[torch.Tensor], list[torch.Tensor]], torch.Tensor]
PER_CLASS_OBJECTIVES: dict[str, PerClassObjective] = {
    "dm": lambda net, real, syn: dm_loss(net.embed, real, syn),
    "dc": dc_loss,
}


def _per_class_loss_fn(objective: PerClassObjective, synset: SyntheticSet,
                       real_batch: Callable[[int, torch.Generator], torch.Tensor], build_net: Callable[[], nn.Module],
                       num_classes: int, dtype: torch.dtype, device: torch.device) -> LossFn:
    """DM / DC: a fresh random network per iteration, every synthetic item vs a real batch per class."""

    def loss_fn(generator: torch.Generator, cursor: ExpertCursor) -> torch.Tensor:
        net = random_network(build_net, draw_seed(generator), device, dtype)
        videos, labels = synset.all_videos(generator)
        real = [real_batch(c, generator).to(dtype) for c in range(num_classes)]
        loss = objective(net, real, [videos[labels == c] for c in range(num_classes)])
        loss.backward()
        return loss.detach()

    return loss_fn


def _mtt_loss_fn(synset: SyntheticSet, num_items: int, snapshot: SnapshotReader, build_student: Callable[[], nn.Module],
                 mtt: MttSettings, dtype: torch.dtype, device: torch.device) -> LossFn:
    """MTT: next expert from the cursor, random start epoch in [0, max_start_epoch), `syn_steps` student steps."""
    if mtt.mode not in MTT_MODES:
        raise ValueError(f"dynamic.mtt_mode must be one of {sorted(MTT_MODES)} (got {mtt.mode!r})")
    objective = MTT_MODES[mtt.mode]
    # Only the architecture matters (weights come from the flat vectors); seeded so the global RNG is not consumed.
    student = seeded(0, build_student).to(device=device, dtype=dtype).train()

    def loss_fn(generator: torch.Generator, cursor: ExpertCursor) -> torch.Tensor:
        expert = cursor.next(generator)
        start_epoch = int(torch.randint(mtt.max_start_epoch, (1,), generator=generator))
        start = snapshot(expert, start_epoch).to(device=device, dtype=dtype)
        target = snapshot(expert, start_epoch + mtt.expert_epochs).to(device=device, dtype=dtype)
        _check_trajectory(expert, start_epoch, start_epoch + mtt.expert_epochs, start, target)
        plan = mtt_plan(num_items, mtt.syn_steps, mtt.batch_syn, generator)
        return objective(student, start, target, synset.syn_lr, synset.materialize, plan, synset.leaves())

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


def _run_loop(synset: SyntheticSet, optimizers: dict[str, torch.optim.Optimizer], loss_fn: LossFn, *,
              name: str, lr_keys: str, iterations: int, generator: torch.Generator, cursor: ExpertCursor, min_syn_lr: float | None,
              checkpoint_every: int, eval_every: int, state: dict | None, on_checkpoint: OnCheckpoint | None,
              on_metrics: OnMetrics | None, on_eval: OnEval | None) -> None:
    """The shared engine: step, clamp syn_lr, report, evaluate, checkpoint; resumes from `state`.

    A non-finite loss or synthetic tensor stops the loop with an error naming `name`, the iteration and
    `lr_keys` (the config keys to lower), before anything non-finite can be checkpointed or exported.
    """
    start, best = 0, {}
    if state is not None:
        synset.load_state_tensors(state["tensors"])
        for name, opt in optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        generator.set_state(state["generator"])
        cursor.order, cursor.position = list(state["cursor"]["order"]), state["cursor"]["position"]
        start, best = state["iteration"], dict(state.get("best") or {})

    def snapshot_state(iteration: int) -> dict[str, Any]:
        return {"iteration": iteration, "tensors": synset.state_tensors(),
                "optimizers": {name: copy.deepcopy(opt.state_dict()) for name, opt in optimizers.items()},
                "generator": generator.get_state(), "cursor": cursor.state(), "best": dict(best)}

    def evaluate(iteration: int) -> None:
        nonlocal best
        if on_eval is not None:
            result = on_eval(iteration, synset.source())
            best = dict(result) if isinstance(result, dict) else best

    for it in range(start, iterations):
        tic = time.perf_counter()
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)
        loss = loss_fn(generator, cursor)
        if not torch.isfinite(loss):
            raise Diverged(f"{name}: the distillation loss became {loss.item()} at iteration {it}; "
                                     f"lower {lr_keys}")
        for opt in optimizers.values():
            opt.step()
        if not all(bool(torch.isfinite(t).all()) for t in synset.leaves()):
            raise Diverged(f"{name}: the synthetic set became non-finite at iteration {it} (loss "
                                     f"{loss.item():.4g}); lower {lr_keys}")
        if min_syn_lr is not None:
            with torch.no_grad():
                synset.syn_lr.clamp_(min=min_syn_lr)
        if on_metrics is not None:
            on_metrics(it, {"loss": float(loss), "syn_lr": float(synset.syn_lr.detach()),
                            "seconds": time.perf_counter() - tic})
        done = it + 1
        if done == iterations or (eval_every and done % eval_every == 0):
            evaluate(done)
        if on_checkpoint is not None and (done == iterations or done % checkpoint_every == 0):
            on_checkpoint(snapshot_state(done))
    if start == iterations == 0:
        evaluate(0)


def _sgd(params: Sequence[torch.Tensor], lr: float, momentum: float) -> torch.optim.SGD:
    return torch.optim.SGD(list(params), lr=lr, momentum=momentum)


def _mtt_lr_optimizer(synset: SyntheticSet, mtt: MttSettings) -> dict[str, torch.optim.Optimizer]:
    """The learnable `syn_lr` (when `train_lr`): its own SGD, `lr_lr`, momentum `mtt.lr_momentum`."""
    synset.syn_lr.requires_grad_(mtt.train_lr)
    return {"syn_lr": _sgd([synset.syn_lr], mtt.lr_lr, mtt.lr_momentum)} if mtt.train_lr else {}


def _video_real_batch(sample_real: RealSampler, n: int, device: torch.device
                      ) -> Callable[[int, torch.Generator], torch.Tensor]:
    return lambda c, generator: to_model_input(sample_real(c, n, generator), device)


def run_static_stage(method: str, sample_real: RealSampler, static_cfg, layout: SlotLayout, size: int,
                     device: torch.device | str, seed: int, *, model_cfg=None, snapshot: SnapshotReader | None = None,
                     expert_ids: Sequence[int] = (), mtt: MttSettings | None = None, state: dict | None = None,
                     on_checkpoint: OnCheckpoint | None = None, on_metrics: OnMetrics | None = None,
                     checkpoint_every: int = 50) -> torch.Tensor:
    """Stage 1: distil `spc` still images per class from single real frames -> static memory `(C*spc, 3, H, W)`.

    `dm` / `dc`: fresh random ConvNet2D per iteration, one random frame from each of `static_cfg.batch_real` random
    clips per class; `dc` matches per-class gradients with DC's 'ours' distance, one image step per fresh network
    (upstream DC's outer/inner loops for ipc 1 and 5 in this repo's `get_loops`; the longer schedules upstream
    uses for ipc >= 10 are not implemented).
    `mtt`: match single-frame ConvNet2D expert trajectories (`snapshot`, `expert_ids`) with `mtt` settings.
    Images are optimised with SGD(`static_cfg.lr`, `static_cfg.momentum`).
    """
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    images = init_static_memory(layout, size, static_cfg.init, generator, sample_real, device)
    synset = PixelSet(images, layout.num_classes)
    c = layout.num_classes
    build = lambda: build_model("convnet2d", c, 1, size, model_cfg)  # noqa: E731
    optimizers: dict[str, torch.optim.Optimizer] = {"static": _sgd(synset.leaves(), static_cfg.lr, static_cfg.momentum)}
    if method in PER_CLASS_OBJECTIVES:
        def real(k: int, g: torch.Generator) -> torch.Tensor:
            return to_model_input(random_real_frames(sample_real, k, static_cfg.batch_real, g), device)

        loss_fn = _per_class_loss_fn(PER_CLASS_OBJECTIVES[method], synset, real, build, c, images.dtype, device)
        min_lr = None
    elif method == "mtt":
        mtt = mtt or MttSettings()
        optimizers.update(_mtt_lr_optimizer(synset, mtt))
        loss_fn = _mtt_loss_fn(synset, synset.num_slots, _require(snapshot), build, mtt, images.dtype, device)
        min_lr = mtt.min_syn_lr if mtt.train_lr else None
    else:
        raise ValueError(f"static.method must be 'dm', 'dc' or 'mtt' (got {method!r})")
    _run_loop(synset, optimizers, loss_fn, name=f"static stage ({method})",
              lr_keys="static.lr" + (" or dynamic.lr_lr" if method == "mtt" else ""),
              iterations=static_cfg.iterations, generator=generator,
              cursor=ExpertCursor(list(expert_ids)), min_syn_lr=min_lr, checkpoint_every=checkpoint_every,
              eval_every=0, state=state, on_checkpoint=on_checkpoint, on_metrics=on_metrics, on_eval=None)
    return synset.videos.detach()


def run_dynamic_stage(method: str, synset: S2DSet, sample_real: RealSampler, dynamic_cfg, device: torch.device | str,
                      seed: int, *, model_cfg=None, snapshot: SnapshotReader | None = None,
                      expert_ids: Sequence[int] = (), state: dict | None = None,
                      on_checkpoint: OnCheckpoint | None = None, on_metrics: OnMetrics | None = None,
                      on_eval: OnEval | None = None) -> S2DSet:
    """Stage 2: optimise the dynamic memory and the integrator (and `syn_lr`, static if asked) in place.

    Optimisers per method.md 5.1: SGD(momentum `dynamic_cfg.momentum`) on dynamic (`lr_dynamic`), integrator
    (`lr_integrator`) and, with `train_static`, static (`lr_static`); with MTT and `train_lr`, SGD(`lr_lr`,
    momentum 0.9) on `syn_lr`, clamped to `>= min_syn_lr` after every step. `on_eval(n, source)` fires after every
    `eval_every` completed iterations and after the last one (before that iteration's checkpoint, so a checkpoint
    carries the best metrics the hook returned).
    """
    cfg, device = dynamic_cfg, torch.device(device)
    layout = synset.layout
    generator = torch.Generator().manual_seed(seed)
    synset.static_memory.requires_grad_(cfg.train_static)
    groups = synset.trainable()
    lrs = {"dynamic": cfg.lr_dynamic, "integrator": cfg.lr_integrator, "static": cfg.lr_static}
    optimizers: dict[str, torch.optim.Optimizer] = {
        name: _sgd(params, lrs[name], cfg.momentum) for name, params in groups.items()}
    c, size, dtype = layout.num_classes, synset.static_memory.shape[-1], synset.dynamic_memory.dtype
    build = lambda: build_model("convnet3d", c, synset.frames, size, model_cfg)  # noqa: E731
    if method == "dm":
        loss_fn = _per_class_loss_fn(PER_CLASS_OBJECTIVES["dm"], synset,
                                     _video_real_batch(sample_real, cfg.batch_real, device), build, c, dtype, device)
        min_lr = None
    elif method == "mtt":
        mtt = MttSettings.from_config(cfg)
        optimizers.update(_mtt_lr_optimizer(synset, mtt))
        loss_fn = _mtt_loss_fn(synset, layout.num_slots, _require(snapshot), build, mtt, dtype, device)
        min_lr = mtt.min_syn_lr if mtt.train_lr else None
    else:
        raise ValueError(f"dynamic.method must be 'dm' or 'mtt' (got {method!r})")
    keys = [f"dynamic.{k}" for k in ("lr_dynamic", "lr_integrator")] + (["dynamic.lr_static"] if cfg.train_static
                                                                        else [])
    keys += ["dynamic.lr_lr"] if method == "mtt" and cfg.train_lr else []
    _run_loop(synset, optimizers, loss_fn, name=f"dynamic stage ({method})", lr_keys=" or ".join(keys),
              iterations=cfg.iterations, generator=generator,
              cursor=ExpertCursor(list(expert_ids)), min_syn_lr=min_lr, checkpoint_every=cfg.checkpoint_every,
              eval_every=cfg.eval_every, state=state, on_checkpoint=on_checkpoint, on_metrics=on_metrics,
              on_eval=on_eval)
    return synset


def run_pixel_baseline(method: str, pixels: PixelSet, sample_real: RealSampler, dynamic_cfg, lr_pixels: float,
                       iterations: int, device: torch.device | str, seed: int, *, model_cfg=None,
                       snapshot: SnapshotReader | None = None, expert_ids: Sequence[int] = (),
                       state: dict | None = None, on_checkpoint: OnCheckpoint | None = None,
                       on_metrics: OnMetrics | None = None, on_eval: OnEval | None = None) -> PixelSet:
    """DM / MTT on raw pixels (method.md 7): SGD(momentum 0.5) on the videos; MTT learns `syn_lr` (momentum 0.5).

    `dynamic_cfg` supplies batch_real, the MTT knobs, checkpoint_every and eval_every; `lr_pixels` and
    `iterations` come from the baselines section (pixel_lr_dm / pixel_lr_mtt, pixel_iterations).
    """
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    frames, size = pixels.videos.shape[1], pixels.videos.shape[-1]
    c, dtype = pixels.num_classes, pixels.videos.dtype
    build = lambda: build_model("convnet3d", c, frames, size, model_cfg)  # noqa: E731
    optimizers: dict[str, torch.optim.Optimizer] = {"pixels": _sgd(pixels.leaves(), lr_pixels, 0.5)}
    if method == "dm":
        real = _video_real_batch(sample_real, dynamic_cfg.batch_real, device)
        loss_fn = _per_class_loss_fn(PER_CLASS_OBJECTIVES["dm"], pixels, real, build, c, dtype, device)
        min_lr = None
    elif method == "mtt":
        mtt = MttSettings.from_config(dynamic_cfg, lr_momentum=0.5)
        optimizers.update(_mtt_lr_optimizer(pixels, mtt))
        loss_fn = _mtt_loss_fn(pixels, pixels.num_slots, _require(snapshot), build, mtt, dtype, device)
        min_lr = mtt.min_syn_lr if mtt.train_lr else None
    else:
        raise ValueError(f"baselines.pixel_methods entries must be 'dm' or 'mtt' (got {method!r})")
    _run_loop(pixels, optimizers, loss_fn, name=f"pixel baseline ({method})", lr_keys=f"baselines.pixel_lr_{method}",
              iterations=iterations, generator=generator,
              cursor=ExpertCursor(list(expert_ids)), min_syn_lr=min_lr, checkpoint_every=dynamic_cfg.checkpoint_every,
              eval_every=dynamic_cfg.eval_every, state=state, on_checkpoint=on_checkpoint, on_metrics=on_metrics,
              on_eval=on_eval)
    return pixels


def _require(snapshot: SnapshotReader | None) -> SnapshotReader:
    if snapshot is None:
        raise ValueError("method mtt needs expert trajectories: pass `snapshot` and `expert_ids`")
    return snapshot


__all__ = ["ExpertCursor", "MttSettings", "SnapshotReader", "run_dynamic_stage", "run_pixel_baseline",
           "run_static_stage"]
