import pytest
import torch
from torch.nn import functional as F

from conftest import ARCHS, assert_budget_met, calibration_ids, tiny_model
from test_spectral import spectra_of
from rankcut import CompressionConfig, compress
from rankcut.allocation import AllocationContext, create_allocator
from rankcut.allocation.spectral import spectral_view
from rankcut.allocation.zerosum import component_scores, zero_sum_ranks
from rankcut.errors import ConfigError
from rankcut.sweep import ModelStream
from rankcut.plan import DENSE, Budget


@pytest.fixture(scope="module")
def setup64():
    """A float64 tiny model, its spectra and calibration ids."""
    ids = calibration_ids(8, 24, seed=0)
    model = tiny_model().double()
    targets, spectra = spectra_of(model, ids)
    return model, targets, spectra, ids


def loss64(model, targets, spectra, ids, name=None, index=0, value=1.0) -> float:
    """Mean next-token loss in float64 with gate ``value`` on component ``index`` of ``name``."""
    with torch.no_grad(), spectral_view(model, targets, spectra) as layers:
        for layer_name, layer in layers.items():
            gate = torch.ones(layer.full_rank, dtype=torch.float64)
            if layer_name == name:
                gate[index] = value
            layer.gate = gate
        logits = model(input_ids=ids, use_cache=False).logits
    return float(F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()))


def test_scores_are_the_negative_gate_derivative(setup64):
    """Central differences in the gate (ε = 0.1: the model's float32 norms set a noise floor)."""
    model, targets, spectra, ids = setup64
    scores = component_scores(ModelStream(model, targets), spectra, ids, batch_size=4)
    eps = 0.1
    for target in targets[::4]:
        score = scores[target.name]
        for index in score.abs().argsort(descending=True)[:2].tolist():
            plus = loss64(model, targets, spectra, ids, target.name, index, 1 + eps)
            minus = loss64(model, targets, spectra, ids, target.name, index, 1 - eps)
            assert -(plus - minus) / (2 * eps) == pytest.approx(float(score[index]), rel=1e-2)


