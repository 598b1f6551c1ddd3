"""The matching objectives that make a synthetic set useful: DM (embedding means), MTT (expert trajectories),
and DC (gradient matching, for still images in the static stage).

MTT comes in two exact forms. `mtt_unrolled` keeps the whole `syn_steps` graph (memory grows with the unroll;
kept for parity checks). `mtt_memory_constant` (the default, the TESLA idea) stores only the student weights per
step, then sweeps backwards recomputing one step's graph at a time and carrying the adjoint `v = dL/dθ_i` with
Hessian-vector products, so activation memory does not grow with `syn_steps`.

Both MTT functions take a `make_batch(indices, generator) -> (x, y)` closure that is differentiable in the
synthetic leaf tensors, and return the detached loss while *accumulating* `.grad` on `leaves` and on `syn_lr`
(when it requires grad), ready for the stage's optimisers.

Determinism of the recomputation: every student step gets two seeds drawn up front from the caller's generator
(`mtt_plan`). The batch seed feeds a fresh generator handed to `make_batch` (so the static/dynamic pairing is
replayed exactly); the dropout seed draws the step's dropout masks for its whole batch from a CPU generator
(`planned_dropout`), so masks are replayed exactly, on any device, without touching the global RNG.

Split over workers (`Shard`, METHOD.md 5.5a): each worker computes the student gradient of its rows of every
step's batch (`make_batch(indices, generator, rows)`: every random draw made for the whole batch, videos for the
rows only; dropout masks drawn for the whole batch and sliced) and the workers sum it at every step, so every
worker walks the same student trajectory and ends with the gradient of one worker, up to the order of sums.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vdistill.distill.synset import draw_seed, substream
from vdistill.models import flat_params, functional_forward, seeded, unflatten

EmbedFn = Callable[[torch.Tensor], torch.Tensor]
# `make_batch(indices, generator[, rows]) -> (x, y)`: the videos and labels of `indices[rows]` (all of them without
# `rows`), every random draw made for all of `indices`; `rows` is passed only when the loss is split over workers.
MakeBatch = Callable[..., tuple[torch.Tensor, torch.Tensor]]
AllReduce = Callable[[torch.Tensor], None]


@dataclass(frozen=True)
class Shard:
    """Worker `rank` of `world` running one distillation loop in lock-step with the others; `all_reduce` sums a
    tensor in place over the workers. DM / DC take a contiguous block of classes (`classes`), MTT a contiguous
    block of rows of every student step's batch (`rows`). What a worker computes depends only on its part, never
    on how the rest is split, so any number of workers makes the set of one (up to the order of sums)."""

    rank: int
    world: int
    all_reduce: AllReduce

    def classes(self, num_classes: int) -> range:
        return _block(num_classes, self.rank, self.world)

    def rows(self, n: int) -> slice:
        block = _block(n, self.rank, self.world)
        return slice(block.start, block.stop)


def _block(n: int, rank: int, world: int) -> range:
    """The `rank`-th of `world` contiguous blocks of `range(n)`, as even as they come (empty past `n`)."""
    return range(round(rank * n / world), round((rank + 1) * n / world))


def class_blocks(num_classes: int, workers: int) -> list[range]:
    """Every worker's block of classes."""
    return [_block(num_classes, rank, workers) for rank in range(workers)]


def dm_loss(embed_fn: EmbedFn, real_by_class: Sequence[torch.Tensor], syn_by_class: Sequence[torch.Tensor]
            ) -> torch.Tensor:
    """Σ_c ‖mean embed(real_c) − mean embed(syn_c)‖² (METHOD.md 5.4); the real side carries no gradient.

    Each entry is a batch of one class, `(n, T, 3, H, W)` for ConvNet3D.embed or `(n, 3, H, W)` for ConvNet2D.
    """
    if len(real_by_class) != len(syn_by_class):
        raise ValueError(f"{len(real_by_class)} real classes vs {len(syn_by_class)} synthetic classes")
    loss = torch.zeros(())
    for real, syn in zip(real_by_class, syn_by_class):
        with torch.no_grad():
            real_mean = embed_fn(real).mean(dim=0)
        diff = real_mean - embed_fn(syn).mean(dim=0)
        loss = loss.to(diff) + (diff * diff).sum()
    return loss


