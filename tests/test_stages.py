"""The distillation loop: every expert is used, resume is exact, DM+S2D learns, optimisers follow METHOD.md 5.1 / 7."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from vdistill.config import BaselinesConfig, DynamicConfig, ModelConfig, StaticConfig
from vdistill.data.pixels import to_model_input
from vdistill.distill.objectives import dm_loss, random_network
from vdistill.distill.loop import ExpertCursor, Recipe, _items, distill
from vdistill.distill.synset import PixelSet, S2DSet, SlotLayout, draw_seed, init_static_memory, substream
from vdistill.models import ConvNet2D, ConvNet3D, flat_params

C, T, SIZE = 3, 4, 16
MODEL = ModelConfig(width=8, head="adaptive", width_2d=8, depth_2d=2)


def class_sampler(pool: int = 8):
    """Random uint8 clips with class structure: class c is bright in colour channel c, dark elsewhere."""
    g = torch.Generator().manual_seed(123)
    clips = torch.randint(0, 60, (C, pool, T, SIZE, SIZE, 3), generator=g, dtype=torch.uint8)
    for c in range(C):
        clips[c, ..., c] += 150
    return lambda c, n, generator: clips[c, torch.randint(pool, (n,), generator=generator)]


def trajectories(build, num_experts: int, epochs: int):
    """A snapshot reader over made-up trajectories (init + a small random walk), recording every expert read."""
    reads: list[int] = []
    data = {}
    for k in range(num_experts):
        torch.manual_seed(k)
        theta = flat_params(build())
        g = torch.Generator().manual_seed(100 + k)
        data[k] = [theta + 0.01 * e * torch.randn(theta.shape, generator=g) for e in range(epochs)]

    def snapshot(expert: int, epoch: int) -> torch.Tensor:
        reads.append(expert)
        return data[expert][epoch].clone()

    return snapshot, reads


def s2d_set(seed: int = 0, vpc: int = 1) -> S2DSet:
    layout = SlotLayout(C, vpc)
    g = torch.Generator().manual_seed(seed)
    static = init_static_memory(layout, SIZE, "real", g, class_sampler())
    return S2DSet.create(layout, static, T, g)


def video_experts(num_experts: int = 3):
    return trajectories(lambda: ConvNet3D(C, T, SIZE, width=8, head="adaptive"), num_experts, 4)


def dyn_cfg(**kw) -> DynamicConfig:
    base = dict(iterations=6, batch_real=4, syn_steps=2, max_start_epoch=2, expert_epochs=1, optimizer="sgd",
                lr_dynamic=1.0, lr_integrator=1e-2, lr_lr=1e-3, checkpoint_every=100)
    return DynamicConfig(**{**base, **kw})


def run_dynamic(method: str, synset: S2DSet, sample_real, cfg: DynamicConfig, seed: int = 0, **kwargs) -> S2DSet:
    """The dynamic stage's loop: `cfg` as the `method`'s settings."""
    recipe = Recipe.dynamic(cfg.model_copy(update={"method": method}))
    distill(synset, recipe, sample_real, torch.Generator().manual_seed(seed), "cpu", num_classes=C, model_cfg=MODEL,
            **kwargs)
    return synset


def test_expert_cursor_visits_every_expert_once_per_pass_in_a_fresh_order():
    cursor, g = ExpertCursor([4, 7, 9, 11]), torch.Generator().manual_seed(0)
    passes = [[cursor.next(g) for _ in range(4)] for _ in range(3)]
    assert all(sorted(p) == [4, 7, 9, 11] for p in passes)
    assert len({tuple(p) for p in passes}) > 1


def test_mtt_dynamic_stage_uses_every_expert_across_iterations():
    snapshot, reads = video_experts(3)
    run_dynamic("mtt", s2d_set(), class_sampler(), dyn_cfg(iterations=6), snapshot=snapshot, expert_ids=[0, 1, 2])
    per_iteration = reads[::2]  # start and target of the same expert each iteration
    assert reads[1::2] == per_iteration
    assert Counter(per_iteration) == {0: 2, 1: 2, 2: 2}
    assert sorted(per_iteration[:3]) == [0, 1, 2]


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("method", ["dm", "mtt"])
def test_dynamic_stage_resumed_from_a_checkpoint_matches_a_straight_run(method, optimizer):
    snapshot, _ = video_experts(2)
    kwargs = dict(snapshot=snapshot, expert_ids=[0, 1])
    cfg = dyn_cfg(iterations=6, checkpoint_every=3, optimizer=optimizer,
                  **({"lr_dynamic": 0.05, "lr_integrator": 1e-3} if optimizer == "adam" else {}))
    saved: list[dict] = []
    straight = run_dynamic(method, s2d_set(), class_sampler(), cfg, 5, on_checkpoint=saved.append, **kwargs)
    assert [s["iteration"] for s in saved] == [3, 6]
    resumed = run_dynamic(method, s2d_set(seed=99), class_sampler(), cfg, 5, state=saved[0], **kwargs)
    for name, tensor in straight.state_tensors().items():
        assert torch.equal(tensor, resumed.state_tensors()[name]), name


def motion_sampler(pool: int = 8):
    """Classes that differ only in motion: class c flashes bright on frames t with (t + c) % C == 0."""
    g = torch.Generator().manual_seed(7)
    clips = torch.randint(60, 120, (C, pool, T, SIZE, SIZE, 3), generator=g, dtype=torch.uint8)
    for c in range(C):
        clips[c, :, [t for t in range(T) if (t + c) % C == 0]] += 120
    return lambda c, n, generator: clips[c, torch.randint(pool, (n,), generator=generator)]


def held_out_dm_loss(synset: S2DSet, sample_real) -> float:
    """DM loss averaged over 8 fixed random networks and real batches the stage never sees."""
    g = torch.Generator().manual_seed(999)
    total = 0.0
    with torch.no_grad():
        videos, labels = synset.all_videos(g)
        for k in range(8):
            net = random_network(lambda: ConvNet3D(C, T, SIZE, width=8, head="adaptive"), 1000 + k, "cpu")
            real = [to_model_input(sample_real(c, 16, g)) for c in range(C)]
            total += dm_loss(net.embed, real, [videos[labels == c] for c in range(C)]).item()
    return total / 8


def test_dm_s2d_learns_motion_that_the_static_memory_lacks():
    sample_real = motion_sampler()
    layout = SlotLayout(C, 1)
    g = torch.Generator().manual_seed(0)
    synset = S2DSet.create(layout, init_static_memory(layout, SIZE, "real", g, sample_real), T, g)
    before = held_out_dm_loss(synset, sample_real)
    losses: list[float] = []
    cfg = dyn_cfg(iterations=30, batch_real=8, lr_dynamic=1e4, lr_integrator=1e-2)
    run_dynamic("dm", synset, sample_real, cfg, on_metrics=lambda it, m: losses.append(m["loss"]))
    assert len(losses) == 30
    assert held_out_dm_loss(synset, sample_real) < 0.75 * before


def test_dynamic_stage_optimisers_follow_the_paper_and_static_stays_frozen():
    saved: list[dict] = []
    snapshot, _ = video_experts(1)
    synset = s2d_set()
    static_before = synset.static_memory.detach().clone()
    run_dynamic("mtt", synset, class_sampler(), dyn_cfg(iterations=2, checkpoint_every=2), snapshot=snapshot,
                expert_ids=[0], on_checkpoint=saved.append)
    groups = {name: sd["param_groups"][0] for name, sd in saved[0]["optimizers"].items()}
    assert set(groups) == {"dynamic", "integrator", "syn_lr"}
    assert (groups["dynamic"]["lr"], groups["dynamic"]["momentum"]) == (1.0, 0.95)
    assert (groups["integrator"]["lr"], groups["integrator"]["momentum"]) == (1e-2, 0.95)
    assert (groups["syn_lr"]["lr"], groups["syn_lr"]["momentum"]) == (1e-3, 0.9)
    assert torch.equal(synset.static_memory, static_before)


def test_learned_syn_lr_is_clamped_at_min_syn_lr():
    snapshot, _ = video_experts(1)
    history: list[float] = []
    cfg = dyn_cfg(iterations=3, lr_lr=1e6, min_syn_lr=5e-3, lr_teacher=0.01)
    synset = run_dynamic("mtt", s2d_set(), class_sampler(), cfg, snapshot=snapshot, expert_ids=[0],
                         on_metrics=lambda it, m: history.append(m["syn_lr"]))
    floor = torch.tensor(5e-3).item()  # 5e-3 as float32 holds it
    assert min(history) == floor and float(synset.syn_lr.detach()) >= floor


def test_evaluation_hook_gets_a_source_every_eval_every_and_at_the_end():
    calls: list[tuple[int, int]] = []

    def on_eval(iteration, source):
        videos, labels = source(torch.Generator().manual_seed(0))
        calls.append((iteration, videos.shape[0]))

    run_dynamic("dm", s2d_set(vpc=2), class_sampler(), dyn_cfg(iterations=5, eval_every=2), on_eval=on_eval)
    assert calls == [(2, 12), (4, 12), (5, 12)]  # 3 classes x 2 slots x 2 dynamic clips


@pytest.mark.parametrize("method", ["dm", "dc", "mtt"])
def test_static_stage_distils_class_major_images(method):
    snapshot, _ = trajectories(lambda: ConvNet2D(C, SIZE, width=8, depth=2), 2, 4)
    layout = SlotLayout(C, 1)
    losses: list[float] = []
    cfg = StaticConfig(method=method, iterations=3, batch_real=4, lr=0.1)
    g = torch.Generator().manual_seed(0)
    stills = PixelSet(init_static_memory(layout, SIZE, "real", g, class_sampler()), C)
    distill(stills, Recipe.static(cfg, dyn_cfg(syn_steps=2, max_start_epoch=2)), class_sampler(), g, "cpu",
            num_classes=C, model_cfg=MODEL, snapshot=snapshot, expert_ids=[0, 1],
            on_metrics=lambda it, m: losses.append(m["loss"]))
    static = stills.videos.detach()
    initial = init_static_memory(layout, SIZE, "real", torch.Generator().manual_seed(0), class_sampler())
    assert static.shape == (C * 2, 3, SIZE, SIZE) and not static.requires_grad
    assert len(losses) == 3 and not torch.equal(static, initial)


@pytest.mark.parametrize("method", ["dm", "mtt"])
def test_pixel_baseline_updates_pixels_with_momentum_half(method):
    snapshot, _ = video_experts(1)
    pixels = PixelSet.from_real(class_sampler(), C, 1, torch.Generator().manual_seed(0))
    before = pixels.videos.detach().clone()
    saved: list[dict] = []
    recipe = Recipe.pixels(method, BaselinesConfig(pixel_iterations=2, pixel_optimizer="sgd", pixel_lr_dm=1.0,
                                                   pixel_lr_mtt=100.0),
                           dyn_cfg(method=method, checkpoint_every=2))
    distill(pixels, recipe, class_sampler(), torch.Generator().manual_seed(0), "cpu", num_classes=C, model_cfg=MODEL,
            snapshot=snapshot, expert_ids=[0], on_checkpoint=saved.append)
    assert not torch.equal(pixels.videos, before)
    momenta = {name: sd["param_groups"][0]["momentum"] for name, sd in saved[0]["optimizers"].items()}
    assert momenta == ({"pixels": 0.5} if method == "dm" else {"pixels": 0.5, "syn_lr": 0.5})


@pytest.mark.parametrize("method", ["dm", "mtt"])
def test_dynamic_stage_leaves_the_global_rng_alone(method):
    snapshot, _ = video_experts(1)
    synset = s2d_set()
    before = torch.random.get_rng_state()
    run_dynamic(method, synset, class_sampler(), dyn_cfg(iterations=2), snapshot=snapshot, expert_ids=[0])
    assert torch.equal(torch.random.get_rng_state(), before)


def test_zero_iteration_pixel_baseline_evaluates_the_real_initialisation():
    pixels = PixelSet.from_real(class_sampler(), C, 1, torch.Generator().manual_seed(0))
    calls: list[int] = []
    recipe = Recipe.pixels("dm", BaselinesConfig(pixel_iterations=0), dyn_cfg(method="dm"))
    distill(pixels, recipe, class_sampler(), torch.Generator().manual_seed(0), "cpu", num_classes=C, model_cfg=MODEL,
            on_eval=lambda it, source: calls.append(it))
    assert calls == [0]


def test_mtt_names_the_expert_and_epochs_of_a_segment_that_did_not_move():
    frozen = flat_params(ConvNet3D(C, T, SIZE, width=8, head="adaptive"))
    with pytest.raises(ValueError, match=r"expert 0: the snapshots of epochs \d and \d are identical"):
        run_dynamic("mtt", s2d_set(), class_sampler(), dyn_cfg(iterations=1),
                    snapshot=lambda expert, epoch: frozen.clone(), expert_ids=[0])


def test_mtt_names_a_diverged_expert_and_the_key_to_lower():
    snapshot, _ = video_experts(1)
    with pytest.raises(FloatingPointError, match=r"expert 0 has non-finite weights.*lower experts.lr"):
        run_dynamic("mtt", s2d_set(), class_sampler(), dyn_cfg(iterations=1),
                    snapshot=lambda expert, epoch: snapshot(expert, epoch) * float("nan"), expert_ids=[0])


def test_a_non_finite_distillation_stops_naming_the_stage_iteration_and_keys():
    with pytest.raises(FloatingPointError, match=r"dynamic stage \(dm\).*iteration \d.*lower dynamic.lr_dynamic"):
        run_dynamic("dm", s2d_set(), class_sampler(), dyn_cfg(iterations=2, lr_dynamic=1e30))


def _dm_loss_fn(synset, classes):
    from vdistill.distill.loop import PER_CLASS_OBJECTIVES, _per_class_loss_fn

    sample_real, build = class_sampler(), lambda: ConvNet3D(C, T, SIZE, width=8, head="adaptive")
    real = lambda c, g: to_model_input(sample_real(c, 4, g))  # noqa: E731
    return _per_class_loss_fn(PER_CLASS_OBJECTIVES["dm"], synset, real, build, classes, torch.float32,
                              torch.device("cpu")), real, build


def test_dm_takes_its_gradient_class_by_class_equal_to_the_whole_loss():
    """The class-by-class loop (bounded memory at 400 classes) computes the gradient of the summed loss; each class
    draws from its own substream of the iteration's seed."""
    by_class, whole = s2d_set(vpc=2), s2d_set(vpc=2)
    loss_fn, real, build = _dm_loss_fn(by_class, range(C))
    loss = loss_fn(torch.Generator().manual_seed(5), ExpertCursor([]))
    seed = draw_seed(torch.Generator().manual_seed(5))
    net = random_network(build, seed, "cpu")
    draws = [substream(seed, c) for c in range(C)]
    reals = [real(c, draws[c]) for c in range(C)]
    reference = dm_loss(net.embed, reals, [whole.class_videos(c, draws[c]) for c in range(C)])
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    for mine, theirs in zip(by_class.leaves(), whole.leaves()):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-7)


