"""The gradient sweep (rankcut.sweep): the loss and every target's weight gradient, computed one block
resident at a time through chunked logits, equal those of one backward pass through the whole model."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from conftest import ARCHS, calibration_ids, tiny_model
from rankcut.sweep import ModelStream, weight_gradients
from rankcut.checkpoint import ResidentWeights
from rankcut.targets import find_targets


def whole_model_gradients(model, targets, ids):
    weights = [model.get_submodule(t.name).weight for t in targets]
    logits = model(input_ids=ids, use_cache=False).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    return float(loss.detach()), dict(zip([t.name for t in targets], torch.autograd.grad(loss, weights)))


def swept(model, targets, ids, batch_size, **kwargs):
    gradients, order = {}, []

    def keep(block, block_gradients):
        order.append(block)
        gradients.update({name: g.clone() for name, g in block_gradients.items()})

    loss = weight_gradients(model, ResidentWeights(model), targets, ids, batch_size, keep, **kwargs)
    return loss, gradients, order


@pytest.mark.parametrize("arch", ARCHS)
def test_the_sweep_gives_the_whole_models_loss_and_gradients(arch, tmp_path):
    ids = calibration_ids(6, 20, seed=3)
    model = tiny_model(arch).double()
    targets = find_targets(model)
    expected_loss, expected = whole_model_gradients(model, targets, ids)
    loss, got, order = swept(model, targets, ids, batch_size=4, store_dir=tmp_path / "store")  # batches of 4 and 2
    assert order == sorted({t.block for t in targets}, reverse=True)  # last block first, each once
    assert loss == pytest.approx(expected_loss, rel=1e-12)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-9, atol=1e-12)
    assert not list((tmp_path / "store").iterdir())  # every saved input was read back and deleted
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())


def test_logit_chunks_do_not_change_the_result(monkeypatch):
    """Chunks of 7 predicted positions (windows of 19 split mid-window) against one chunk per batch."""
    import rankcut.sweep as sweep

    ids = calibration_ids(4, 20, seed=5)
    model = tiny_model("gemma3").double()  # soft-capped logits and a scaled embedding: the model's own head runs
    targets = find_targets(model)
    loss, whole, _ = swept(model, targets, ids, batch_size=2)
    monkeypatch.setattr(sweep, "LOGITS_BYTES", 7 * 4 * model.config.vocab_size)
    chunked_loss, chunked, _ = swept(model, targets, ids, batch_size=2)
    assert chunked_loss == pytest.approx(loss, rel=1e-12)
    for name in whole:
        torch.testing.assert_close(chunked[name], whole[name], rtol=1e-9, atol=1e-12)


def test_excluded_blocks_still_pass_the_gradient_down():
    """Targets only in block 0: blocks above hand the gradient down without calling back."""
    ids = calibration_ids(4, 16, seed=1)
    model = tiny_model().double()
    first = [t for t in find_targets(model) if t.block == 0]
    _, expected = whole_model_gradients(model, first, ids)
    seen = []
    stream = ModelStream(model, first)
    stream.weight_gradients(ids, 4, lambda block, grads: seen.append((block, grads)))
    assert [block for block, _ in seen] == [0]
    for name, gradient in seen[0][1].items():
        torch.testing.assert_close(gradient, expected[name], rtol=1e-9, atol=1e-12)


def whole_model_gated(model, targets, spectra, ids, gates, kl: bool):
    """The gated model's loss and gate gradients from one backward pass through the whole model (the
    in-memory reference): CE, or KL to the dense model's next-token distributions."""
    from rankcut.allocation.spectral import spectral_view

    with torch.no_grad():
        dense = model(input_ids=ids, use_cache=False).logits[:, :-1].flatten(0, 1).log_softmax(-1)
    with spectral_view(model, targets, spectra) as layers:
        leaves = {name: gate.clone().requires_grad_() for name, gate in gates.items()}
        for name, layer in layers.items():
            layer.gate = leaves.get(name)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].flatten(0, 1)
        if kl:
            loss = F.kl_div(logits.log_softmax(-1), dense, log_target=True, reduction="batchmean")
        else:
            loss = F.cross_entropy(logits, ids[:, 1:].flatten())
        grads = torch.autograd.grad(loss, list(leaves.values()))
    return float(loss.detach()), dict(zip(leaves, grads))


@pytest.mark.parametrize("kl", [False, True], ids=["ce", "kl"])
@pytest.mark.parametrize("arch", ARCHS)
def test_the_gated_objective_gives_the_whole_models_loss_and_gate_gradients(arch, kl):
    """What the training allocators see (rankcut.allocation.spectral.gated_objective): soft gates of
    several widths on some targets, the others dense; one block resident at a time."""
    from rankcut.allocation.spectral import gated_objective
    from test_spectral import spectra_of

    ids = calibration_ids(4, 20, seed=7)
    model = tiny_model(arch).double()
    targets, spectra = spectra_of(model, ids)
    generator = torch.Generator().manual_seed(0)
    gates = {t.name: torch.rand(max(1, min(t.shape) - 3 * i), generator=generator, dtype=torch.float64)
             for i, t in enumerate(targets) if i % 3 != 1}  # every third target dense
    expected_loss, expected = whole_model_gated(model, targets, spectra, ids, gates, kl)
    objective = gated_objective(ModelStream(model, targets), spectra, "kl" if kl else "ce")
    loss, got = objective(ids, gates)
    assert loss == pytest.approx(expected_loss, rel=1e-10)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-8, atol=1e-12)
    assert all(type(model.get_submodule(t.name)).__name__ == "Linear" for t in targets)  # restored
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())
