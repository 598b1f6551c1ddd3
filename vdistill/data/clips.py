"""Read the clip cache written by `vdistill.data.ingest`: whole splits, one class at a time, or a Ray stream.

Clips stay uint8 `(T, H, W, 3)` here; consumers normalise on their device (`vdistill.data.pixels`).
Order is deterministic: rows are sorted by clip key.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import torch

from vdistill.storage import join, path_component

# The cache layout `vdistill.data.ingest` writes: <cache>/manifest.json, <cache>/clips/split=<s>/label=<0042>/*.parquet
MANIFEST = "manifest.json"
CLIPS = "clips"


def partition_uri(cache_uri: str, split: str, label: int) -> str:
    return join(cache_uri, CLIPS, f"split={path_component(split, 'split')}", f"label={int(label):04d}")


@dataclass
class ClipSet:
    """`videos` uint8 `(N, T, H, W, 3)`, `labels` int64 `(N,)`, indices into `classes`."""

    videos: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def read_manifest(storage: Any, cache_uri: str) -> dict:
    """The cache's manifest.json; FileNotFoundError (with the fix) when the cache is absent or partial."""
    uri = join(cache_uri, MANIFEST)
    if not storage.is_file(uri):
        raise FileNotFoundError(f"no clip cache at {cache_uri} ({MANIFEST} missing): run `vdistill ingest` first")
    return storage.read_json(uri)


def _clip_array(column: pa.ChunkedArray, shape: tuple[int, ...]) -> np.ndarray:
    """Tensor column (Ray's tensor extension or its plain list storage) -> uint8 `(N, *shape)`."""
    parts = []
    for chunk in column.chunks:
        storage = chunk.storage if isinstance(chunk, pa.ExtensionArray) else chunk
        parts.append(storage.flatten().to_numpy(zero_copy_only=False))
    flat = np.concatenate(parts) if parts else np.empty(0, np.uint8)
    return flat.astype(np.uint8, copy=False).reshape(-1, *shape)


def _read_folder(storage: Any, uri: str, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """All clips under a cache folder sorted by key: uint8 `(N, *shape)`, int64 `(N,)`."""
    if not storage.exists(uri):
        return np.empty((0, *shape), np.uint8), np.empty(0, np.int64)
    fs, path = storage.resolve(uri)
    table = pads.dataset(path, filesystem=fs, format="parquet", partitioning=None).to_table(
        columns=["clip", "label", "key"])
    table = table.sort_by("key")
    return _clip_array(table["clip"], shape), table["label"].to_numpy().astype(np.int64)


def _clip_shape(manifest: dict) -> tuple[int, int, int, int]:
    return manifest["frames"], manifest["size"], manifest["size"], 3


def load_split(storage: Any, cache_uri: str, split: str) -> ClipSet:
    """A whole split in memory (small caches): uint8 clips sorted by key."""
    manifest = read_manifest(storage, cache_uri)
    videos, labels = _read_folder(storage, join(cache_uri, CLIPS, f"split={split}"), _clip_shape(manifest))
    return ClipSet(torch.from_numpy(videos), torch.from_numpy(labels), list(manifest["classes"]))


class ClassSampler:
    """Random real clips of one class; a class's partition is read on first use, then kept."""

    def __init__(self, storage: Any, cache_uri: str, split: str) -> None:
        self.storage = storage
        self.cache_uri = cache_uri
        self.split = split
        self.manifest = read_manifest(storage, cache_uri)
        self.classes: list[str] = list(self.manifest["classes"])
        self._loaded: dict[int, torch.Tensor] = {}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def clips(self, c: int) -> torch.Tensor:
        """All clips of class `c`, uint8 `(N_c, T, H, W, 3)`, sorted by key."""
        if c not in self._loaded:
            videos, _ = _read_folder(self.storage, partition_uri(self.cache_uri, self.split, c),
                                     _clip_shape(self.manifest))
            if len(videos) == 0:
                raise ValueError(f"class {c} ({self.classes[c]}) has no clips in split {self.split!r}")
            self._loaded[c] = torch.from_numpy(videos)
        return self._loaded[c]

    def sample(self, c: int, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 `(n, T, H, W, 3)`; without replacement, cycling fresh permutations when n > clips in c."""
        pool = self.clips(c)
        reps = -(-n // len(pool))
        order = torch.cat([torch.randperm(len(pool), generator=generator) for _ in range(reps)])[:n]
        return pool[order]


def stream_split(storage: Any, cache_uri: str, split: str):
    """A lazy `ray.data.Dataset` of one split with columns clip (uint8 `(T, H, W, 3)`) and label."""
    import ray

    read_manifest(storage, cache_uri)
    fs, path = storage.resolve(join(cache_uri, CLIPS, f"split={split}"))
    return ray.data.read_parquet(path, filesystem=fs, partitioning=None).select_columns(["clip", "label"])
