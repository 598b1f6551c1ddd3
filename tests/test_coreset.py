"""Coreset selection: herding and k-center on hand-checkable points, and whole-clip-set selection."""
from __future__ import annotations

import pytest
import torch

from vdistill.config import ModelConfig
from vdistill.coreset import herding, kcenter, random_choice, select_coreset
from vdistill.data.clips import ClipSet
from vdistill.models import build_model

LINE = torch.tensor([[0.0], [1.0], [2.5], [3.0], [10.0]])  # mean 3.3
# Centre point (5, 5) plus four corners at different distances; mean (5.6, 5).
PLANE = torch.tensor([[5.0, 5.0], [0.0, 0.0], [12.0, 0.0], [0.0, 9.0], [11.0, 11.0]])


def test_herding_tracks_the_running_mean_on_a_line():
    # targets: 3.3 -> 3; 6.6-3=3.6 -> 2.5; 9.9-5.5=4.4 -> 1; 13.2-6.5=6.7 -> 10 (|3.3| < |5.7|)
    assert herding(LINE, 4).tolist() == [3, 2, 1, 4]


def test_kcenter_adds_the_farthest_point_on_a_line():
    # start nearest the mean (3); farthest from {3} is 10; from {3, 10} it is 0 (3 away); then 1 (1 away).
    assert kcenter(LINE, 3).tolist() == [3, 4, 0]
    assert kcenter(LINE, 4).tolist() == [3, 4, 0, 1]


def test_kcenter_in_the_plane_uses_distance_to_the_nearest_centre():
    # from (5,5): (12,0) is 8.60 away; then (11,11) is 8.49 from (5,5); then (0,0) is 7.07 vs (0,9) 6.40.
    assert kcenter(PLANE, 4).tolist() == [0, 2, 4, 1]


def test_kcenter_matches_a_brute_force_greedy_reference():
    features = torch.randn(30, 4, generator=torch.Generator().manual_seed(0))

    def dist(i: int, j: int) -> float:
        return float((features[i] - features[j]).norm())

    mean = features.mean(0)
    chosen = [min(range(30), key=lambda i: float((features[i] - mean).norm()))]
    while len(chosen) < 6:
        chosen.append(max((i for i in range(30) if i not in chosen), key=lambda i: min(dist(i, c) for c in chosen)))
    assert kcenter(features, 6).tolist() == chosen


def test_one_clip_per_class_is_the_same_for_herding_and_kcenter():
    assert herding(PLANE, 1).tolist() == kcenter(PLANE, 1).tolist() == [0]


def test_duplicates_are_never_picked_twice():
    features = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [5.0, 5.0]])
    assert kcenter(features, 3).tolist() == [0, 3, 1]
    assert len(set(herding(features, 4).tolist())) == 4


def test_random_choice_is_distinct_and_seeded():
    a = random_choice(10, 4, torch.Generator().manual_seed(1))
    assert len(set(a.tolist())) == 4
    assert torch.equal(a, random_choice(10, 4, torch.Generator().manual_seed(1)))


def test_asking_for_more_clips_than_a_class_has_fails_clearly():
    with pytest.raises(ValueError, match="cannot pick 6 of 5"):
        herding(LINE, 6)


def clip_set() -> ClipSet:
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 2] * 4)
    return ClipSet(torch.randint(0, 256, (12, 8, 16, 16, 3), dtype=torch.uint8, generator=g), labels, ["a", "b", "c"])


@pytest.mark.parametrize("method", ["random", "herding", "kcenter"])
def test_select_coreset_keeps_k_real_clips_per_class_class_major(method):
    full = clip_set()
    embedder = build_model("convnet3d", 3, 8, 16, ModelConfig(width=16, head="adaptive"), seed=0)
    core = select_coreset(method, full.class_clips, full.classes, 2, embedder, "cpu", torch.Generator().manual_seed(0))
    assert isinstance(core, ClipSet) and core.classes == full.classes
    assert core.videos.dtype == torch.uint8 and core.videos.shape == (6, 8, 16, 16, 3)
    assert core.labels.tolist() == [0, 0, 1, 1, 2, 2]
    for clip, label in zip(core.videos, core.labels):
        match = (full.videos == clip).flatten(1).all(1).nonzero().flatten()
        assert len(match) == 1 and full.labels[match].item() == label


def test_herding_needs_an_embedder():
    with pytest.raises(ValueError, match="embedder"):
        full = clip_set()
        select_coreset("herding", full.class_clips, full.classes, 1, None, "cpu", torch.Generator())