def gradient_distance(real_grad: dict[str, torch.Tensor], syn_grad: dict[str, torch.Tensor]) -> torch.Tensor:
    """DC's 'ours' distance: Σ over weight tensors and output channels of 1 − cos(g_real, g_syn).

    Bias and norm parameters (1-D) are ignored, as in upstream DC's `dis_metric='ours'`.
    """
    total = torch.zeros(())
    for name, gr in real_grad.items():
        if gr.dim() < 2:
            continue
        gr, gs = gr.reshape(gr.shape[0], -1), syn_grad[name].reshape(gr.shape[0], -1)
        cos = (gr * gs).sum(-1) / (gr.norm(dim=-1) * gs.norm(dim=-1) + 1e-6)
        total = total.to(cos) + (1 - cos).sum()
    return total


def dc_loss(net: nn.Module, real_by_class: Sequence[torch.Tensor], syn_by_class: Sequence[torch.Tensor]
            ) -> torch.Tensor:
    """DC gradient matching (METHOD.md 4): Σ_c distance(∇θ CE(real_c, c), ∇θ CE(syn_c, c)), real side detached.

    `net` supplies the architecture and its current weights; batches are `(n, 3, H, W)` images of class c.
    """
    loss = torch.zeros(())
    for c, (real, syn) in enumerate(zip(real_by_class, syn_by_class, strict=True)):
        term = dc_class_loss(net, c, real, syn)
        loss = loss.to(term) + term
    return loss


def dc_class_loss(net: nn.Module, c: int, real: torch.Tensor, syn: torch.Tensor) -> torch.Tensor:
    """One class's term of `dc_loss`: lets a loop take its gradient class by class."""
    theta = flat_params(net).to(next(net.parameters())).requires_grad_(True)
    real_grad = {k: v.detach() for k, v in _class_grad(net, theta, real, c, create_graph=False).items()}
    return gradient_distance(real_grad, _class_grad(net, theta, syn, c, create_graph=True))


def _class_grad(net: nn.Module, theta: torch.Tensor, x: torch.Tensor, c: int, create_graph: bool
                ) -> dict[str, torch.Tensor]:
    """∇θ CE(net(x; θ), c) per parameter name."""
    y = torch.full((x.shape[0],), c, dtype=torch.long, device=x.device)
    ce = F.cross_entropy(functional_forward(net, theta, x), y)
    (grad,) = torch.autograd.grad(ce, theta, create_graph=create_graph)
    return unflatten(net, grad)


def random_network(build: Callable[[], nn.Module], seed: int, device: torch.device | str,
                   dtype: torch.dtype = torch.float32) -> nn.Module:
    """A fresh randomly initialised network from an explicit seed, frozen, in train mode (DM's embedder)."""
    return seeded(seed, build).to(device=device, dtype=dtype).train().requires_grad_(False)


@dataclass(frozen=True)
class MttStep:
    """One student step: which synthetic items (CPU `(b,)`), and the seeds that make it replayable."""

    indices: torch.Tensor
    batch_seed: int
    dropout_seed: int


def mtt_plan(num_items: int, syn_steps: int, batch_syn: int, generator: torch.Generator) -> list[MttStep]:
    """Minibatches as in METHOD.md 5.5: chunks of a `randperm`, taken from the end, refilled when used up."""
    batch_syn = batch_syn or num_items
    plan: list[MttStep] = []
    chunks: list[torch.Tensor] = []
    for _ in range(syn_steps):
        if not chunks:
            chunks = list(torch.randperm(num_items, generator=generator).split(batch_syn))
        plan.append(MttStep(chunks.pop(), draw_seed(generator), draw_seed(generator)))
    return plan


