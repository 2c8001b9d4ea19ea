import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import VOCAB, assert_budget_met, language_model_loss, tiny_model
from rankcut.allocation import AllocationContext, create_allocator
from rankcut.allocation.ara import (
    ARAConfig, StaircaseMasks, binary_rank, initial_logits, mask_priority, soft_mask, straight_through,
)
from rankcut.allocation.baselines import uniform_rank
from rankcut import CompressionConfig, compress
from rankcut.allocation.spectral import gate_surrogate, gated_objective, spectral_view
from rankcut.sweep import ModelStream
from rankcut.errors import ConfigError
from rankcut.plan import Budget
from test_spectral import spectra_of


@pytest.fixture(scope="module")
def setup():
    """A tiny model, calibration text sampled from the model itself (so truncation costs CE), spectra."""
    model = tiny_model()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (8, 1), generator=generator)
    with torch.no_grad():
        for _ in range(31):
            probabilities = model(ids).logits[:, -1].softmax(-1)
            ids = torch.cat([ids, torch.multinomial(probabilities, 1, generator=generator)], dim=1)
    targets, spectra = spectra_of(model, ids)
    return model, ids, targets, spectra


def run(setup, keep=0.5, seed=0, output_dir=None, **options):
    model, ids, targets, spectra = setup
    budget = Budget({t.name: t.shape for t in targets}, keep)
    allocator = create_allocator("ara", {"steps": 12, "seqlen": None, "batch_size": 4, "lr": 0.1, **options})
    context = AllocationContext(budget, targets, spectra, model, ids, seed=seed, show_progress=False, output_dir=output_dir)
    return allocator.allocate(context)


@settings(max_examples=40, deadline=None)
@given(length=st.integers(1, 40), seed=st.integers(0, 10**6), scale=st.floats(0.1, 10.0))
def test_soft_mask_is_monotone_and_every_logit_gets_gradient(length, seed, scale):
    generator = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(length, generator=generator, dtype=torch.float64)).requires_grad_()
    weights = torch.randn(length, generator=generator, dtype=torch.float64)
    mask = soft_mask(logits)
    assert mask[0].item() == pytest.approx(1.0, abs=1e-12)
    assert torch.all(mask[1:] <= mask[:-1]) and torch.all(mask >= 0)

    (weights * mask).sum().backward()
    step = 1e-6
    numeric = torch.zeros(length, dtype=torch.float64)
    for j in range(length):
        shift = torch.zeros(length, dtype=torch.float64)
        shift[j] = step
        with torch.no_grad():
            up = (weights * soft_mask(logits + shift)).sum()
            down = (weights * soft_mask(logits - shift)).sum()
        numeric[j] = (up - down) / (2 * step)
    assert torch.allclose(logits.grad, numeric, rtol=1e-5, atol=1e-8)
    if length > 1:  # global influence: m_2.. depend on every logit, including those below the cut
        grads = torch.autograd.functional.jacobian(soft_mask, logits.detach())
        # ∂m_i/∂θ_k = p_k (1[k ≥ i] − m_i): nonzero wherever float64 can tell m_i from 0 and 1 and p_k from 0
        # (with saturated logits m_2 can round to exactly 1, which zeroes its row)
        probabilities, rows = logits.detach().softmax(0), mask.detach()
        telling = ((rows > 1e-12) & (rows < 1 - 1e-12))[:, None] & (probabilities > 1e-250)[None, :]
        telling[0] = False
        assert torch.all(grads[telling].abs() > 0)


def test_straight_through_forward_is_hard_and_backward_is_soft():
    logits = torch.randn(20, generator=torch.Generator().manual_seed(1), dtype=torch.float64).requires_grad_()
    weights = torch.randn(20, dtype=torch.float64)
    mask = soft_mask(logits)
    rank = binary_rank(logits, mask, "median")
    gate = straight_through(mask, rank)
    hard = (torch.arange(20) < rank).double()
    assert torch.equal(gate, hard)  # exactly the binary mask, not up to rounding
    assert torch.equal(hard, (mask >= 0.5).double())
    (soft_grad,) = torch.autograd.grad((weights * mask).sum(), logits, retain_graph=True)
    (ste_grad,) = torch.autograd.grad((weights * gate).sum(), logits)
    assert torch.allclose(ste_grad, soft_grad)


