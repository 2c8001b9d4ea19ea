"""FermiGrad and Dobi (rankcut.allocation.fermi): the μ-gradient, the budget shift, the gate window,
the low-temperature limit, the readout, and the allocators end to end on tiny models.

Sign conventions checked here (see the module docstring): the gated weight is
``W(μ) = Σ_i f_i σ_i u_i Bfull_i`` with ``f_i = sigmoid((μ − i)/T)``; ``ΔL_i = −σ_i u_iᵀ G Bfull_iᵀ``
(``G = ∂L/∂W`` at ``W(μ)``) is the first-order loss change of removing component ``i``; and
``∂L/∂μ = −(1/T) Σ_i f_i (1 − f_i) ΔL_i``.
"""

import copy

import pytest
import torch
from torch.nn import functional as F

from conftest import VOCAB, assert_budget_met, tiny_model
from test_spectral import spectra_of
from rankcut.allocation import AllocationContext, create_allocator
from rankcut.allocation.fermi import ComponentValues, FermiGradConfig, FermiSystem, train_ranks
from rankcut.allocation.spectral import spectral_view
from rankcut.errors import ConfigError
from rankcut.plan import DENSE, Budget

EPS64 = torch.finfo(torch.float64).eps


def loss64(model, ids) -> torch.Tensor:
    """Mean next-token CE in float64 (``language_model_loss`` casts logits to float32)."""
    logits = model(input_ids=ids, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


@pytest.fixture(scope="module")
def setup64():
    """A float64 tiny model with its spectra, calibration ids and a budget."""
    ids = torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(0))
    model = tiny_model().double()
    targets, spectra = spectra_of(model, ids)
    budget = Budget({t.name: t.shape for t in targets}, 0.5)
    return model, targets, spectra, ids, budget


@pytest.fixture(scope="module")
def setup32():
    ids = torch.randint(0, VOCAB, (8, 24), generator=torch.Generator().manual_seed(1))
    model = tiny_model()
    targets, spectra = spectra_of(model, ids)
    return model, targets, spectra, ids


def off_grid(system: FermiSystem) -> torch.Tensor:
    """Uniform ranks moved off the integers, so no component sits exactly at f = 1/2."""
    offsets = torch.rand(len(system.names), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return system.uniform() + 0.2 + 0.6 * offsets


def apply_gates(layers, occupations: torch.Tensor, widths: list[int]) -> None:
    """Gate each layer with the first ``w`` occupations of its row, as the allocator's gates are cut."""
    for layer, row, width in zip(layers, occupations, widths):
        layer.gate = row[:width]


def gated_loss(model, targets, spectra, system, mu, temperature, ids) -> torch.Tensor:
    with spectral_view(model, targets, spectra) as views:
        layers = [views[name] for name in system.names]
        apply_gates(layers, system.occupations(mu, temperature), system.gate_widths(mu, temperature, EPS64))
        return loss64(model, ids)


def test_mu_gradient_matches_finite_differences(setup64):
    """Central differences in μ_l. The model's norms compute in float32 even in a float64 model (a
    ~1e-7 relative noise floor on the loss), so h = 0.1 at T = 2: measured agreement ~1e-4."""
    model, targets, spectra, ids, budget = setup64
    system = FermiSystem(budget)
    temperature = torch.full_like(system.full, 2.0)
    mu = off_grid(system).requires_grad_()
    gated_loss(model, targets, spectra, system, mu, temperature, ids).backward()
    h = 0.1
    rows = mu.grad.abs().argsort(descending=True)[:6].tolist()  # the largest gradients: well above the noise
    for row in rows:
        step = torch.zeros_like(mu)
        step[row] = h
        with torch.no_grad():
            plus = gated_loss(model, targets, spectra, system, mu + step, temperature, ids)
            minus = gated_loss(model, targets, spectra, system, mu - step, temperature, ids)
        assert float(plus - minus) / (2 * h) == pytest.approx(float(mu.grad[row]), rel=2e-3), system.names[row]


def test_mu_gradient_is_the_window_average_of_zero_sum_scores(setup64):
    """∂L/∂μ = −(1/T) Σ f(1−f) ΔL_i with ΔL_i = −σ_i u_iᵀ G Bfull_iᵀ, G from autograd on a dense copy
    of the model whose weights are the gated reconstructions (same function, ordinary linears)."""
    model, targets, spectra, ids, budget = setup64
    system = FermiSystem(budget)
    temperature = torch.linspace(1.0, 4.0, len(system.names), dtype=torch.float64)
    mu = off_grid(system).requires_grad_()
    gated_loss(model, targets, spectra, system, mu, temperature, ids).backward()

    occupations = system.occupations(mu.detach(), temperature)
    dense = copy.deepcopy(model)
    weights = []
    for row, name in enumerate(system.names):
        s = spectra[name]
        weight = (s.u.double() * s.sigma * occupations[row, : s.full_rank]) @ s.b_full.double()
        linear = dense.get_submodule(name)
        linear.weight = torch.nn.Parameter(weight)
        weights.append(linear.weight)
    grads = torch.autograd.grad(loss64(dense, ids), weights)
    for row, (name, grad) in enumerate(zip(system.names, grads)):
        s = spectra[name]
        delta = -s.sigma * ((s.u.double().T @ grad) * s.b_full.double()).sum(dim=1)  # ΔL_i
        f = occupations[row, : s.full_rank]
        expected = -(f * (1 - f) * delta).sum() / temperature[row]
        assert float(mu.grad[row]) == pytest.approx(float(expected), rel=1e-4, abs=1e-10), name


def test_soft_cost_is_monotone_in_the_global_shift_and_the_shift_meets_the_budget():
    budget = Budget({"a": (64, 64), "b": (32, 96), "c": (96, 64)}, 0.6, "pivga")
    system = FermiSystem(budget)
    mu = torch.tensor([25.0, 20.0, 40.0], dtype=torch.float64)
    temperature = torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64)
    totals = [float(system.soft_costs(system.clamp(mu + delta), temperature).sum())
              for delta in torch.linspace(-80, 80, 321).tolist()]
    assert all(later >= earlier for earlier, later in zip(totals, totals[1:]))
    assert totals[-1] > totals[0]
    shifted = system.shift_to_budget(mu, temperature)
    assert float(system.soft_costs(shifted, temperature).sum()) == pytest.approx(budget.target, rel=1e-9)
    assert float(system.soft_costs(shifted, temperature).sum()) <= budget.target
    differences = shifted - mu
    assert torch.allclose(differences, differences[0].expand(3))  # one global shift (no clamp reached)


