"""DM split over workers by class: two processes summing their classes' gradients over gloo take exactly the steps
of one process computing every class (the foundation of `run.distill_workers`, issue 22)."""
from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vdistill.config import StaticConfig
from vdistill.distill.loop import Recipe, Shard, distill
from vdistill.distill.synset import PixelSet, SlotLayout, init_static_memory
from tests.test_stages import C, MODEL, SIZE, class_sampler, dyn_cfg, s2d_set

ITERATIONS = 10


def _loop(kind: str, shard: Shard | None) -> dict[str, torch.Tensor]:
    """10 iterations of the static stage's DM on stills, or the dynamic stage's DM on an S2D set; -> the set."""
    sampler = class_sampler()
    if kind == "static":
        layout = SlotLayout(C, 1)
        synset = PixelSet(init_static_memory(layout, SIZE, "real", torch.Generator().manual_seed(0), sampler), C)
        recipe = Recipe.static(StaticConfig(iterations=ITERATIONS, batch_real=4), dyn_cfg())
    else:
        synset = s2d_set(vpc=2)
        recipe = Recipe.dynamic(dyn_cfg(iterations=ITERATIONS, method="dm", optimizer="adam", lr_dynamic=0.05,
                                        lr_integrator=1e-3))
    distill(synset, recipe, sampler, torch.Generator().manual_seed(3), "cpu", num_classes=C, model_cfg=MODEL,
            shard=shard)
    return synset.state_tensors()


def _worker(rank: int, world: int, blocks: list[list[int]], kind: str, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        tensors = _loop(kind, Shard(blocks[rank], lambda flat: dist.all_reduce(flat)))
        torch.save(tensors, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["static", "dynamic"])
def test_two_workers_with_a_block_of_classes_each_make_the_set_of_one(kind, tmp_path):
    one = _loop(kind, None)
    blocks = [[0], list(range(1, C))]
    mp.start_processes(_worker, args=(2, blocks, kind, str(tmp_path / "store"), str(tmp_path)), nprocs=2,
                       join=True, start_method="spawn")
    for rank in range(2):
        two = torch.load(tmp_path / f"rank{rank}.pt")
        assert two.keys() == one.keys()
        for name, tensor in one.items():
            scale = tensor.abs().max().clamp_min(1e-12)
            assert (two[name] - tensor).abs().max() / scale <= 1e-4, (rank, name)
        assert not torch.equal(one["dynamic_memory" if kind == "dynamic" else "videos"],
                               _start(kind)), "the loop must have moved the set"


def test_mtt_is_refused_on_a_shard_of_classes():
    with pytest.raises(ValueError, match="MTT cannot be split over workers by class"):
        distill(s2d_set(), Recipe.dynamic(dyn_cfg(method="mtt")), class_sampler(), torch.Generator(), "cpu",
                num_classes=C, model_cfg=MODEL, shard=Shard([0], lambda flat: None))


def _start(kind: str) -> torch.Tensor:
    if kind == "static":
        layout = SlotLayout(C, 1)
        return init_static_memory(layout, SIZE, "real", torch.Generator().manual_seed(0), class_sampler())
    return s2d_set(vpc=2).dynamic_memory.detach()
