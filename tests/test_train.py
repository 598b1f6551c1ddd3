"""The one training loop and the clip augmentation: layouts, seeds, standardisation, separate top-1/top-5."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from vdistill.augment import ClipAugment
from vdistill.config import ModelConfig
from vdistill.data.pixels import to_model_input
from vdistill.models import build_model, flat_params
from vdistill.train import test_accuracy, train_epoch

TINY = ModelConfig(width=16, head="adaptive")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def clips(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 8, 16, 16, 3), dtype=torch.uint8, generator=gen(seed))


def one_epoch(videos: torch.Tensor, labels: torch.Tensor, seed: int = 0, **kwargs) -> tuple[dict, torch.Tensor]:
    model = build_model("convnet3d", 3, 8, 16, ModelConfig(width=16, head="adaptive", dropout=0.0), seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = train_epoch(model, videos, labels, optimizer, batch_size=4, device="cpu", generator=gen(seed), **kwargs)
    return stats, flat_params(model)


class Recorder(nn.Module):
    """Logits read straight from the input (first C values); remembers every batch it saw."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.classes = classes
        self.scale = nn.Parameter(torch.ones(()))
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return x.flatten(1)[:, : self.classes] * self.scale


def test_uint8_storage_layout_trains_exactly_like_normalised_float_layout():
    videos, labels = clips(), torch.tensor([0, 1, 2, 0, 1, 2])
    stats_u8, params_u8 = one_epoch(videos, labels)
    stats_f, params_f = one_epoch(to_model_input(videos), labels)
    assert stats_u8["loss"] == pytest.approx(stats_f["loss"], rel=1e-5)
    torch.testing.assert_close(params_u8, params_f)


def test_shuffle_order_comes_from_the_generator():
    videos, labels = clips(), torch.tensor([0, 1, 2, 0, 1, 2])
    _, a = one_epoch(videos, labels, seed=1)
    _, b = one_epoch(videos, labels, seed=1)
    _, c = one_epoch(videos, labels, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_frame_models_train_on_uint8_frames():
    model = build_model("convnet2d", 3, 1, 16, ModelConfig(width_2d=8, depth_2d=2), seed=0)
    frames = torch.randint(0, 256, (5, 16, 16, 3), dtype=torch.uint8)
    stats = train_epoch(model, frames, torch.tensor([0, 1, 2, 0, 1]), torch.optim.SGD(model.parameters(), lr=0.1),
                        batch_size=2, device="cpu", generator=gen())
    assert set(stats) == {"loss", "acc"} and 0.0 <= stats["acc"] <= 1.0


def test_standardize_gives_the_network_zero_mean_unit_std_batches():
    model = Recorder(3)
    train_epoch(model, clips(), torch.tensor([0, 1, 2, 0, 1, 2]), torch.optim.SGD(model.parameters(), lr=0.1),
                batch_size=4, device="cpu", generator=gen(), standardize=True)
    for batch in model.seen:
        assert batch.mean().item() == pytest.approx(0.0, abs=1e-5)
        assert batch.std().item() == pytest.approx(1.0, abs=1e-5)


def test_train_epoch_applies_the_augmentation_it_is_given():
    videos, labels = clips(), torch.tensor([0, 1, 2, 0, 1, 2])
    _, plain = one_epoch(videos, labels)
    _, augmented = one_epoch(videos, labels, augment=ClipAugment("flip_color", mode="all"))
    assert not torch.equal(plain, augmented)


def test_top1_and_top5_are_scored_separately():
    # Logits are the inputs' first 6 values: sample 0 ranks its label 1st, sample 1 ranks it 3rd, sample 2 last.
    logits = torch.tensor([[9.0, 1, 2, 3, 4, 5], [5.0, 4, 3, 2, 1, 0], [0.0, 1, 2, 3, 4, 5]])
    videos = torch.zeros(3, 1, 3, 2, 2)
    videos.view(3, -1)[:, :6] = logits
    scores = test_accuracy(Recorder(6), videos, torch.tensor([0, 2, 0]), batch_size=2, device="cpu")
    assert scores == {"top1": pytest.approx(1 / 3), "top5": pytest.approx(2 / 3)}


def test_top5_means_top_c_when_there_are_fewer_than_five_classes():
    videos = torch.zeros(2, 1, 3, 2, 2)
    videos.view(2, -1)[:, :3] = torch.tensor([[3.0, 2, 1], [3.0, 2, 1]])
    scores = test_accuracy(Recorder(3), videos, torch.tensor([2, 0]), batch_size=2, device="cpu")
    assert scores == {"top1": 0.5, "top5": 1.0}


def test_stochastic_test_passes_count_every_flip_draw():
    # Class 0 iff the left column is brighter: correct exactly when the clip is not mirrored.
    class LeftRight(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.stack([x[..., 0].mean((1, 2, 3)), x[..., -1].mean((1, 2, 3))], dim=1)

    videos = torch.zeros(5, 2, 3, 4, 4)
    videos[..., 0] = 1.0
    scores = test_accuracy(LeftRight(), videos, torch.zeros(5, dtype=torch.long), batch_size=5, device="cpu",
                           passes=4, flip=True, generator=gen(3))
    expected = (torch.rand(20, generator=gen(3)) >= 0.5).float().mean().item()
    assert scores["top1"] == pytest.approx(expected)
    assert 0.0 < scores["top1"] < 1.0


def test_random_test_flips_need_an_explicit_generator():
    with pytest.raises(ValueError, match="Generator"):
        test_accuracy(Recorder(2), torch.zeros(1, 1, 3, 2, 2), torch.zeros(1, dtype=torch.long), batch_size=1,
                      device="cpu", flip=True)


@pytest.mark.parametrize("op", ["crop", "flip", "scale", "rotate", "color"])
def test_augmentation_draws_one_transform_per_clip_shared_by_its_frames(op):
    frame = torch.randn(4, 1, 3, 16, 16)
    out = ClipAugment(op)(frame.expand(-1, 6, -1, -1, -1).contiguous(), gen())
    torch.testing.assert_close(out, out[:, :1].expand_as(out))
    assert not torch.allclose(out[0], out[1])  # different clips, different draws


def test_augmentation_is_differentiable_in_the_pixels():
    x = torch.randn(2, 4, 3, 16, 16, requires_grad=True)
    ClipAugment("crop_flip_scale_rotate_color", mode="all")(x, gen()).square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_augmentation_is_reproducible_and_accepts_frames():
    x = torch.randn(3, 3, 16, 16)
    augment = ClipAugment("crop_scale_rotate_color", mode="all")
    a, b = augment(x, gen(5)), augment(x, gen(5))
    assert a.shape == x.shape and torch.equal(a, b)


def test_one_mode_applies_a_single_op_per_batch():
    x = torch.randn(2, 3, 3, 16, 16)
    out = ClipAugment("flip_color", mode="one")(x, gen(0))
    g = gen(0)  # replay: first the op choice, then that op's own draws
    choice = int(torch.randint(2, (1,), generator=g))
    expected = ClipAugment(["flip", "color"][choice], mode="all")(x, g)
    torch.testing.assert_close(out, expected)


def test_unknown_augmentation_op_is_rejected():
    with pytest.raises(ValueError, match="unknown ops"):
        ClipAugment("crop_blur")
