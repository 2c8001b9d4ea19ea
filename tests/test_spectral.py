import pytest
import torch

from conftest import calibration_ids, language_model_loss, tiny_model
from rankcut import CompressionConfig, compress
from rankcut.allocation import AllocationContext, create_allocator
from rankcut.allocation.spectral import TailAverage, TrainingSchedule, spectral_view
from rankcut.calibration import BlockStream
from rankcut.compress import _Decomposer
from rankcut.plan import Budget
from rankcut.targets import find_targets


def spectra_of(model, ids):
    targets = find_targets(model)
    decomposer = _Decomposer(model, "cholesky", {})
    spectra = {}
    BlockStream(model, targets, ids, 4).run(lambda run: spectra.update(decomposer.spectra(run)))
    return targets, spectra


def test_hard_prefix_gate_equals_the_truncated_model():
    ids = calibration_ids(8, 24, seed=0)
    model = tiny_model()
    targets, spectra = spectra_of(model, ids)
    budget = Budget({t.name: t.shape for t in targets}, 0.5)
    plan = create_allocator("uniform").allocate(AllocationContext(budget, targets, spectra))
    with torch.no_grad():
        with spectral_view(model, targets, spectra) as layers:
            for name, layer in layers.items():
                layer.gate = torch.ones(plan.ranks[name])
            gated = model(ids[:2]).logits
            gated_loss = language_model_loss(model, ids[:2])
    truncated, _ = compress(tiny_model(), CompressionConfig(keep_ratio=0.5, allocator="uniform", factor_format="plain",
                                                               closed_loop="none"),
                            calibration=ids, show_progress=False)
    with torch.no_grad():
        assert torch.allclose(gated, truncated(ids[:2]).logits, atol=1e-4)
    assert all(p.requires_grad for p in model.parameters())  # restored
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear"
    assert torch.isfinite(gated_loss)


def test_gradients_reach_only_the_gates():
    ids = calibration_ids(8, 24, seed=1)
    model = tiny_model()
    targets, spectra = spectra_of(model, ids)
    with spectral_view(model, targets, spectra) as layers:
        gates = {name: torch.ones(layer.full_rank, requires_grad=True) for name, layer in layers.items()}
        for name, layer in layers.items():
            layer.gate = gates[name]
        language_model_loss(model, ids[:4]).backward()
        assert all(g.grad is not None and torch.isfinite(g.grad).all() and g.grad.abs().sum() > 0 for g in gates.values())
        assert all(p.grad is None for p in model.parameters())


def test_training_steps_cover_the_epochs_unless_given():
    assert TrainingSchedule().steps_for(256) == 128
    assert TrainingSchedule(epochs=2.5, batch_size=4).steps_for(10) == 7  # ceil(25 / 4)
    assert TrainingSchedule(batch_size=8).steps_for(3) == 1  # a batch holds every window
    assert TrainingSchedule(epochs=5.0, steps=12).steps_for(256) == 12


def test_tail_average_is_the_mean_of_the_last_steps():
    average = TailAverage(steps=10, fraction=0.3)
    for step in range(10):
        average.update(step, torch.tensor([float(step), -float(step)]))
    torch.testing.assert_close(average.value(), torch.tensor([8.0, -8.0], dtype=torch.float64))  # steps 7, 8, 9
    last = TailAverage(steps=4, fraction=0.0)
    for step in range(4):
        last.update(step, torch.tensor([float(step)]))
    assert float(last.value()) == 3.0


@pytest.mark.parametrize("name", ["ara", "fermigrad", "dobi"])
def test_learned_allocators_train_one_epoch_of_whole_windows_by_default(name):
    ids = calibration_ids(6, 20, seed=1)
    model = tiny_model()
    targets, spectra = spectra_of(model, ids)
    context = AllocationContext(Budget({t.name: t.shape for t in targets}, 0.6), targets, spectra, model, ids,
                                show_progress=False)
    plan = create_allocator(name).allocate(context)
    steps = plan.info["settings"]["steps"] if name == "ara" else plan.info["training"]["steps"]
    assert steps == 3  # 6 windows, 2 per step
    assert plan.info["settings"]["tokens_per_step"] == 2 * 20
