"""The synthetic set: validated slot layouts, in-slot pairing, differentiable materialisation, sources, accounting."""
from __future__ import annotations

import pickle
import subprocess
import sys

import pytest
import torch

from vdistill.config import DynamicConfig
from vdistill.data.pixels import to_model_input
from vdistill.distill.synset import (PixelSet, S2DSet, SlotLayout, init_static_memory, random_real_frames,
                                     s2d_storage, storage_mb)

C, T, SIZE = 3, 4, 8


def class_sampler(pool: int = 6):
    """Real clips whose class is written in their pixel values: class c is filled with 40*c + clip index."""
    clips = torch.stack([torch.full((pool, T, SIZE, SIZE, 3), 40 * c, dtype=torch.uint8) + torch.arange(
        pool, dtype=torch.uint8).view(pool, 1, 1, 1, 1) for c in range(C)])

    def sample(c: int, n: int, generator: torch.Generator) -> torch.Tensor:
        return clips[c, torch.randint(pool, (n,), generator=generator)]

    return sample


def make_set(vpc: int = 2, train_static: bool = False, seed: int = 0) -> S2DSet:
    layout = SlotLayout(C, vpc)
    g = torch.Generator().manual_seed(seed)
    static = torch.randn(C * layout.spc, 3, SIZE, SIZE, generator=g)
    return S2DSet.create(layout, static, T, g, train_static=train_static)


def test_paper_layout_owns_two_statics_and_two_dynamics_per_slot():
    layout = SlotLayout.from_config(10, DynamicConfig(vpc=5, statics_per_slot=2, dynamics_per_slot=2, scale=1), 16)
    assert (layout.spc, layout.dpc, layout.num_slots, layout.num_items) == (10, 10, 50, 100)


@pytest.mark.parametrize("frames, scale, statics, dynamics, slots", [(8, 2, 1, 1, 8), (16, 2, 1, 1, 10),
                                                                     (8, 1, 1, 1, 2), (8, 2, 2, 2, 4), (16, 1, 2, 2, 1)])
def test_default_layout_fills_one_videos_storage_with_as_many_slots_as_fit(frames, scale, statics, dynamics,
                                                                            slots):
    cfg = DynamicConfig(vpc=2, scale=scale, statics_per_slot=statics, dynamics_per_slot=dynamics)
    layout = SlotLayout.from_config(C, cfg, frames)
    assert layout.slots_per_video == slots and layout.num_slots == C * 2 * slots
    size = 16
    small = size // scale

    def ratio(slots_per_class: int) -> float:
        return s2d_storage(C * slots_per_class * statics * 3 * small**2, C * slots_per_class * dynamics * frames
                           * small**2, 0, num_classes=C, vpc=2, frames=frames, size=size)["ratio_to_baseline"]

    assert ratio(layout.slots_per_class) <= 1.0 < ratio(layout.slots_per_class + 2)  # 2 more slots do not fit


def test_a_slot_larger_than_a_video_is_refused_naming_the_keys():
    with pytest.raises(ValueError, match="dynamic.statics_per_slot"):
        SlotLayout.from_config(C, DynamicConfig(statics_per_slot=8, dynamics_per_slot=2, scale=1), 8)


@pytest.mark.parametrize("kwargs, key", [
    (dict(vpc=0), "dynamic.vpc"),
    (dict(vpc=1, statics_per_slot=0), "dynamic.statics_per_slot"),
    (dict(vpc=1, dynamics_per_slot=-1), "dynamic.dynamics_per_slot"),
    (dict(vpc=1.5), "dynamic.vpc"),
])
def test_bad_layout_is_rejected_naming_the_config_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        SlotLayout(C, **kwargs)


def test_static_memory_of_the_wrong_size_is_rejected_naming_the_keys():
    layout = SlotLayout(C, 1, statics_per_slot=3)
    with pytest.raises(ValueError, match="dynamic.statics_per_slot"):
        S2DSet(layout, torch.zeros(C * 2, 3, SIZE, SIZE), torch.zeros(C, 2, T, 1, SIZE, SIZE),
               make_set().integrator, torch.tensor(0.01))


