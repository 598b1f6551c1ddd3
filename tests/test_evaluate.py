"""The evaluation protocol: seeded fresh networks, last-epoch scores, Ray seeds aggregated into mean ± std."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import pyarrow as pa
import pyarrow.parquet as pq

from vdistill.config import Config, EvaluateConfig, ModelConfig, TrainConfig, load_config
from vdistill.data.clips import MANIFEST, ClipSet, clip_column, load_split, partition_uri
from vdistill.data.stream import SplitStream
from vdistill.distill.synset import storage_mb
from vdistill.evaluate import (TensorSource, eval_seeds, evaluate_set, format_results_table, lr_decay_epoch,
                               train_and_test)
from vdistill.storage import Storage, join

MODEL = ModelConfig(width=32, head="adaptive")
COLOURS = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0],
                        [0, 255, 255], [255, 0, 255], [255, 255, 255], [0, 0, 0]], dtype=torch.float)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def colour_clips(per_class: int, seed: int, classes: int = 8) -> ClipSet:
    """Each class is a flat colour under heavy pixel noise: separable, but only by learning."""
    labels = torch.arange(classes).repeat_interleave(per_class)
    noise = torch.randint(-60, 61, (len(labels), 8, 16, 16, 3), generator=torch.Generator().manual_seed(seed))
    videos = (COLOURS[labels].view(-1, 1, 1, 1, 3) * 0.6 + 50 + noise).clamp(0, 255).to(torch.uint8)
    return ClipSet(videos, labels, [f"c{i}" for i in range(classes)])


def write_cache(cache_uri: str, splits: dict[str, ClipSet]) -> None:
    """The splits as a clip cache in ingest's layout: one Parquet file per class, row groups of 3 clips."""
    for split, clips in splits.items():
        for c in range(len(clips.classes)):
            mine = (clips.labels == c).nonzero().flatten()
            table = pa.table({"clip": clip_column(clips.videos[mine].numpy()),
                              "label": pa.array([c] * len(mine), pa.int64()),
                              "key": pa.array([f"{split}-{int(i):04d}" for i in mine])})
            folder = partition_uri(cache_uri, split, c)
            Path(folder).mkdir(parents=True, exist_ok=True)
            pq.write_table(table, join(folder, "part-0.parquet"), row_group_size=3)
    any_split = next(iter(splits.values()))
    Storage().write_json(join(cache_uri, MANIFEST), {"classes": any_split.classes, "frames": 8, "size": 16,
                                                     "splits": sorted(splits)})


def run(train: ClipSet, test, epochs: int, seed: int = 0, source=None) -> dict:
    return train_and_test(source or TensorSource(train.videos, train.labels), test, model_name="convnet3d",
                          num_classes=len(test.classes), frames=8, size=16, model_cfg=MODEL,
                          eval_cfg=EvaluateConfig(epochs=epochs, batch_size=16), train_cfg=TrainConfig(), lr=0.01,
                          seed=seed, device="cpu")


def test_fresh_network_learns_a_separable_toy_set():
    result = run(colour_clips(4, 0), colour_clips(5, 1), epochs=40)
    assert result["top1"] >= 0.9
    assert result["top5"] >= result["top1"]
    assert (result["seed"], result["epochs"]) == (0, 40) and result["seconds"] > 0


def test_top1_and_top5_are_distinct_fields_of_an_undertrained_network():
    result = run(colour_clips(4, 0), colour_clips(5, 1), epochs=1)
    assert result["top5"] > result["top1"]


def test_same_seed_gives_the_same_network_and_score():
    train, test = colour_clips(2, 0), colour_clips(2, 1)
    a, b, c = run(train, test, epochs=3, seed=4), run(train, test, epochs=3, seed=4), run(train, test, epochs=3, seed=5)
    assert (a["train_loss"], a["top1"]) == (b["train_loss"], b["top1"])
    assert a["train_loss"] != c["train_loss"]


