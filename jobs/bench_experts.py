"""Benchmark: expert training through Ray Train vs a bare PyTorch loop, 1 vs 2 workers, and a worker's memory.

Generates a random uint8 clip cache with class structure, then trains the experts a `static.method=mtt` run
needs (video and frame experts: model, batch, epochs the same everywhere) three ways in one run: a bare
single-process loop over the split held in memory (`vdistill.train.train_epoch`, the fastest a loop can read
its data), `run_experts` with 1 Ray Train worker and with 2, both kinds in one Ray Train run, each expert
streaming its epochs from the cache. Every worker and the bare loop use one CPU thread, so throughput compares
per core. End to end is wall time; "training only" is the time inside the epoch loops (for Ray Train that
includes streaming the epoch from the cache). Start-up comes from the epoch timestamps the experts record.

`--memory` instead trains one video and one frame expert (1 worker, 400 classes of 8x32x32 clips) at 5 and at
80 clips per class and prints the Ray Train worker's peak RSS at both sizes and the time per epoch.

`--readers` compares how an expert could read its epochs (400 classes x 20 clips of 8x32x32, batches of 64, the
same 64 MB shuffle buffer, no training): `SplitStream` (what experts use: pyarrow row groups in a seeded order)
against Ray Data (`read_parquet` + `iter_torch_batches` with a seeded local shuffle buffer), each in a fresh
process with a fresh local Ray: seconds per epoch (first and second) and the peak RSS of every process involved
(the reader's, plus Ray's workers, raylet and object store for Ray Data).

    python jobs/bench_experts.py [--quick | --long]     # --long: the bare loop alone runs >= 5 minutes
    python jobs/bench_experts.py --memory
    python jobs/bench_experts.py --readers
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from rss import RssSampler  # noqa: E402  (jobs/rss.py)
from vdistill.config import Config, load_config  # noqa: E402
from vdistill.data.clips import load_split  # noqa: E402
from vdistill.data.ingest import MANIFEST, _write_part  # noqa: E402
from vdistill.experts import KINDS, ExpertJob, TrajectoryReader, plan_experts, run_experts  # noqa: E402
from vdistill.models import flat_params  # noqa: E402
from vdistill.storage import Storage, join  # noqa: E402
from vdistill.train import test_accuracy, train_epoch  # noqa: E402


def write_cache(storage: Storage, cache_uri: str, classes: int, per_class: dict[str, int], frames: int, size: int,
                seed: int = 0) -> None:
    """Random clips `(T, H, W, 3)` whose class sets a brighter colour channel and a moving bright bar."""
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for label in range(classes):
            clips = rng.integers(0, 100, (n, frames, size, size, 3), dtype=np.uint8)
            clips[..., label % 3] += 50
            for t in range(frames):
                row = (label * 5 + t * (1 + label % 4)) % size
                clips[:, t, row : row + 4] = 255
            _write_part(storage, cache_uri, split, label,
                        [(f"{split}-{label:03d}-{i:04d}", f"bench://{split}/{label}/{i}", clips[i]) for i in range(n)])
    storage.write_json(join(cache_uri, MANIFEST), {
        "classes": [f"class{c:03d}" for c in range(classes)], "frames": frames, "size": size,
        "splits": sorted(per_class), "counts": {s: {str(c): n for c in range(classes)} for s, n in per_class.items()},
    })


def bench_config(root: str, name: str, experts: int, epochs: int, workers: int, width: int = 32,
                 head: str = "paper") -> Config:
    return load_config(None, [
        f"run.root={root}", f"run.name={name}", f"cache.uri={root}/cache", "run.device=cpu",
        f"model.width={width}", f"model.head={head}", "dynamic.max_start_epoch=1", "dynamic.expert_epochs=1",
        f"experts.epochs={epochs}", f"experts.num_experts={experts}", f"experts.num_workers={workers}",
        "experts.cpus_per_worker=1", "experts.test_every=0", "experts.max_failures=0",
    ])


def bare_loop(cfg: Config, storage: Storage) -> dict[str, float]:
    """The experts' work in this process, one thread, the split in memory: same model, batch, epochs, final test."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    train = load_split(storage, cfg.cache_uri, "train")
    test = load_split(storage, cfg.cache_uri, "test")
    train_s, device = 0.0, torch.device("cpu")
    for kind in KINDS:
        for job in plan_experts(cfg, storage, kind):
            torch.manual_seed(job.seed)
            generator = torch.Generator().manual_seed(job.seed)
            train_x, test_x = (_inputs(job, s.videos, generator) for s in (train, test))
            model = job.build_model()
            optimizer = torch.optim.SGD(model.parameters(), lr=job.experts.lr, momentum=job.experts.momentum)
            snapshots = [flat_params(model)]
            for _ in range(job.epochs):
                t = time.perf_counter()
                train_epoch(model, train_x, train.labels, optimizer, batch_size=job.experts.batch_size,
                            device=device, generator=generator)
                train_s += time.perf_counter() - t
                snapshots.append(flat_params(model))
            test_accuracy(model, test_x, test.labels, batch_size=job.experts.batch_size, device=device)
    return {"wall_s": time.perf_counter() - start, "train_s": train_s, "workers": 1, "startup_s": 0.0, "runs": 0}


