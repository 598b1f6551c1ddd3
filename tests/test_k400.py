"""Kinetics-400 as it is downloaded, end to end on the S3 test server.

The fixture has the official annotation CSVs (`label,youtube_id,time_start,time_end,split` in `train.csv` and
`validate.csv`, labels quoted), clips named `<youtube_id>_<start:06d>_<end:06d>.mp4` in class folders whose
names have spaces and parentheses, two listed clips that are on no disk, a corrupted original whose official
replacement (same file name) sits in `replacement/replacement_for_corrupted_k400/`, and a clip found only in
`replacement/`. The `configs/k400_*.yaml` presets run against it as they are; only sizes, iteration counts and
resources are shrunk for two CPU cores (CPU_SIZED). The DM preset runs as a user types it (the `vdistill`
console script in an empty folder), the MTT preset through the library on the same clip cache (`cache.uri`),
so the ingest happens once.
"""
from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from vdistill.config import load_config
from vdistill.data.manifests import build_manifest
from vdistill.data.synthetic import demo_classes, encode_mp4, render_video
from vdistill.storage import Storage, join

from tests.cli import vdistill

REPO = Path(__file__).resolve().parents[1]
HEADER = "label,youtube_id,time_start,time_end,split"
CLASSES = ("abseiling", "air drumming", "answering questions", "passing American football (not in game)", "zumba")
TRAIN_PER_CLASS, VALIDATE_PER_CLASS = 7, 2
SPLIT_FOLDER = {"train": "train", "validate": "val"}  # the download's folders; validate.csv -> val/
MISSING = {("abseiling", "train", 2), ("zumba", "validate", 0)}  # in the CSVs, on no disk: 2 of 45 (< 5 %)
CORRUPTED = ("air drumming", "train", 0)  # a broken original in train/, its replacement under the same name
ONLY_IN_REPLACEMENT = ("zumba", "train", 1)
REPLACEMENT_ARCHIVE = "replacement/replacement_for_corrupted_k400"  # where the official .tgz unpacks

# Sizes, iteration counts and resources for 2 CPU cores; every other setting comes from the preset files.
CPU_SIZED = [
    "decode.size=48",  # the smallest size model.head=paper takes; decode.frames stays the preset's 8
    "model.width=8", "model.width_2d=8",
    "experts.num_experts=2", "experts.num_workers=1", "experts.gpus_per_worker=0",
    "static.iterations=2", "dynamic.iterations=2", "dynamic.max_start_epoch=1",
    "evaluate.epochs=2", "evaluate.num_eval=1", "evaluate.gpus_per_task=0",
    "run.coordinator_gpus=0", "validation.epochs=5",
]
PRESETS = REPO / "configs"


@dataclass
class K400Bucket:
    """The dataset on the S3 server and what a correct ingest makes of it."""

    endpoint: str
    bucket: str
    storage: Storage
    expected: dict[str, Counter] = field(default_factory=lambda: {"train": Counter(), "test": Counter()})
    missing: list[str] = field(default_factory=list)  # file names the ingest must report missing
    replacements: list[str] = field(default_factory=list)  # URIs of replacement clips the cache must hold
    corrupted: str = ""  # URI of the broken original the cache must not use

    @property
    def root(self) -> str:
        return f"{self.bucket}/kinetics400"

    @property
    def clips(self) -> int:
        return sum(sum(c.values()) for c in self.expected.values())

    def data_overrides(self) -> list[str]:
        # The official train/validate split as it is: no training clips held out for validation here.
        return [f"data.root={self.root}", f"data.annotations={self.root}/annotations",
                f"storage.endpoint_url={self.endpoint}", "data.val_fraction=0"]


def youtube_id(key: str, i: int) -> str:
    """11 characters of YouTube's alphabet (letters, digits, '-', '_'); some start with '-', like real ids."""
    text = base64.urlsafe_b64encode(hashlib.sha1(f"{key}/{i}".encode()).digest()).decode()
    return ("--" + text)[:11] if i == 3 else text[:11]


def clip_row(label: str, split: str, i: int) -> tuple[str, str]:
    """(CSV row, file name); the 10 s windows lie far past the 2 s of each file: clips are pre-trimmed."""
    yid, start = youtube_id(f"{split}/{label}", i), 30 + 17 * i + (100 if split == "validate" else 0)
    return f'"{label}",{yid},{start},{start + 10},{split}', f"{yid}_{start:06d}_{start + 10:06d}.mp4"


