"""Decode a dataset once into the Parquet clip cache with Ray Data + PyAV, resumably and loudly.

Layout under `cfg.cache_uri`: `clips/split=<split>/label=<idx:04d>/part-<hash>.parquet` (columns clip
uint8 `(T, H, W, 3)`, label int64, key, uri), `quarantine.jsonl` (uri, reason, detail) and
`manifest.json`, written last and atomically; its `input_hash` (annotation rows + decode params)
makes a repeated run a no-op.

Crash recovery without renames (S3 has none): a run that finds no manifest with its hash first
deletes the manifest, then the quarantine file and every clip, and only then writes. Part names are
hashes of the clip keys they hold, so a retried Ray task overwrites its own files instead of
duplicating clips. Workers write their own shards; only small per-video stats reach the driver, so
driver memory does not grow with the dataset.
"""
from __future__ import annotations

import hashlib
import json
import math
import posixpath
import time
from collections import Counter, defaultdict
from dataclasses import asdict
from typing import Any

import numpy as np

from vdistill.data.clips import CLIPS, MANIFEST, partition_uri
from vdistill.data.decode import DecodeError, DecodeSpec, decode_uri
from vdistill.data.manifests import Manifest, build_manifest
from vdistill.errors import UserError
from vdistill.lease import Lease, Owner
from vdistill.storage import join

LAYOUT_VERSION = 1
QUARANTINE = "quarantine.jsonl"
SHORT_VIDEOS = "short_videos.jsonl"  # clips filled up to decode.frames (loop/pad), one line per clip


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