@contextmanager
def planned_dropout(student: nn.Module, seed: int, rows: slice, total: int) -> Iterator[None]:
    """Every dropout layer of `student` applies rows `rows` of a mask drawn for a batch of `total` from `seed`
    (the k-th layer from `substream(seed, k)`, on the CPU), so a step's masks are the same on any device and for
    any split of its batch over workers, and the global RNG is not touched."""

    def hook(k: int, p: float) -> Callable:
        def apply(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
            x = args[0]
            keep = torch.rand((total, *x.shape[1:]), generator=substream(seed, k))[rows] >= p
            return x * keep.to(device=x.device, dtype=x.dtype) / (1.0 - p)
        return apply

    layers = [m for m in student.modules() if isinstance(m, nn.Dropout) and m.training and m.p > 0]
    handles = [m.register_forward_hook(hook(k, m.p)) for k, m in enumerate(layers)]
    for m in layers:
        m.eval()  # the layer passes its input through; the hook applies the planned mask
    try:
        yield
    finally:
        for m, handle in zip(layers, handles):
            handle.remove()
            m.train()


def _student_gradient(student: nn.Module, theta: torch.Tensor, make_batch: MakeBatch, step: MttStep,
                      create_graph: bool, shard: Shard | None = None) -> torch.Tensor:
    """∂CE(student(x; θ), y)/∂θ for one planned step, `(P,)`; with `create_graph` it stays differentiable.
    With `shard`, this worker's rows' share of it (the step's gradient is the sum over the workers)."""
    n = len(step.indices)
    rows = slice(0, n) if shard is None else shard.rows(n)
    generator = torch.Generator().manual_seed(step.batch_seed)
    with planned_dropout(student, step.dropout_seed, rows, n):
        x, y = make_batch(step.indices, generator) if shard is None else make_batch(step.indices, generator, rows)
        ce = F.cross_entropy(functional_forward(student, theta, x), y, reduction="sum") / n
    (grad,) = torch.autograd.grad(ce, theta, create_graph=create_graph)
    return grad


class _SumOverWorkers(torch.autograd.Function):
    """The workers' shares of a step's gradient, summed. Backward passes the gradient through: every worker holds
    the same downstream gradient, which is what each share receives."""

    @staticmethod
    def forward(ctx, share: torch.Tensor, all_reduce: AllReduce) -> torch.Tensor:
        total = share.clone()
        all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _Replicated(torch.autograd.Function):
    """θ as every worker holds it. Backward sums the workers' gradients: each worker's share of a step's gradient
    depends on θ, so ∂L/∂θ needs every share's Hessian-vector product."""

    @staticmethod
    def forward(ctx, theta: torch.Tensor, all_reduce: AllReduce) -> torch.Tensor:
        ctx.all_reduce = all_reduce
        return theta.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        total = grad.clone()
        ctx.all_reduce(total)
        return total, None


def _summed(tensors: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor], shard: Shard
            ) -> list[torch.Tensor]:
    """Every worker's partial gradients summed in one collective (a missing one counts as zero)."""
    parts = [torch.zeros_like(ref) if t is None else t for t, ref in zip(tensors, like)]
    flat = torch.cat([p.reshape(-1) for p in parts])
    shard.all_reduce(flat)
    return [chunk.view_as(p) for chunk, p in zip(flat.split([p.numel() for p in parts]), parts)]