def test_binarisation_rules_differ_on_a_bimodal_simplex():
    p = torch.tensor([0.0, 0.4] + [0.0] * 3 + [0.12] * 5, dtype=torch.float64)  # ranks 1..10
    logits = p.clamp(min=1e-12).log()
    mask = soft_mask(logits)
    assert binary_rank(logits, mask, "argmax") == 2  # the most likely single rank
    assert binary_rank(logits, mask, "median") == 6  # m_6 = 0.6 ≥ 0.5 > m_7 = 0.48


shapes = st.dictionaries(st.text("abcdef", min_size=1, max_size=3), st.tuples(st.integers(1, 80), st.integers(1, 80)),
                         min_size=1, max_size=6)


@settings(max_examples=60, deadline=None)
@given(shapes=shapes, keep=st.floats(0.05, 1.0), fmt=st.sampled_from(["plain", "pivga"]),
       candidates=st.sampled_from(["full", "break_even"]), rule=st.sampled_from(["median", "argmax"]))
def test_initialisation_gives_the_uniform_rank(shapes, keep, fmt, candidates, rule):
    budget = Budget(shapes, keep, fmt)
    masks = StaircaseMasks(budget, ARAConfig(candidates=candidates, binarize=rule))
    for name, mask in masks.masks().items():
        m, n = shapes[name]
        expected = budget.normalize(name, max(1, uniform_rank(m, n, keep, fmt)))
        assert budget.normalize(name, mask.rank) == expected
        assert abs(mask.soft.sum().item() - mask.rank) <= max(1.0, 0.01 * min(m, n))


def test_initialisation_holds_the_median_for_wide_spectra():
    # r in the tens of thousands: the Laplace tails alone would move the median; the raised peak holds it
    logits = initial_logits(20000, 15000, 1000.0)
    for rule in ("median", "argmax"):
        assert binary_rank(logits, soft_mask(logits), rule) == 15000


def test_compression_ratio_caps_dense_modules_but_still_pulls_them_back():
    budget = Budget({"a": (40, 40), "b": (40, 40)}, 0.5)
    masks = StaircaseMasks(budget, ARAConfig(candidates="full"))
    masks.logits["a"] = initial_logits(40, 38, 1.0).requires_grad_()  # soft cost 38·80 > 40·40
    state = masks.masks()
    ratio = masks.global_ratio(state)
    b_cost = state["b"].rank * 80
    assert ratio.item() == pytest.approx((1600 + b_cost) / 3200)  # "a" counts as dense, not more
    ratio.backward()
    assert masks.logits["a"].grad.abs().sum() > 0  # compression pressure reaches the dense module


