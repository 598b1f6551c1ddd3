"""Ray Data ingest from a real S3 endpoint (moto server) into the Parquet clip cache, and reading it back."""
from __future__ import annotations

import json
import logging
import os
import re
import uuid

import boto3
import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch

from vdistill.config import DemoConfig, load_config
from vdistill.data.clips import ClassSampler, load_split, read_manifest, stream_split
from vdistill.data.decode import DecodeError, DecodeSpec, decode_uri
from vdistill.data.ingest import IngestError, format_summary, partition_uri, run_ingest
from vdistill.data.manifests import AnnotationError, build_manifest
from vdistill.data.synthetic import read_frame_index, write_demo_dataset, write_index_video
from vdistill.storage import Storage, join

DEMO = DemoConfig(classes=3, train_per_class=3, test_per_class=2, size=32, frames=8)
BROKEN = {"corrupt.mp4": "corrupt", "empty.mp4": "empty", "short.mp4": "too_short", "notes.mp4": "corrupt",
          "gone.mp4": "missing"}


@pytest.fixture(scope="module")
def bucket(s3_server):
    """A module-wide bucket: (Storage, s3 URI, data root, CSV URI)."""
    name = f"ingest-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    storage = Storage(endpoint_url=s3_server, region="us-east-1", access_key="testing", secret_key="testing")
    root = f"s3://{name}/data"
    csv_uri = write_demo_dataset(storage, root, DEMO)
    write_index_video(storage, join(root, "index/a.mp4"), 40)
    write_index_video(storage, join(root, "index/b.mp4"), 40)  # the test split's window: never a train file
    write_index_video(storage, join(root, "index/short.mp4"), 2)
    storage.write_bytes(join(root, "broken/corrupt.mp4"), os.urandom(2048))
    storage.write_bytes(join(root, "broken/empty.mp4"), b"")
    storage.write_bytes(join(root, "broken/notes.mp4"), b"these are not the frames you are looking for\n" * 20)
    extra = ["index/a.mp4,zz_index,train", "index/b.mp4,zz_index,test,0.4,1.2", "index/short.mp4,zz_index,train",
             "broken/corrupt.mp4,zz_index,train", "broken/empty.mp4,zz_index,train",
             "broken/notes.mp4,zz_index,train", "broken/gone.mp4,zz_index,train"]
    storage.write_text(csv_uri, storage.read_text(csv_uri) + "\n".join(extra) + "\n")
    return storage, f"s3://{name}", root, csv_uri


def _cfg(root: str, csv_uri: str, cache: str, **over):
    items = {"data.root": root, "data.annotations": csv_uri, "cache.uri": cache, "decode.frames": 8,
             "decode.size": 32, "decode.min_frames": 4, "cache.videos_per_task": 4,
             "cache.max_quarantine_fraction": 0.3, "data.val_fraction": 0, **over}  # splits as annotated
    return load_config(None, [f"{k}={v}" for k, v in items.items()])


def _objects(storage_uri: str, s3_server: str, prefix: str) -> dict:
    bucket = storage_uri.removeprefix("s3://")
    pages = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").get_paginator("list_objects_v2")
    return {o["Key"]: (o["ETag"], o["LastModified"]) for p in pages.paginate(Bucket=bucket, Prefix=prefix)
            for o in p.get("Contents", [])}


@pytest.fixture(scope="module")
def ingested(bucket, ray_session):
    storage, base, root, csv_uri = bucket
    cfg = _cfg(root, csv_uri, f"{base}/cache")
    return cfg, run_ingest(cfg, storage, progress=False)


def test_counts_per_class_and_split(ingested):
    cfg, summary = ingested
    idx = summary["classes"].index("zz_index")
    assert summary["counts"]["train"] == {**{str(c): 3 for c in range(3)}, str(idx): 1}
    assert summary["counts"]["test"] == {**{str(c): 2 for c in range(3)}, str(idx): 1}


def test_quarantine_reasons_reported(bucket, ingested):
    storage, *_ = bucket
    cfg, summary = ingested
    lines = [json.loads(x) for x in storage.read_text(join(cfg.cache_uri, "quarantine.jsonl")).splitlines()]
    got = {q["uri"].rsplit("/", 1)[1]: q["reason"] for q in lines}
    assert got == BROKEN
    assert summary["quarantine"] == {"corrupt": 2, "empty": 1, "missing": 1, "too_short": 1}


def test_partition_layout_matches_contract(bucket, ingested):
    storage, *_ = bucket
    cfg, _ = ingested
    files = storage.list_files(join(cfg.cache_uri, "clips"))
    assert files
    for uri in files:
        m = re.search(r"/clips/split=(train|test)/label=(\d{4})/part-[0-9a-f]{16}\.parquet$", uri)
        assert m, uri
        fs, path = storage.resolve(uri)
        table = pq.read_table(path, filesystem=fs)
        assert table.column_names == ["clip", "label", "key", "uri"]
        assert set(table["label"].to_pylist()) == {int(m.group(2))}


