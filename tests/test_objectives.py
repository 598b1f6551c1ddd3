"""DM, MTT and DC objectives: hand-computed values, replayable plans, memory-constant == unrolled gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vdistill.distill.objectives import (dc_loss, dm_loss, gradient_distance, mtt_memory_constant, mtt_plan,
                                         mtt_unrolled, random_network)
from vdistill.distill.synset import S2DSet, SlotLayout
from vdistill.models import ConvNet2D, ConvNet3D, flat_params

MODES = {"unrolled": mtt_unrolled, "constant": mtt_memory_constant}


def test_dm_loss_is_the_summed_squared_distance_of_class_means():
    real = [torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[0.0, 0.0]])]
    syn = [torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, -1.0], [3.0, 1.0]])]
    # class 0: mean real (2, 3) vs (0, 1) -> 4 + 4; class 1: (0, 0) vs (2, 0) -> 4
    assert dm_loss(lambda x: x, real, syn).item() == pytest.approx(12.0)


def test_dm_loss_with_a_linear_embedding_differentiates_only_the_synthetic_side():
    weight = torch.tensor([[2.0, 0.0], [0.0, -1.0]])
    real = [torch.tensor([[1.0, 1.0]], requires_grad=True)]
    syn = [torch.tensor([[0.0, 0.0], [1.0, 1.0]], requires_grad=True)]
    loss = dm_loss(lambda x: x @ weight, real, syn)
    # embed(real) = (2, -1); mean embed(syn) = (1, -0.5) -> diff (1, -0.5) -> 1.25
    assert loss.item() == pytest.approx(1.25)
    loss.backward()
    assert real[0].grad is None
    # d/dsyn_j = -2 / 2 * diff @ W^T = -(1, -0.5) @ W^T = (-2, -0.5)
    assert torch.allclose(syn[0].grad, torch.tensor([[-2.0, -0.5], [-2.0, -0.5]]))


def test_dm_loss_runs_on_video_and_frame_embeddings():
    video = random_network(lambda: ConvNet3D(2, 4, 16, width=8, head="adaptive"), 0, "cpu")
    frame = random_network(lambda: ConvNet2D(2, 16, width=8, depth=2), 0, "cpu")
    clips, images = torch.randn(3, 4, 3, 16, 16), torch.randn(3, 3, 16, 16)
    assert dm_loss(video.embed, [clips[:2], clips[2:]], [clips[:1], clips[1:]]).item() > 0
    assert dm_loss(frame.embed, [images[:2], images[2:]], [images[:1], images[1:]]).item() > 0


def test_random_network_is_frozen_reproducible_and_leaves_the_global_rng_alone():
    before = torch.random.get_rng_state()
    build = lambda: ConvNet2D(2, 8, width=4, depth=1)  # noqa: E731
    a, b, c = random_network(build, 7, "cpu"), random_network(build, 7, "cpu"), random_network(build, 8, "cpu")
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(flat_params(a), flat_params(b)) and not torch.equal(flat_params(a), flat_params(c))
    assert a.training and not any(p.requires_grad for p in a.parameters())


def test_mtt_plan_takes_chunks_from_the_end_of_a_randperm_and_refills():
    plan = mtt_plan(5, 4, 2, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    first = torch.randperm(5, generator=g)
    assert [s.indices.tolist() for s in plan[:3]] == [first[4:].tolist(), first[2:4].tolist(), first[:2].tolist()]
    assert plan[3].indices.numel() == 1  # a fresh permutation, again its short last chunk first
    assert len({s.batch_seed for s in plan} | {s.dropout_seed for s in plan}) == 8


@pytest.mark.parametrize("mode", sorted(MODES))
def test_mtt_one_step_on_a_linear_model_matches_the_hand_computation(mode):
    torch.manual_seed(0)
    model = nn.Linear(3, 2, bias=False)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 1, 0])
    start = torch.randn(6, dtype=torch.float64)
    target = torch.randn(6, dtype=torch.float64)
    syn_lr = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    model = model.double()
    plan = mtt_plan(4, 1, 4, torch.Generator().manual_seed(0))
    loss = MODES[mode](model, start, target, syn_lr, lambda idx, g: (x[idx], y[idx]), plan, [x])

    # By hand: softmax cross-entropy gradient of a linear map W (2x3), row-major flat.
    w = start.view(2, 3)
    probs = torch.softmax(x.detach() @ w.T, dim=1)
    grad_w = (probs - F.one_hot(y, 2)).T @ x.detach() / 4
    theta1 = start - 0.5 * grad_w.reshape(-1)
    denom = (start - target).pow(2).sum()
    assert loss.item() == pytest.approx(((theta1 - target).pow(2).sum() / denom).item(), rel=1e-12)
    expected_lr_grad = -2 * ((theta1 - target) * grad_w.reshape(-1)).sum() / denom
    assert syn_lr.grad.item() == pytest.approx(expected_lr_grad.item(), rel=1e-10)
    assert x.grad is not None and x.grad.shape == (4, 3)


def test_mtt_rejects_an_expert_whose_start_equals_its_target():
    model = nn.Linear(2, 2, bias=False)
    flat = torch.zeros(4)
    x = torch.zeros(2, 2, requires_grad=True)
    plan = mtt_plan(2, 1, 2, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="must be finite and differ"):
        mtt_memory_constant(model, flat, flat, torch.tensor(0.1), lambda i, g: (x[i], torch.zeros(len(i)).long()),
                            plan, [x])


def _grads_of(mode: str, synset: S2DSet, net: nn.Module, start, target, plan) -> tuple[float, list[torch.Tensor]]:
    tensors = synset.leaves() + [synset.syn_lr]
    for t in tensors:
        t.grad = None
    loss = MODES[mode](net, start, target, synset.syn_lr, synset.materialize, plan, synset.leaves())
    return loss.item(), [t.grad.clone() for t in tensors]


def test_memory_constant_gradients_equal_the_unrolled_gradients_with_dropout_and_pairing():
    g = torch.Generator().manual_seed(0)
    layout = SlotLayout(3, 2)
    static = torch.randn(3 * layout.spc, 3, 12, 12, generator=g, dtype=torch.float64)
    synset = S2DSet.create(layout, static, 4, g, syn_lr=0.05, train_static=True)
    synset.syn_lr.requires_grad_(True)
    net = ConvNet3D(3, 4, 12, width=8, head="adaptive", dropout=0.5).double().train()
    start = flat_params(net)
    target = start + 0.01 * torch.randn(start.shape, generator=g, dtype=torch.float64)
    plan = mtt_plan(layout.num_slots, 5, 4, g)  # 5 steps over batches of 4 of 6 slots: chunks of 4 and 2
    loss_u, grads_u = _grads_of("unrolled", synset, net, start, target, plan)
    loss_c, grads_c = _grads_of("constant", synset, net, start, target, plan)
    assert loss_c == pytest.approx(loss_u, rel=1e-12)
    assert len(grads_u) == 5  # static, dynamic, integrator weight + bias, syn_lr
    for a, b in zip(grads_u, grads_c):
        assert a.abs().sum() > 0
        assert ((a - b).norm() / a.norm()).item() < 1e-4


def test_dropout_replay_makes_mtt_deterministic_and_leaves_the_global_rng_alone():
    g = torch.Generator().manual_seed(1)
    layout = SlotLayout(2, 1)
    synset = S2DSet.create(layout, torch.randn(4, 3, 12, 12, generator=g), 4, g)
    synset.syn_lr.requires_grad_(True)
    net = ConvNet3D(2, 4, 12, width=8, head="adaptive", dropout=0.5).train()
    start = flat_params(net)
    target = start + 0.01 * torch.randn(start.shape, generator=g)
    plan = mtt_plan(2, 3, 2, g)
    before = torch.random.get_rng_state()
    first = _grads_of("constant", synset, net, start, target, plan)
    second = _grads_of("constant", synset, net, start, target, plan)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert first[0] == second[0] and all(torch.equal(a, b) for a, b in zip(first[1], second[1]))


def test_gradient_distance_is_one_minus_cosine_per_output_channel_ignoring_biases():
    real = {"w": torch.tensor([[1.0, 0.0], [0.0, 2.0]]), "b": torch.tensor([5.0, 5.0])}
    syn = {"w": torch.tensor([[3.0, 0.0], [1.0, 0.0]]), "b": torch.tensor([-5.0, 0.0])}
    # channel 0: same direction -> 0; channel 1: orthogonal -> 1; biases ignored
    assert gradient_distance(real, syn).item() == pytest.approx(1.0, abs=1e-5)


def test_dc_loss_vanishes_when_the_synthetic_batch_equals_the_real_batch():
    net = random_network(lambda: ConvNet2D(2, 8, width=4, depth=1), 0, "cpu")
    images = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    syn = images.clone().requires_grad_(True)
    assert dc_loss(net, [images[:2], images[2:]], [syn[:2], syn[2:]]).item() == pytest.approx(0.0, abs=1e-4)
    other = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    loss = dc_loss(net, [images[:2], images[2:]], [other[:2], other[2:]])
    loss.backward()
    assert loss.item() > 0.1 and other.grad.abs().sum() > 0
