"""The distillation's real-clip sampler: whole classes when they fit, rotating pools within its memory otherwise."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from vdistill.data.clips import MANIFEST, ClassSampler, partition_uri
from vdistill.storage import Storage, join

CLASSES, T, S, PER_CLASS = ["a", "b", "c"], 2, 4, 40
CLIP_BYTES = T * S * S * 3


def _cache(root: str, rows_per_group: int = 4) -> str:
    """Clip i of class c is filled with the value 100*c + i (an id readable from any pixel); small row groups."""
    storage, cache = Storage(), join(root, "cache")
    for c in range(len(CLASSES)):
        clips = [np.full((T, S, S, 3), 100 * c + i, np.uint8) for i in range(PER_CLASS)]
        table = pa.table({"clip": pa.array([clip.ravel() for clip in clips], pa.list_(pa.uint8())),
                          "label": pa.array([c] * PER_CLASS, pa.int64()),
                          "key": pa.array([f"{c}-{i:03d}" for i in range(PER_CLASS)])})
        folder = partition_uri(cache, "train", c)
        half = PER_CLASS // 2
        for part, rows in (("0", table.slice(0, half)), ("1", table.slice(half))):
            sink = pa.BufferOutputStream()
            pq.write_table(rows, sink, row_group_size=rows_per_group)
            storage.write_bytes(join(folder, f"part-{part}.parquet"), sink.getvalue().to_pybytes())
    storage.write_json(join(cache, MANIFEST), {"classes": CLASSES, "frames": T, "size": S})
    return cache


def _ids(batch: torch.Tensor, c: int) -> list[int]:
    return [int(clip[0, 0, 0, 0]) - 100 * c for clip in batch]


def _budget_mb(pool_clips: int) -> float:
    return 2 * pool_clips * CLIP_BYTES * len(CLASSES) / 1e6


def test_a_class_that_fits_is_held_whole_and_drawn_without_replacement(tmp_path):
    with ClassSampler(Storage(), _cache(str(tmp_path)), "train") as sampler:
        batch = sampler.sample(1, PER_CLASS, torch.Generator().manual_seed(0))
    assert sorted(_ids(batch, 1)) == list(range(PER_CLASS))


def test_a_large_class_is_drawn_from_rotating_pools_that_stay_within_the_budget_and_cover_it(tmp_path):
    g, seen = torch.Generator().manual_seed(0), set()
    with ClassSampler(Storage(), _cache(str(tmp_path)), "train", memory_mb=_budget_mb(6)) as sampler:
        assert sampler.pool_clips == 6
        for _ in range(200):
            seen.update(_ids(sampler.sample(2, 6, g), 2))
            assert all(len(pool) == 6 for pool in sampler._pools.values())  # row groups of 4: 8 read, 6 kept
        assert sampler.state()["rotation"][2] >= 200 * 6 // (4 * 6) - 1  # each resident clip drawn ~4 times
    assert seen == set(range(PER_CLASS))


def test_a_resumed_sampler_draws_exactly_what_the_uninterrupted_one_draws(tmp_path):
    cache, budget = _cache(str(tmp_path)), _budget_mb(6)
    g = torch.Generator().manual_seed(3)
    with ClassSampler(Storage(), cache, "train", memory_mb=budget, seed=7) as straight:
        for _ in range(5):
            straight.sample(0, 4, g)
        state, g_state = straight.state(), g.get_state()
        expected = [straight.sample(0, 4, g) for _ in range(8)]
    g.set_state(g_state)
    with ClassSampler(Storage(), cache, "train", memory_mb=budget, seed=7) as resumed:
        resumed.sample(0, 4, torch.Generator().manual_seed(99))  # what rebuilding the set draws before the loop
        resumed.load_state(state)
        assert all(torch.equal(resumed.sample(0, 4, g), e) for e in expected)


def test_a_pool_smaller_than_a_row_group_keeps_its_budget_and_still_covers_the_class(tmp_path):
    g, seen = torch.Generator().manual_seed(1), set()
    with ClassSampler(Storage(), _cache(str(tmp_path), rows_per_group=16), "train", memory_mb=_budget_mb(3)) as sampler:
        for _ in range(300):
            seen.update(_ids(sampler.sample(0, 3, g), 0))
            assert all(len(pool) == 3 for pool in sampler._pools.values())
            assert all(len(ahead.result()) == 3 for ahead in sampler._ahead.values())
    assert seen == set(range(PER_CLASS))


def test_a_budget_below_one_clip_per_class_names_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"cache.sampler_mb=.*raise cache.sampler_mb"):
        ClassSampler(Storage(), _cache(str(tmp_path)), "train", memory_mb=1e-6)


def test_retaining_some_classes_frees_the_others_pools_and_a_dropped_class_draws_as_before(tmp_path):
    cache, budget = _cache(str(tmp_path)), _budget_mb(6)
    with ClassSampler(Storage(), cache, "train", memory_mb=budget, seed=7) as kept:
        expected = [kept.sample(0, 4, torch.Generator().manual_seed(k)) for k in range(6)]
    with ClassSampler(Storage(), cache, "train", memory_mb=budget, seed=7) as sampler:
        first = [sampler.sample(0, 4, torch.Generator().manual_seed(k)) for k in range(3)]
        for c in (1, 2):
            sampler.sample(c, 4, torch.Generator().manual_seed(0))
        everything = sampler.held_mb
        sampler.retain([1])  # a worker whose block is class 1
        assert sampler.held_mb == pytest.approx(everything / 3)
        rest = [sampler.sample(0, 4, torch.Generator().manual_seed(k)) for k in range(3, 6)]
    assert all(torch.equal(a, b) for a, b in zip(first + rest, expected))
