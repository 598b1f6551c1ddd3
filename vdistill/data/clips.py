"""Read the clip cache written by `vdistill.data.ingest`: whole splits, one class at a time, or a Ray stream.

Clips stay uint8 `(T, H, W, 3)` here; consumers normalise on their device (`vdistill.data.pixels`).
Order is deterministic: rows are sorted by clip key.
"""
from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
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

    @property
    def clip_shape(self) -> tuple[int, int, int, int]:
        """`(T, H, W, 3)`, as `SplitStream.clip_shape`."""
        return tuple(self.videos.shape[1:])  # type: ignore[return-value]

    def class_clips(self, c: int) -> torch.Tensor:
        """The clips of class `c`, in key order."""
        return self.videos[self.labels == c]

    def in_order(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches in key order, as `SplitStream.in_order` streams a split (the last one shorter)."""
        for start in range(0, len(self), batch_size):
            yield self.videos[start : start + batch_size], self.labels[start : start + batch_size]


def read_manifest(storage: Any, cache_uri: str) -> dict:
    """The cache's manifest.json; FileNotFoundError (with the fix) when the cache is absent or partial."""
    uri = join(cache_uri, MANIFEST)
    if not storage.is_file(uri):
        raise FileNotFoundError(f"no clip cache at {cache_uri} ({MANIFEST} missing): run `vdistill ingest` first")
    return storage.read_json(uri)


def clip_column(clips: np.ndarray) -> pa.FixedSizeBinaryArray:
    """uint8 `(N, T, H, W, 3)` -> the cache's `clip` column: each clip one fixed-size binary value.

    Parquet stores it as one value per clip; a `list<uint8>` (Ray's tensor type) stores one value per *byte*, with
    repetition levels for each, which made writing 9x and reading 6x slower (8x64x64 clips, zstd).
    """
    flat = np.ascontiguousarray(clips, dtype=np.uint8).reshape(len(clips), -1)
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(flat.shape[1]), len(flat), [None, pa.py_buffer(flat)])


def clip_array(column: pa.ChunkedArray, shape: tuple[int, ...]) -> np.ndarray:
    """A `clip` column -> writable uint8 `(N, *shape)`: fixed-size binary (`clip_column`), or the `list<uint8>` /
    Ray tensor columns that caches written before it hold."""
    parts = []
    for chunk in column.chunks:
        if pa.types.is_fixed_size_binary(chunk.type):
            width = chunk.type.byte_width
            values = np.frombuffer(chunk.buffers()[1], np.uint8)
            parts.append(values[chunk.offset * width : (chunk.offset + len(chunk)) * width])
        else:
            storage = chunk.storage if isinstance(chunk, pa.ExtensionArray) else chunk
            parts.append(storage.flatten().to_numpy(zero_copy_only=False).astype(np.uint8, copy=False))
    if not parts:
        return np.empty((0, *shape), np.uint8)
    flat = np.concatenate(parts) if len(parts) > 1 else parts[0].copy()  # a copy: Arrow's buffers are read-only
    return flat.reshape(-1, *shape)