@pytest.mark.parametrize("factor_format", ["plain", "pivga"])
def test_a_module_past_break_even_costs_dense_and_reads_out_dense(factor_format):
    budget = Budget({"a": (64, 64), "b": (32, 96)}, 0.5, factor_format)
    system = FermiSystem(budget)
    temperature = torch.full((2,), 0.3, dtype=torch.float64)
    top = system.clamp(torch.tensor([1000.0, 1000.0], dtype=torch.float64))  # clamped to r + 1
    assert top.tolist() == [65.0, 33.0]
    costs = system.soft_costs(top, temperature)
    if factor_format == "plain":  # N ≈ r is far past break-even (mn/(m+n)): capped at mn exactly
        assert costs.tolist() == [64 * 64, 32 * 96]
    else:  # PivGa: N(m+n) − N² < mn for every N < r; at N ≈ r it is within a fraction of a rank of mn
        assert (costs <= system.dense).all() and (costs > system.dense - 0.2 * system.width).all()
    huge = torch.full((2,), 1000.0, dtype=torch.float64)
    assert torch.equal(system.soft_costs(huge, torch.full((2,), 0.01, dtype=torch.float64)), system.dense)
    assert system.readout(top) == {"a": DENSE, "b": DENSE}
    plain_break_even = {"a": 32, "b": 24}  # ⌈mn/(m+n)⌉: the first rank whose factors cost >= mn
    if factor_format == "plain":
        edge = torch.tensor([32.7, 24.2], dtype=torch.float64)
        assert system.readout(edge) == {"a": DENSE, "b": DENSE}
        assert system.readout(edge - 1) == {name: k - 1 for name, k in plain_break_even.items()}