def _inputs(job: ExpertJob, videos: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Clips for video experts, one fixed random frame per clip for frame experts."""
    if job.kind == "video":
        return videos
    return videos[torch.arange(len(videos)), torch.randint(videos.shape[1], (len(videos),), generator=generator)]


def ray_run(cfg: Config, storage: Storage, on_epoch=None) -> dict[str, float]:
    start_wall, start = time.time(), time.perf_counter()
    uris = run_experts(cfg, storage, KINDS, progress=False, on_epoch=on_epoch)
    wall = time.perf_counter() - start
    histories = {kind: [TrajectoryReader(storage, u).meta["history"] for u in uris[kind]] for kind in KINDS}
    epochs = [h for kind in KINDS for h in histories[kind]]
    first_epoch_start = min(h[0]["finished_at"] - h[0]["train_seconds"] for h in epochs)
    return {"wall_s": wall, "train_s": sum(e["train_seconds"] for h in epochs for e in h),
            "epoch_s": {kind: min(e["train_seconds"] for h in histories[kind] for e in h) for kind in KINDS},
            "workers": cfg.experts.num_workers, "startup_s": first_epoch_start - start_wall,
            "runs": len(os.listdir(join(cfg.run_uri, "experts", "_ray_train")))}


def start_ray() -> None:
    import ray

    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": {"MLFLOW_DISABLE_TELEMETRY": "true"}})


def compare(args: argparse.Namespace) -> None:
    import ray

    if args.quick:
        classes, per_class, experts, epochs = 4, 16, 2, 2
    elif args.long:
        classes, per_class, experts, epochs = 40, 64, 4, 5
    else:
        classes, per_class, experts, epochs = 10, 32, 4, 5
    frames, size = 8, 64
    storage = Storage()
    with tempfile.TemporaryDirectory(prefix="bench_experts_") as root:
        write_cache(storage, f"{root}/cache", classes, {"train": per_class, "test": max(2, per_class // 4)},
                    frames, size)
        clips = classes * per_class * experts * epochs * len(KINDS)
        print(f"{experts} video + {experts} frame experts x {epochs} epochs x {classes * per_class} clips "
              f"({frames}x{size}x{size}), ConvNet3D width 32 / ConvNet2D, batch 16, 1 thread per worker")
        start_ray()
        try:
            results = {"bare loop (1 process)": bare_loop(bench_config(root, "bare", experts, epochs, 1), storage)}
            for workers in (1, 2):
                cfg = bench_config(root, f"ray{workers}", experts, epochs, workers)
                results[f"Ray Train, {workers} worker(s)"] = ray_run(cfg, storage)
        finally:
            ray.shutdown()
    print(f"\nload average over the last 1/5/15 min: {'/'.join(f'{x:.1f}' for x in os.getloadavg())} "
          f"on {os.cpu_count()} cores (other processes share the cores: ratios need a quiet machine)")
    bare = results["bare loop (1 process)"]
    one = results["Ray Train, 1 worker(s)"]
    two = results["Ray Train, 2 worker(s)"]
    print(f"\n{'setup':26} {'wall s':>7} {'clips/s':>8} {'per core':>8} {'train-only clips/s/core':>24} "
          f"{'startup s':>9} {'outside train':>13} {'Ray Train runs':>14}")
    for name, r in results.items():
        rate = clips / r["wall_s"]
        outside = 1 - r["train_s"] / (r["wall_s"] * r["workers"])
        print(f"{name:26} {r['wall_s']:7.1f} {rate:8.1f} {rate / r['workers']:8.1f} "
              f"{clips / r['train_s']:24.1f} {r['startup_s']:9.1f} {outside:12.0%} {r['runs']:14d}")
    print("\nratios (target)")
    print(f"  Ray 1 worker / bare, end to end per core   {bare['wall_s'] / one['wall_s']:.2f}x  (>= 0.9x)")
    print(f"  Ray 1 worker / bare, training only         {bare['train_s'] / one['train_s']:.2f}x")
    print(f"  Ray 2 workers / 1 worker, end to end       {one['wall_s'] / two['wall_s']:.2f}x  (>= 1.6x)")
    print(f"  Ray 2 workers / 1 worker, training only    {one['train_s'] / two['train_s'] * 2:.2f}x  "
          "(per-core train rate x 2)")


class PeakRSS:
    """`on_epoch` hook: records the worker's peak RSS so far (ru_maxrss) before each epoch, one file per call."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def __call__(self, job: ExpertJob, epoch: int) -> None:
        with open(os.path.join(self.folder, f"{job.kind}-{job.index}-{epoch}-{os.getpid()}.json"), "w") as f:
            json.dump({"pid": os.getpid(), "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, f)


def memory() -> None:
    """Peak RSS of one Ray Train expert worker and its time per epoch at 5 and 80 clips per class."""
    import ray

    classes, frames, size, epochs = 400, 8, 32, 3
    storage = Storage()
    rows = {}
    start_ray()
    try:
        for per_class in (5, 80):
            with tempfile.TemporaryDirectory(prefix="bench_experts_rss_") as root:
                write_cache(storage, f"{root}/cache", classes, {"train": per_class, "test": max(2, per_class // 4)},
                            frames, size)
                peaks = os.path.join(root, "peaks")
                os.makedirs(peaks)
                cfg = bench_config(root, f"rss{per_class}", 1, epochs, 1, width=8, head="adaptive")
                result = ray_run(cfg, storage, on_epoch=PeakRSS(peaks))
                readings = [json.load(open(os.path.join(peaks, name))) for name in os.listdir(peaks)]
                rows[per_class] = {"peak_mb": max(r["peak_mb"] for r in readings), "epoch_s": result["epoch_s"],
                                   "split_mb": classes * per_class * frames * size * size * 3 / 2**20}
    finally:
        ray.shutdown()
    print(f"\n1 video + 1 frame expert, {epochs} epochs, {classes} classes of {frames}x{size}x{size} clips, 1 worker")
    print(f"{'clips/class':>11} {'train split MB':>14} {'worker peak RSS MB':>18} {'video epoch s':>13} "
          f"{'frame epoch s':>13}  (fastest epoch)")
    for n, r in rows.items():
        print(f"{n:11d} {r['split_mb']:14.0f} {r['peak_mb']:18.0f} {r['epoch_s']['video']:13.2f} "
              f"{r['epoch_s']['frame']:13.2f}")
    growth = {kind: rows[80]["epoch_s"][kind] / rows[5]["epoch_s"][kind] for kind in KINDS}
    print(f"peak RSS 80/5: {rows[80]['peak_mb'] / rows[5]['peak_mb']:.2f}x (<= 1.2x); epoch time 80/5: "
          + ", ".join(f"{kind} {g:.1f}x" for kind, g in growth.items()) + " (linear: 16x)")


def _read_epochs(reader: str, cache_uri: str, out: str) -> None:
    """Subprocess body of `--readers`: two epochs through one reader; writes seconds and peak RSS to `out`."""
    import ray

    from vdistill.data.clips import stream_split
    from vdistill.data.stream import SplitStream

    storage, seconds = Storage(), []
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    clip_bytes = int(np.prod(SplitStream(storage, cache_uri, "train").clip_shape))
    with RssSampler() as rss:
        for epoch in (1, 2):
            tic = time.perf_counter()
            if reader == "SplitStream":
                batches = SplitStream(storage, cache_uri, "train").epoch(0, epoch, 64)
            else:
                batches = stream_split(storage, cache_uri, "train").iter_torch_batches(
                    batch_size=64, local_shuffle_buffer_size=(64 << 20) // clip_bytes, local_shuffle_seed=epoch)
            clips = sum(len(batch[1] if isinstance(batch, tuple) else batch["label"]) for batch in batches)
            seconds.append(time.perf_counter() - tic)
    ray.shutdown()
    with open(out, "w") as f:
        json.dump({"seconds": seconds, "clips": clips, "peak_mb": rss.peak / 2**20}, f)


def readers() -> None:
    """One epoch of a 400-class split through SplitStream and through Ray Data, each in a fresh process."""
    import subprocess
    import sys

    classes, per_class, frames, size = 400, 20, 8, 32
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench_readers_") as root:
        write_cache(Storage(), f"{root}/cache", classes, {"train": per_class}, frames, size)
        for reader in ("SplitStream", "Ray Data"):
            out = os.path.join(root, "out.json")
            subprocess.run([sys.executable, __file__, "--read-epochs", reader, f"{root}/cache", out], check=True)
            rows[reader] = json.load(open(out))
    print(f"\none epoch of {classes * per_class} clips ({frames}x{size}x{size}), batches of 64, a 64 MB shuffle buffer")
    print(f"{'reader':<12} {'epoch 1 s':>9} {'epoch 2 s':>9} {'clips/s':>8} {'peak RSS MB (all processes)':>28}")
    for name, r in rows.items():
        print(f"{name:<12} {r['seconds'][0]:9.2f} {r['seconds'][1]:9.2f} {r['clips'] / r['seconds'][1]:8.0f} "
              f"{r['peak_mb']:28.0f}")
    split, ray_data = rows["SplitStream"], rows["Ray Data"]
    print(f"Ray Data / SplitStream: epoch time {ray_data['seconds'][1] / split['seconds'][1]:.2f}x, "
          f"memory {ray_data['peak_mb'] / split['peak_mb']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller data and fewer epochs (smoke test)")
    size.add_argument("--long", action="store_true", help="a job whose bare loop alone runs >= 5 minutes")
    size.add_argument("--memory", action="store_true", help="a worker's peak RSS at 5 and 80 clips per class")
    size.add_argument("--readers", action="store_true", help="SplitStream vs Ray Data for an expert's epochs")
    parser.add_argument("--read-epochs", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.read_epochs:
        _read_epochs(*args.read_epochs)
    elif args.readers:
        readers()
    elif args.memory:
        memory()
    else:
        compare(args)


if __name__ == "__main__":
    main()
