import torch

from conftest import calibration_ids, tiny_model
from rankcut import CompressionConfig, compress
from rankcut.allocation import AllocationContext, create_allocator
from rankcut.allocation.spectral import language_model_loss, spectral_view
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
    truncated, _ = compress(tiny_model(), CompressionConfig(keep_ratio=0.5, allocator="uniform", factor_format="plain"),
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
