"""The validation guard (METHOD.md 5.9): a held-out share of the training clips, scored during every distillation loop;
a loop ends holding its best iterate, backs off when unstable, and a run says when a stage did not gain."""
from __future__ import annotations

import random

import torch

from vdistill.config import DataConfig, ValidationConfig, load_config
from vdistill.coordinator import _no_gain_line
from vdistill.data.clips import ClipSet
from vdistill.data.manifests import VideoRow, carve_validation
from vdistill.distill.loop import Recipe, _Instability, distill
from vdistill.distill.synset import S2DSet, SlotLayout, init_static_memory
from vdistill.evaluate import validation_scorer
from tests.test_stages import C, MODEL, T, SIZE, dyn_cfg, motion_sampler


def rows(train: dict[int, int], test: int = 3) -> list[VideoRow]:
    out = [VideoRow(f"s3://b/v/{c}/clip{i}.mp4", c, "train") for c, n in train.items() for i in range(n)]
    return out + [VideoRow(f"s3://b/v/{c}/test{i}.mp4", c, "test") for c in train for i in range(test)]


def test_validation_split_is_a_stratified_share_of_training_clips_the_same_in_any_order():
    data = DataConfig()  # val_fraction 0.2, val_max_per_class 10
    original = rows({0: 10, 1: 30, 2: 100, 3: 1})
    carved = carve_validation(original, data)
    val = [r for r in carved if r.split == "val"]
    assert {c: sum(r.label == c for r in val) for c in range(4)} == {0: 2, 1: 6, 2: 10, 3: 0}  # capped, last kept
    assert {r.uri for r in val} <= {r.uri for r in original if r.split == "train"}  # never a test clip
    assert sum(r.split == "test" for r in carved) == sum(r.split == "test" for r in original)
    shuffled = original[:]
    random.Random(1).shuffle(shuffled)
    assert {r.uri for r in carve_validation(shuffled, data) if r.split == "val"} == {r.uri for r in val}
    assert not any(r.split == "val" for r in carve_validation(original, DataConfig(val_fraction=0)))


def test_the_three_splits_must_have_three_names():
    try:
        load_config(None, ["data.val_split=test"])
    except ValueError as exc:
        assert "data.train_split, data.test_split and data.val_split must differ" in str(exc)
    else:
        raise AssertionError("a validation split named like the test split was accepted")


def motion_val_split(scrambled: bool = False) -> ClipSet:
    """Held-out clips of the motion classes; `scrambled` relabels them at random, so that scores differ from
    iterate to iterate and the best one is not simply the first."""
    sample = motion_sampler()
    g = torch.Generator().manual_seed(11)
    videos = torch.cat([sample(c, 4, g) for c in range(C)])
    labels = torch.arange(C).repeat_interleave(4)
    if scrambled:
        labels = labels[torch.randperm(len(labels), generator=g)]
    return ClipSet(videos, labels, [f"class{c}" for c in range(C)])


def guarded(method: str = "dm", **cfg) -> tuple[S2DSet, Recipe]:
    layout = SlotLayout(C, 1)
    g = torch.Generator().manual_seed(0)
    synset = S2DSet.create(layout, init_static_memory(layout, SIZE, "real", g, motion_sampler()), T, g,
                           integrator_init="residual", dynamic_init="real", sample_real=motion_sampler())
    guard = ValidationConfig(every=2, num_nets=1, epochs=3, window=3)
    settings = {"method": method, "optimizer": "adam", "lr_dynamic": 0.05, "lr_integrator": 1e-3, **cfg}
    return synset, Recipe.dynamic(dyn_cfg(**settings), guard)


def scorer(scrambled: bool = False):
    cfg = load_config(None, ["model.width=8", "model.head=adaptive", "run.device=cpu"])
    return validation_scorer(motion_val_split(scrambled), cfg)


