"""What a starting set is worth before any distillation, at about one real clip's storage per class.

Trains one fresh network per random draw of real clips (`--draws` draws, so the spread includes which clips
were drawn) on each kind of starting set and prints top-1 on the test split with each set's storage:

- random real clips, 1 and 2 per class (the baseline, and what twice its storage buys);
- the paper's S2D layout started from real data, 2 stills + 2 motion residuals per class drawn from *different*
  clips and paired at random every epoch (`dynamic.init=real`, `integrator_init=residual`: the former default);
- the same with each still paired with its own clip's residual (a still = the clip's temporal mean);
- grayscale real clips, 3 per class (8 planes a clip instead of 24: three clips in one clip's storage);
- grayscale real clips at half size, 12 per class (2 planes a clip: twelve in one clip's storage);
- S2D's default start (METHOD.md 5.2a): 8 slots of 1 still + 1 clip per class at half size, each clip's
  luminance on its still's colours (stills = random real frames), made by `S2DSet.create` with the default
  `dynamic.*` settings.

    python jobs/bench_starts.py --motion camera        # needs the set made by jobs/bench_quality.py --motion camera
"""
from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from vdistill.config import DynamicConfig, load_config  # noqa: E402
from vdistill.coordinator import connect_ray, run_pipeline  # noqa: E402
from vdistill.coreset import random_choice, select_coreset  # noqa: E402
from vdistill.data.clips import ClipSet, load_split  # noqa: E402
from vdistill.data.pixels import to_model_input  # noqa: E402
from vdistill.distill.synset import (S2DSet, SlotLayout, downscale, init_static_memory, real_residuals,  # noqa: E402
                                     upscale)
from vdistill.evaluate import EpochSource, TensorSource, eval_seeds, train_and_test  # noqa: E402
from vdistill.storage import Storage  # noqa: E402

Start = Callable[[ClipSet, torch.Generator], EpochSource]


def draw(train: ClipSet, n: int, generator: torch.Generator) -> ClipSet:
    """`n` random clips of every class, class-major (the random coreset)."""
    return select_coreset("random", train.class_clips, train.classes, n, None, "cpu", generator)


def real(n: int) -> Start:
    def make(train: ClipSet, g: torch.Generator) -> EpochSource:
        picked = draw(train, n, g)
        return TensorSource(picked.videos, picked.labels)
    return make


def grayscale(n: int) -> Start:
    def make(train: ClipSet, g: torch.Generator) -> EpochSource:
        picked = draw(train, n, g)
        x = to_model_input(picked.videos)
        return TensorSource(x.mean(2, keepdim=True).expand_as(x).contiguous(), picked.labels)
    return make


def grayscale_small(n: int, scale: int) -> Start:
    def make(train: ClipSet, g: torch.Generator) -> EpochSource:
        picked = draw(train, n, g)
        x = upscale(downscale(to_model_input(picked.videos).mean(2, keepdim=True), scale), scale)
        return TensorSource(x.expand(-1, -1, 3, -1, -1).contiguous(), picked.labels)
    return make


def s2d_default(train: ClipSet, g: torch.Generator) -> EpochSource:
    """The dynamic stage's iteration 0 with the default settings, stills = random real frames."""
    cfg = DynamicConfig()
    layout = SlotLayout.from_config(len(train.classes), cfg, train.videos.shape[1])

    def sample(c: int, n: int, generator: torch.Generator) -> torch.Tensor:
        clips = train.class_clips(c)
        return clips[random_choice(len(clips), n, generator)]

    stills = init_static_memory(layout, train.videos.shape[2], "real", g, sample)
    return S2DSet.create(layout, stills, train.videos.shape[1], g, integrator_init=cfg.integrator_init,
                         dynamic_init=cfg.init, sample_real=sample).source()


def own_motion(n: int) -> Start:
    """Each clip as its temporal mean (a colour still) plus its own grayscale residual: what S2D stores, paired."""
    def make(train: ClipSet, g: torch.Generator) -> EpochSource:
        picked = draw(train, n, g)
        still = to_model_input(picked.videos).mean(1, keepdim=True)
        return TensorSource(still + real_residuals(picked.videos), picked.labels)
    return make