def test_demo_clip_pixels_equal_direct_decode(bucket, ingested):
    storage, *_ = bucket
    cfg, summary = ingested
    test = load_split(storage, cfg.cache_uri, "test")
    fs, path = storage.resolve(cfg.cache_uri + "/clips/split=test/label=0001")
    uris = sorted(zip(pq.read_table(path, filesystem=fs)["key"].to_pylist(),
                      pq.read_table(path, filesystem=fs)["uri"].to_pylist()))
    expected = decode_uri(storage, uris[0][1], DecodeSpec.from_config(cfg.decode)).frames
    first_of_class1 = int(torch.nonzero(test.labels == 1)[0])
    assert torch.equal(test.videos[first_of_class1], torch.from_numpy(expected))


def test_index_clips_hold_exactly_the_sampled_frames(bucket, ingested):
    storage, *_ = bucket
    cfg, summary = ingested
    idx = summary["classes"].index("zz_index")
    train, test = load_split(storage, cfg.cache_uri, "train"), load_split(storage, cfg.cache_uri, "test")
    whole = train.videos[train.labels == idx][0].numpy()
    window = test.videos[test.labels == idx][0].numpy()
    assert [read_frame_index(f) for f in whole] == np.round(np.linspace(0, 39, 8)).astype(int).tolist()
    assert [read_frame_index(f) for f in window] == (10 + np.round(np.linspace(0, 19, 8))).astype(int).tolist()


