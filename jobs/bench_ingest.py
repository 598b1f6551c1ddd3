"""Benchmark: Ray Data ingest vs a plain single-process PyAV loop, from local disk and from S3 (moto on 127.0.0.1).

Same rows, same T and resolution for both. The plain loop only decodes; the Ray ingest also writes the
Parquet cache (staging shards, compaction, manifest), so its ratio is a lower bound. Each run is repeated
and the best kept (the range is printed): on a shared 2-core machine any other job distorts a run.

Per Ray run it prints where the wall-clock time went (the ingest's own `timings`): manifest (annotations +
listing), lease (its settle wait) and other driver work, Ray Data start-up (until the first decode task
runs), the decode stage (decode tasks, with compaction of finished classes overlapped), the compaction
tail, finalize (staging delete, quarantine); and the busy seconds of the workers. `per core` is plain
seconds / (Ray seconds x CPUs) end to end; `steady` uses the decode stage alone (no start-up, tail, lease).

    python jobs/bench_ingest.py [--quick] [--repeats 3] [--sizes 200 800] [--footage 800]
"""
from __future__ import annotations

import argparse
import os
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TQDM_DISABLE", "1")

import psutil  # noqa: E402

from vdistill.config import DemoConfig, load_config  # noqa: E402
from vdistill.data.decode import DecodeSpec, decode_uri  # noqa: E402
from vdistill.data.footage import write_footage_dataset  # noqa: E402
from vdistill.data.ingest import run_ingest  # noqa: E402
from vdistill.data.manifests import build_manifest  # noqa: E402
from vdistill.data.synthetic import write_demo_dataset  # noqa: E402
from vdistill.storage import Storage, join  # noqa: E402

FRAMES, SIZE = 8, 64  # decoded clip
FOOTAGE_SIZE, FOOTAGE_FRAMES = 160, 16  # the footage set's source videos (real camera crops, H.264)


@dataclass
class Result:
    name: str
    source: str
    clips: int
    frames: int
    seconds: list[float]  # every repeat; the best counts
    peak_rss_mb: float
    cores: float
    timings: dict = field(default_factory=dict)  # the best Ray run's ingest timings

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.best


class RssSampler:
    """Peak of (driver RSS + RSS of this driver's Ray worker processes), sampled every 0.1 s in a thread."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        me = psutil.Process()
        total = me.memory_info().rss
        for child in me.children(recursive=True):
            try:
                if child.name().startswith("ray::"):
                    total += child.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, self._sample())

    def __enter__(self) -> "RssSampler":
        self.peak = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _cfg(root: str, csv_uri: str, cache: str):
    return load_config(None, [f"data.root={root}", f"data.annotations={csv_uri}", f"cache.uri={cache}",
                              f"decode.frames={FRAMES}", f"decode.size={SIZE}", "cache.max_quarantine_fraction=0"])


def plain_loop(storage: Storage, cfg, name: str, source: str, repeats: int) -> Result:
    spec = DecodeSpec.from_config(cfg.decode)
    rows = build_manifest(cfg.data, storage).rows
    seconds = []
    with RssSampler() as rss:
        for _ in range(repeats):
            started = time.perf_counter()
            frames = sum(decode_uri(storage, r.uri, spec, start_s=r.start_s, end_s=r.end_s).num_decoded for r in rows)
            seconds.append(time.perf_counter() - started)
    return Result(name, source, len(rows), frames, seconds, rss.peak / 2**20, 1.0)


def ray_ingest(storage: Storage, cfg_for, name: str, source: str, cores: float, repeats: int) -> Result:
    """`repeats` fresh ingests (a new cache folder each); keeps the fastest one's timings."""
    seconds, best = [], None
    with RssSampler() as rss:
        for i in range(repeats):
            started = time.perf_counter()
            summary = run_ingest(cfg_for(i), storage, progress=False)
            seconds.append(time.perf_counter() - started)
            if seconds[-1] == min(seconds):
                best = summary
    return Result(name, source, best["num_clips"], best["throughput"]["decoded_frames"], seconds,
                  rss.peak / 2**20, cores, {**best["timings"], "total_s": min(seconds)})


def mirror(local: Storage, src_root: str, remote: Storage, dst_root: str) -> None:
    for uri in local.list_files(src_root):
        remote.write_bytes(dst_root + uri[len(src_root):], local.read_bytes(uri))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ratio(plain: Result, ray: Result, seconds: float) -> float:
    """Per core: plain frames/s over Ray frames/s per CPU (same frames, so a ratio of times)."""
    return plain.best / (seconds * ray.cores) if seconds > 0 else 0.0


def format_table(pairs: list[tuple[Result, Result]]) -> str:
    head = (f"{'workload':<22}{'source':<7}{'clips':>6}{'plain s':>9}{'ray s':>8}{'range':>13}{'plain f/s':>10}"
            f"{'ray f/s':>9}{'RSS MB':>8}{'per core':>9}{'steady':>8}")
    lines = [head, "-" * len(head)]
    for plain, ray in pairs:
        rng = f"{min(ray.seconds):.1f}-{max(ray.seconds):.1f}"
        lines.append(f"{plain.name:<22}{plain.source:<7}{ray.clips:>6}{plain.best:>9.2f}{ray.best:>8.2f}{rng:>13}"
                     f"{plain.frames_per_s:>10.0f}{ray.frames_per_s:>9.0f}{ray.peak_rss_mb:>8.0f}"
                     f"{_ratio(plain, ray, ray.best):>9.2f}{_ratio(plain, ray, ray.timings['decode_s']):>8.2f}")
    return "\n".join(lines)