class RandomPairing:
    """The paper layout from real data: 2 stills (one random frame of each of 2 clips) and 2 residuals of 2 other
    clips per class; every epoch each class's video is a random still plus a random residual."""

    def __init__(self, train: ClipSet, g: torch.Generator) -> None:
        stills = to_model_input(draw(train, 2, g).videos)
        self.stills = stills[torch.arange(len(stills)), torch.randint(stills.shape[1], (len(stills),), generator=g)]
        self.residuals = real_residuals(draw(train, 2, g).videos)
        self.classes = len(train.classes)

    def __call__(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        base = 2 * torch.arange(self.classes)
        s, d = base + torch.randint(2, (self.classes,), generator=g), base + torch.randint(2, (self.classes,), generator=g)
        return self.stills[s].unsqueeze(1) + self.residuals[d], torch.arange(self.classes)


ROWS: list[tuple[str, Start, int]] = [  # label, start, fp32 planes of H x W per class
    ("random real clips, 1 per class", real(1), 24),
    ("random real clips, 2 per class", real(2), 48),
    ("paper layout, real start: 2 stills x 2 residuals, random pairs", RandomPairing, 22),
    ("S2D start: 2 clips, each still with its own motion", own_motion(2), 22),
    ("grayscale real clips, 3 per class", grayscale(3), 24),
    ("grayscale real clips at half size, 12 per class", grayscale_small(12, 2), 24),
    ("S2D default start: 8 x (1 still + 1 clip), half size", s2d_default, 22),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--motion", choices=["playback", "camera", "rotation"], default="playback")
    parser.add_argument("--classes", type=int, default=12)
    parser.add_argument("--draws", type=int, default=5, help="random draws per row, one fresh network each")
    parser.add_argument("--root", default="runs/bench-quality")
    parser.add_argument("--rows", default="", help="comma list of row numbers to run (1-based; default all)")
    args = parser.parse_args()
    cfg = load_config(None, ["demo.kind=footage", f"demo.motion={args.motion}", f"demo.classes={args.classes}",
                             "demo.train_per_class=30", "demo.test_per_class=10", f"run.root={args.root}",
                             f"run.name=bench-footage-{args.motion}-{args.classes}", "tracking.enabled=false"])
    storage = Storage()
    if not storage.exists(cfg.cache_uri):
        connect_ray(cfg)
        run_pipeline(cfg, until="ingest", demo=True)
    train, test = (load_split(storage, cfg.cache_uri, s) for s in (cfg.data.train_split, cfg.data.test_split))
    frames, size = train.videos.shape[1], train.videos.shape[2]
    print(f"{args.motion} set: {len(train.classes)} classes, {args.draws} draws x 1 network per row, "
          f"{cfg.evaluate.epochs} epochs; chance {100 / len(train.classes):.1f}%\n")
    print(f"{'starting set':50} | storage MB | top-1 %")
    chosen = [int(i) - 1 for i in args.rows.split(",")] if args.rows else range(len(ROWS))
    for label, start, planes in (ROWS[i] for i in chosen):
        began, scores = time.time(), []
        for i, seed in enumerate(eval_seeds(cfg.run.seed, args.draws)):
            source = start(train, torch.Generator().manual_seed(cfg.run.seed + i))
            scores.append(train_and_test(source, test, model_name="convnet3d", num_classes=len(train.classes),
                                         frames=frames, size=size, model_cfg=cfg.model, eval_cfg=cfg.evaluate,
                                         train_cfg=cfg.train, lr=cfg.evaluate.lr, seed=seed,
                                         device=torch.device("cpu"))["top1"])
        top1 = 100 * np.array(scores)
        mb = planes * len(train.classes) * size * size * 4 / 1e6
        print(f"{label:50} | {mb:10.2f} | {top1.mean():.1f} ± {top1.std():.1f}  ({time.time() - began:.0f} s)",
              flush=True)


if __name__ == "__main__":
    main()
