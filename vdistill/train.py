"""The one training loop: experts, evaluation and the full-data baseline all train and test through it.

Data may be uint8 storage layout `(N, T, H, W, 3)` (moved per batch as uint8 and normalised on the
device: a quarter of the bytes cross the bus) or float model layout `(N, T, 3, H, W)` already in the
normalised space (synthetic sets). Frame data `(N, H, W, 3)` / `(N, 3, H, W)` works the same way for
2-D networks. Shuffling, augmentation and test-time flips draw only from the generators passed in. The loops take
any iterable of batches (`train_batches`, `accuracy`), so data streamed from the cache (`vdistill.data.stream`)
trains and tests the same way as data in memory (`train_epoch`, `test_accuracy`).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from vdistill.data.pixels import standardize as standardize_batch
from vdistill.data.pixels import to_model_input

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


# `(inputs, labels)`: uint8 storage layout or float model layout (see above), int64 `(B,)`.
Batch = tuple[torch.Tensor, torch.Tensor]


def model_batch(videos: torch.Tensor, index: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Rows `index` of uint8 `(N, T, H, W, 3)` or float `(N, T, 3, H, W)` as normalised float on `device`."""
    return _model_input(videos[index.to(videos.device)], device)


def _model_input(batch: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    return to_model_input(batch, device) if batch.dtype == torch.uint8 else batch.to(device).float()


def _indexed(videos: torch.Tensor, labels: torch.Tensor, indices: Iterable[torch.Tensor]) -> Iterator[Batch]:
    """Batches of in-memory data, one per index tensor."""
    for index in indices:
        yield videos[index.to(videos.device)], labels[index.to(labels.device)]


def train_epoch(
    model: nn.Module,
    videos: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    batch_size: int,
    device: torch.device | str,
    generator: torch.Generator,
    standardize: bool = False,
    augment: Augment | None = None,
) -> dict[str, float]:
    """One shuffled pass over in-memory data (the order drawn from `generator`); see `train_batches`."""
    return train_batches(model, shuffled(videos, labels, batch_size, generator), optimizer, device=device,
                         generator=generator, standardize=standardize, augment=augment)


def shuffled(videos: torch.Tensor, labels: torch.Tensor, batch_size: int, generator: torch.Generator
             ) -> Iterator[Batch]:
    """In-memory data in an order drawn from `generator`, `batch_size` clips at a time (the last one shorter)."""
    return _indexed(videos, labels, torch.randperm(labels.shape[0], generator=generator).split(batch_size))


def train_batches(
    model: nn.Module,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device | str,
    generator: torch.Generator,
    standardize: bool = False,
    augment: Augment | None = None,
) -> dict[str, float]:
    """One pass over `batches` (in memory or streamed from the cache) with cross-entropy, dropout on; returns the
    epoch's mean `loss` and `acc`.

    Augmentation (when given, drawing from `generator`) runs before standardisation, so the network always sees
    a standardised batch. Metrics accumulate on the device: one host sync per epoch.
    """
    model.train()
    n = 0
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for inputs, targets in batches:
        x = _model_input(inputs, device)
        if augment is not None:
            x = augment(x, generator)
        if standardize:
            x = standardize_batch(x)
        y = targets.to(device)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
        n += len(y)
    return {"loss": loss_sum.item() / n, "acc": correct.item() / n}


@torch.no_grad()
def test_accuracy(
    model: nn.Module,
    videos: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int,
    device: torch.device | str,
    passes: int = 1,
    flip: bool = False,
    generator: torch.Generator | None = None,
    standardize: bool = False,
) -> dict[str, float]:
    """`accuracy` over `passes` full passes of in-memory data, in order.

    Accuracy = correct predictions over all passes / (passes * N).
    """
    order = torch.arange(labels.shape[0]).split(batch_size)
    batches = (batch for _ in range(passes) for batch in _indexed(videos, labels, order))
    return accuracy(model, batches, device=device, flip=flip, generator=generator, standardize=standardize)


@torch.no_grad()
def accuracy(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    device: torch.device | str,
    flip: bool = False,
    generator: torch.Generator | None = None,
    standardize: bool = False,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy over `batches` in eval mode, computed separately (top-5 means top-min(5, C)),
    never mixed (METHOD.md W-3).

    With `flip`, each clip is mirrored horizontally with probability 1/2 (the paper protocol's stochastic
    test, which needs a `generator`).
    """
    if flip and generator is None:
        raise ValueError("test_accuracy(flip=True) needs a torch.Generator for the random flips")
    model.eval()
    n = 0
    top1 = torch.zeros((), device=device, dtype=torch.long)
    top5 = torch.zeros((), device=device, dtype=torch.long)
    for inputs, targets in batches:
        x = _model_input(inputs, device)
        if flip:
            mirror = (torch.rand(len(targets), generator=generator, device=generator.device) < 0.5).to(device)
            x = torch.where(mirror.view(-1, *[1] * (x.dim() - 1)), x.flip(-1), x)
        if standardize:
            x = standardize_batch(x)
        y = targets.to(device)
        logits = model(x)
        ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
        top1 += (logits.argmax(1) == y).sum()
        top5 += (ranked == y[:, None]).any(1).sum()
        n += len(y)
    return {"top1": top1.item() / n, "top5": top5.item() / n}


test_accuracy.__test__ = False  # a library function whose name starts with "test": keep pytest from collecting it