class _Requests(logging.Handler):
    """The S3 test server's request lines (werkzeug logs one per request, in this process's server thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_a_listed_video_is_fetched_with_one_request(bucket):
    storage, _, root, csv_uri = bucket
    manifest = build_manifest(_cfg(root, csv_uri, "").data, storage)
    uri = next(r.uri for r in manifest.rows if r.uri.endswith("index/a.mp4"))
    assert manifest.sizes[uri] == storage.size(uri)  # from the one listing the manifest made
    logger, requests = logging.getLogger("werkzeug"), _Requests()
    logger.addHandler(requests)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        listed = decode_uri(storage, uri, DecodeSpec(frames=8, size=32), size=manifest.sizes[uri])
        listed_requests = [line for line in requests.lines if "index/a.mp4" in line]
        requests.lines.clear()
        unlisted = decode_uri(storage, uri, DecodeSpec(frames=8, size=32))
        unlisted_requests = [line for line in requests.lines if "index/a.mp4" in line]
    finally:
        logger.removeHandler(requests)
        logger.setLevel(level)
    def methods(lines: list[str]) -> list[str]:  # werkzeug colours some lines: take the HTTP verb only
        return [re.search(r"(GET|HEAD|PUT|POST) /", line).group(1) for line in lines]

    assert methods(listed_requests) == ["GET"]
    assert methods(unlisted_requests) == ["HEAD", "GET"]
    assert np.array_equal(listed.frames, unlisted.frames)
    with pytest.raises(DecodeError) as gone:  # deleted after the listing: still "missing"
        decode_uri(storage, join(root, "broken/gone.mp4"), DecodeSpec(frames=8, size=32), size=1000)
    assert gone.value.reason == "missing"


def test_load_split_is_sorted_uint8_with_global_classes(bucket, ingested):
    storage, *_ = bucket
    cfg, summary = ingested
    train = load_split(storage, cfg.cache_uri, "train")
    assert train.videos.dtype == torch.uint8 and train.videos.shape == (len(train), 8, 32, 32, 3)
    assert train.classes == summary["classes"] == read_manifest(storage, cfg.cache_uri)["classes"]
    again = load_split(storage, cfg.cache_uri, "train")
    assert torch.equal(train.labels, again.labels) and torch.equal(train.videos, again.videos)


def test_class_sampler_returns_only_that_class(bucket, ingested):
    storage, *_ = bucket
    cfg, _ = ingested
    sampler = ClassSampler(storage, cfg.cache_uri, "train")
    train = load_split(storage, cfg.cache_uri, "train")
    batch = sampler.sample(2, 5, torch.Generator().manual_seed(0))  # 3 clips in class 2: cycles permutations
    pool = train.videos[train.labels == 2]
    assert batch.shape == (5, 8, 32, 32, 3)
    assert all(any(torch.equal(b, p) for p in pool) for b in batch)
    assert sampler.num_classes == 4


def test_stream_split_yields_uint8_batches(bucket, ingested):
    storage, *_ = bucket
    cfg, summary = ingested
    batches = list(stream_split(storage, cfg.cache_uri, "test").iter_torch_batches(batch_size=4))
    assert sum(len(b["label"]) for b in batches) == sum(summary["counts"]["test"].values())
    assert batches[0]["clip"].dtype == torch.uint8 and batches[0]["clip"].shape[1:] == (8, 32, 32, 3)


def test_rerun_with_same_inputs_writes_nothing(bucket, ingested, s3_server):
    storage, base, *_ = bucket
    cfg, _ = ingested
    before = _objects(base, s3_server, "cache/")
    summary = run_ingest(cfg, storage, progress=False)
    assert summary["skipped"] and _objects(base, s3_server, "cache/") == before
    assert "nothing done" in format_summary(summary)


def test_summary_screen_lists_splits_reasons_and_throughput(ingested):
    _, summary = ingested
    text = format_summary(summary)
    for needle in ("train", "test", "corrupt=2", "missing=1", "clips/s", "frames/s", "MiB"):
        assert needle in text


def test_rerun_after_interrupted_ingest_has_no_duplicates(bucket, ingested):
    storage, base, root, csv_uri = bucket
    cfg, _ = ingested
    cache = f"{base}/cache-crashed"
    # a killed run: shards present (one duplicated under another name), no manifest
    for uri in storage.list_files(join(cfg.cache_uri, "clips")):
        storage.write_bytes(uri.replace(cfg.cache_uri, cache), storage.read_bytes(uri))
    one = storage.list_files(join(cache, "clips"))[0]
    storage.write_bytes(one.replace("part-", "part-ffff"), storage.read_bytes(one))
    summary = run_ingest(_cfg(root, csv_uri, cache), storage, progress=False)
    fs, path = storage.resolve(join(cache, "clips"))
    keys = pads.dataset(path, filesystem=fs, format="parquet", partitioning=None).to_table(columns=["key"])["key"]
    assert len(keys) == len(set(keys.to_pylist())) == summary["num_clips"]


def test_too_many_quarantined_fails_after_writing_quarantine(bucket, ray_session):
    storage, base, root, csv_uri = bucket
    cache = f"{base}/cache-strict"
    with pytest.raises(IngestError, match="quarantine"):
        run_ingest(_cfg(root, csv_uri, cache, **{"cache.max_quarantine_fraction": 0.05}), storage, progress=False)
    assert storage.is_file(join(cache, "quarantine.jsonl")) and not storage.is_file(join(cache, "manifest.json"))


def _demo_plus_one_row(storage: Storage, root: str, *, frames: int, extra_frames: int, row: str) -> str:
    """A 2-class demo set plus one index video of `extra_frames` frames, listed by the extra CSV `row`."""
    csv_uri = write_demo_dataset(storage, root, DemoConfig(classes=2, train_per_class=1, test_per_class=1, size=16,
                                                           frames=frames))
    write_index_video(storage, join(root, row.split(",", 1)[0]), extra_frames)
    storage.write_text(csv_uri, storage.read_text(csv_uri) + row + "\n")
    return csv_uri


def test_split_escaping_the_cache_is_refused_and_nothing_is_written(tmp_path):
    storage = Storage()
    root = str(tmp_path / "data")
    csv_uri = _demo_plus_one_row(storage, root, frames=4, extra_frames=8, row="extra.mp4,c0,x/../../../escaped_split")
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(AnnotationError, match=r"demo.csv:\d+: column 3 \(split\): 'x/../../../escaped_split'"):
        run_ingest(_cfg(root, csv_uri, str(tmp_path / "a" / "b" / "c" / "cache")), storage, progress=False)
    assert sorted(p for p in tmp_path.rglob("*")) == before


def test_partition_folder_refuses_a_split_that_is_not_one_folder_name():
    with pytest.raises(ValueError, match="cannot be a folder name"):
        partition_uri("/cache", "../escaped", 0)


def test_videos_shorter_than_a_clip_are_listed_and_counted(tmp_path, ray_session):
    storage = Storage()
    root = str(tmp_path / "data")
    csv_uri = _demo_plus_one_row(storage, root, frames=8, extra_frames=5, row="five.mp4,c0,train")
    cfg = _cfg(root, csv_uri, str(tmp_path / "cache"))
    summary = run_ingest(cfg, storage, progress=False)
    assert summary["short_videos"] == {"count": 1, "filled_by": "loop", "list": "short_videos.jsonl"}
    listed = [json.loads(x) for x in storage.read_text(join(cfg.cache_uri, "short_videos.jsonl")).splitlines()]
    assert listed == [{"uri": join(root, "five.mp4"), "decoded": 5, "frames": 8, "filled_by": "loop"}]
    assert "short videos (fewer than 8 frames, filled by loop): 1, listed in short_videos.jsonl" in format_summary(
        summary)