def test_materialize_gives_a_video_per_dynamic_clip_and_class_major_labels():
    synset = make_set(vpc=2)  # 2 dynamic clips per slot: 4 videos per class
    videos, labels = synset.all_videos(torch.Generator().manual_seed(1))
    assert videos.shape == (C * 4, T, 3, SIZE, SIZE)
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_every_item_takes_a_still_of_its_own_slot_and_every_still_is_used():
    layout = SlotLayout(C, vpc=3, statics_per_slot=2, dynamics_per_slot=3)
    items = torch.arange(layout.num_items).repeat(200)
    static_idx = layout.draw_statics(items, torch.Generator().manual_seed(0))
    label, slot = items // layout.dpc, (items % layout.dpc) // 3
    assert torch.equal(static_idx // 2, label * 3 + slot)
    assert set(static_idx.tolist()) == set(range(C * layout.spc))


def test_memories_at_half_size_make_full_size_videos_and_clip_start_is_the_clips_luminance():
    """scale 2 + init clip + residual integrator: iteration 0's video i is real clip i in grayscale at half size,
    upsampled, plus the still's colour offset: its luminance is exactly the clip's (METHOD.md 5.2a)."""
    layout = SlotLayout(C, 1, statics_per_slot=1, dynamics_per_slot=3, scale=2)
    g = torch.Generator().manual_seed(0)
    sample = class_sampler()
    stills = init_static_memory(layout, SIZE, "real", g, sample)
    synset = S2DSet.create(layout, stills, T, g, integrator_init="residual", dynamic_init="clip", sample_real=sample)
    assert synset.static_memory.shape[-1] == synset.dynamic_memory.shape[-1] == SIZE // 2
    g_clips = torch.Generator().manual_seed(0)
    init_static_memory(layout, SIZE, "real", g_clips, sample)  # replay the draws up to the dynamic memory's
    videos, labels = synset.all_videos(torch.Generator().manual_seed(1))
    assert videos.shape == (C * 3, T, 3, SIZE, SIZE) and labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    luma = videos.mean(2)
    for c in range(C):
        clips = to_model_input(sample(c, 3, g_clips)).mean(2, keepdim=True)  # (3, T, 1, H, W): no detail to lose
        assert torch.allclose(luma[3 * c:3 * c + 3], clips[:, :, 0], atol=1e-5)


def test_replaying_a_generator_state_replays_the_pairing():
    synset = make_set()
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    first, _ = synset.all_videos(g)
    second, _ = synset.all_videos(g)
    g.set_state(state)
    replay, _ = synset.all_videos(g)
    assert torch.equal(first, replay)
    assert not torch.equal(first, second)


def test_materialize_is_differentiable_in_dynamic_integrator_and_trainable_static():
    synset = make_set(train_static=True)
    videos, _ = synset.materialize(torch.tensor([0, 3]), torch.Generator().manual_seed(0))
    videos.square().sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in synset.leaves())
    assert len(synset.leaves()) == 4  # dynamic, integrator weight + bias, static


def test_static_memory_is_frozen_by_default():
    synset = make_set()
    assert not synset.static_memory.requires_grad
    assert "static" not in synset.trainable()


def test_storage_ratio_matches_method_table_for_miniucf_vpc1():
    mb = s2d_storage(50 * 2 * 3 * 112 * 112, 50 * 2 * 16 * 112 * 112, 327, num_classes=50, vpc=1, frames=16, size=112)
    assert mb["pixel_baseline_mb"] / 1.048576 == pytest.approx(114.8, abs=0.05)  # MiB column of method.md 5.8
    assert mb["total_mb"] / 1.048576 == pytest.approx(90.9, abs=0.05)
    assert mb["ratio_to_baseline"] == pytest.approx(0.79, abs=0.005)


def test_storage_counts_stored_bytes_or_fp32_like_the_paper():
    clips = torch.zeros(2, T, SIZE, SIZE, 3, dtype=torch.uint8)
    assert storage_mb(clips) == clips.numel() / 1e6
    assert storage_mb(clips, as_float32=True) == storage_mb(clips.float()) == 4 * clips.numel() / 1e6


