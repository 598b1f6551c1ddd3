"""Memory and time of every stage as the data grows: a Kinetics-shaped cache (400 classes) at N clips per class.

Usage: `python jobs/bench_scale.py [--sizes 5 20 80] [--classes 400] [--frames 8] [--size 32] [--stages ...]`

For each N a clip cache of `classes` x N training clips (plus a fixed test split of 2 clips per class) is written
straight to Parquet in the layout ingest writes (row groups of 16 clips, the `cache.rows_per_group` default), then
every stage runs on it for a few iterations/epochs, each in a fresh subprocess, so that the subprocess's peak RSS
(`ru_maxrss`) is the memory of the process that does that stage's work:

- ingest: `run_ingest` on a local Ray over `classes` x N (+2 test) real H.264 files (one encoded clip per class,
  copied under every clip's name): the peak RSS of its busiest Ray worker (decode and compaction tasks) and of
  the driver, and seconds per 1,000 videos;
- experts: one expert trained by `train_expert` (what a Ray Train worker runs), streaming its epochs;
- static-dm, dynamic-dm, dynamic-mtt: the coordinator's loops (`distill`) with the real-clip sampler at
  `--sampler-mb` (default: the smallest budget whose pools hold `batch_real` clips per class, so every N above
  `2 x batch_real` clips per class is sampled from pools and the bound is exercised);
- evaluate: herding on the training split (class by class) and one evaluation network trained on the coreset,
  tested on the streamed test split; evaluate-full: the full-data baseline as the evaluate stage runs it (one
  epoch streamed from the cache).

Prints a table (peak RSS MiB and seconds per epoch/iteration per N) and, last, the worst stage's memory growth
between the smallest and the largest N: `memory growth over 16x data: worst stage <name> <ratio>x`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STAGES = ("ingest", "experts", "static-dm", "dynamic-dm", "dynamic-mtt", "evaluate", "evaluate-full")
BATCH_REAL = 8  # dynamic.batch_real / static.batch_real of the distillation stages
TEST_PER_CLASS = 2


def write_cache(root: str, classes: int, per_class: int, frames: int, size: int) -> str:
    """A cache of random uint8 clips with a per-class colour (enough structure for the losses to be non-trivial),
    written by ingest's own writer (`cache.file_mb` files, row groups of `cache.rows_per_group` clips)."""
    import numpy as np

    from vdistill.data.clips import MANIFEST
    from vdistill.data.ingest import _write_part
    from vdistill.storage import Storage, join

    storage, cache = Storage(), join(root, "cache")
    rng = np.random.default_rng(0)
    counts: dict[str, dict[str, int]] = {}
    for split, n in (("train", per_class), ("test", TEST_PER_CLASS)):
        counts[split] = {}
        for c in range(classes):
            clips = rng.integers(0, 160, (n, frames, size, size, 3), dtype=np.uint8)
            clips[..., c % 3] += 90
            _write_part(storage, cache, split, c, [(f"{split}-{c:04d}-{i:05d}", "", clips[i]) for i in range(n)])
            counts[split][str(c)] = n
    storage.write_json(join(cache, MANIFEST), {
        "classes": [f"class {c:03d}" for c in range(classes)], "frames": frames, "size": size,
        "splits": ["test", "train"], "counts": counts})
    return cache


# ---- stage workers (each in its own process) ----------------------------------------------------------------
def _config(spec: dict):
    from vdistill.config import load_config

    return load_config(None, [
        f"run.root={spec['root']}/runs", "run.name=scale", f"cache.uri={spec['cache']}", "run.device=cpu",
        f"model.width={spec['width']}", "model.head=adaptive", f"model.width_2d={spec['width']}",
        "experts.epochs=2", "experts.batch_size=64", "experts.test_every=0", f"cache.sampler_mb={spec['sampler_mb']}",
        f"dynamic.batch_real={BATCH_REAL}", f"static.batch_real={BATCH_REAL}", "dynamic.syn_steps=2", "dynamic.max_start_epoch=1",
        "dynamic.expert_epochs=1", "dynamic.batch_syn=256", "evaluate.epochs=2", "evaluate.batch_size=64",
        "tracking.enabled=false"])