def test_scores_match_the_whitened_gradient_formula(setup64):
    """ΔL_i = −σ_i u_iᵀ G Bfull_iᵀ with G the dense weight gradient of the same loss."""
    model, targets, spectra, ids = setup64
    scores = component_scores(ModelStream(model, targets), spectra, ids, batch_size=4)
    weights = [model.get_submodule(t.name).weight for t in targets]
    logits = model(input_ids=ids, use_cache=False).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    grads = torch.autograd.grad(loss, weights)
    for target, grad in zip(targets, grads):
        s = spectra[target.name]
        expected = -s.sigma * ((s.u.double().T @ grad) * s.b_full.double()).sum(dim=1)
        torch.testing.assert_close(scores[target.name], expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
    assert all(p.grad is None for p in model.parameters())


def test_removing_a_tail_component_changes_the_loss_as_predicted(setup64):
    """Full removal is a finite step: first order is accurate for the smallest component of each
    module (small σ), so there we compare predicted and actual loss changes directly."""
    model, targets, spectra, ids = setup64
    scores = component_scores(ModelStream(model, targets), spectra, ids, batch_size=8)
    base = loss64(model, targets, spectra, ids)
    predicted, actual = [], []
    for target in targets:
        last = scores[target.name].numel() - 1
        predicted.append(float(scores[target.name][last]))
        actual.append(loss64(model, targets, spectra, ids, target.name, last, 0.0) - base)
    predicted, actual = torch.tensor(predicted), torch.tensor(actual)
    assert torch.corrcoef(torch.stack([predicted, actual]))[0, 1] > 0.98
    assert (predicted - actual).abs().sum() < 0.15 * actual.abs().sum()


def test_zero_sum_rule_on_a_worked_example():
    # PivGa costs for 6 x 6: dense 36, rank k costs 12k − k² (35, 32, 27, 20, 11), so every removal saves.
    budget = Budget({"a": (6, 6), "b": (6, 6)}, 0.82, "pivga")  # target 59
    scores = {"a": torch.tensor([9.0, 9, 9, 9, 3, -1]), "b": torch.tensor([9.0, 9, 9, 9, -2, 2])}
    ranks, info = zero_sum_ranks(budget, scores, {"a": 1, "b": 1})
    # s=0: Q₊ gives b5 (+2); s>0: Q₋ gives a5 (−1), then b4 (−2); s<0: Q₊ gives a4 (+3); s>0 but Q₋ is
    # empty: Q₊ gives a3 (+9, ties go to the first module); total 27 + 32 = 59. (The flipped rule ends
    # at a=2, b=5.)
    assert ranks == {"a": 3, "b": 4}
    assert info == {"running_sum": 11.0, "removed_components": 5}


def test_modules_above_break_even_stay_dense_and_floors_hold():
    # Plain 6 x 6: break-even rank 2 (cost 24 < 36), so removals save nothing above it.
    budget = Budget({"a": (6, 6), "b": (6, 6)}, 48 / 72)
    scores = {"a": torch.full((6,), 0.1), "b": torch.full((6,), 5.0)}
    ranks, _ = zero_sum_ranks(budget, scores, {"a": 1, "b": 1})
    assert ranks == {"a": 1, "b": DENSE}
    ranks, _ = zero_sum_ranks(budget, scores, {"a": 2, "b": 2})
    assert ranks == {"a": 2, "b": 2}
    with pytest.raises(ConfigError, match="floor"):
        zero_sum_ranks(budget, scores, {"a": 6, "b": 6})


def test_running_sum_stays_balanced():
    generator = torch.Generator().manual_seed(0)
    shapes = {f"m{i}": (40, 30) for i in range(6)}
    scores = {name: torch.randn(30, generator=generator, dtype=torch.float64) for name in shapes}
    _, info = zero_sum_ranks(Budget(shapes, 0.4), scores, {name: 1 for name in shapes})
    assert abs(info["running_sum"]) <= max(float(s.abs().max()) for s in scores.values())


@pytest.mark.parametrize("factor_format", ["plain", "pivga"])
def test_allocation_meets_the_budget_exactly(factor_format):
    ids = calibration_ids(8, 24, seed=2)
    model = tiny_model()
    targets, spectra = spectra_of(model, ids)
    budget = Budget({t.name: t.shape for t in targets}, 0.55, factor_format)
    context = AllocationContext(budget, targets, spectra, model, ids, seed=3, show_progress=False)
    plan = create_allocator("zerosum", {"windows": 4, "batch_size": 2}).allocate(context)
    assert_budget_met(plan.ranks, plan.budget)
    assert plan.info["recomputed_batches_per_block"] == 2 and plan.info["settings"]["windows_used"] == 4
    assert 0 < plan.info["negative_score_fraction"] < 1
    again = create_allocator("zerosum", {"windows": 4, "batch_size": 2}).allocate(context)
    assert again.ranks == plan.ranks
    assert all(p.requires_grad for p in model.parameters())  # the model is restored
    assert type(model.get_submodule(targets[0].name)).__name__ == "Linear"


def test_compress_end_to_end(monkeypatch, tmp_path):
    monkeypatch.setenv("RANKCUT_CACHE", str(tmp_path))
    ids = calibration_ids(8, 24, seed=4)
    config = CompressionConfig(keep_ratio=0.6, allocator="zerosum", allocator_options={"windows": "4"})
    compressed, report = compress(tiny_model(), config, calibration=ids, show_progress=False)
    assert report.measured["target_params"] == report.plan.total_cost <= report.measured["budget"]
    assert report.plan.allocator == "zerosum"
    with torch.no_grad():
        assert torch.isfinite(compressed(ids[:2]).logits).all()


@pytest.mark.parametrize("options", [{"windows": 0}, {"batch_size": 0}, {"min_rank_ratio": 1.5}, {"stages": 0}, {"stages": "two"},
                                     {"min_rank_ratio": -0.1}, {"correction": True}, {"windows": "many"}])
def test_bad_options_raise(options):
    with pytest.raises(ConfigError):
        create_allocator("zerosum", options)


def test_needs_model_and_data():
    budget = Budget({"a": (6, 6)}, 0.5)
    with pytest.raises(ConfigError, match="model and calibration"):
        create_allocator("zerosum").allocate(AllocationContext(budget, [], {}))


@pytest.mark.parametrize("arch", ARCHS)
def test_scores_match_the_formula_on_every_architecture(arch):
    ids = calibration_ids(4, 16, seed=6)
    model = tiny_model(arch).double()
    targets, spectra = spectra_of(model, ids)
    scores = component_scores(ModelStream(model, targets), spectra, ids, batch_size=2)
    last = [t for t in targets if t.block == targets[-1].block]
    weights = [model.get_submodule(t.name).weight for t in last]
    losses = [F.cross_entropy(model(input_ids=b, use_cache=False).logits[:, :-1].flatten(0, 1), b[:, 1:].flatten())
              for b in ids.split(2)]
    grads = torch.autograd.grad(sum(losses) / len(losses), weights)
    for target, grad in zip(last, grads):
        s = spectra[target.name]
        expected = -s.sigma * ((s.u.double().T @ grad) * s.b_full.double()).sum(dim=1)
        torch.testing.assert_close(scores[target.name], expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))


