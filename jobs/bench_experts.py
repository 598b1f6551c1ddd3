"""Benchmark: expert training through Ray Train vs a bare PyTorch loop, and 1 vs 2 workers.

Generates a random uint8 clip cache with class structure, then trains the same experts (model, batch,
epochs, the same `vdistill.train.train_epoch`) three ways in one run: a bare single-process loop,
`run_experts` with 1 Ray Train worker, and with 2 workers. Every worker and the bare loop use one CPU
thread, so throughput compares per core. The share of wall time spent outside `train_epoch`
(Ray startup, cache loading, tests, checkpoint writes) comes from the epoch timestamps the experts record.

    python jobs/bench_experts.py [--quick]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from vdistill.config import Config, load_config  # noqa: E402
from vdistill.data.clips import load_split  # noqa: E402
from vdistill.data.ingest import MANIFEST, _write_part  # noqa: E402
from vdistill.experts import TrajectoryReader, expert_seed, plan_experts, run_experts  # noqa: E402
from vdistill.models import flat_params  # noqa: E402
from vdistill.storage import Storage, join  # noqa: E402
from vdistill.train import test_accuracy, train_epoch  # noqa: E402

FRAMES, SIZE = 8, 64


def write_cache(storage: Storage, cache_uri: str, classes: int, per_class: dict[str, int], seed: int = 0) -> None:
    """Random clips `(T, H, W, 3)` whose class sets a brighter colour channel and a moving bright bar."""
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for label in range(classes):
            clips = rng.integers(0, 100, (n, FRAMES, SIZE, SIZE, 3), dtype=np.uint8)
            clips[..., label % 3] += 50
            for t in range(FRAMES):
                row = (label * 5 + t * (1 + label % 4)) % SIZE
                clips[:, t, row : row + 4] = 255
            _write_part(storage, cache_uri, split, label,
                        [(f"{split}-{label:02d}-{i:04d}", f"bench://{split}/{label}/{i}", clips[i]) for i in range(n)])
    storage.write_json(join(cache_uri, MANIFEST), {
        "classes": [f"class{c:02d}" for c in range(classes)], "frames": FRAMES, "size": SIZE,
        "splits": sorted(per_class), "counts": {s: {str(c): n for c in range(classes)} for s, n in per_class.items()},
    })


def bench_config(root: str, name: str, experts: int, epochs: int, workers: int) -> Config:
    return load_config(None, [
        f"run.root={root}", f"run.name={name}", f"cache.uri={root}/cache", "run.device=cpu",
        "model.width=32", "model.head=paper", "dynamic.max_start_epoch=1", "dynamic.expert_epochs=1",
        f"experts.epochs={epochs}", f"experts.num_experts={experts}", f"experts.num_workers={workers}",
        "experts.cpus_per_worker=1", "experts.test_every=0", "experts.max_failures=0",
    ])


def bare_loop(cfg: Config, storage: Storage) -> dict[str, float]:
    """The experts' work in this process, one thread: same model, batch, epochs, train_epoch and final test."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    train = load_split(storage, cfg.cache_uri, "train")
    test = load_split(storage, cfg.cache_uri, "test")
    train_s, device = 0.0, torch.device("cpu")
    for job in plan_experts(cfg, storage, "video"):
        torch.manual_seed(expert_seed(cfg.run.seed, "video", job.index))
        generator = torch.Generator().manual_seed(job.seed)
        model = job.build_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=job.experts.lr, momentum=job.experts.momentum)
        snapshots = [flat_params(model)]
        for _ in range(job.epochs):
            t = time.perf_counter()
            train_epoch(model, train.videos, train.labels, optimizer, batch_size=job.experts.batch_size, device=device,
                        generator=generator)
            train_s += time.perf_counter() - t
            snapshots.append(flat_params(model))
        test_accuracy(model, test.videos, test.labels, batch_size=job.experts.batch_size, device=device)
    return {"wall_s": time.perf_counter() - start, "train_s": train_s, "workers": 1, "startup_s": 0.0}


def ray_run(cfg: Config, storage: Storage) -> dict[str, float]:
    start_wall, start = time.time(), time.perf_counter()
    uris = run_experts(cfg, storage, "video", progress=False)
    wall = time.perf_counter() - start
    histories = [TrajectoryReader(storage, u).meta["history"] for u in uris]
    first_epoch_start = min(h[0]["finished_at"] - h[0]["train_seconds"] for h in histories)
    return {"wall_s": wall, "train_s": sum(e["train_seconds"] for h in histories for e in h),
            "workers": cfg.experts.num_workers, "startup_s": first_epoch_start - start_wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller data and fewer epochs (smoke test)")
    args = parser.parse_args()
    classes, per_class, experts, epochs = (4, 16, 2, 2) if args.quick else (10, 32, 4, 5)
    import ray

    storage = Storage()
    with tempfile.TemporaryDirectory(prefix="bench_experts_") as root:
        write_cache(storage, f"{root}/cache", classes, {"train": per_class, "test": max(2, per_class // 4)})
        clips = classes * per_class * experts * epochs
        print(f"{experts} experts x {epochs} epochs x {classes * per_class} clips ({FRAMES}x{SIZE}x{SIZE}), "
              f"ConvNet3D width 32, batch 256, 1 thread per worker")
        ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False,
                 runtime_env={"env_vars": {"MLFLOW_DISABLE_TELEMETRY": "true"}})
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
    print(f"\n{'setup':26} {'wall s':>7} {'clips/s':>8} {'per core':>8} {'train-only clips/s/core':>24} "
          f"{'startup s':>9} {'outside train':>13}")
    for name, r in results.items():
        rate = clips / r["wall_s"]
        outside = 1 - r["train_s"] / (r["wall_s"] * r["workers"])
        print(f"{name:26} {r['wall_s']:7.1f} {rate:8.1f} {rate / r['workers']:8.1f} "
              f"{clips / r['train_s']:24.1f} {r['startup_s']:9.1f} {outside:12.0%}")
    two = results["Ray Train, 2 worker(s)"]
    print("\nratios (target)")
    print(f"  Ray 1 worker / bare, end to end per core   {bare['wall_s'] / one['wall_s']:.2f}x  (>= 0.9x)")
    print(f"  Ray 1 worker / bare, train_epoch only      {bare['train_s'] / one['train_s']:.2f}x")
    print(f"  Ray 2 workers / 1 worker, end to end       {one['wall_s'] / two['wall_s']:.2f}x  (>= 1.6x)")
    print(f"  Ray 2 workers / 1 worker, train_epoch only {one['train_s'] / two['train_s'] * 2:.2f}x  "
          "(per-core train rate x 2)")


if __name__ == "__main__":
    main()
