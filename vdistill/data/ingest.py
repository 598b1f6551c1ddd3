"""Decode a dataset once into the Parquet clip cache with Ray Data + PyAV, resumably and loudly.

Layout under `cfg.cache_uri`: `clips/split=<split>/label=<idx:04d>/part-<hash>.parquet` (columns clip: the
uint8 `(T, H, W, 3)` bytes as one fixed-size binary value, `data.clips.clip_column`; label int64, key, uri),
`quarantine.jsonl` (uri, reason, detail), `short_videos.jsonl` and `manifest.json`, written last and
atomically; its `input_hash` (annotation rows + decode params) makes a repeated run a no-op. A class takes
as few files as `cache.file_mb` allows (each file but its last is at least that big, so B bytes of a class
take at most ceil(B / file_mb) files), and every file is cut into Parquet row groups of at most
`cache.rows_per_group` clips, so a reader can fetch a few random clips of a class by reading a few row groups
instead of whole files.

Two steps, overlapped: Ray Data tasks decode consecutive runs of rows (sorted by class) and write one
uncompressed Arrow shard per class they touch under `staging/`; as soon as every video of a class has been
decoded, one Ray task compacts that class's shards into its final files; `staging/` goes once all are done.

Crash recovery without renames (S3 has none): a run that finds no manifest with its hash first deletes the
manifest, then the quarantine file, every clip and every staging shard, and only then writes. Shard and
file names are hashes of the clip keys they hold, and compaction reads its shards in name order, so a
retried Ray task (decode or compaction) rewrites its own files instead of duplicating clips. Workers write
their own files; only small per-video stats reach the driver, so driver memory does not grow with the data.
"""
from __future__ import annotations

import hashlib
import json
import math
import posixpath
import resource
import time
from collections import Counter, defaultdict
from dataclasses import asdict, replace
from typing import Any, Iterable

import numpy as np

from vdistill.config import CacheConfig
from vdistill.data.clips import CLIPS, MANIFEST, clip_column, partition_uri
from vdistill.data.decode import DecodeError, DecodeSpec, decode_uri
from vdistill.data.manifests import Manifest, build_manifest
from vdistill.errors import UserError
from vdistill.lease import Lease, Owner
from vdistill.storage import join

LAYOUT_VERSION = 1
QUARANTINE = "quarantine.jsonl"
SHORT_VIDEOS = "short_videos.jsonl"  # clips filled up to decode.frames (loop/pad), one line per clip
STAGING = "staging"  # per-task shards, compacted into clips/ and then deleted
_WAVES = 4  # decode tasks per CPU slot: the last wave's imbalance costs at most a quarter of a slot's share
_SHARD_BYTES = 8 << 20  # a task flushes a class's clips at this size: bounded task memory, one PUT per shard
_DEFAULTS = CacheConfig()


class IngestError(UserError, RuntimeError):
    """The ingest ran but the result is not trustworthy (e.g. too many videos quarantined); the cache stays
    resumable (no manifest, quarantine.jsonl written), so the same command after a fix continues."""


def clip_key(uri: str, start_s: float | None, end_s: float | None) -> str:
    """Stable unique clip id: file stem + a hash of (uri, window)."""
    stem = posixpath.splitext(posixpath.basename(uri))[0]
    digest = hashlib.sha1(f"{uri}|{start_s}|{end_s}".encode()).hexdigest()[:10]
    return f"{stem}-{digest}"


