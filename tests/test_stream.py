"""Streaming a cache split: every clip once per epoch, in an order fixed by (seed, epoch), in bounded memory."""
from __future__ import annotations

import os
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from ray.data.extensions import ArrowTensorArray

from vdistill.data.clips import MANIFEST, clip_column, partition_uri
from vdistill.data.stream import SplitStream
from vdistill.storage import Storage, join

CLASSES, FRAMES, SIZE = 4, 4, 16


def write_cache(cache_uri: str, per_class: int, *, files_per_class: int = 1, row_group_size: int | None = None,
                encoding: str = "tensor") -> None:
    """Clip `i` of the split holds `i % 256` in pixel (0, 0) of every frame, and frame t holds t in pixel (1, 0).

    `encoding`: "tensor" (Ray's tensor column, what caches before `clip_column` hold) or "binary" (`clip_column`)."""
    storage = Storage()
    for label in range(CLASSES):
        ids = np.arange(label * per_class, (label + 1) * per_class)
        clips = np.zeros((len(ids), FRAMES, SIZE, SIZE, 3), np.uint8)
        clips[:, :, 0, 0, 0] = (ids % 256)[:, None]
        clips[:, :, 1, 0, 0] = np.arange(FRAMES)
        for part, rows in enumerate(np.array_split(np.arange(len(ids)), files_per_class)):
            column = ArrowTensorArray.from_numpy(clips[rows]) if encoding == "tensor" else clip_column(clips[rows])
            table = pa.table({"clip": column,
                              "label": pa.array([label] * len(rows), pa.int64()),
                              "key": pa.array([f"clip-{i:04d}" for i in ids[rows]])})
            path = join(partition_uri(cache_uri, "train", label), f"part-{part}.parquet")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            pq.write_table(table, path, row_group_size=row_group_size)
    storage.write_json(join(cache_uri, MANIFEST), {"classes": [f"c{c}" for c in range(CLASSES)], "frames": FRAMES,
                                                   "size": SIZE, "splits": ["train"]})


def ids_of(batches) -> list[int]:
    return [int(i) for x, _ in batches for i in x[:, 0, 0, 0, 0]]


@pytest.fixture
def cache(tmp_path) -> str:
    uri = str(tmp_path / "cache")
    write_cache(uri, per_class=10)
    return uri


def test_an_epoch_yields_every_clip_once_in_full_batches_then_the_rest(cache):
    batches = list(SplitStream(Storage(), cache, "train").epoch(seed=1, epoch=1, batch_size=4))
    assert sorted(ids_of(batches)) == list(range(40))
    assert [len(y) for _, y in batches] == [4] * 10
    assert all(x.shape[1:] == (FRAMES, SIZE, SIZE, 3) and x.dtype == torch.uint8 for x, _ in batches)
    for x, y in batches:  # labels travel with their clips
        assert (y == x[:, 0, 0, 0, 0].long() // 10).all()


def test_caches_with_tensor_columns_read_exactly_like_binary_ones(tmp_path):
    write_cache(str(tmp_path / "tensor"), per_class=10, row_group_size=4, encoding="tensor")
    write_cache(str(tmp_path / "binary"), per_class=10, row_group_size=4, encoding="binary")
    epochs = [list(SplitStream(Storage(), str(tmp_path / name), "train").epoch(2, 1, batch_size=4))
              for name in ("tensor", "binary")]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(*epochs, strict=True))


def test_the_order_is_a_pure_function_of_seed_and_epoch(cache):
    def order(seed: int, epoch: int) -> list[int]:  # a fresh stream each time, as after a restart
        return ids_of(SplitStream(Storage(), cache, "train", buffer_mb=0.01).epoch(seed, epoch, batch_size=3))

    assert order(7, 2) == order(7, 2)
    assert order(7, 2) != order(7, 3) and order(7, 2) != order(8, 2)


@pytest.mark.parametrize("layout", [{"files_per_class": 5}, {"row_group_size": 3}],
                         ids=["many small files", "few files, small row groups"])
def test_a_buffer_smaller_than_the_split_still_covers_it_and_mixes_classes(tmp_path, layout):
    cache = str(tmp_path / "cache")
    write_cache(cache, per_class=16, **layout)
    clip_mb = FRAMES * SIZE * SIZE * 3 / 2**20
    stream = SplitStream(Storage(), cache, "train", buffer_mb=8 * clip_mb)  # 8 of the 64 clips
    batches = list(stream.epoch(seed=0, epoch=1, batch_size=4))
    assert sorted(ids_of(batches)) == list(range(64))
    classes_per_batch = [len(set(y.tolist())) for _, y in batches]
    assert np.mean(classes_per_batch) > 1.5, classes_per_batch


def test_an_epoch_holds_a_bounded_buffer_not_the_split(tmp_path):
    cache = str(tmp_path / "cache")
    write_cache(cache, per_class=250, files_per_class=25)  # 1000 clips, 3 MB
    stream = SplitStream(Storage(), cache, "train", buffer_mb=0.25)
    tracemalloc.start()
    try:
        seen = sum(len(y) for _, y in stream.epoch(seed=0, epoch=1, batch_size=16))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seen == 1000
    assert peak < 1.0 * 2**20, f"peak {peak / 2**20:.2f} MB for a 0.25 MB buffer over a 3 MB split"


def test_frame_streams_give_each_clip_one_fixed_frame_in_every_epoch_and_in_order(cache):
    stream = SplitStream(Storage(), cache, "train")

    def frames(batches) -> dict[int, int]:
        chosen = {}
        for x, _ in batches:
            assert x.shape[1:] == (SIZE, SIZE, 3)
            for frame in x:
                chosen[int(frame[0, 0, 0])] = int(frame[1, 0, 0])
        return chosen

    first = frames(stream.epoch(3, 1, batch_size=4, frame_seed=5))
    assert first == frames(stream.epoch(3, 2, batch_size=4, frame_seed=5))
    assert first == frames(stream.in_order(batch_size=4, frame_seed=5))
    assert sorted(first) == list(range(40))
    assert len(set(first.values())) > 1
    assert frames(stream.epoch(3, 1, batch_size=4, frame_seed=6)) != first


def test_in_order_is_the_file_order_every_time(cache):
    stream = SplitStream(Storage(), cache, "train")
    batches = list(stream.in_order(batch_size=6))
    assert ids_of(batches) == list(range(40)) == ids_of(stream.in_order(batch_size=6))
    assert [len(y) for _, y in batches] == [6] * 6 + [4]


def test_a_split_without_clips_is_an_error_naming_it(cache):
    with pytest.raises(ValueError, match="split 'test' .* has no clips"):
        SplitStream(Storage(), cache, "test")