def _match_denominator(start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    denom = (start - target).pow(2).sum()
    if not denom > 0:
        raise ValueError(f"cannot match a trajectory segment of squared length {denom.item()}: the start and target "
                         "expert snapshots must be finite and differ")
    return denom


def _accumulate(tensors: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
    for tensor, grad in zip(tensors, grads):
        if grad is None:
            continue
        tensor.grad = grad.detach().clone() if tensor.grad is None else tensor.grad + grad.detach()


def mtt_unrolled(student: nn.Module, start: torch.Tensor, target: torch.Tensor, syn_lr: torch.Tensor,
                 make_batch: MakeBatch, plan: Sequence[MttStep], leaves: Sequence[torch.Tensor],
                 shard: Shard | None = None) -> torch.Tensor:
    """L = ‖θ_N − θ*‖² / ‖θ_0 − θ*‖² through the full create_graph unroll; accumulates `.grad` on leaves, syn_lr.

    `start`, `target`: expert snapshots `(P,)`; `student` supplies the architecture (run functionally). With
    `shard`, one collective per step forward and back (`_SumOverWorkers`, `_Replicated`) and one for the leaves.
    """
    denom = _match_denominator(start, target)
    theta = start.detach().clone().requires_grad_(True)
    for step in plan:
        if shard is None:
            grad = _student_gradient(student, theta, make_batch, step, create_graph=True)
        else:
            point = _Replicated.apply(theta, shard.all_reduce)
            share = _student_gradient(student, point, make_batch, step, create_graph=True, shard=shard)
            grad = _SumOverWorkers.apply(share, shard.all_reduce)
        theta = theta - syn_lr * grad
    loss = (theta - target).pow(2).sum() / denom
    inputs = list(leaves) + ([syn_lr] if syn_lr.requires_grad else [])
    grads = list(torch.autograd.grad(loss, inputs, allow_unused=True))
    if shard is not None:  # syn_lr's gradient is whole on every worker already: it sees only the summed steps
        grads[:len(leaves)] = _summed(grads[:len(leaves)], leaves, shard)
    _accumulate(inputs, grads)
    return loss.detach()


def mtt_memory_constant(student: nn.Module, start: torch.Tensor, target: torch.Tensor, syn_lr: torch.Tensor,
                        make_batch: MakeBatch, plan: Sequence[MttStep], leaves: Sequence[torch.Tensor],
                        shard: Shard | None = None) -> torch.Tensor:
    """Same loss and the same exact gradients as `mtt_unrolled`, holding one step's graph at a time.

    Forward: θ_{i+1} = θ_i − η g_i with no graph to the synthetic set, keeping θ_i `(P,)` per step in host memory
    (off the accelerator, so device memory is flat in `syn_steps`; the host holds `syn_steps * P` floats).
    Backward, i = N−1..0, with v = ∂L/∂θ_{i+1}: recompute g_i with create_graph (the last step's graph is built
    by the forward sweep and used directly), then
    ∂L/∂syn += −η ∂(g_i·v)/∂syn, ∂L/∂η += −g_i·v, and v ← v − η ∂(g_i·v)/∂θ_i (a Hessian-vector product).
    With `shard`, g_i and the Hessian-vector product are summed over the workers at every step (each computes its
    rows' share), and the synthetic set's and η's partial gradients once at the end.
    """
    denom = _match_denominator(start, target)
    lr = syn_lr.detach()
    theta, history = start.detach(), []
    for i, step in enumerate(plan):
        history.append(theta.to("cpu"))
        if i == len(plan) - 1:  # the backward sweep starts here: build this step's graph once, not twice
            leaf = theta.clone().requires_grad_(True)
            last = (leaf, _student_gradient(student, leaf, make_batch, step, create_graph=True, shard=shard))
            grad = last[1].detach().clone()
        else:
            grad = _student_gradient(student, theta.requires_grad_(True), _detached(make_batch), step, False, shard)
        if shard is not None:
            shard.all_reduce(grad)
        theta = theta.detach() - lr * grad
    loss = (theta - target).pow(2).sum() / denom
    v = 2.0 * (theta - target) / denom
    syn_grads: list[torch.Tensor | None] = [None] * len(leaves)
    lr_grad = torch.zeros_like(lr)
    for i in reversed(range(len(plan))):
        if i == len(plan) - 1:
            (theta, grad), last = last, None
        else:
            theta = history[i].to(start.device).detach().requires_grad_(True)
            grad = _student_gradient(student, theta, make_batch, plan[i], create_graph=True, shard=shard)
        lr_grad = lr_grad - (grad.detach() * v).sum()
        hvp, *leaf_grads = torch.autograd.grad((grad * v).sum(), [theta, *leaves], allow_unused=True)
        syn_grads = [acc if g is None else (-lr * g if acc is None else acc - lr * g)
                     for acc, g in zip(syn_grads, leaf_grads)]
        if shard is not None:
            shard.all_reduce(hvp)
        v = v - lr * hvp
    if shard is not None:
        lr_grad, *syn_grads = _summed([lr_grad, *syn_grads], [lr_grad, *leaves], shard)
    _accumulate(leaves, syn_grads)
    if syn_lr.requires_grad:
        _accumulate([syn_lr], [lr_grad])
    return loss.detach()


def _detached(make_batch: MakeBatch) -> MakeBatch:
    """The same batch without a graph to the synthetic set (the forward sweep needs values only)."""

    def make(indices: torch.Tensor, generator: torch.Generator, *rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            x, y = make_batch(indices, generator, *rows)
        return x.detach(), y

    return make


MTT_MODES: dict[str, Callable[..., torch.Tensor]] = {"constant": mtt_memory_constant, "unrolled": mtt_unrolled}

__all__ = ["MTT_MODES", "AllReduce", "EmbedFn", "MakeBatch", "MttStep", "Shard", "class_blocks", "dc_loss", "dm_loss",
           "gradient_distance", "mtt_memory_constant", "mtt_plan", "mtt_unrolled", "planned_dropout",
           "random_network"]
