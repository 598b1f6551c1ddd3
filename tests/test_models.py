"""Networks: the paper's ConvNet3D shapes and sizes, flat-parameter calls, the integrator, torchvision adapters."""
from __future__ import annotations

import pytest
import torch

from vdistill.config import ModelConfig
from vdistill.models import ConvNet3D, Integrator, build_model, flat_params, functional_forward, param_names
from vdistill.train import train_epoch

TINY = ModelConfig(width=16, head="adaptive")


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_convnet3d_matches_paper_at_miniucf_resolution():
    model = ConvNet3D(50, frames=16, size=112).eval()
    x = torch.randn(1, 16, 3, 112, 112)
    assert count(model) == 3_647_666
    assert model.embed(x).shape == (1, 2048)
    assert model(x).shape == (1, 50)


def test_convnet3d_matches_paper_at_kinetics_resolution():
    model = ConvNet3D(400, frames=8, size=64).eval()
    x = torch.randn(2, 8, 3, 64, 64)
    assert count(model) == 3_692_816
    assert model.embed(x).shape == (2, 256)
    assert model(x).shape == (2, 400)


def test_adaptive_head_runs_at_demo_resolution():
    model = build_model("convnet3d", 10, 8, 32, TINY)
    assert model(torch.randn(3, 8, 3, 32, 32)).shape == (3, 10)


def test_paper_head_rejects_sizes_it_cannot_pool():
    with pytest.raises(ValueError, match="head=adaptive"):
        ConvNet3D(10, frames=8, size=32)


def test_flat_parameter_order_is_the_trajectory_order():
    names = param_names(build_model("convnet3d", 5, 8, 32, TINY))
    assert names == ["conv0.weight", "conv0.bias", "conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias",
                     "logit.weight", "logit.bias"]


def test_functional_forward_from_flat_vector_equals_module_forward():
    model = build_model("convnet3d", 5, 8, 32, TINY, seed=1).eval()
    x = torch.randn(2, 8, 3, 32, 32)
    flat = flat_params(model)
    torch.testing.assert_close(functional_forward(model, flat, x), model(x))
    torch.testing.assert_close(functional_forward(model, flat, x, method="embed"), model.embed(x))


def test_integrator_has_327_parameters_and_makes_videos():
    integrator = Integrator()
    video = integrator(torch.randn(2, 3, 32, 32), torch.randn(2, 8, 1, 32, 32))
    assert count(integrator) == 327
    assert video.shape == (2, 8, 3, 32, 32)


def test_seeded_build_is_reproducible_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a = flat_params(build_model("convnet3d", 5, 8, 32, TINY, seed=7))
    b = flat_params(build_model("convnet3d", 5, 8, 32, TINY, seed=7))
    c = flat_params(build_model("convnet3d", 5, 8, 32, TINY, seed=8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("name", ["r3d_18", "mc3_18", "r2plus1d_18"])
def test_torchvision_adapter_trains_one_step_at_demo_resolution(name):
    model = build_model(name, 4, 8, 32, seed=0)
    before = flat_params(model)
    clips = torch.randint(0, 256, (2, 8, 32, 32, 3), dtype=torch.uint8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = train_epoch(model, clips, torch.tensor([0, 3]), optimizer, batch_size=2, device="cpu",
                        generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(torch.tensor(stats["loss"]))
    assert not torch.equal(flat_params(model), before)
    assert model.eval().embed(torch.randn(1, 8, 3, 32, 32)).shape == (1, 512)


def test_torchvision_adapter_runs_from_flat_parameters():
    model = build_model("mc3_18", 4, 8, 32, seed=0).eval()
    x = torch.randn(1, 8, 3, 32, 32)
    torch.testing.assert_close(functional_forward(model, flat_params(model), x), model(x))