def _distill_worker(spec: dict) -> dict:
    """static-dm / dynamic-dm / dynamic-mtt: the coordinator's loop over the bounded sampler."""
    import torch

    from vdistill.data.clips import ClassSampler
    from vdistill.distill.loop import Recipe, distill
    from vdistill.distill.synset import PixelSet, S2DSet, SlotLayout, init_static_memory
    from vdistill.models import build_model, flat_params
    from vdistill.storage import Storage

    cfg, seconds = _config(spec), []
    generator = torch.Generator().manual_seed(0)
    with ClassSampler(Storage(), spec["cache"], "train", memory_mb=cfg.cache.sampler_mb) as sampler:
        c, t, size = sampler.num_classes, sampler.manifest["frames"], sampler.manifest["size"]
        layout = SlotLayout.from_config(c, cfg.dynamic, t)
        stills = init_static_memory(layout, size, "real", generator, sampler.sample)
        snapshot = None
        if spec["stage"] == "static-dm":
            synset, recipe = PixelSet(stills, c), Recipe.static(cfg.static.model_copy(update={
                "iterations": spec["iterations"]}), cfg.dynamic)
        else:
            method = spec["stage"].split("-")[1]
            dynamic = cfg.dynamic.model_copy(update={"method": method, "iterations": spec["iterations"]})
            synset, recipe = S2DSet.create(layout, stills, t, generator, sample_real=sampler.sample), Recipe.dynamic(
                dynamic)
            if method == "mtt":
                theta = flat_params(build_model("convnet3d", c, t, size, cfg.model, seed=0))
                steps = [theta + 0.01 * e * torch.randn(theta.shape, generator=generator) for e in range(3)]
                snapshot = lambda expert, epoch: steps[epoch]  # noqa: E731
        distill(synset, recipe, sampler.sample, generator, "cpu", num_classes=c, model_cfg=cfg.model,
                snapshot=snapshot, expert_ids=[0], on_metrics=lambda it, m: seconds.append(m["seconds"]))
    return {"seconds": min(seconds[1:] or seconds), "unit": "s/iteration"}


def _evaluate_worker(spec: dict) -> dict:
    """evaluate: herding class by class from the cache, then one network trained on it and tested."""
    import torch

    from vdistill.data.stream import SplitStream
    from vdistill.evaluate import TensorSource, train_and_test
    from vdistill.stages.evaluate import coreset
    from vdistill.storage import Storage

    cfg, storage = _config(spec), Storage()
    tic = time.perf_counter()
    subset = coreset(cfg, storage, spec["cache"], "herding", 1, None)
    test = SplitStream(storage, spec["cache"], "test")
    train_and_test(TensorSource(subset.videos, subset.labels), test, model_name="convnet3d",
                   num_classes=len(subset.classes), frames=subset.videos.shape[1], size=subset.videos.shape[2],
                   model_cfg=cfg.model, eval_cfg=cfg.evaluate, train_cfg=cfg.train, lr=0.01, seed=0,
                   device=torch.device("cpu"))
    return {"seconds": time.perf_counter() - tic, "unit": "s (herding + 1 network)"}


def _experts_worker(spec: dict) -> dict:
    """experts: one video expert, 2 epochs, streamed from the cache as a Ray Train worker streams it."""
    import torch

    from vdistill.data.stream import SplitStream
    from vdistill.experts import TrajectoryReader, plan_experts, train_expert
    from vdistill.storage import Storage

    cfg, storage = _config(spec), Storage()
    job = plan_experts(cfg, storage, "video")[0]
    uri = train_expert(job, storage, SplitStream(storage, spec["cache"], "train"),
                       SplitStream(storage, spec["cache"], "test"), torch.device("cpu"))
    history = TrajectoryReader(storage, uri).meta["history"]
    return {"seconds": min(h["train_seconds"] for h in history), "unit": "s/epoch"}


def _full_data_worker(spec: dict) -> dict:
    """evaluate-full: the full-data baseline as the evaluate stage runs it (streamed from the cache), 1 epoch."""
    import torch

    from vdistill.data.stream import SplitStream
    from vdistill.evaluate import train_and_test
    from vdistill.storage import Storage

    cfg, storage = _config(spec), Storage()
    tic = time.perf_counter()
    train, test = SplitStream(storage, spec["cache"], "train"), SplitStream(storage, spec["cache"], "test")
    train_and_test(train, test, model_name="convnet3d", num_classes=len(train.classes), frames=train.clip_shape[0],
                   size=train.clip_shape[1], model_cfg=cfg.model, eval_cfg=cfg.evaluate.model_copy(update={"epochs": 1}),
                   train_cfg=cfg.train, lr=0.01, seed=0, device=torch.device("cpu"))
    return {"seconds": time.perf_counter() - tic, "unit": "s/epoch (incl. test)"}


def write_videos(root: str, classes: int, per_class: int, frames: int, size: int) -> str:
    """`classes` x (per_class train + 2 test) H.264 files, one encoded clip per class copied under every clip's name
    (decoding cost and memory are per video, not per distinct content), and their generic CSV."""
    import numpy as np

    from vdistill.data.synthetic import encode_mp4

    rng = np.random.default_rng(0)
    rows = []
    for c in range(classes):
        folder = Path(root, "videos", f"class{c:03d}")
        folder.mkdir(parents=True)
        clip = rng.integers(0, 160, (frames, size, size, 3), dtype=np.uint8)
        clip[..., c % 3] += 90
        data = encode_mp4(clip, fps=8)
        for split, n in (("train", per_class), ("test", TEST_PER_CLASS)):
            for i in range(n):
                name = f"class{c:03d}/{split}{i:05d}.mp4"
                (folder / name.split("/")[1]).write_bytes(data)
                rows.append(f"{name},class{c:03d},{split}")
    csv = Path(root, "videos", "annotations.csv")
    csv.write_text("path,label,split\n" + "\n".join(rows) + "\n")
    return str(csv)


