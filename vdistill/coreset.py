"""Coreset baselines: keep k real clips per class (random, herding, k-center) as the storage-matched reference.

Herding and k-center compare clips by the `.embed()` features of a network in eval mode: a randomly
initialised ConvNet3D with an explicit seed (the original's default) or a given model such as an
expert. K-center is the correct greedy farthest-point rule (METHOD.md section 7, W-2: the original's
distance collapses to a scalar, so its 2nd centre is always sample 0 and k >= 3 crashes).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from vdistill.data.clips import ClipSet
from vdistill.train import model_batch

METHODS = ("random", "herding", "kcenter")


def random_choice(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """`k` distinct indices out of `n`, uniformly."""
    _check(n, k)
    return torch.randperm(n, generator=generator)[:k]


def herding(features: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy herding on `(N, D)` features: step i takes the unused sample closest to `(i+1)·μ − Σ selected`."""
    _check(len(features), k)
    mean = features.mean(0)
    chosen: list[int] = []
    total = torch.zeros_like(mean)
    used = torch.zeros(len(features), dtype=torch.bool, device=features.device)
    for i in range(k):
        dist = (features - ((i + 1) * mean - total)).norm(dim=1).masked_fill(used, float("inf"))
        j = int(dist.argmin())
        chosen.append(j)
        used[j] = True
        total = total + features[j]
    return torch.tensor(chosen, dtype=torch.long)


def kcenter(features: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy k-center on `(N, D)` features: start at the sample nearest the mean, then repeatedly add the
    sample farthest from its nearest centre (distances `(N, k)` -> min over centres -> argmax over samples)."""
    _check(len(features), k)
    chosen = [int((features - features.mean(0)).norm(dim=1).argmin())]
    for _ in range(1, k):
        nearest = torch.cdist(features, features[chosen]).amin(dim=1)
        nearest[chosen] = -1.0  # duplicates of a centre have distance 0 too; never re-pick a centre
        chosen.append(int(nearest.argmax()))
    return torch.tensor(chosen, dtype=torch.long)


@torch.no_grad()
def embed_clips(embedder: nn.Module, videos: torch.Tensor, device: torch.device | str,
                batch_size: int = 64) -> torch.Tensor:
    """`.embed()` features `(N, D)` of uint8 `(N, T, H, W, 3)` (or float) clips, network in eval mode."""
    embedder.eval()
    return torch.cat([embedder.embed(model_batch(videos, index, device)).flatten(1).float()
                      for index in torch.arange(len(videos)).split(batch_size)])


def select_coreset(method: str, class_clips: Callable[[int], torch.Tensor], classes: list[str], k_per_class: int,
                   embedder: nn.Module | None, device: torch.device | str, generator: torch.Generator) -> ClipSet:
    """`k_per_class` real clips per class, class-major, as a ClipSet (uint8 clips, the given classes).

    `class_clips(c)` returns class c's clips (e.g. `ClipSet.class_clips`, or `data.clips.load_class` from the
    cache), so only one class is in memory at a time. `embedder` (any module with `.embed`) is needed for
    herding and k-center and ignored by random; it is moved to `device` and put in eval mode.
    """
    if method not in METHODS:
        raise ValueError(f"coreset method must be one of {METHODS}, got {method!r}")
    if method != "random" and embedder is None:
        raise ValueError(f"coreset method {method!r} needs an embedder network with .embed()")
    picked = []
    for c in range(len(classes)):
        members = class_clips(c)
        if method == "random":
            local = random_choice(len(members), k_per_class, generator)
        else:
            select = herding if method == "herding" else kcenter
            local = select(embed_clips(embedder.to(device), members, device).cpu(), k_per_class)
        picked.append(members[local].clone())
    labels = torch.arange(len(classes)).repeat_interleave(k_per_class)
    return ClipSet(torch.cat(picked), labels, list(classes))


def _check(n: int, k: int) -> None:
    if not 1 <= k <= n:
        raise ValueError(f"cannot pick {k} of {n} samples per class; lower the videos per class")