def format_split(pairs: list[tuple[Result, Result]]) -> str:
    """Wall seconds of the best Ray run by step (they add up to its total), then worker busy seconds."""
    head = (f"{'workload':<22}{'source':<7}{'total':>7}{'manif.':>7}{'lease+':>7}{'start':>7}{'decode':>7}"
            f"{'c.tail':>7}{'final':>7} |{'w.dec':>7}{'w.stage':>8}{'w.comp':>7}{'idle%':>7}")
    lines = [head, "-" * len(head)]
    for plain, ray in pairs:
        t, w = ray.timings, ray.timings["workers"]
        steps = ("manifest_s", "clear_s", "startup_s", "decode_s", "compaction_tail_s", "finalize_s")
        other = t["total_s"] - sum(t[k] for k in steps) + t["clear_s"]  # lease settle, driver set-up, manifest write
        busy = w["decode_s"] + w["staging_write_s"] + w["compaction_s"]
        idle = 1 - busy / (ray.cores * (t["decode_s"] + t["compaction_tail_s"]))
        lines.append(f"{plain.name:<22}{plain.source:<7}{t['total_s']:>7.2f}{t['manifest_s']:>7.2f}{other:>7.2f}"
                     f"{t['startup_s']:>7.2f}{t['decode_s']:>7.2f}{t['compaction_tail_s']:>7.2f}{t['finalize_s']:>7.2f} |"
                     f"{w['decode_s']:>7.2f}{w['staging_write_s']:>8.2f}{w['compaction_s']:>7.2f}{100 * idle:>6.0f}%")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sets (80/200 demo videos, 200 footage), 1 repeat")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs given to the local Ray")
    parser.add_argument("--sizes", type=int, nargs="*", default=None, help="procedural demo set sizes (default 200 800)")
    parser.add_argument("--footage", type=int, default=None,
                        help=f"real-footage videos (vdistill.data.footage, {FOOTAGE_SIZE} px, {FOOTAGE_FRAMES} frames; "
                        "default 800, 0 = none)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per measurement, best kept (default 3)")
    parser.add_argument("--sources", nargs="+", default=["local", "s3"], choices=["local", "s3"])
    args = parser.parse_args()
    sizes = args.sizes if args.sizes is not None else ((80, 200) if args.quick else (200, 800))
    footage = args.footage if args.footage is not None else (200 if args.quick else 800)
    repeats = args.repeats or (1 if args.quick else 3)

    import boto3
    import ray
    from moto.server import ThreadedMotoServer

    local = Storage()
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bench",
                 aws_secret_access_key="bench").create_bucket(Bucket="bench")
    s3 = Storage(endpoint_url=endpoint, region="us-east-1", access_key="bench", secret_key="bench")
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    pairs: list[tuple[Result, Result]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            workloads = []
            for n in sizes:
                root = os.path.join(tmp, f"demo{n}")
                demo = DemoConfig(classes=10, train_per_class=n * 3 // 40, test_per_class=n // 40)  # 3:1 train:test
                workloads.append((f"demo {n} videos", root, write_demo_dataset(local, root, demo)))
            if footage:
                root = os.path.join(tmp, f"footage{footage}")
                demo = DemoConfig(kind="footage", classes=16, train_per_class=-(-footage * 3 // 64),
                                  test_per_class=-(-footage // 64), size=FOOTAGE_SIZE, frames=FOOTAGE_FRAMES)
                workloads.append((f"footage {footage} videos", root, write_footage_dataset(local, root, demo)))
            warm = os.path.join(tmp, "warmup")  # start Ray's workers outside the timed runs
            warm_csv = write_demo_dataset(local, warm, DemoConfig(classes=2, train_per_class=4, test_per_class=4))
            run_ingest(_cfg(warm, warm_csv, os.path.join(tmp, "cache-warmup")), local, progress=False)
            for name, root, csv_uri in workloads:
                s3_root = f"s3://bench/{os.path.basename(root)}"
                if "s3" in args.sources:
                    mirror(local, root, s3, s3_root)
                for source, storage, data_root in (("local", local, root), ("s3", s3, s3_root)):
                    if source not in args.sources:
                        continue
                    csv = data_root + csv_uri[len(root):]
                    caches = join(tmp if source == "local" else "s3://bench", f"cache-{os.path.basename(root)}")
                    plain = plain_loop(storage, _cfg(data_root, csv, ""), name, source, repeats)
                    ray_run = ray_ingest(storage, lambda i: _cfg(data_root, csv, f"{caches}-{i}"), name, source,
                                         args.cpus, repeats)
                    pairs.append((plain, ray_run))
                    print(format_table(pairs[-1:]).splitlines()[-1], flush=True)
    finally:
        ray.shutdown()
        server.stop()
    print(f"\nT={FRAMES} size={SIZE}; plain = 1 process, decode only; ray = run_ingest on {args.cpus} CPUs (decode + "
          f"staging + compaction + manifest); best of {repeats}, range = all Ray runs; per core = plain s / (ray s x "
          "CPUs); steady = the same over the decode stage only\n")
    print(format_table(pairs))
    print("\nWall seconds of the best Ray run by step (lease+ = lease settle wait and other driver work), | then busy "
          "seconds summed over workers; idle% = CPU share unused during decode + compaction tail\n")
    print(format_split(pairs))
    ratios = {f"{p.name} {p.source}": (_ratio(p, r, r.best), _ratio(p, r, r.timings["decode_s"])) for p, r in pairs}
    print("\nsummary: per core end-to-end / steady: " + "; ".join(f"{k} {a:.2f}/{b:.2f}" for k, (a, b) in ratios.items()))


if __name__ == "__main__":
    main()