def _ingest_worker(spec: dict) -> dict:
    """ingest: run_ingest on a fresh local Ray; the peak RSS of its busiest worker process and of this driver."""
    import ray

    from vdistill.config import load_config
    from vdistill.data.ingest import run_ingest
    from vdistill.storage import Storage

    csv = write_videos(spec["root"], spec["classes"], spec["n"], spec["frames"], spec["size"])
    cfg = load_config(None, [f"data.annotations={csv}", f"data.root={Path(csv).parent}",
                             f"cache.uri={spec['root']}/ingested", f"decode.frames={spec['frames']}",
                             f"decode.size={spec['size']}"])
    ray.init(num_cpus=spec["threads"], include_dashboard=False, log_to_driver=False)
    try:
        summary = run_ingest(cfg, Storage(), progress=False)
    finally:
        ray.shutdown()
    videos = spec["classes"] * (spec["n"] + TEST_PER_CLASS)
    return {"seconds": 1000 * summary["throughput"]["elapsed_s"] / videos, "unit": "s per 1,000 videos",
            "worker_peak_mib": summary["timings"]["workers"]["peak_rss_mib"]}


WORKERS = {"ingest": _ingest_worker, "experts": _experts_worker, "evaluate-full": _full_data_worker,
           "static-dm": _distill_worker, "dynamic-dm": _distill_worker, "dynamic-mtt": _distill_worker,
           "evaluate": _evaluate_worker}


def _run_worker(spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}, check=False)
    if out.returncode:
        raise RuntimeError(f"{spec['stage']} at N={spec['n']} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _worker_main(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    result = WORKERS[spec["stage"]](spec)
    result["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5, 20, 80], help="training clips per class")
    parser.add_argument("--classes", type=int, default=400)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--width", type=int, default=32, help="ConvNet3D width")
    parser.add_argument("--sampler-mb", type=float, default=None,
                        help="cache.sampler_mb of the distillation loops (default: pools of batch_real clips per class)")
    parser.add_argument("--iterations", type=int, default=3, help="distillation iterations (the first is warm-up)")
    parser.add_argument("--stages", nargs="+", default=[s for s in STAGES if s in WORKERS], choices=STAGES)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker_main(json.loads(args.worker))
        return

    sampler_mb = args.sampler_mb or math.ceil(2 * BATCH_REAL * args.classes * args.frames * args.size**2 * 3 / 1e6)
    results: dict[str, dict[int, dict]] = {}
    tic = time.perf_counter()
    for n in args.sizes:
        with tempfile.TemporaryDirectory(prefix="vdistill-scale-") as root:
            write_start = time.perf_counter()
            cache = write_cache(root, args.classes, n, args.frames, args.size)
            print(f"N={n}: cache of {args.classes} x {n} clips written in {time.perf_counter() - write_start:.0f} s",
                  flush=True)
            for stage in args.stages:
                spec = {"stage": stage, "n": n, "root": root, "cache": cache, "width": args.width,
                        "sampler_mb": sampler_mb, "iterations": args.iterations, "threads": args.threads,
                        "classes": args.classes, "frames": args.frames, "size": args.size}
                r = _run_worker(spec)
                rows = {stage: r}
                if stage == "ingest":  # its work runs in Ray workers: their peak, then the driver's
                    rows = {"ingest tasks": {**r, "peak_mib": r["worker_peak_mib"]}, "ingest driver": r}
                for name, row in rows.items():
                    results.setdefault(name, {})[n] = row
                    print(f"  {name:<14} peak {row['peak_mib']:7.0f} MiB   {row['seconds']:8.3f} {row['unit']}",
                          flush=True)

    small, large = min(args.sizes), max(args.sizes)
    header = f"{'stage':<14} | " + " | ".join(f"N={n:<4} MiB   time" for n in args.sizes) + " | memory ratio"
    print(f"\n{args.classes} classes, clips {args.frames}x{args.size}^2, {args.threads} thread(s), cache.sampler_mb "
          f"{sampler_mb:g}; wall {time.perf_counter() - tic:.0f} s\n{header}\n{'-' * len(header)}")
    growth = {}
    for stage, by_n in results.items():
        growth[stage] = by_n[large]["peak_mib"] / by_n[small]["peak_mib"]
        cells = " | ".join(f"{by_n[n]['peak_mib']:7.0f} {by_n[n]['seconds']:7.2f}" for n in args.sizes)
        print(f"{stage:<14} | {cells} | {growth[stage]:.2f}x")
    worst = max(growth, key=growth.get)
    print(f"memory growth over {large // small}x data: worst stage {worst} {growth[worst]:.2f}x")


if __name__ == "__main__":
    main()