def input_hash(manifest: Manifest, spec: DecodeSpec) -> str:
    """Identity of an ingest: dataset, classes, every row, the missing rows and the decode parameters."""
    payload = {
        "layout": LAYOUT_VERSION, "dataset": manifest.dataset, "classes": manifest.classes,
        "rows": [asdict(r) for r in manifest.rows], "missing": [m["uri"] for m in manifest.missing],
        "decode": asdict(spec),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _none_if_nan(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def _names_hash(keys: Iterable[str]) -> str:
    return hashlib.sha1("\n".join(keys).encode()).hexdigest()[:16]


def _clip_table(label: int, clips: list[tuple[str, str, np.ndarray]]):
    """Clips `(key, uri, (T, H, W, 3))` of one class -> the cache's Arrow table, sorted by key."""
    import pyarrow as pa

    clips = sorted(clips, key=lambda c: c[0])
    return pa.table({
        "clip": clip_column(np.stack([c[2] for c in clips])),
        "label": pa.array([label] * len(clips), pa.int64()),
        "key": pa.array([c[0] for c in clips], pa.string()),
        "uri": pa.array([c[1] for c in clips], pa.string()),
    })


def _write_parts(storage: Any, folder: str, tables: Iterable[Any], *, rows_per_group: int, file_bytes: int) -> list[int]:
    """Tables of one class -> zstd Parquet files in `folder`; returns their sizes.

    A file is closed once it holds `file_bytes`, so B bytes take at most ceil(B / file_bytes) files; row
    groups hold at most `rows_per_group` clips (random-row-group readers). A file is named by a hash of
    the keys it holds and built in memory, then written atomically in one piece.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    sizes: list[int] = []
    sink = writer = None
    keys: list[str] = []

    def close() -> None:
        writer.close()
        data = sink.getvalue().to_pybytes()
        storage.write_bytes(join(folder, f"part-{_names_hash(keys)}.parquet"), data)
        sizes.append(len(data))

    for table in tables:
        for start in range(0, table.num_rows, rows_per_group):
            group = table.slice(start, rows_per_group)
            if writer is None:
                sink, keys = pa.BufferOutputStream(), []
                writer = pq.ParquetWriter(sink, group.schema, compression="zstd")
            writer.write_table(group)  # one row group per call
            keys += group["key"].to_pylist()
            if sink.tell() >= file_bytes:
                close()
                writer = None
    if writer is not None:
        close()
    return sizes


def _write_part(storage: Any, cache_uri: str, split: str, label: int, clips: list[tuple[str, str, np.ndarray]]) -> int:
    """Clips `(key, uri, (T, H, W, 3))` of one (split, label) straight into the cache layout; returns bytes."""
    return sum(_write_parts(storage, partition_uri(cache_uri, split, label), [_clip_table(label, clips)],
                            rows_per_group=_DEFAULTS.rows_per_group, file_bytes=int(_DEFAULTS.file_mb * 1e6)))


def _staging_uri(cache_uri: str, split: str, label: int) -> str:
    return partition_uri(join(cache_uri, STAGING), split, label)


def _write_shard(storage: Any, cache_uri: str, split: str, label: int, clips: list[tuple[str, str, np.ndarray]]) -> str:
    """One uncompressed Arrow IPC shard of a task's clips of one class (compaction compresses once); its URI.

    No fsync: a crash makes staging worthless anyway (the re-run deletes it); the rename keeps it whole.
    """
    import pyarrow as pa

    table = _clip_table(label, clips)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    uri = join(_staging_uri(cache_uri, split, label), f"part-{_names_hash(table['key'].to_pylist())}.arrow")
    storage.write_bytes(uri, sink.getvalue().to_pybytes(), durable=False)
    return uri


class _Shards:
    """A decode task's clips of the current class, flushed to a staging shard when the class changes or at
    `_SHARD_BYTES`; remembers which shard each row went to."""

    def __init__(self, storage: Any, cache_uri: str, rows: int) -> None:
        self.storage, self.cache_uri = storage, cache_uri
        self.uri_of_row = [""] * rows
        self.write_s = 0.0
        self._group: tuple[str, int] | None = None
        self._clips: list[tuple[str, str, np.ndarray]] = []
        self._rows: list[int] = []
        self._bytes = 0

    def add(self, row: int, split: str, label: int, key: str, uri: str, frames: np.ndarray) -> None:
        if self._clips and ((split, label) != self._group or self._bytes >= _SHARD_BYTES):
            self.flush()
        self._group = (split, label)
        self._clips.append((key, uri, frames))
        self._rows.append(row)
        self._bytes += frames.nbytes

    def flush(self) -> None:
        if not self._clips:
            return
        started = time.perf_counter()
        uri = _write_shard(self.storage, self.cache_uri, *self._group, self._clips)
        self.write_s += time.perf_counter() - started
        for row in self._rows:
            self.uri_of_row[row] = uri
        self._clips, self._rows, self._bytes = [], [], 0


def decode_batch(batch: dict[str, np.ndarray], *, storage: Any, spec: DecodeSpec, cache_uri: str) -> dict[str, np.ndarray]:
    """Ray Data UDF: rows (sorted by class) -> clips in staging shards; one stats row per video.

    Stats: status/detail (quarantine reason), decoded frames, the video's staging `shard` ("" if none) and
    decode `seconds`; per task: `started` (epoch s), the worker's peak RSS `rss_mib` and, booked on its first row,
    `write_s` (staging writes).
    """
    started = time.time()
    n = len(batch["uri"])
    status, detail, decoded, seconds = [], [], np.zeros(n, np.int64), np.zeros(n)
    shards = _Shards(storage, cache_uri, n)
    for i, (uri, split, label, size, t0, t1) in enumerate(zip(batch["uri"], batch["split"], batch["label"],
                                                              batch["size"], batch["start_s"], batch["end_s"])):
        t0, t1 = _none_if_nan(t0), _none_if_nan(t1)
        key = clip_key(str(uri), t0, t1)
        t = time.perf_counter()
        try:
            clip = decode_uri(storage, str(uri), spec, start_s=t0, end_s=t1, key=key,
                              size=int(size) if size >= 0 else None)
        except DecodeError as exc:
            status.append(exc.reason)
            detail.append(exc.detail)
            continue
        finally:
            seconds[i] = time.perf_counter() - t
        shards.add(i, str(split), int(label), key, str(uri), clip.frames)
        status.append("ok")
        detail.append("" if clip.exact else f"long video: nearest-frame sampling over {clip.num_decoded} frames")
        decoded[i] = clip.num_decoded
    shards.flush()
    write_s = np.zeros(n)
    write_s[:1] = shards.write_s
    return {
        "uri": batch["uri"], "split": batch["split"], "label": batch["label"],
        "status": np.array(status, dtype=object), "detail": np.array(detail, dtype=object),
        "decoded": decoded, "shard": np.array(shards.uri_of_row, dtype=object), "seconds": seconds,
        "write_s": write_s, "started": np.full(n, started), "rss_mib": np.full(n, _peak_rss_mib()),
    }


def _peak_rss_mib() -> float:
    """This process's peak resident memory: what an ingest task must be given (it does not grow with the dataset)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def compact_class(storage: Any, shards: list[str], folder: str, rows_per_group: int, file_bytes: int) -> dict:
    """A class's staging shards -> its final files in `folder` (see `_write_parts`); shards are read one at a
    time in name order, so a retry writes the same files. Returns bytes, files and seconds."""
    import pyarrow as pa

    started = time.perf_counter()
    tables = (pa.ipc.open_file(pa.BufferReader(storage.read_bytes(uri))).read_all() for uri in sorted(shards))
    sizes = _write_parts(storage, folder, tables, rows_per_group=rows_per_group, file_bytes=file_bytes)
    return {"bytes": sum(sizes), "files": len(sizes), "seconds": time.perf_counter() - started,
            "rss_mib": _peak_rss_mib()}


def _clear(storage: Any, cache_uri: str) -> None:
    """Invalidate first (manifest), then remove what a previous or interrupted run left."""
    for name in (MANIFEST, QUARANTINE, SHORT_VIDEOS, CLIPS, STAGING):
        storage.delete(join(cache_uri, name))


def _num_tasks(rows: int, slots: float, videos_per_task: int) -> int:
    """Enough tasks for `_WAVES` per CPU slot (load balance), none over `videos_per_task` videos."""
    return max(1, min(rows, max(math.ceil(rows / videos_per_task), math.ceil(_WAVES * slots))))


def _dataset(manifest: Manifest, tasks: int):
    """One block per decode task: consecutive rows, so a task touches few classes (few staging shards)."""
    import ray

    items = [{"uri": r.uri, "split": r.split, "label": r.label, "size": manifest.sizes.get(r.uri, -1),
              "start_s": float("nan") if r.start_s is None else r.start_s,
              "end_s": float("nan") if r.end_s is None else r.end_s} for r in manifest.rows]
    return ray.data.from_items(items, override_num_blocks=tasks)


def run_ingest(cfg: Any, storage: Any, progress: bool = True, owner: Owner | None = None) -> dict:
    """Annotation rows -> Ray Data (PyAV decode UDF) -> Parquet clip cache; returns the manifest/summary.

    A no-op (nothing written) when the cache's manifest already has this input hash. Writing holds the
    cache's lease (LeaseHeld while another live ingest writes the same cache.uri).
    Raises IngestError, after writing quarantine.jsonl, when too many videos were quarantined.
    """
    started = time.perf_counter()
    manifest = build_manifest(cfg.data, storage)
    spec = DecodeSpec.from_config(cfg.decode, seed=cfg.run.seed)
    digest = input_hash(manifest, spec)
    cache_uri = cfg.cache_uri
    previous = storage.read_json_or(join(cache_uri, MANIFEST))
    if previous and previous.get("input_hash") == digest:
        return {**previous, "skipped": True}
    manifest_s = time.perf_counter() - started
    with Lease(storage, cache_uri, "cache", digest, owner or Owner()):
        previous = storage.read_json_or(join(cache_uri, MANIFEST))  # written by the lease's last holder?
        if previous and previous.get("input_hash") == digest:
            return {**previous, "skipped": True}
        return _write_cache(cfg, storage, manifest, spec, digest, progress, manifest_s)


def _write_cache(cfg: Any, storage: Any, manifest: Manifest, spec: DecodeSpec, digest: str, progress: bool,
                 manifest_s: float) -> dict:
    import ray
    from tqdm.auto import tqdm

    cache_uri, cache = cfg.cache_uri, cfg.cache
    began = time.perf_counter()
    if not ray.is_initialized():
        ray.init()
    _clear(storage, cache_uri)
    # codec threads = the task's CPUs (pixels do not depend on them, so the input hash keeps threads=1)
    decode_spec = replace(spec, threads=max(1, int(cache.cpus_per_task)))
    compact = ray.remote(num_cpus=cache.cpus_per_task)(compact_class)
    file_bytes = max(1, int(cache.file_mb * 1e6))

    counts: dict[str, Counter] = defaultdict(Counter)
    quarantine = list(manifest.missing)
    short: list[dict] = []
    decoded_frames = clips = approx = 0
    expected = Counter((r.split, r.label) for r in manifest.rows)
    seen: Counter = Counter()
    shards: dict[tuple[str, int], set[str]] = defaultdict(set)
    compactions = []
    workers = {"decode_s": 0.0, "staging_write_s": 0.0, "compaction_s": 0.0, "peak_rss_mib": 0.0}
    cleared, executing, first_task = time.perf_counter(), time.time(), math.inf
    if manifest.rows:
        slots = ray.cluster_resources().get("CPU", 1.0) / cache.cpus_per_task
        ds = _dataset(manifest, _num_tasks(len(manifest.rows), slots, cache.videos_per_task)).map_batches(
            decode_batch, batch_size=None, num_cpus=cache.cpus_per_task, batch_format="numpy",
            fn_kwargs={"storage": storage, "spec": decode_spec, "cache_uri": cache_uri})
        # One operator with tiny outputs: Ray Data's per-operator reservation only throttles it (measured on
        # 2 CPUs: 1.6 tasks run at a time with it, 2.0 without). This dataset's context, not the global one.
        ds.context.op_resource_reservation_enabled = False
        with tqdm(total=len(manifest.rows), desc="ingest", unit="video", disable=not progress) as bar:
            for stats in ds.iter_batches(batch_size=None, batch_format="numpy"):
                first_task = min(first_task, float(stats["started"].min()))
                workers["decode_s"] += float(stats["seconds"].sum())
                workers["staging_write_s"] += float(stats["write_s"].sum())
                workers["peak_rss_mib"] = max(workers["peak_rss_mib"], float(stats["rss_mib"].max()))
                for uri, split, label, status, detail, n, shard in zip(
                        stats["uri"], stats["split"], stats["label"], stats["status"], stats["detail"],
                        stats["decoded"], stats["shard"]):
                    group = (str(split), int(label))
                    if status == "ok":
                        counts[group[0]][str(group[1])] += 1
                        clips += 1
                        approx += bool(detail)
                        shards[group].add(str(shard))
                        if n < spec.frames:  # kept, but its frames repeat (decode.short_video)
                            short.append({"uri": str(uri), "decoded": int(n), "frames": spec.frames,
                                          "filled_by": spec.short_video})
                    else:
                        quarantine.append({"uri": str(uri), "reason": str(status), "detail": str(detail)})
                    decoded_frames += int(n)
                    seen[group] += 1
                    if seen[group] == expected[group] and shards[group]:  # class complete: compact it now
                        compactions.append(compact.remote(storage, sorted(shards[group]),
                                                          partition_uri(cache_uri, *group), cache.rows_per_group,
                                                          file_bytes))
                bar.update(len(stats["status"]))
    decoded_at = time.perf_counter()
    written = ray.get(compactions)
    compacted_at = time.perf_counter()
    workers["compaction_s"] = sum(w["seconds"] for w in written)
    workers["peak_rss_mib"] = max([workers["peak_rss_mib"], *(w["rss_mib"] for w in written)])
    storage.delete(join(cache_uri, STAGING))

    short.sort(key=lambda q: q["uri"])
    storage.write_text(join(cache_uri, SHORT_VIDEOS), "".join(json.dumps(q, sort_keys=True) + "\n" for q in short))
    quarantine.sort(key=lambda q: (q["reason"], q["uri"]))
    storage.write_text(join(cache_uri, QUARANTINE), "".join(json.dumps(q, sort_keys=True) + "\n" for q in quarantine))
    by_reason = dict(sorted(Counter(q["reason"] for q in quarantine).items()))
    total = len(manifest.rows) + len(manifest.missing)
    fraction = len(quarantine) / total if total else 0.0
    if fraction > cache.max_quarantine_fraction or clips == 0:
        raise IngestError(
            f"{len(quarantine)} of {total} videos quarantined ({fraction:.1%} > cache.max_quarantine_fraction="
            f"{cache.max_quarantine_fraction:.1%}) by reason {by_reason}; see {join(cache_uri, QUARANTINE)}"
            if clips else f"no clip could be decoded ({by_reason}); see {join(cache_uri, QUARANTINE)}")

    finished = time.perf_counter()
    elapsed = finished - began
    startup = min(max(first_task - executing, 0.0), decoded_at - cleared)
    # Wall-clock steps: manifest_s (annotations, listing) comes before the lease; the rest add up to elapsed_s.
    # `workers` are busy seconds summed over all Ray tasks (compare with the steps times the CPUs).
    timings = {"manifest_s": manifest_s, "clear_s": cleared - began, "startup_s": startup,
               "decode_s": decoded_at - cleared - startup, "compaction_tail_s": compacted_at - decoded_at,
               "finalize_s": finished - compacted_at}
    splits = sorted({r.split for r in manifest.rows})
    summary = {
        "layout_version": LAYOUT_VERSION, "dataset": manifest.dataset, "classes": manifest.classes,
        "frames": spec.frames, "size": spec.size, "decode": asdict(spec), "input_hash": digest,
        "splits": splits,
        "counts": {s: {str(c): counts[s][str(c)] for c in range(len(manifest.classes))} for s in splits},
        "num_clips": clips, "bytes_written": sum(w["bytes"] for w in written),
        "files_written": sum(w["files"] for w in written), "quarantine": by_reason,
        "quarantined": len(quarantine), "excluded": manifest.excluded, "approximate_sampling": approx,
        "short_videos": {"count": len(short), "filled_by": spec.short_video, "list": SHORT_VIDEOS},
        "throughput": {"elapsed_s": round(elapsed, 3), "decoded_frames": decoded_frames,
                       "clips_per_s": round(clips / elapsed, 2) if elapsed else 0.0,
                       "frames_per_s": round(decoded_frames / elapsed, 1) if elapsed else 0.0},
        "timings": {**{k: round(v, 3) for k, v in timings.items()},
                    "workers": {k: round(v, 3) for k, v in workers.items()}},
    }
    storage.write_json(join(cache_uri, MANIFEST), summary)
    return {**summary, "skipped": False}


def format_summary(summary: dict) -> str:
    """One screen: clips per split, classes, quarantine by reason, bytes, throughput, where the time went."""
    classes = summary["classes"]
    lines = [f"clip cache: {summary['dataset']}  {len(classes)} classes  T={summary['frames']} "
             f"size={summary['size']}  hash={summary['input_hash']}"
             + ("  (already up to date, nothing done)" if summary.get("skipped") else "")]
    for split in summary["splits"]:
        per_class = summary["counts"][split]
        values = list(per_class.values())
        lo, hi = (min(values), max(values)) if values else (0, 0)
        lines.append(f"  {split:<8} {sum(values):>8} clips   per class min {lo} max {hi}")
    quarantine = summary["quarantine"]
    lines.append(f"  quarantined {summary['quarantined']}" + (
        ": " + ", ".join(f"{k}={v}" for k, v in quarantine.items()) if quarantine else ""))
    if summary.get("short_videos", {}).get("count"):
        sv = summary["short_videos"]
        lines.append(f"  short videos (fewer than {summary['frames']} frames, filled by {sv['filled_by']}): "
                     f"{sv['count']}, listed in {sv['list']}")
    if summary.get("excluded"):
        lines.append("  excluded on purpose: " + ", ".join(f"{k}={v}" for k, v in summary["excluded"].items()))
    t = summary["throughput"]
    files = f" in {summary['files_written']} files" if "files_written" in summary else ""
    lines.append(f"  written {summary['bytes_written'] / 2**20:.1f} MiB{files} in {t['elapsed_s']:.1f} s   "
                 f"{t['clips_per_s']:.1f} clips/s   {t['frames_per_s']:.0f} decoded frames/s")
    if "timings" in summary:  # caches written before the stage split was recorded have none
        s, w = summary["timings"], summary["timings"]["workers"]
        lines.append(f"  wall s: start-up {s['startup_s']:.1f}, decode {s['decode_s']:.1f}, compaction tail "
                     f"{s['compaction_tail_s']:.1f}, finalize {s['finalize_s']:.1f}   worker s: decode "
                     f"{w['decode_s']:.1f}, staging writes {w['staging_write_s']:.1f}, compaction "
                     f"{w['compaction_s']:.1f}"
                     + (f"   worker peak RSS {w['peak_rss_mib']:.0f} MiB" if "peak_rss_mib" in w else ""))
    return "\n".join(lines)