def test_global_ratio_is_the_binary_plans_ratio_with_the_soft_gradient():
    """R_glob in value is the ratio of the binary ranks the forward runs (not of the soft ranks Σ m_i),
    and its gradient is the soft mask's."""
    budget = Budget({"a": (40, 30), "b": (50, 40)}, 0.5, "pivga")
    masks = StaircaseMasks(budget, ARAConfig(candidates="full"))
    masks.logits["a"] = (initial_logits(30, 9, 1.0) + 0.3 * torch.randn(30, generator=torch.Generator().manual_seed(0))
                         ).requires_grad_()
    state = masks.masks()
    assert abs(state["a"].soft.sum().item() - state["a"].rank) > 1e-3  # soft and binary ranks differ here
    ratio = masks.global_ratio(state)
    assert ratio.item() == pytest.approx(masks.binary_ratio(state), rel=1e-6)  # float32 masks
    ratio.backward()
    soft = masks.logits["a"].detach().requires_grad_()
    (soft_mask(soft).sum() * (70 - 2 * state["a"].rank) / budget.dense_total).backward()
    assert torch.allclose(masks.logits["a"].grad, soft.grad, rtol=1e-6, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(shapes=shapes, keep=st.floats(0.05, 1.0), fmt=st.sampled_from(["plain", "pivga"]), seed=st.integers(0, 10**6))
def test_rescale_meets_the_budget_exactly(shapes, keep, fmt, seed):
    budget = Budget(shapes, keep, fmt)
    generator = torch.Generator().manual_seed(seed)
    soft, ranks = {}, {}
    for name, (m, n) in shapes.items():
        logits = 3 * torch.randn(min(m, n), generator=generator)
        soft[name] = soft_mask(logits)
        ranks[name] = binary_rank(logits, soft[name], "median")
    if budget.total({name: 1 for name in shapes}) > budget.target:
        return  # not even rank 1 everywhere fits: Budget.rescale reports it
    plan = budget.rescale(ranks, mask_priority(budget, soft))
    assert_budget_met(plan, budget)


def test_dense_flow_engages_at_break_even(setup):
    model, ids, targets, spectra = setup
    budget = Budget({t.name: t.shape for t in targets}, 0.5)
    name = targets[0].name
    x = torch.randn(5, targets[0].in_features)
    for dense_flow in (True, False):
        masks = StaircaseMasks(budget, ARAConfig(dense_flow=dense_flow))
        length = masks.logits[name].numel()
        assert length == budget.max_rank(name) + 1  # break_even candidates: the last one is dense
        with spectral_view(model, targets, spectra) as layers:
            layer = layers[name]
            for rank, dense in ((length - 1, False), (length, True)):
                masks.logits[name] = initial_logits(length, rank, 2.0).requires_grad_()
                state = masks.masks()
                assert state[name].rank == rank and state[name].dense == dense
                gates = masks.gates(state)
                assert (name not in gates) == (dense and dense_flow)
                layer.gate = gates.get(name)  # no gate: the layer runs its dense weight
                with torch.no_grad():
                    same = torch.allclose(layer(x), layer.dense_linear(x), atol=1e-4)
                if dense and dense_flow:
                    assert same and torch.equal(layer(x), layer.dense_linear(x))
                elif not dense:
                    assert not same  # the truncated layer


def test_guidance_variants():
    """G2 pulls only dense-regime masks to all ones; G1 pulls module ratios above τ up to 1."""
    budget = Budget({"a": (40, 40), "b": (40, 40), "c": (40, 40)}, 0.5)
    losses = {}
    for guidance in ("none", "G1", "G2"):
        masks = StaircaseMasks(budget, ARAConfig(guidance=guidance, guidance_threshold=0.8))
        length = masks.logits["a"].numel()
        masks.logits["a"] = initial_logits(length, length, 2.0).requires_grad_()  # dense regime
        masks.logits["b"] = initial_logits(length, length - 1, 2.0).requires_grad_()  # ratio 0.95 > τ
        state = masks.masks()  # "c" stays at the uniform rank, ratio 0.5 < τ
        assert state["a"].dense and not state["b"].dense and not state["c"].dense
        loss = masks.guidance(state)
        losses[guidance] = loss.item()
        if guidance == "none":
            assert loss.item() == 0 and not loss.requires_grad
            continue
        loss.backward()
        pushed, untouched = ("a", ["b", "c"]) if guidance == "G2" else ("b", ["c"])
        with torch.no_grad():  # one descent step raises the pushed module's soft rank
            before = soft_mask(masks.logits[pushed]).sum()
            after = soft_mask(masks.logits[pushed] - 0.1 * masks.logits[pushed].grad).sum()
        assert after > before
        assert all(masks.logits[name].grad is None for name in untouched)
    assert losses["G1"] > 0 and losses["G2"] > 0 and losses["G1"] != losses["G2"]


def test_tiny_model_trains_and_meets_the_budget(setup, tmp_path):
    model, ids, targets, spectra = setup
    weights = {name: p.clone() for name, p in model.state_dict().items()}
    plan = run(setup, steps=30, output_dir=tmp_path)
    training = plan.info["training"]
    assert training["steps"] == 30 and training["loss_end"] < training["loss_start"]
    assert plan.total_cost <= plan.budget.target
    assert abs(plan.achieved_keep_ratio - 0.5) < 0.01
    assert all(torch.equal(p, weights[name]) for name, p in model.state_dict().items())  # only θ trained
    assert all(p.requires_grad for p in model.parameters())
    assert type(model.get_submodule(targets[0].name)).__name__ == "Linear"
    assert (tmp_path / "ara_ranks_keep0.5_plain.png").is_file() and plan.info["plot"].endswith(".png")
    assert plan.info["readout"]["rescaled_keep_ratio"] == pytest.approx(plan.achieved_keep_ratio)


@pytest.mark.parametrize("options", [
    {"guidance": "none"}, {"guidance": "G1"}, {"binarize": "argmax"}, {"dense_flow": False},
    {"candidates": "full", "gradient_window": 0.1}, {"fill_priority": "energy"},
    {"seqlen": 16, "batch_size": 100},
])
def test_options_run_within_budget(setup, options):
    plan = run(setup, keep=0.6, steps=4, **options)
    assert plan.total_cost <= plan.budget.target
    assert plan.allocator_config == {**ARAConfig().to_dict(), "steps": 4, "seqlen": None, "batch_size": 4,
                                     "lr": 0.1, **options}


def test_argmax_and_median_learn_different_plans(setup):
    median = run(setup, keep=0.6, steps=8)
    argmax = run(setup, keep=0.6, steps=8, binarize="argmax")
    assert median.info["training"]["curve"] != argmax.info["training"]["curve"]


def test_same_seed_same_plan(setup):
    first, second = run(setup, seed=3), run(setup, seed=3)
    assert first.ranks == second.ranks
    assert first.info["training"]["curve"] == second.info["training"]["curve"]
    other = run(setup, seed=4)
    assert other.info["training"]["curve"] != first.info["training"]["curve"]


@pytest.mark.parametrize("options", [
    {"steps": 0}, {"batch_size": 0}, {"seqlen": 1}, {"lr": 0}, {"lambda_c": -1}, {"lambda_g": -1},
    {"guidance": "G3"}, {"binarize": "mean"}, {"candidates": "some"}, {"gradient_window": 1.5},
    {"gradient_window": -0.1}, {"init_width": 0}, {"guidance_threshold": 0}, {"precision": "fp8"},
    {"checkpointing": "on"}, {"no_such_option": 1},
])
def test_bad_options_raise(options):
    with pytest.raises(ConfigError):
        create_allocator("ara", options)


def test_bfloat16_needs_cuda_and_ara_needs_a_model(setup):
    model, ids, targets, spectra = setup
    budget = Budget({t.name: t.shape for t in targets}, 0.5)
    with pytest.raises(ConfigError, match="CUDA"):
        create_allocator("ara", {"precision": "bfloat16"}).allocate(AllocationContext(budget, targets, spectra, model, ids))
    with pytest.raises(ConfigError, match="model"):
        create_allocator("ara").allocate(AllocationContext(budget, targets, spectra))
    assert math.isfinite(run(setup, steps=1).info["training"]["loss_start"])


def test_streamed_step_gives_the_whole_models_logit_gradients(setup):
    """The gradient one training step puts on the mask logits, through the block-by-block objective and
    the surrogate, equals one backward pass through the whole gated model (dense-flow modules included)."""
    model, ids, targets, spectra = setup
    model = tiny_model().double()
    targets, spectra = spectra_of(model, ids)
    budget = Budget({t.name: t.shape for t in targets}, 0.7)
    grads = []
    for streamed in (False, True):
        masks = StaircaseMasks(budget, ARAConfig())
        length = masks.logits[targets[0].name].numel()  # the first module in the dense regime
        masks.logits[targets[0].name] = initial_logits(length, length, 2.0).requires_grad_()
        state = masks.masks()
        gates = masks.gates(state)
        if streamed:
            _, gradients = gated_objective(ModelStream(model, targets), spectra)(ids[:4], {
                name: gate.detach() for name, gate in gates.items()})
            gate_surrogate(gates, gradients).backward()
        else:
            with spectral_view(model, targets, spectra) as layers:
                for name, layer in layers.items():
                    layer.gate = gates.get(name)
                language_model_loss(model, ids[:4]).backward()
        assert masks.logits[targets[0].name].grad is None  # the dense module does not see the task loss
        grads.append(torch.cat([masks.logits[name].grad for name in gates]))
    assert len(gates) == len(targets) - 1
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-9) and grads[0].abs().max() > 0


def test_compress_end_to_end_with_ara(setup, tmp_path):
    model, ids, targets, spectra = setup
    config = CompressionConfig(keep_ratio=0.6, allocator="ara", allocator_options={"steps": 3, "seqlen": 16})
    compressed, report = compress(tiny_model(), config, calibration=ids, show_progress=False, output_dir=tmp_path)
    assert report.plan.allocator == "ara" and report.measured["target_params"] <= report.measured["budget"]
    assert report.plan.info["settings"]["windows"] == [8, 16]
    assert torch.isfinite(compressed(ids[:2]).logits).all()
