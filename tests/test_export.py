"""The distilled artifact: export, load back as a Dataset (local and S3), storage accounting, previews."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import av
import pytest
import torch
from PIL import Image

import vdistill
from tests.conftest import free_port
from vdistill.distill.synset import S2DSet, SlotLayout, pixel_baseline_mb
from vdistill.errors import DamagedFile
from vdistill.export import NotAnArtifact, export_pixels, export_s2d, load_distilled, render_artifact
from vdistill.models import Integrator
from vdistill.storage import Storage, join

C, VPC, SPS, DPS, T, S = 3, 2, 2, 2, 6, 16
CLASSES = ["apply eye makeup", "bowling", "yo-yo"]


def _s2d_tensors(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    integrator = Integrator()
    with torch.no_grad():
        for p in integrator.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return {"static_memory": torch.randn(C * SPS * VPC, 3, S, S, generator=g),
            "dynamic_memory": torch.randn(C, DPS * VPC, T, 1, S, S, generator=g),
            "integrator_state": integrator.state_dict()}


def _export_s2d(storage: Storage, uri: str, previews: bool = False, **tensors) -> dict:
    return export_s2d(storage, uri, **(tensors or _s2d_tensors()), layout=SlotLayout(C, VPC, SPS, DPS),
                      classes=CLASSES, syn_lr=0.02, config_hash="abc123", metrics={"top1": 0.4}, previews=previews)


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path) -> tuple[Storage, str]:
    """An artifact folder URI on local disk or on the S3 test server."""
    if request.param == "local":
        return Storage(), str(tmp_path / "artifact")
    storage, bucket = request.getfixturevalue("s3_storage")
    return storage, join(bucket, "artifacts", "s2d")


def _integrate(tensors: dict, s_idx: int, label: int, d_idx: int) -> torch.Tensor:
    integrator = Integrator()
    integrator.load_state_dict(tensors["integrator_state"])
    with torch.no_grad():
        return integrator(tensors["static_memory"][s_idx : s_idx + 1],
                          tensors["dynamic_memory"][label, d_idx : d_idx + 1])[0]


def test_s2d_artifact_loads_one_class_major_video_per_dynamic_clip(where):
    storage, uri = where
    _export_s2d(storage, uri)
    ds = load_distilled(uri, storage)
    assert len(ds) == C * VPC * DPS
    assert [ds[i][1] for i in range(len(ds))] == [c for c in range(C) for _ in range(VPC * DPS)]
    assert ds[0][0].shape == (T, 3, S, S) and ds[0][0].dtype == torch.float32
    assert ds.classes == CLASSES and ds.syn_lr == pytest.approx(0.02)
    assert ds.meta["metrics"] == {"top1": 0.4} and ds.meta["config_hash"] == "abc123"
    assert ds.meta["layout"] == {"num_classes": C, "vpc": VPC, "statics_per_slot": SPS, "dynamics_per_slot": DPS,
                                 "scale": 1, "slots_per_video": 1, "spc": SPS * VPC, "dpc": DPS * VPC, "num_slots": C * VPC,
                                 "num_items": C * DPS * VPC}


def test_fixed_pairing_video_is_the_integrator_of_its_dynamic_clip_and_a_still_of_its_slot(tmp_path):
    tensors = _s2d_tensors()
    _export_s2d(Storage(), str(tmp_path), **tensors)
    ds = load_distilled(str(tmp_path), pairing="fixed", seed=3)
    for item in range(len(ds)):
        label, d_idx = divmod(item, DPS * VPC)
        within = d_idx // DPS
        s_idx = int(ds.statics_for(torch.tensor([item]), torch.Generator()))
        assert SPS * VPC * label + SPS * within <= s_idx < SPS * VPC * label + SPS * (within + 1)
        video, _ = ds[item]
        torch.testing.assert_close(video, _integrate(tensors, s_idx, label, d_idx))
        torch.testing.assert_close(ds[item][0], video)  # fixed: the same video on every access


def test_random_pairing_redraws_within_the_slot_on_each_access_reproducibly(tmp_path):
    tensors = _s2d_tensors()
    _export_s2d(Storage(), str(tmp_path), **tensors)
    item = 7
    label, d = divmod(item, DPS * VPC)
    within = d // DPS
    candidates = {(s, d): _integrate(tensors, s, label, d)
                  for s in range(SPS * VPC * label + SPS * within, SPS * VPC * label + SPS * (within + 1))}

    def drawn(ds) -> list[tuple[int, int]]:
        out = []
        for _ in range(24):
            video = ds[item][0]
            out.append(next(k for k, v in candidates.items() if torch.allclose(v, video, atol=1e-5)))
        return out

    first = drawn(load_distilled(str(tmp_path), seed=7))
    assert len(set(first)) > 1
    assert drawn(load_distilled(str(tmp_path), seed=7)) == first


def test_s2d_storage_is_accounted_per_component_against_the_pixel_baseline(tmp_path):
    size, frames = 64, 8
    g = torch.Generator().manual_seed(0)
    meta = export_s2d(Storage(), str(tmp_path), static_memory=torch.randn(2 * 2, 3, size, size, generator=g),
                      dynamic_memory=torch.randn(2, 2, frames, 1, size, size, generator=g),
                      integrator_state=Integrator().state_dict(), layout=SlotLayout(2, 1, 2, 2),
                      classes=["a", "b"], previews=False)
    storage = meta["storage"]
    assert storage["static_mb"] == pytest.approx(2 * 2 * 3 * size * size * 4 / 1e6)
    assert storage["dynamic_mb"] == pytest.approx(2 * 2 * frames * size * size * 4 / 1e6)
    assert storage["integrator_mb"] == pytest.approx(327 * 4 / 1e6)
    assert storage["pixel_baseline_mb"] == pytest.approx(pixel_baseline_mb(2, 1, frames, size))
    assert storage["total_mb"] == pytest.approx(storage["static_mb"] + storage["dynamic_mb"] + storage["integrator_mb"])
    # method.md 5.8: spc = dpc = 2*VPC gives (6 + 2T) / (3T) = 0.9167 at T=8, plus the integrator's 327 floats
    assert storage["ratio_to_baseline"] == pytest.approx((6 + 2 * frames) / (3 * frames), abs=2e-3)


@pytest.mark.parametrize("scale", [1, 2])
def test_artifact_regenerates_the_videos_the_set_trains_on(tmp_path, scale):
    layout = SlotLayout(C, VPC, SPS, DPS, scale)
    g = torch.Generator().manual_seed(0)
    synset = S2DSet.create(layout, torch.randn(C * layout.spc, 3, S, S, generator=g), T, g)
    t = synset.state_tensors()
    export_s2d(Storage(), str(tmp_path), static_memory=t["static_memory"], dynamic_memory=t["dynamic_memory"],
               integrator_state=synset.integrator.state_dict(), layout=layout, classes=CLASSES, previews=False)
    videos, labels = load_distilled(str(tmp_path))(torch.Generator().manual_seed(4))
    expected, expected_labels = synset.all_videos(torch.Generator().manual_seed(4))
    assert torch.equal(videos, expected.detach()) and torch.equal(labels, expected_labels)


def test_pixel_artifact_round_trips_videos_and_labels(where):
    storage, uri = where
    videos = torch.randn(C * VPC, T, 3, S, S)
    labels = torch.arange(C).repeat_interleave(VPC)
    meta = export_pixels(storage, uri, videos=videos, labels=labels, classes=CLASSES, method="dm", syn_lr=0.01,
                         previews=False)
    assert meta["layout"]["vpc"] == VPC and meta["storage"]["ratio_to_baseline"] == 1.0
    ds = load_distilled(uri, storage)
    assert len(ds) == C * VPC and ds.meta["kind"] == "pixels"
    for i in range(len(ds)):
        torch.testing.assert_close(ds[i][0], videos[i])
        assert ds[i][1] == int(labels[i])


def test_uint8_coreset_is_stored_as_uint8_and_loaded_normalised(tmp_path):
    clips = torch.randint(0, 256, (C, T, S, S, 3), dtype=torch.uint8)
    meta = export_pixels(Storage(), str(tmp_path), videos=clips, labels=torch.arange(C), classes=CLASSES,
                         method="herding", previews=False)
    assert meta["pixel_dtype"] == "uint8" and meta["storage"]["file_mb"] == pytest.approx(clips.numel() / 1e6)
    ds = load_distilled(str(tmp_path))
    from vdistill.data.pixels import to_model_input, to_uint8

    torch.testing.assert_close(ds[1][0], to_model_input(clips[1:2])[0])
    assert torch.equal(to_uint8(ds[1][0]), clips[1])


def test_whole_set_call_is_an_epoch_source_that_repairs_per_generator(tmp_path):
    _export_s2d(Storage(), str(tmp_path))
    ds = load_distilled(str(tmp_path))
    videos, labels = ds(torch.Generator().manual_seed(1))
    again, _ = ds(torch.Generator().manual_seed(1))
    assert videos.shape == (C * VPC * DPS, T, 3, S, S)
    assert labels.tolist() == [c for c in range(C) for _ in range(VPC * DPS)]
    torch.testing.assert_close(videos, again)


def test_top_level_load_distilled_opens_an_artifact(tmp_path):
    _export_s2d(Storage(), str(tmp_path))
    assert len(vdistill.load_distilled(str(tmp_path), pairing="fixed")) == C * VPC * DPS


def test_folder_without_meta_is_rejected_as_unfinished(tmp_path):
    Storage().write_tensors(str(tmp_path / "static_memory.safetensors"), {"static_memory": torch.zeros(1)})
    with pytest.raises(FileNotFoundError, match="meta.json"):
        load_distilled(str(tmp_path))


def _damage(folder: Path, how: str) -> tuple[str, str]:
    """Export an S2D artifact to `folder`, damage it `how`; -> (the file to be named, what must be said)."""
    tensors = _s2d_tensors()
    if how == "nan":
        tensors["static_memory"][0, 0, 0, 0] = float("nan")
        _export_s2d(Storage(), str(folder), **_s2d_tensors())
        Storage().write_tensors(str(folder / "static_memory.safetensors"), {"static_memory": tensors["static_memory"]})
        return f"{folder}/static_memory.safetensors", "tensor 'static_memory' has non-finite values"
    _export_s2d(Storage(), str(folder), **tensors)
    static, meta = folder / "static_memory.safetensors", folder / "meta.json"
    if how == "truncated":
        static.write_bytes(static.read_bytes()[:-100])
        return str(static), "not a safetensors file"
    if how == "pickle":
        torch.save({"static_memory": tensors["static_memory"]}, static)
        return str(static), "not a safetensors file"
    if how == "bad-json":
        meta.write_text(meta.read_text()[:-20])
        return str(meta), "not valid JSON"
    if how == "no-meta":
        meta.unlink()
        return str(meta), "not found"
    outside = folder.parent / f"{folder.name}-elsewhere.safetensors"
    static.rename(outside)
    static.symlink_to(outside)
    return str(static), f"a link to {outside}, outside the artifact"


DAMAGES = ("truncated", "pickle", "bad-json", "no-meta", "nan", "outward-symlink")


def test_vdistill_show_names_a_damaged_file_or_an_unreachable_endpoint_in_one_line(tmp_path):
    expected = {how: _damage(tmp_path / how, how) for how in DAMAGES}
    exe = shutil.which("vdistill")
    procs = {how: subprocess.Popen([exe, "show", str(tmp_path / how)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True) for how in DAMAGES}  # in parallel: each pays the torch import
    dead = f"127.0.0.1:{free_port()}"  # and an S3 endpoint nobody answers on
    procs["s3-down"] = subprocess.Popen([exe, "show", "s3://bucket/artifact"], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True,
                                        env={**os.environ, "AWS_ENDPOINT_URL": f"http://{dead}", "AWS_ACCESS_KEY_ID": "x",
                                             "AWS_SECRET_ACCESS_KEY": "x", "AWS_EC2_METADATA_DISABLED": "true"})
    expected["s3-down"] = (dead.replace(":", " port "), "vdistill: S3 endpoint unreachable (")
    for how, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        path, what = expected[how]
        assert proc.returncode != 0 and out == "", (how, out, err)
        assert err.count("\n") == 1 and err.startswith("vdistill: ") and path in err and what in err, (how, err)
        assert not (tmp_path / how / "previews").exists()


def test_load_distilled_names_the_damaged_file(tmp_path):
    for how in DAMAGES:
        path, what = _damage(tmp_path / how, how)
        with pytest.raises((DamagedFile, NotAnArtifact)) as info:
            load_distilled(str(tmp_path / how))
        assert path in str(info.value) and what in str(info.value)


def test_export_rejects_a_dynamic_memory_that_does_not_match_the_layout(tmp_path):
    tensors = _s2d_tensors()
    tensors["dynamic_memory"] = tensors["dynamic_memory"][:, :1]
    with pytest.raises(ValueError, match="dpc"):
        _export_s2d(Storage(), str(tmp_path), **tensors)
    assert not (tmp_path / "meta.json").exists()


def test_export_lists_its_previews_in_meta(s3_storage):
    storage, bucket = s3_storage
    uri = join(bucket, "s2d")
    meta = _export_s2d(storage, uri, previews=True)
    assert "previews/static_memory.png" in meta["previews"]
    assert all(storage.is_file(join(uri, p)) for p in meta["previews"])
    assert storage.read_json(join(uri, "meta.json"))["previews"] == meta["previews"]


def test_render_artifact_writes_gif_mp4_and_png_that_decode(tmp_path):
    _export_s2d(Storage(), str(tmp_path / "art"))
    written = render_artifact(str(tmp_path / "art"), str(tmp_path / "show"), Storage(), fps=4)
    names = sorted(uri.rsplit("/", 1)[1] for uri in written)
    per_class = [f"class_{c:03d}_{n}" for c, n in enumerate(["apply_eye_makeup", "bowling", "yo-yo"])]
    assert names == sorted([f"{p}.{e}" for p in per_class for e in ("gif", "mp4")]
                           + ["classes.gif", "classes.mp4", "static_memory.png", "dynamic_memory.gif"])
    for uri in written:
        if uri.endswith(".gif"):
            with Image.open(uri) as gif:
                assert gif.n_frames == T and min(gif.size) >= 128
        elif uri.endswith(".mp4"):
            with av.open(uri) as container:
                frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
            assert len(frames) == T and min(frames[0].shape[:2]) >= 128
        else:
            with Image.open(uri) as png:
                png.load()
                assert png.size[0] >= 128 * SPS * VPC