def test_dm_gradients_of_disjoint_class_blocks_add_up_to_the_whole_losss():
    """What lets workers split the classes: a class's draws do not depend on which other classes are computed,
    so blocks of classes computed apart (here one after the other, on copies of the set) sum to the whole."""
    whole, first, rest = s2d_set(vpc=2), s2d_set(vpc=2), s2d_set(vpc=2)
    total = _dm_loss_fn(whole, range(C))[0](torch.Generator().manual_seed(7), ExpertCursor([]))
    parts = [_dm_loss_fn(part, classes)[0](torch.Generator().manual_seed(7), ExpertCursor([]))
             for part, classes in ((first, [0]), (rest, range(1, C)))]
    assert total.item() == pytest.approx(sum(p.item() for p in parts), rel=1e-5)
    for w, f, r in zip(whole.leaves(), first.leaves(), rest.leaves()):
        torch.testing.assert_close(w.grad, f.grad + r.grad, rtol=1e-4, atol=1e-7)
    assert first.dynamic_memory.grad[1:].abs().max() == 0 and rest.dynamic_memory.grad[0].abs().max() == 0


def test_mtt_with_fewer_synthetic_items_per_step_than_the_set_holds_trains_and_resumes_exactly():
    """batch_syn < C*vpc, as the K400 preset (256 of 400 videos): minibatched student steps."""
    snapshot, _ = video_experts(2)
    kwargs = dict(snapshot=snapshot, expert_ids=[0, 1])
    cfg = dyn_cfg(iterations=4, batch_syn=2)
    before = s2d_set(vpc=2).dynamic_memory.detach().clone()
    straight = run_dynamic("mtt", s2d_set(vpc=2), class_sampler(), cfg, 1, **kwargs)
    assert not torch.equal(straight.dynamic_memory, before)
    saved: list[dict] = []
    run_dynamic("mtt", s2d_set(vpc=2), class_sampler(), dyn_cfg(iterations=2, batch_syn=2, checkpoint_every=2), 1,
                on_checkpoint=saved.append, **kwargs)
    resumed = run_dynamic("mtt", s2d_set(vpc=2), class_sampler(), cfg, 1, state=saved[0], **kwargs)
    for name, tensor in straight.state_tensors().items():
        assert torch.equal(tensor, resumed.state_tensors()[name]), name


def test_mtt_student_steps_take_the_papers_batch_however_many_clips_the_budget_holds():
    """batch_syn 0 = C*vpc videos per student step, drawn from all C*dpc stored clips (METHOD.md 5.2)."""
    layout = SlotLayout(C, 1, statics_per_slot=1, dynamics_per_slot=1, scale=2, slots_per_video=4)
    g = torch.Generator().manual_seed(0)
    synset = S2DSet.create(layout, init_static_memory(layout, SIZE, "real", g, class_sampler()), T, g)
    assert _items(synset, 0) == (C * 4, C)
    assert _items(synset, 3) == (C * 4, 3)