def test_state_tensors_round_trip_to_the_same_videos():
    synset = make_set()
    clone = make_set(seed=1)
    clone.load_state_tensors(synset.state_tensors())
    a, _ = synset.all_videos(torch.Generator().manual_seed(5))
    b, _ = clone.all_videos(torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_evaluation_source_pickles_and_repairs_on_every_call_without_graph():
    synset = make_set(vpc=2)
    source = pickle.loads(pickle.dumps(synset.source()))
    g = torch.Generator().manual_seed(0)
    first, labels = source(g)
    second, _ = source(g)
    assert not first.requires_grad
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert not torch.equal(first, second)
    expected, _ = synset.all_videos(torch.Generator().manual_seed(0))
    assert torch.allclose(first, expected.detach())
    assert source.syn_lr == pytest.approx(0.01)


def test_pixel_source_pickles_and_keeps_the_videos_and_learned_lr():
    pixels = PixelSet(torch.randn(C * 2, T, 3, SIZE, SIZE), C, syn_lr=0.05)
    source = pickle.loads(pickle.dumps(pixels.source()))
    videos, labels = source(torch.Generator())
    assert torch.equal(videos, pixels.videos.detach()) and labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert source.syn_lr == pytest.approx(0.05)


def test_sources_do_not_import_the_artifact_layer():
    code = ("import sys, torch\n"
            "from vdistill.distill.synset import PixelSet, S2DSet, SlotLayout\n"
            "S2DSet.create(SlotLayout(1, 1), torch.zeros(2, 3, 4, 4), 2, torch.Generator()).source()\n"
            "PixelSet(torch.zeros(1, 2, 3, 4, 4), 1).source()\n"
            "assert 'vdistill.export' not in sys.modules, 'synset imported export'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_pixel_set_starts_from_real_clips_of_each_class():
    pixels = PixelSet.from_real(class_sampler(), C, 2, torch.Generator().manual_seed(0))
    videos, labels = pixels.all_videos()
    assert videos.shape == (C * 2, T, 3, SIZE, SIZE) and labels.tolist() == [0, 0, 1, 1, 2, 2]
    raw = torch.stack([torch.full((T, SIZE, SIZE, 3), 40 * c, dtype=torch.uint8) for c in range(C)])
    reference = to_model_input(raw)[:, :, 0]  # channel 0 of each class at pixel value 40*c
    for k in range(C * 2):
        assert (videos[k, :, 0] - reference[k // 2]).abs().max() < 6 / 255 / 0.229  # clip index adds <6 levels


def test_real_static_init_takes_one_frame_of_each_class():
    layout = SlotLayout(C, 1)
    frames = random_real_frames(class_sampler(), 1, 5, torch.Generator().manual_seed(0))
    assert frames.shape == (5, SIZE, SIZE, 3) and ((frames >= 40) & (frames < 46)).all()
    static = init_static_memory(layout, SIZE, "real", torch.Generator().manual_seed(0), class_sampler())
    assert static.shape == (C * 2, 3, SIZE, SIZE)
    class_means = static.mean(dim=(1, 2, 3)).view(C, 2).mean(dim=1)
    assert (class_means[1:] > class_means[:-1]).all()
    noise = init_static_memory(layout, SIZE, "noise", torch.Generator().manual_seed(0))
    assert noise.shape == (C * 2, 3, SIZE, SIZE)


def test_real_dynamic_init_with_the_residual_integrator_starts_as_the_real_clip():
    """Iteration 0 of dynamic.init=real: the still (here the clip's temporal mean) plus the clip's own motion."""
    g = torch.Generator().manual_seed(0)
    clip = torch.randint(0, 256, (1, T, SIZE, SIZE, 1), generator=g, dtype=torch.uint8).expand(-1, -1, -1, -1, 3)
    real = to_model_input(clip)
    layout = SlotLayout(1, 1, statics_per_slot=1, dynamics_per_slot=1)
    s2d = S2DSet.create(layout, real.mean(dim=1), T, g, integrator_init="residual", dynamic_init="real",
                        sample_real=lambda c, n, generator: clip)
    videos, _ = s2d.all_videos(g)
    error = (videos - real).norm() / (real - real.mean(dim=1, keepdim=True)).norm()
    assert error < 0.05  # exact up to the per-channel normalisation of a grey clip's motion


def test_real_dynamic_init_needs_a_sampler():
    layout = SlotLayout(C, 1)
    with pytest.raises(ValueError, match="dynamic.init=real needs a real-clip sampler"):
        S2DSet.create(layout, torch.zeros(C * layout.spc, 3, SIZE, SIZE), T, torch.Generator(), dynamic_init="real")
