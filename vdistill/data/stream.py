"""Read a cache split as a stream of batches with bounded memory: experts and evaluations (the full-data baseline,
every test split) train and test on a split without ever holding it.

A split is the Parquet row groups under `<cache>/clips/split=<s>/label=<0042>/*.parquet`, however ingest
grouped the clips into files and row groups. `SplitStream.epoch(seed, epoch, batch_size)` reads every row
group once, in an order drawn from `(seed, epoch)`, through a fixed-size shuffle buffer whose draws come from
the same generator: an epoch's batches are a pure function of the seed, the epoch and the cache's files, so a
restarted expert sees exactly the batches it would have seen. Memory is the buffer (`buffer_mb`) plus a few
row groups read ahead, whatever the size of the split. Clips stay uint8, like the rest of the cache readers.
"""
from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from vdistill.data.clips import CLIPS, clip_array, read_manifest
from vdistill.storage import join, path_component

# `(clips, labels)`: uint8 `(B, T, H, W, 3)` (or frames `(B, H, W, 3)`) and int64 `(B,)`.
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class _RowGroup:
    path: str
    index: int
    rows: int


def frame_choice(keys: Sequence[str], seed: int, frames: int) -> np.ndarray:
    """One frame index per clip, a hash of (seed, clip key): the same frame every epoch, whatever the read order."""
    salt = str(seed).encode()
    return np.array([int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8, key=salt).digest(), "little") % frames
                     for k in keys], dtype=np.int64)


class SplitStream:
    """One split of a clip cache, read in batches: `epoch(...)` shuffled for training, `in_order(...)` for tests.

    The row groups are listed once (one footer per file, read in parallel threads), so one stream serves every
    expert and epoch of a worker; it pickles as that list, so one listing also serves every evaluation task.
    `frame_seed` turns clips into single frames `(H, W, 3)`, one fixed frame per clip (`frame_choice`), for 2-D
    frame experts; frames are picked as each row group is read, so the buffer then holds frames, not clips.
    """

    def __init__(self, storage: Any, cache_uri: str, split: str, *, buffer_mb: float = 64.0,
                 read_ahead: int = 4) -> None:
        manifest = read_manifest(storage, cache_uri)
        self.split = split
        self.classes: list[str] = list(manifest["classes"])
        self.clip_shape: tuple[int, int, int, int] = (manifest["frames"], manifest["size"], manifest["size"], 3)
        self.buffer_bytes = int(buffer_mb * 2**20)
        self.read_ahead = read_ahead
        self._fs, root = storage.resolve(join(cache_uri, CLIPS, f"split={path_component(split, 'split')}"))
        infos = self._fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        files = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")
                       and i.path.rsplit("/", 2)[-2].startswith("label="))
        with ThreadPoolExecutor(max_workers=8, thread_name_prefix="vdistill-footers") as pool:
            sizes = list(pool.map(self._row_group_sizes, files))
        self.row_groups: list[_RowGroup] = [_RowGroup(path, g, rows) for path, groups in zip(files, sizes)
                                            for g, rows in enumerate(groups)]
        if not self.row_groups:
            raise ValueError(f"split {split!r} of the clip cache {cache_uri} has no clips")

    def _row_group_sizes(self, path: str) -> list[int]:
        with self._fs.open_input_file(path) as handle:
            meta = pq.ParquetFile(handle).metadata
        return [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]

    def __len__(self) -> int:
        return sum(g.rows for g in self.row_groups)

    def epoch(self, seed: int, epoch: int, batch_size: int, *, frame_seed: int | None = None) -> Iterator[Batch]:
        """One pass over the split in a shuffled order drawn from `(seed, epoch)` only; full batches, then the
        rest. Shuffled within a buffer of `buffer_mb`: row groups in a random order, clips at random from it."""
        rng = np.random.default_rng([seed, epoch])
        order = [self.row_groups[i] for i in rng.permutation(len(self.row_groups))]
        shape = self.clip_shape[1:] if frame_seed is not None else self.clip_shape
        capacity = max(batch_size, min(len(self), self.buffer_bytes // int(np.prod(shape))))
        clips, labels = np.empty((capacity, *shape), np.uint8), np.empty(capacity, np.int64)
        filled = 0
        for x, y in self._read(order, frame_seed):
            start = 0
            while start < len(y):
                if filled == capacity:
                    pick = rng.choice(filled, batch_size, replace=False)
                    yield torch.from_numpy(clips[pick]), torch.from_numpy(labels[pick])
                    # Move the buffer's tail into the holes so the first `filled` slots stay the live ones.
                    filled -= batch_size
                    holes = pick[pick < filled]
                    tail = np.setdiff1d(np.arange(filled, filled + batch_size), pick, assume_unique=True)
                    clips[holes], labels[holes] = clips[tail], labels[tail]
                take = min(capacity - filled, len(y) - start)
                clips[filled : filled + take] = x[start : start + take]
                labels[filled : filled + take] = y[start : start + take]
                filled, start = filled + take, start + take
        rest = rng.permutation(filled)
        for i in range(0, filled, batch_size):
            pick = rest[i : i + batch_size]
            yield torch.from_numpy(clips[pick]), torch.from_numpy(labels[pick])

    def in_order(self, batch_size: int, *, frame_seed: int | None = None) -> Iterator[Batch]:
        """One pass in file order (fixed), for testing: batches of `batch_size`, the last one shorter."""
        pending: list[tuple[np.ndarray, np.ndarray]] = []
        held = 0
        for x, y in self._read(self.row_groups, frame_seed):
            pending.append((x, y))
            held += len(y)
            while held >= batch_size:
                held -= batch_size
                yield _take(pending, batch_size)
        if held:
            yield _take(pending, held)

    def _read(self, groups: Iterable[_RowGroup], frame_seed: int | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The row groups' clips (or chosen frames) and labels, in the given order, `read_ahead` of them in a
        background thread (pyarrow releases the GIL) so reading overlaps training."""
        columns = ["clip", "label", "key"] if frame_seed is not None else ["clip", "label"]
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="vdistill-stream") as pool:
            ahead: deque[Future] = deque()
            groups = iter(groups)
            while True:
                while len(ahead) < self.read_ahead and (group := next(groups, None)) is not None:
                    ahead.append(pool.submit(self._read_group, group, columns, frame_seed))
                if not ahead:
                    return
                yield ahead.popleft().result()

    def _read_group(self, group: _RowGroup, columns: list[str],
                    frame_seed: int | None) -> tuple[np.ndarray, np.ndarray]:
        with self._fs.open_input_file(group.path) as handle:
            table = pq.ParquetFile(handle).read_row_group(group.index, columns=columns)
        clips = clip_array(table["clip"], self.clip_shape)
        labels = table["label"].to_numpy().astype(np.int64, copy=False)
        if frame_seed is not None:
            frames = frame_choice(table["key"].to_pylist(), frame_seed, self.clip_shape[0])
            clips = clips[np.arange(len(clips)), frames]
        return clips, labels


def _take(pending: list[tuple[np.ndarray, np.ndarray]], n: int) -> Batch:
    """The first `n` rows of `pending` (consumed from it, in place) as one batch."""
    xs, ys, need = [], [], n
    while need:
        x, y = pending[0]
        xs.append(x[:need])
        ys.append(y[:need])
        if len(y) > need:
            pending[0] = (x[need:], y[need:])
            need = 0
        else:
            pending.pop(0)
            need -= len(y)
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))