def test_gate_window_is_exact_to_float_precision(setup32):
    """Gates cut at ⌈μ + T log(2T/ε)⌉ give the same logits as full-width gates (float32 rounding)."""
    model, targets, spectra, ids = setup32
    budget = Budget({t.name: t.shape for t in targets}, 0.4)
    system = FermiSystem(budget)
    temperature = torch.full_like(system.full, 1.5)
    mu = system.uniform()
    occupations = system.occupations(mu, temperature)
    widths = system.gate_widths(mu, temperature, torch.finfo(torch.float32).eps)
    narrower = sum(w < r for w, r in zip(widths, system.full.tolist()))
    assert narrower >= len(widths) // 2  # the window really cuts most modules
    with torch.no_grad(), spectral_view(model, targets, spectra) as views:
        layers = [views[name] for name in system.names]
        apply_gates(layers, occupations, widths)
        windowed = model(ids[:2]).logits
        apply_gates(layers, occupations, [int(r) for r in system.full.tolist()])
        full = model(ids[:2]).logits
        tight = [min(w, int(k)) for w, k in zip(widths, torch.ceil(mu + 6 * temperature).tolist())]
        apply_gates(layers, occupations, tight)  # a cut at μ + 6T (f ≈ 2e-3) does show
        cut = model(ids[:2]).logits
    scale = float(full.abs().max())
    assert float((windowed - full).abs().max()) < 1e-5 * scale
    assert float((cut - full).abs().max()) > 100 * float((windowed - full).abs().max())


def test_low_temperature_gives_the_truncated_model(setup32):
    """At T = 0.01 and μ = k + 0.5 the relaxed model is the rank-k truncation (hard prefix gates)."""
    model, targets, spectra, ids = setup32
    budget = Budget({t.name: t.shape for t in targets}, 0.5)
    system = FermiSystem(budget)
    ranks = system.uniform()
    mu, temperature = ranks + 0.5, torch.full_like(ranks, 0.01)
    widths = system.gate_widths(mu, temperature, torch.finfo(torch.float32).eps)
    assert widths == [int(k) + 1 for k in ranks.tolist()]  # the boundary component and nothing past it
    with torch.no_grad(), spectral_view(model, targets, spectra) as views:
        layers = [views[name] for name in system.names]
        apply_gates(layers, system.occupations(mu, temperature), widths)
        relaxed = model(ids[:2]).logits
        for layer, k in zip(layers, ranks.tolist()):
            layer.gate = torch.ones(int(k))
        truncated = model(ids[:2]).logits
    assert torch.allclose(relaxed, truncated, atol=1e-5)


def context_for(setup, keep_ratio=0.5, factor_format="plain", seed=0, output_dir=None):
    model, targets, spectra, ids = setup
    budget = Budget({t.name: t.shape for t in targets}, keep_ratio, factor_format)
    return AllocationContext(budget, targets, spectra, model, ids, seed=seed, show_progress=False,
                             output_dir=output_dir)


@pytest.mark.parametrize("factor_format", ["plain", "pivga"])
def test_fermigrad_meets_the_budget_exactly(setup32, factor_format):
    context = context_for(setup32, 0.5, factor_format)
    plan = create_allocator("fermigrad", {"steps": 12, "batch_size": 4, "seqlen": 16}).allocate(context)
    assert_budget_met(plan.ranks, plan.budget)
    training = plan.info["training"]
    assert all(point["ratio"] == pytest.approx(0.5, rel=1e-9) for point in training["curve"])  # the shift holds it
    assert plan.info["readout"]["soft_keep_ratio"] == pytest.approx(0.5, rel=1e-9)
    assert training["steps"] == 12 and training["seconds"] > 0
    assert {"first_loss", "last_loss", "curve"} <= set(training)
    assert all(p.requires_grad for p in setup32[0].parameters())  # the model is restored


def test_fermigrad_penalty_mode_and_kl_objective_meet_the_budget(setup32):
    options = {"steps": 6, "batch_size": 2, "budget_mode": "penalty", "objective": "kl", "fill_priority": "energy"}
    plan = create_allocator("fermigrad", options).allocate(context_for(setup32, 0.6))
    assert_budget_met(plan.ranks, plan.budget)
    assert plan.info["training"]["first_loss"] >= 0  # a KL


@pytest.mark.parametrize("factor_format", ["plain", "pivga"])
def test_dobi_meets_the_budget_exactly(setup32, factor_format):
    plan = create_allocator("dobi", {"steps": 8, "batch_size": 4}).allocate(context_for(setup32, 0.4, factor_format))
    assert_budget_met(plan.ranks, plan.budget)
    assert plan.info["readout"]["temperature"] == pytest.approx(0.05)