def _write_part(storage: Any, cache_uri: str, split: str, label: int, clips: list[tuple[str, str, np.ndarray]]) -> int:
    """One Parquet shard for one (split, label) group of clips `(key, uri, (T, H, W, 3))`; returns bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray.data.extensions import ArrowTensorArray

    clips = sorted(clips, key=lambda c: c[0])
    keys = [c[0] for c in clips]
    table = pa.table({
        "clip": ArrowTensorArray.from_numpy(np.stack([c[2] for c in clips])),
        "label": pa.array([label] * len(clips), pa.int64()),
        "key": pa.array(keys, pa.string()),
        "uri": pa.array([c[1] for c in clips], pa.string()),
    })
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    data = sink.getvalue().to_pybytes()
    name = hashlib.sha1("\n".join(keys).encode()).hexdigest()[:16]
    storage.write_bytes(join(partition_uri(cache_uri, split, label), f"part-{name}.parquet"), data)
    return len(data)


def decode_batch(batch: dict[str, np.ndarray], *, storage: Any, spec: DecodeSpec, cache_uri: str) -> dict[str, np.ndarray]:
    """Ray Data UDF: rows -> clips written as shards; returns one stats row per video (status, reason, ...)."""
    groups: dict[tuple[str, int], list] = defaultdict(list)
    status, detail, decoded = [], [], []
    for uri, split, label, t0, t1 in zip(batch["uri"], batch["split"], batch["label"], batch["start_s"],
                                         batch["end_s"]):
        t0, t1 = _none_if_nan(t0), _none_if_nan(t1)
        key = clip_key(str(uri), t0, t1)
        try:
            clip = decode_uri(storage, str(uri), spec, start_s=t0, end_s=t1, key=key)
        except DecodeError as exc:
            status.append(exc.reason)
            detail.append(exc.detail)
            decoded.append(0)
            continue
        groups[(str(split), int(label))].append((key, str(uri), clip.frames))
        status.append("ok")
        detail.append("" if clip.exact else f"long video: nearest-frame sampling over {clip.num_decoded} frames")
        decoded.append(clip.num_decoded)
    written = sum(_write_part(storage, cache_uri, s, lbl, clips) for (s, lbl), clips in groups.items())
    per_video_bytes = np.zeros(len(status), dtype=np.int64)
    per_video_bytes[:1] = written  # the batch's shard bytes, booked on its first row
    return {
        "uri": batch["uri"], "split": batch["split"], "label": batch["label"],
        "status": np.array(status, dtype=object), "detail": np.array(detail, dtype=object),
        "decoded": np.array(decoded, dtype=np.int64),
        "bytes": per_video_bytes,
    }


def _clear(storage: Any, cache_uri: str) -> None:
    """Invalidate first (manifest), then remove what a previous or interrupted run left."""
    for name in (MANIFEST, QUARANTINE, SHORT_VIDEOS, CLIPS):
        storage.delete(join(cache_uri, name))


def _dataset(manifest: Manifest, videos_per_task: int):
    import ray

    items = [{"uri": r.uri, "split": r.split, "label": r.label,
              "start_s": float("nan") if r.start_s is None else r.start_s,
              "end_s": float("nan") if r.end_s is None else r.end_s} for r in manifest.rows]
    blocks = max(1, min(math.ceil(len(items) / videos_per_task), 4096))
    return ray.data.from_items(items, override_num_blocks=blocks)


def run_ingest(cfg: Any, storage: Any, progress: bool = True, owner: Owner | None = None) -> dict:
    """Annotation rows -> Ray Data (PyAV decode UDF) -> Parquet clip cache; returns the manifest/summary.

    A no-op (nothing written) when the cache's manifest already has this input hash. Writing holds the
    cache's lease (LeaseHeld while another live ingest writes the same cache.uri).
    Raises IngestError, after writing quarantine.jsonl, when too many videos were quarantined.
    """
    manifest = build_manifest(cfg.data, storage)
    spec = DecodeSpec.from_config(cfg.decode, seed=cfg.run.seed)
    digest = input_hash(manifest, spec)
    cache_uri = cfg.cache_uri
    previous = storage.read_json_or(join(cache_uri, MANIFEST))
    if previous and previous.get("input_hash") == digest:
        return {**previous, "skipped": True}
    with Lease(storage, cache_uri, "cache", digest, owner or Owner()):
        previous = storage.read_json_or(join(cache_uri, MANIFEST))  # written by the lease's last holder?
        if previous and previous.get("input_hash") == digest:
            return {**previous, "skipped": True}
        return _write_cache(cfg, storage, manifest, spec, digest, progress)


def _write_cache(cfg: Any, storage: Any, manifest: Manifest, spec: DecodeSpec, digest: str, progress: bool) -> dict:
    import ray
    from tqdm.auto import tqdm

    cache_uri = cfg.cache_uri
    if not ray.is_initialized():
        ray.init()
    _clear(storage, cache_uri)

    started = time.perf_counter()
    counts: dict[str, Counter] = defaultdict(Counter)
    quarantine = list(manifest.missing)
    short: list[dict] = []
    decoded_frames = bytes_written = clips = approx = 0
    if manifest.rows:
        ds = _dataset(manifest, cfg.cache.videos_per_task).map_batches(
            decode_batch, batch_size=cfg.cache.videos_per_task, num_cpus=cfg.cache.cpus_per_task,
            batch_format="numpy", fn_kwargs={"storage": storage, "spec": spec, "cache_uri": cache_uri})
        with tqdm(total=len(manifest.rows), desc="ingest", unit="video", disable=not progress) as bar:
            for stats in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for uri, split, label, status, detail, n in zip(stats["uri"], stats["split"], stats["label"],
                                                                stats["status"], stats["detail"], stats["decoded"]):
                    if status == "ok":
                        counts[str(split)][str(int(label))] += 1
                        clips += 1
                        approx += bool(detail)
                        if n < spec.frames:  # kept, but its frames repeat (decode.short_video)
                            short.append({"uri": str(uri), "decoded": int(n), "frames": spec.frames,
                                          "filled_by": spec.short_video})
                    else:
                        quarantine.append({"uri": str(uri), "reason": str(status), "detail": str(detail)})
                    decoded_frames += int(n)
                bytes_written += int(stats["bytes"].sum())
                bar.update(len(stats["status"]))
    elapsed = time.perf_counter() - started

    short.sort(key=lambda q: q["uri"])
    storage.write_text(join(cache_uri, SHORT_VIDEOS), "".join(json.dumps(q, sort_keys=True) + "\n" for q in short))
    quarantine.sort(key=lambda q: (q["reason"], q["uri"]))
    storage.write_text(join(cache_uri, QUARANTINE), "".join(json.dumps(q, sort_keys=True) + "\n" for q in quarantine))
    by_reason = dict(sorted(Counter(q["reason"] for q in quarantine).items()))
    total = len(manifest.rows) + len(manifest.missing)
    fraction = len(quarantine) / total if total else 0.0
    if fraction > cfg.cache.max_quarantine_fraction or clips == 0:
        raise IngestError(
            f"{len(quarantine)} of {total} videos quarantined ({fraction:.1%} > cache.max_quarantine_fraction="
            f"{cfg.cache.max_quarantine_fraction:.1%}) by reason {by_reason}; see {join(cache_uri, QUARANTINE)}"
            if clips else f"no clip could be decoded ({by_reason}); see {join(cache_uri, QUARANTINE)}")

    splits = sorted({r.split for r in manifest.rows})
    summary = {
        "layout_version": LAYOUT_VERSION, "dataset": manifest.dataset, "classes": manifest.classes,
        "frames": spec.frames, "size": spec.size, "decode": asdict(spec), "input_hash": digest,
        "splits": splits,
        "counts": {s: {str(c): counts[s][str(c)] for c in range(len(manifest.classes))} for s in splits},
        "num_clips": clips, "bytes_written": bytes_written, "quarantine": by_reason,
        "quarantined": len(quarantine), "excluded": manifest.excluded, "approximate_sampling": approx,
        "short_videos": {"count": len(short), "filled_by": spec.short_video, "list": SHORT_VIDEOS},
        "throughput": {"elapsed_s": round(elapsed, 3), "decoded_frames": decoded_frames,
                       "clips_per_s": round(clips / elapsed, 2) if elapsed else 0.0,
                       "frames_per_s": round(decoded_frames / elapsed, 1) if elapsed else 0.0},
    }
    storage.write_json(join(cache_uri, MANIFEST), summary)
    return {**summary, "skipped": False}


def format_summary(summary: dict) -> str:
    """One screen: clips per split, classes, quarantine by reason, bytes, throughput."""
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
    lines.append(f"  written {summary['bytes_written'] / 2**20:.1f} MiB in {t['elapsed_s']:.1f} s   "
                 f"{t['clips_per_s']:.1f} clips/s   {t['frames_per_s']:.0f} decoded frames/s")
    return "\n".join(lines)