def gate_gradients(model, targets, spectra, ids, ranks):
    """∂L/∂g at the hard prefix gates of ``ranks`` (dense where absent), by autograd through the gates."""
    with spectral_view(model, targets, spectra) as layers:
        gates = {}
        for name, layer in layers.items():
            gate = torch.zeros(layer.full_rank, dtype=torch.float64)
            gate[: ranks.get(name, layer.full_rank)] = 1.0
            gates[name] = gate.requires_grad_()
            layer.gate = gates[name]
        logits = model(input_ids=ids, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        return dict(zip(gates, torch.autograd.grad(loss, list(gates.values()))))


def test_scores_at_a_truncated_plan_are_the_gate_derivatives_there(setup64):
    """Later stages score at the plan so far: every component's score, kept or removed, is −∂L/∂g_i at
    that plan's hard gates."""
    model, targets, spectra, ids = setup64
    ranks = {t.name: max(1, min(t.shape) // (2 + i % 3)) for i, t in enumerate(targets) if i % 2 == 0}
    scores = component_scores(ModelStream(model, targets), spectra, ids, batch_size=4, ranks=ranks)
    expected = gate_gradients(model, targets, spectra, ids, ranks)
    for target in targets:
        want = -expected[target.name]
        torch.testing.assert_close(scores[target.name], want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))
    dense = component_scores(ModelStream(model, targets), spectra, ids, batch_size=4)
    assert not torch.allclose(dense[targets[-1].name], scores[targets[-1].name])  # the plan moved the scores
    assert all(type(model.get_submodule(t.name)).__name__ == "Linear" for t in targets)
    before = gate_gradients(model, targets, spectra, ids, {})
    torch.testing.assert_close(-before[targets[0].name], dense[targets[0].name], rtol=1e-4,
                               atol=1e-6 * float(before[targets[0].name].abs().max()))  # weights restored


@pytest.mark.parametrize("stages", [1, 3])
def test_stages_meet_the_budget_and_record_each_share(stages):
    ids = calibration_ids(8, 24, seed=2)
    model = tiny_model()
    targets, spectra = spectra_of(model, ids)
    budget = Budget({t.name: t.shape for t in targets}, 0.55, "pivga")
    context = AllocationContext(budget, targets, spectra, model, ids, seed=3, show_progress=False)
    plan = create_allocator("zerosum", {"windows": 4, "batch_size": 2, "stages": stages}).allocate(context)
    assert_budget_met(plan.ranks, plan.budget)
    shares = [stage["target"] for stage in plan.info["stages"]]
    assert len(shares) == stages and shares[-1] == budget.target and shares == sorted(shares, reverse=True)


def test_more_stages_change_the_plan():
    ids = calibration_ids(8, 24, seed=2)
    model = tiny_model()
    targets, spectra = spectra_of(model, ids)
    budget = Budget({t.name: t.shape for t in targets}, 0.5, "pivga")
    context = AllocationContext(budget, targets, spectra, model, ids, seed=3, show_progress=False)
    one, four = (create_allocator("zerosum", {"windows": 4, "stages": n}).allocate(context) for n in (1, 4))
    assert one.ranks != four.ranks