def test_the_source_is_asked_for_a_new_set_every_epoch():
    train = colour_clips(2, 0)

    class Counting:
        def __init__(self) -> None:
            self.generators: list[torch.Generator] = []

        def __call__(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            self.generators.append(generator)
            return train.videos, train.labels

    source = Counting()
    run(train, colour_clips(1, 1), epochs=3, source=source)
    assert len(source.generators) == 3 and all(isinstance(g, torch.Generator) for g in source.generators)


def test_a_test_split_streamed_from_the_cache_scores_exactly_like_the_split_in_memory(tmp_path):
    cache = str(tmp_path / "cache")
    train = colour_clips(2, 0)
    write_cache(cache, {"test": colour_clips(5, 1)})
    in_memory = run(train, load_split(Storage(), cache, "test"), epochs=3, seed=2)
    streamed = run(train, SplitStream(Storage(), cache, "test"), epochs=3, seed=2)
    assert (streamed["top1"], streamed["top5"], streamed["train_loss"]) == \
        (in_memory["top1"], in_memory["top5"], in_memory["train_loss"])
    assert 0 < streamed["top5"] < 1  # 3 epochs: a score that the test clips decide, not a saturated one


def test_the_full_data_baseline_trains_on_the_cache_stream_reproducibly(tmp_path):
    cache = str(tmp_path / "cache")
    write_cache(cache, {"train": colour_clips(4, 0), "test": colour_clips(5, 1)})
    train, test = SplitStream(Storage(), cache, "train"), SplitStream(Storage(), cache, "test")
    result = run(None, test, epochs=40, seed=3, source=train)
    assert result["top1"] >= 0.9
    again = run(None, test, epochs=2, seed=3, source=train), run(None, test, epochs=2, seed=3, source=train)
    assert again[0]["train_loss"] == again[1]["train_loss"]  # its epochs are drawn from the network's seed


def test_paper_presets_carry_the_papers_protocol_and_overrides_win():
    paper = load_config(CONFIGS / "miniucf_mtt_vpc1.yaml").evaluate
    assert (paper.epochs, paper.momentum, paper.weight_decay, paper.test_passes, paper.test_flip) == \
        (501, 0.9, 5e-4, 3, True)
    assert load_config(CONFIGS / "miniucf_mtt_vpc1.yaml", ["evaluate.epochs=10"]).evaluate.epochs == 10


def test_lr_drops_after_epoch_251_of_the_papers_501():
    assert lr_decay_epoch(501) == 251
    assert lr_decay_epoch(11) == 6  # epochs 0..6 at lr, 7..10 at lr/10


def test_evaluation_seeds_are_distinct_and_derived_from_the_run_seed():
    assert len(set(eval_seeds(0, 5))) == 5
    assert eval_seeds(0, 3) == eval_seeds(0, 3) != eval_seeds(1, 3)


def test_evaluate_set_runs_each_seed_as_a_ray_task_and_aggregates(ray_session):
    # 2 CPUs per task on the 4-CPU test Ray: two workers, each reused, so torch is imported twice, not four times.
    cfg = Config(model=MODEL, evaluate=EvaluateConfig(num_eval=2, epochs=50, batch_size=16, cpus_per_task=2))
    train, test = colour_clips(2, 0, classes=6), colour_clips(2, 1, classes=6)
    result = evaluate_set((train.videos, train.labels), test, cfg, storage_mb=storage_mb(train.videos),
                          clips=len(train.labels), models=["convnet3d", "mc3_18"], epochs=2)
    assert set(result["models"]) == {"convnet3d", "mc3_18"}
    assert (result["clips"], result["lr"], result["epochs"]) == (12, cfg.evaluate.lr, 2)
    for summary in result["models"].values():
        runs = summary["runs"]
        assert [r["seed"] for r in runs] == eval_seeds(cfg.run.seed, 2)
        assert [r["epochs"] for r in runs] == [2, 2]
        top1, top5 = np.array([r["top1"] for r in runs]), np.array([r["top5"] for r in runs])
        assert summary["top1_mean"] == pytest.approx(top1.mean()) and summary["top1_std"] == pytest.approx(top1.std())
        assert summary["top5_mean"] == pytest.approx(top5.mean()) and summary["top5_std"] == pytest.approx(top5.std())
    table = format_results_table([{"method": "random", "vpc": 2, **result}])
    assert "random" in table and "mc3_18" in table and "top-5" in table


def test_a_diverged_evaluation_is_reported_as_failed_not_as_a_number():
    train, test = colour_clips(2, 0), colour_clips(2, 1)
    result = train_and_test(TensorSource(train.videos, train.labels), test, model_name="convnet3d", num_classes=8,
                            frames=8, size=16, model_cfg=MODEL, eval_cfg=EvaluateConfig(epochs=5, batch_size=16),
                            train_cfg=TrainConfig(), lr=1e6, seed=0, device="cpu")
    assert result["top1"] is None and "lower evaluate.lr" in result["failed"]
    from vdistill.evaluate import _summary

    summary = _summary([result, {"top1": 0.5, "top5": 0.9}])
    assert summary["top1_mean"] is None and summary["failed"] == 1
    table = format_results_table([{"method": "DM+S2D", "vpc": 1, "storage_mb": 1.0, "clips": 8,
                                   "models": {"convnet3d": summary}}])
    assert "failed (1/2 diverged)" in table and "nan" not in table.lower()


def test_random_selection_gets_a_fresh_draw_per_network_and_each_network_trains_on_its_own(ray_session, tmp_path):
    from vdistill.stages.evaluate import coreset_sources

    cache = str(tmp_path / "cache")
    write_cache(cache, {"train": colour_clips(6, 0), "test": colour_clips(2, 1)})
    cfg = Config(model=MODEL, evaluate=EvaluateConfig(num_eval=3, epochs=1, batch_size=16))
    draws, mb, clips = coreset_sources(cfg, Storage(), cache, "random", 1, None)
    assert len(draws) == 3 and clips == 8 and mb == pytest.approx(storage_mb(draws[0].videos, as_float32=True))
    assert len({tuple(d.videos.flatten()[::97].tolist()) for d in draws}) == 3  # three different picks
    again, _, _ = coreset_sources(cfg, Storage(), cache, "random", 1, None)
    assert all(torch.equal(a.videos, b.videos) for a, b in zip(draws, again))  # the same draws at every re-run
    assert len(coreset_sources(cfg, Storage(), cache, "herding", 1, None)[0]) == 1  # deterministic: one set
    # Each network trains on its own draw: the scores equal three single-draw evaluations with the same seeds.
    test = colour_clips(2, 1)
    together = evaluate_set(draws, test, cfg)["models"]["convnet3d"]["runs"]
    seeds = eval_seeds(cfg.run.seed, 3)
    alone = [run(ClipSet(d.videos, d.labels, test.classes), test, epochs=1, seed=s)["top1"]
             for d, s in zip(draws, seeds)]
    assert [r["top1"] for r in together] == pytest.approx(alone)