def test_a_diverging_stage_backs_off_then_keeps_its_starting_set_and_says_so():
    synset, recipe = guarded(iterations=8, lr_dynamic=1e30)
    start = synset.state_tensors()
    lines: list[str] = []
    record = distill(synset, recipe, motion_sampler(), torch.Generator().manual_seed(0), "cpu", num_classes=C,
                     model_cfg=MODEL, validate=scorer(), log=lines.append)
    assert [b["reloaded"] for b in record.backoffs] == [0, 0] and record.stopped_early
    assert [b["scale"] for b in record.backoffs] == [0.3, 0.3 * 0.3]
    assert any("back-off 1/2" in line and "dynamic.lr_dynamic" in line for line in lines)
    assert not record.improved and record.best_iteration == 0
    for name, tensor in start.items():
        assert torch.equal(synset.state_tensors()[name], tensor), name
    line = _no_gain_line("dynamic-dm", record.to_dict())
    assert line.startswith("DM+S2D did not improve on its starting set (validation ") and "dynamic.lr_dynamic" in line


def test_a_loop_ends_holding_its_best_validation_iterate():
    synset, recipe = guarded(iterations=6, checkpoint_every=1)
    saved: list[dict] = []
    record = distill(synset, recipe, motion_sampler(), torch.Generator().manual_seed(0), "cpu", num_classes=C,
                     model_cfg=MODEL, validate=scorer(scrambled=True), on_checkpoint=saved.append)
    assert [it for it, _ in record.scores] == [0, 2, 4, 6]
    assert record.best == max(score for _, score in record.scores)
    best = record.scores[[s for _, s in record.scores].index(record.best)][0]
    assert record.best_iteration == best
    kept = saved[best - 1]["tensors"] if best else guarded()[0].state_tensors()
    for name, tensor in kept.items():
        assert torch.equal(synset.state_tensors()[name], tensor), name


def test_a_resumed_loop_keeps_the_best_iterate_found_before_the_interruption():
    synset, recipe = guarded(iterations=6, checkpoint_every=3)
    saved: list[dict] = []
    straight = distill(synset, recipe, motion_sampler(), torch.Generator().manual_seed(0), "cpu", num_classes=C,
                       model_cfg=MODEL, validate=scorer(), on_checkpoint=saved.append)
    fresh, _ = guarded(iterations=6, checkpoint_every=3)
    resumed = distill(fresh, recipe, motion_sampler(), torch.Generator().manual_seed(0), "cpu", num_classes=C,
                      model_cfg=MODEL, validate=scorer(), state=saved[0])
    assert resumed.to_dict() == straight.to_dict()
    for name, tensor in synset.state_tensors().items():
        assert torch.equal(fresh.state_tensors()[name], tensor), name


def test_instability_is_a_sustained_rise_or_a_pinned_lr_not_noise():
    rising, noisy, pinned = _Instability(3), _Instability(3), _Instability(3)
    assert [rising.observe(x, False) != "" for x in (1.0, 1.0, 1.0, 1.2, 1.3)] == [False] * 4 + [True]
    assert not any(noisy.observe(x, False) for x in (1.0, 0.9, 1.1, 1.04, 0.8, 1.02, 0.95))
    assert [pinned.observe(0.5, True) != "" for _ in range(3)] == [False, False, True]


def test_a_loss_that_scatters_by_tens_of_percent_is_not_a_rise_but_a_sustained_climb_is():
    # DM's loss under a fresh random network each iteration scatters ~20% around a flat level: 500 iterations
    # checked at every one must never back off; the same scatter on a level that climbs 40% must.
    noise = torch.randn(500, generator=torch.Generator().manual_seed(0)).mul(0.2).add(1.0).clamp(min=0.05)
    flat, climbing = _Instability(10), _Instability(10)
    assert not any(flat.observe(float(x), False) for x in noise)
    level = torch.cat([torch.ones(100), torch.full((400,), 1.4)])
    assert any(climbing.observe(float(x * l), False) for x, l in zip(noise, level))