def _read_folder(storage: Any, uri: str, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """All clips under a cache folder sorted by key: uint8 `(N, *shape)`, int64 `(N,)`."""
    if not storage.exists(uri):
        return np.empty((0, *shape), np.uint8), np.empty(0, np.int64)
    fs, path = storage.resolve(uri)
    table = pads.dataset(path, filesystem=fs, format="parquet", partitioning=None).to_table(
        columns=["clip", "label", "key"])
    table = table.sort_by("key")
    return clip_array(table["clip"], shape), table["label"].to_numpy().astype(np.int64)


def _clip_shape(manifest: dict) -> tuple[int, int, int, int]:
    return manifest["frames"], manifest["size"], manifest["size"], 3


def load_split(storage: Any, cache_uri: str, split: str) -> ClipSet:
    """A whole split in memory (small caches): uint8 clips sorted by key."""
    manifest = read_manifest(storage, cache_uri)
    videos, labels = _read_folder(storage, join(cache_uri, CLIPS, f"split={split}"), _clip_shape(manifest))
    return ClipSet(torch.from_numpy(videos), torch.from_numpy(labels), list(manifest["classes"]))


def load_class(storage: Any, cache_uri: str, split: str, c: int) -> torch.Tensor:
    """One class of a split, uint8 `(N_c, T, H, W, 3)` sorted by key: what fits when the split does not."""
    shape = _clip_shape(read_manifest(storage, cache_uri))
    videos, _ = _read_folder(storage, partition_uri(cache_uri, split, c), shape)
    return torch.from_numpy(videos)


REUSE = 4  # draws per resident clip, on average, before its pool is replaced: reads stay a quarter of the draws


@dataclass(frozen=True)
class _RowGroup:
    path: str
    index: int
    rows: int


class ClassSampler:
    """Random real clips of one class in bounded memory: where every distillation loop draws its real batches.

    `memory_mb` bounds the clips held for all classes together. A class that fits its share is held whole,
    sorted by key. A larger class holds a *pool* of `pool_clips` clips: random Parquet row groups (the smallest
    read), of which a random `pool_clips` rows are kept, so the budget holds whatever `cache.rows_per_group`
    ingest wrote. A pool is swapped for the next once `REUSE` times as many clips were drawn from it as it holds,
    the next pool read ahead in a background thread while the current one serves. Which clips a pool holds is a
    pure function of (seed, class, rotation), and `state()` is what a checkpoint must keep, so a resumed loop
    draws the same clips.
    Use it as a context manager (it stops the read-ahead thread).
    """

    def __init__(self, storage: Any, cache_uri: str, split: str, *, memory_mb: float = 8192.0, seed: int = 0) -> None:
        self.storage, self.cache_uri, self.split, self.seed = storage, cache_uri, split, seed
        self.manifest = read_manifest(storage, cache_uri)
        self.classes: list[str] = list(self.manifest["classes"])
        clip_bytes = int(np.prod(_clip_shape(self.manifest)))
        # Half the share of a class for its pool, half for the pool being read ahead.
        self.pool_clips = int(memory_mb * 1e6 // (2 * clip_bytes * max(1, len(self.classes))))
        if self.pool_clips < 1:
            raise ValueError(f"cache.sampler_mb={memory_mb:g} cannot hold one clip per class for {len(self.classes)} "
                             f"classes of {clip_bytes / 1e6:.3f} MB; raise cache.sampler_mb")
        self._groups: dict[int, list[_RowGroup]] = {}
        self._pools: dict[int, torch.Tensor] = {}
        self._rotation: dict[int, int] = {}
        self._drawn: dict[int, int] = {}
        self._ahead: dict[int, Future] = {}
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vdistill-sampler")

    def __enter__(self) -> "ClassSampler":
        return self

    def __exit__(self, *exc: object) -> None:
        self._reader.shutdown(wait=True, cancel_futures=True)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def state(self) -> dict[str, dict[int, int]]:
        """The pool counters (rotation and clips drawn per class) a resumed loop needs."""
        return {"rotation": dict(self._rotation), "drawn": dict(self._drawn)}

    def load_state(self, state: dict[str, dict[int, int]]) -> None:
        for future in self._ahead.values():
            future.cancel()
        self._pools.clear()
        self._ahead.clear()
        self._rotation = {int(c): int(r) for c, r in state["rotation"].items()}
        self._drawn = {int(c): int(n) for c, n in state["drawn"].items()}

    def retain(self, classes: Iterable[int]) -> None:
        """Drop the pools (and reads ahead) of every class not in `classes`: a distillation worker that draws only
        its own classes holds only their share of `memory_mb`. The counters stay, so a dropped class that is drawn
        again reads back the same pool."""
        keep = set(classes)
        for c in [c for c in self._pools if c not in keep]:
            del self._pools[c]
            ahead = self._ahead.pop(c, None)
            if ahead is not None:
                ahead.cancel()

    @property
    def held_mb(self) -> float:
        """Megabytes of clips the pools hold now (reads ahead not counted)."""
        return sum(pool.nbytes for pool in self._pools.values()) / 1e6

    def sample(self, c: int, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 `(n, T, H, W, 3)`; without replacement within the pool, cycling fresh permutations when n
        exceeds it."""
        if self._whole(c):
            pool = self._pool(c)
        else:
            if c in self._drawn and self._drawn[c] + n > REUSE * len(self._pool(c)):
                self._rotate(c)
            pool = self._pool(c)
            self._drawn[c] = self._drawn.get(c, 0) + n
        reps = -(-n // len(pool))
        order = torch.cat([torch.randperm(len(pool), generator=generator) for _ in range(reps)])[:n]
        return pool[order]

    # ---- pools --------------------------------------------------------------------------------------
    def _row_groups(self, c: int) -> list[_RowGroup]:
        if c not in self._groups:
            fs, root = self.storage.resolve(partition_uri(self.cache_uri, self.split, c))
            infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
            groups = []
            for info in sorted((i for i in infos if i.path.endswith(".parquet")), key=lambda i: i.path):
                with fs.open_input_file(info.path) as handle:
                    meta = pq.ParquetFile(handle).metadata
                groups += [_RowGroup(info.path, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
            if not groups:
                raise ValueError(f"class {c} ({self.classes[c]}) has no clips in split {self.split!r}")
            self._groups[c] = groups
        return self._groups[c]

    def _whole(self, c: int) -> bool:
        return sum(g.rows for g in self._row_groups(c)) <= 2 * self.pool_clips

    def _pool(self, c: int) -> torch.Tensor:
        if c not in self._pools:
            self._pools[c] = self._read(c, self._rotation.get(c, 0))
            if not self._whole(c):
                self._ahead[c] = self._reader.submit(self._read, c, self._rotation.get(c, 0) + 1)
        return self._pools[c]

    def _rotate(self, c: int) -> None:
        self._rotation[c] = self._rotation.get(c, 0) + 1
        self._drawn[c] = 0
        ahead = self._ahead.pop(c, None)
        self._pools[c] = ahead.result() if ahead is not None else self._read(c, self._rotation[c])
        self._ahead[c] = self._reader.submit(self._read, c, self._rotation[c] + 1)

    def _read(self, c: int, rotation: int) -> torch.Tensor:
        """Clips of class `c` for one pool, sorted by key: all of them, or the row groups drawn for `rotation`."""
        groups = self._row_groups(c)
        whole = self._whole(c)
        if not whole:
            seed = int(np.random.SeedSequence([self.seed, c, rotation]).generate_state(1)[0])
            draw = torch.Generator().manual_seed(seed)
            # Row groups in the order a random permutation of the class's clips first hits them: a group is drawn
            # in proportion to its clips, so a short last group of a file is not over-represented.
            owner = np.repeat(np.arange(len(groups)), [g.rows for g in groups])
            hits = owner[torch.randperm(len(owner), generator=draw).numpy()]
            _, first = np.unique(hits, return_index=True)
            chosen, rows = [], 0
            for g in hits[np.sort(first)].tolist():
                if rows >= self.pool_clips:
                    break
                chosen.append(groups[g])
                rows += groups[g].rows
            groups = chosen
        fs, _ = self.storage.resolve(self.cache_uri)
        tables = []
        for path in sorted({g.path for g in groups}):
            with fs.open_input_file(path) as handle:
                wanted = [g.index for g in groups if g.path == path]
                tables.append(pq.ParquetFile(handle).read_row_groups(wanted, columns=["clip", "key"]))
        table = pa.concat_tables(tables).sort_by("key")
        if not whole and table.num_rows > self.pool_clips:  # row groups overshoot the pool: keep a random part
            table = table.take(torch.randperm(table.num_rows, generator=draw)[: self.pool_clips].sort().values.numpy())
        return torch.from_numpy(clip_array(table["clip"], _clip_shape(self.manifest)))


def stream_split(storage: Any, cache_uri: str, split: str):
    """A lazy `ray.data.Dataset` of one split with columns clip (uint8 `(T, H, W, 3)`) and label."""
    import ray

    shape = _clip_shape(read_manifest(storage, cache_uri))
    fs, path = storage.resolve(join(cache_uri, CLIPS, f"split={split}"))

    def tensors(table: pa.Table) -> dict[str, np.ndarray]:
        return {"clip": clip_array(table["clip"], shape), "label": table["label"].to_numpy().astype(np.int64)}

    return ray.data.read_parquet(path, filesystem=fs, partitioning=None, columns=["clip", "label"]).map_batches(
        tensors, batch_format="pyarrow", batch_size=None)