def write_k400(storage: Storage, endpoint: str, bucket: str) -> K400Bucket:
    """`kinetics400/{train,val}/<label>/*.mp4`, `kinetics400/replacement/...`, `kinetics400/annotations/*.csv`."""
    k400 = K400Bucket(endpoint, bucket, storage)
    rng = np.random.default_rng(0)
    for split, count in (("train", TRAIN_PER_CLASS), ("validate", VALIDATE_PER_CLASS)):
        rows = [HEADER]
        for label, look in zip(CLASSES, demo_classes(len(CLASSES))):
            for i in range(count):
                row, name = clip_row(label, split, i)
                rows.append(row)
                if (label, split, i) in MISSING:
                    k400.missing.append(name)
                    continue
                k400.expected["train" if split == "train" else "test"][label] += 1
                mp4 = encode_mp4(render_video(look, 16, 64, rng), fps=8)  # 2 s, 64x64 H.264
                uri = join(k400.root, SPLIT_FOLDER[split], label, name)
                if (label, split, i) == ONLY_IN_REPLACEMENT:
                    uri = join(k400.root, "replacement", name)
                    k400.replacements.append(uri)
                elif (label, split, i) == CORRUPTED:
                    storage.write_bytes(uri, mp4[: len(mp4) // 3])  # cut before the moov box: cannot be opened
                    k400.corrupted, uri = uri, join(k400.root, REPLACEMENT_ARCHIVE, name)
                    k400.replacements.append(uri)
                storage.write_bytes(uri, mp4)
        storage.write_text(join(k400.root, "annotations", f"{split}.csv"), "\n".join(rows) + "\n")
    # The official test.csv has no labels; with validate.csv present it is not read.
    storage.write_text(join(k400.root, "annotations", "test.csv"),
                       "youtube_id,time_start,time_end,split\nAAAAAAAAAAA,10,20,test\n")
    return k400


@pytest.fixture(scope="module")
def k400(s3_server) -> K400Bucket:
    import boto3

    name = f"k400-{uuid.uuid4().hex[:8]}"
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    storage = Storage(endpoint_url=s3_server, region="us-east-1", access_key="testing", secret_key="testing")
    yield write_k400(storage, s3_server, f"s3://{name}")
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=name, Key=obj["Key"])
    client.delete_bucket(Bucket=name)


# ---- the adapter on the download layout ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def manifest(k400):
    cfg = load_config(PRESETS / "k400.yaml", k400.data_overrides())
    return build_manifest(cfg.data, Storage.from_config(cfg.storage))


def _names(entries: list[dict]) -> list[tuple[str, str]]:
    return sorted((e["reason"], e["uri"].rsplit("/", 1)[1]) for e in entries)


def test_k400_classes_are_the_csv_labels_with_spaces_sorted(manifest):
    assert manifest.classes == sorted(CLASSES)


def test_k400_clips_per_class_and_split_come_from_the_class_folders(manifest, k400):
    got = {"train": Counter(), "test": Counter()}
    for row in manifest.rows:
        got[row.split][manifest.classes[row.label]] += 1
    assert got == k400.expected


def test_k400_listed_clips_on_no_disk_are_reported_missing(manifest, k400):
    assert _names(manifest.missing) == sorted(("missing", name) for name in k400.missing)


def test_k400_official_replacement_wins_over_the_corrupted_original(manifest, k400):
    uris = {row.uri for row in manifest.rows}
    assert set(k400.replacements) <= uris
    assert k400.corrupted not in uris


def test_k400_clips_are_whole_pre_trimmed_files_not_csv_windows(manifest):
    assert {(row.start_s, row.end_s) for row in manifest.rows} == {(None, None)}


# ---- the presets, end to end -------------------------------------------------------------------------------
def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


@pytest.fixture(scope="module")
def cache_uri(k400) -> str:
    return f"{k400.bucket}/cache/k400-48x8"  # one ingest, shared by both presets


@pytest.fixture(scope="module")
def dm_run(k400, cache_uri, tmp_path_factory):
    """`vdistill run configs/k400_dm_vpc1.yaml ...` from an empty folder, the run folder on S3 (MLflow falls back
    to a local store under that folder's runs/)."""
    cwd = tmp_path_factory.mktemp("user")
    overrides = [*k400.data_overrides(), f"run.root={k400.bucket}/runs", f"cache.uri={cache_uri}", *CPU_SIZED]
    proc = vdistill(["run", str(PRESETS / "k400_dm_vpc1.yaml"), *overrides], cwd)
    return proc, load_config(PRESETS / "k400_dm_vpc1.yaml", overrides)


@pytest.fixture(scope="module")
def mtt_run(k400, cache_uri, dm_run, ray_session, tmp_path_factory):
    """`run_pipeline` on configs/k400_mtt_vpc1.yaml, on the cache the DM run filled; the cache before and after."""
    from vdistill.coordinator import run_pipeline

    _ok(dm_run[0])
    root = tmp_path_factory.mktemp("runs")
    cfg = load_config(PRESETS / "k400_mtt_vpc1.yaml",
                      [*k400.data_overrides(), f"run.root={root}", f"cache.uri={cache_uri}", *CPU_SIZED])
    def snapshot() -> dict[str, bytes]:
        return {uri: k400.storage.read_bytes(uri) for uri in k400.storage.list_files(cache_uri)}

    before = snapshot()
    outputs = run_pipeline(cfg)
    return cfg, outputs, before, snapshot()


def _cached(storage: Storage, cache_uri: str) -> list[tuple[str, int, str]]:
    """(split, label, source uri) of every clip in the cache's Parquet shards."""
    import pyarrow.parquet as pq

    clips = []
    for part in storage.list_files(join(cache_uri, "clips")):
        split = next(p.removeprefix("split=") for p in part.split("/") if p.startswith("split="))
        with storage.open_input(part) as f:
            table = pq.read_table(f, columns=["label", "uri"])
        clips += [(split, label, uri) for label, uri in zip(table.column("label").to_pylist(),
                                                            table.column("uri").to_pylist())]
    return clips


@pytest.mark.slow
def test_dm_preset_from_the_console_script_exits_0_with_a_results_table(dm_run):
    proc, _ = dm_run
    _ok(proc)
    table = proc.stdout[proc.stdout.index("top-1 %"):]
    for method in ("random", "herding", "kcenter", "DM+S2D"):  # the preset's baselines, then the method
        assert f"\n{method} " in table, table


@pytest.mark.slow
def test_dm_preset_caches_the_right_clips_per_class_and_split(dm_run, k400, cache_uri):
    _ok(dm_run[0])
    summary = k400.storage.read_json(join(cache_uri, "manifest.json"))
    assert (summary["dataset"], summary["classes"]) == ("kinetics400", sorted(CLASSES))
    assert (summary["frames"], summary["size"]) == (8, 48)
    cached = Counter((split, summary["classes"][label]) for split, label, _ in _cached(k400.storage, cache_uri))
    assert cached == Counter({(split, label): n for split, per in k400.expected.items() for label, n in per.items()})
    assert summary["num_clips"] == k400.clips


@pytest.mark.slow
def test_dm_preset_ingest_reports_the_missing_clips_and_nothing_else(dm_run, k400, cache_uri):
    proc, _ = dm_run
    _ok(proc)
    quarantine = [json.loads(line) for line in k400.storage.read_text(join(cache_uri, "quarantine.jsonl")).splitlines()]
    assert _names(quarantine) == sorted(("missing", name) for name in k400.missing)
    assert all(q["detail"].startswith("K400 clip not found") for q in quarantine)
    assert "quarantined 2: missing=2" in proc.stdout


@pytest.mark.slow
def test_dm_preset_decodes_the_replacement_clips_not_the_corrupted_original(dm_run, k400, cache_uri):
    _ok(dm_run[0])
    uris = {uri for _, _, uri in _cached(k400.storage, cache_uri)}
    assert set(k400.replacements) <= uris and k400.corrupted not in uris


@pytest.mark.slow
def test_dm_preset_exports_an_artifact_named_with_the_k400_classes(dm_run, k400):
    proc, cfg = dm_run
    _ok(proc)
    artifact = join(cfg.run_uri, "artifact")
    meta = k400.storage.read_json(join(artifact, "meta.json"))
    assert (meta["kind"], meta["classes"], meta["layout"]["vpc"]) == ("s2d", sorted(CLASSES), 1)
    assert "DM+S2D" in meta["metrics"]
    assert k400.storage.is_file(join(artifact, "static_memory.safetensors"))
    assert f"distilled artifact: {artifact}" in proc.stdout


@pytest.mark.slow
def test_mtt_preset_through_the_library_reuses_the_cache_without_rewriting_it(mtt_run, k400):
    _, outputs, before, after = mtt_run
    assert before and after == before
    assert outputs["ingest"]["clips"] == k400.clips


@pytest.mark.slow
def test_mtt_preset_through_the_library_finishes_with_results_and_an_artifact(mtt_run, k400):
    cfg, outputs, _, _ = mtt_run
    rows = k400.storage.read_json(join(cfg.run_uri, "evaluate", "results.json"))
    assert [r["method"] for r in rows] == ["random", "herding", "kcenter", "MTT+S2D"]
    assert "top-1 %" in outputs["evaluate"]["table"]
    assert len(outputs["experts-video"]["trajectories"]) == 2
    meta = k400.storage.read_json(join(outputs["export"]["artifact"], "meta.json"))
    assert (meta["kind"], meta["classes"], meta["layout"]["vpc"]) == ("s2d", sorted(CLASSES), 1)
    assert "MTT+S2D" in meta["metrics"]