def test_training_lowers_the_loss(setup32):
    """On one fixed batch at a fixed temperature, Adam on μ (budget held by the shift) reallocates
    rank and lowers the KL to the dense model."""
    model, targets, spectra, ids = setup32
    context = context_for((model, targets, spectra, ids[:2]), 0.4)
    system = FermiSystem(context.budget)
    config = FermiGradConfig(steps=25, batch_size=2, lr=1.0, objective="kl")
    temperature = torch.full_like(system.full, 1.0)
    result = train_ranks(context, system, system.uniform(), lambda steps: lambda step: temperature, config, "shift", 0.0,
                         "fermigrad")
    losses = [point["loss"] for point in result.curve]
    assert losses[-1] < 0.8 * losses[0]
    assert result.soft_ratio == pytest.approx(0.4, rel=1e-9)
    assert not torch.equal(result.mu, system.shift_to_budget(system.uniform(), temperature))


def test_same_seed_gives_the_same_plan(setup32, tmp_path):
    options = {"steps": 5, "batch_size": 2, "seqlen": 12}
    first = create_allocator("fermigrad", options).allocate(context_for(setup32, 0.5, seed=7, output_dir=tmp_path))
    second = create_allocator("fermigrad", options).allocate(context_for(setup32, 0.5, seed=7))
    assert first.ranks == second.ranks
    assert first.info["readout"]["mu"] == second.info["readout"]["mu"]
    pytest.importorskip("matplotlib")
    assert first.info["plot"].endswith(".png") and (tmp_path / first.info["plot"].split("/")[-1]).is_file()


def test_repair_removes_the_cheapest_loss_per_parameter_first():
    budget = Budget({"a": (10, 10), "b": (10, 10)}, 0.5)  # target 100; rank k costs 20k
    values = ComponentValues(budget, {"a": torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0]),
                                      "b": torch.tensor([5.0, 4.0, 3.5, 0.5, 0.1])})
    ranks, removed = values.remove_over_budget({"a": 4, "b": 4})  # 160 -> 100: three steps
    assert removed == 3 and budget.total(ranks) == 100
    assert ranks == {"a": 2, "b": 3}  # b's 0.5, then a's 2.0 and a's 3.0 (both below b's 3.5)
    assert values.priority("a", 2) == pytest.approx(3.0 / 20)  # fill restores a's 3.0 before b's 0.5
    assert values.priority("b", 3) == pytest.approx(0.5 / 20)
    assert values.priority("a", 4) == pytest.approx(1.0 / 20)  # rank 4 is the last useful: next is dense


@pytest.mark.parametrize("name, options", [
    ("fermigrad", {"temperature": 1.0}),
    ("fermigrad", {"t_start": 0.0}),
    ("fermigrad", {"t_start": 1.5}),
    ("fermigrad", {"t_end": -0.1}),
    ("fermigrad", {"t_end": 1.5}),
    ("fermigrad", {"lr": 0}),
    ("fermigrad", {"steps": 0}),
    ("fermigrad", {"seqlen": 1}),
    ("fermigrad", {"budget_mode": "exact"}),
    ("fermigrad", {"objective": "mse"}),
    ("fermigrad", {"penalty": -1}),
    ("dobi", {"beta": 0}),
    ("dobi", {"penalty": -5}),
    ("dobi", {"batch_size": 0}),
    ("dobi", {"t_start": 0.1}),
])
def test_invalid_options_raise(name, options):
    with pytest.raises(ConfigError):
        create_allocator(name, options)


def test_cli_strings_are_coerced_and_training_needs_a_model(setup32):
    allocator = create_allocator("fermigrad", {"steps": "3", "t_end": "0.5", "seqlen": "none"})
    assert allocator.config.steps == 3 and allocator.config.t_end == 0.5 and allocator.config.seqlen is None
    model, targets, spectra, ids = setup32
    budget = Budget({t.name: t.shape for t in targets}, 0.5)
    with pytest.raises(ConfigError):
        allocator.allocate(AllocationContext(budget, targets, spectra, None, ids, show_progress=False))


@pytest.mark.parametrize("name", ["fermigrad", "dobi"])
def test_compress_builds_a_model_within_the_budget(name, tmp_path):
    from rankcut import CompressionConfig, compress

    ids = torch.randint(0, VOCAB, (6, 20), generator=torch.Generator().manual_seed(5))
    config = CompressionConfig(keep_ratio=0.6, allocator=name, allocator_options={"steps": 3, "batch_size": 2})
    model, report = compress(tiny_model(), config, calibration=ids, show_progress=False, output_dir=tmp_path)
    assert report.measured["target_params"] <= report.measured["budget"]
    assert report.plan.allocator == name and report.plan.info["training"]["steps"] == 3
    with torch.no_grad():
        assert torch.isfinite(model(ids[:2]).logits).all()
