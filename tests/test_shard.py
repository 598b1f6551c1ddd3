"""A loop split over workers: two processes summing their shares over gloo take exactly the steps of one process
(the foundation of `run.distill_workers`, issue 22). DM and DC split by class; MTT splits every student step's
batch, in both of its modes, with dropout on."""
from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vdistill.config import StaticConfig
from vdistill.distill.loop import Recipe, Shard, distill
from vdistill.distill.objectives import class_blocks
from vdistill.distill.synset import PixelSet, SlotLayout, init_static_memory
from tests.test_stages import C, MODEL, SIZE, class_sampler, dyn_cfg, s2d_set, video_experts

ITERATIONS = 10
KINDS = ["static-dm", "static-dc", "dynamic-dm", "dynamic-mtt-constant", "dynamic-mtt-unrolled"]


def _loop(kind: str, shard: Shard | None) -> dict[str, torch.Tensor]:
    """10 iterations of the static stage on stills (DM or DC), or the dynamic stage on an S2D set (DM, or MTT in
    one of its modes, learning its lr); -> the set."""
    sampler, extra = class_sampler(), {}
    if kind.startswith("static"):
        synset = PixelSet(_start(kind), C)
        recipe = Recipe.static(StaticConfig(method=kind.split("-")[1], iterations=ITERATIONS, batch_real=4),
                               dyn_cfg())
    else:
        synset = s2d_set(vpc=2)
        settings = dict(iterations=ITERATIONS, optimizer="adam", lr_dynamic=0.05, lr_integrator=1e-3)
        if kind == "dynamic-dm":
            recipe = Recipe.dynamic(dyn_cfg(method="dm", **settings))
        else:  # 6 videos per student step: 3 per worker
            recipe = Recipe.dynamic(dyn_cfg(method="mtt", mtt_mode=kind.split("-")[2], syn_steps=3, **settings))
            extra = dict(snapshot=video_experts(2)[0], expert_ids=[0, 1])
    distill(synset, recipe, sampler, torch.Generator().manual_seed(3), "cpu", num_classes=C, model_cfg=MODEL,
            shard=shard, **extra)
    return synset.state_tensors()


def _worker(rank: int, world: int, kind: str, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        tensors = _loop(kind, Shard(rank, world, lambda flat: dist.all_reduce(flat)))
        torch.save(tensors, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", KINDS)
def test_two_workers_make_the_set_of_one(kind, tmp_path):
    one = _loop(kind, None)
    mp.start_processes(_worker, args=(2, kind, str(tmp_path / "store"), str(tmp_path)), nprocs=2,
                       join=True, start_method="spawn")
    for rank in range(2):
        two = torch.load(tmp_path / f"rank{rank}.pt")
        assert two.keys() == one.keys()
        for name, tensor in one.items():
            scale = tensor.abs().max().clamp_min(1e-12)
            assert (two[name] - tensor).abs().max() / scale <= 1e-4, (rank, name)
    moved = "videos" if kind.startswith("static") else "dynamic_memory"
    assert not torch.equal(one[moved], _start(kind)), "the loop must have moved the set"
    if "mtt" in kind:
        assert one["syn_lr"].item() != s2d_set(vpc=2).syn_lr.item(), "MTT must have learned its lr"


def test_blocks_cover_every_class_and_every_row_once():
    for n, world in ((3, 2), (400, 3), (5, 8)):
        blocks = class_blocks(n, world)
        assert [c for block in blocks for c in block] == list(range(n))
        rows = [Shard(rank, world, lambda flat: None).rows(n) for rank in range(world)]
        assert [i for r in rows for i in range(n)[r]] == list(range(n))


def _start(kind: str) -> torch.Tensor:
    if kind.startswith("static"):
        return init_static_memory(SlotLayout(C, 1), SIZE, "real", torch.Generator().manual_seed(0), class_sampler())
    return s2d_set(vpc=2).dynamic_memory.detach()
