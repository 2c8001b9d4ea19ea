"""The weight correction (``closed_loop="correct"``, ZS-SVD's between-stage pull): the pulled weight undoes
the truncation's first-order loss change exactly, the gradient is the truncated model's, and each
round's factors are the best whitened rank-k fit of the pulled weight under the dense inputs' Gram."""

from __future__ import annotations

import pytest
import torch

from conftest import calibration_ids, tiny_config, tiny_model
from rankcut import CompressionConfig, compress
from rankcut.correction import pulled_weight
from rankcut.data import select_windows
from rankcut.errors import ConfigError

WINDOWS = 4


def test_the_pulled_weight_undoes_the_first_order_change_along_the_gradient():
    generator = torch.Generator().manual_seed(0)
    weight, truncation, gradient = (torch.randn(6, 5, generator=generator, dtype=torch.float64) for _ in range(3))
    pulled, step = pulled_weight(weight, truncation, gradient)
    change = pulled - truncation
    # the step lies along g and gives back <g, W − T>, the first-order loss change truncation made
    torch.testing.assert_close((gradient * change).sum(), (gradient * (weight - truncation)).sum())
    torch.testing.assert_close(change, step["coefficient"] * gradient)
    assert step["first_order_change"] == pytest.approx(float((gradient * (weight - truncation)).sum()))
    assert step["relative_step"] == pytest.approx(float(change.norm() / (weight - truncation).norm()))
    unmoved, nothing = pulled_weight(weight, truncation, torch.zeros_like(gradient))
    assert torch.equal(unmoved, truncation) and nothing["coefficient"] == 0.0
    # a share of the step goes that share of the way, and undoes that share of the change
    half, half_step = pulled_weight(weight, truncation, gradient, 0.5)
    torch.testing.assert_close(half - truncation, 0.5 * change)
    assert half_step["first_order_change"] == pytest.approx(0.5 * step["first_order_change"])


def dense_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The ``out x in`` matrix a factorized layer (or a Linear) applies, read off its outputs."""
    eye = torch.eye(layer.in_features, dtype=torch.float64)
    with torch.no_grad():
        out = layer.double()(eye)
        if getattr(layer, "bias", None) is not None:
            out = out - layer.bias
    layer.float()
    return out.T


def run(closed_loop: str, ids: torch.Tensor, **settings):
    config = CompressionConfig(keep_ratio=0.5, allocator="uniform", closed_loop=closed_loop, **settings)
    return compress(tiny_model(), config, calibration=ids, show_progress=False)


@pytest.mark.parametrize("share", [1.0, 0.5])
def test_one_round_fits_the_weight_pulled_along_the_truncated_model_s_gradient(share):
    ids = calibration_ids(12, 32, seed=3)
    open_loop, _ = run("none", ids)
    corrected, report = run("correct", ids, correction_windows=WINDOWS, correction_step=share)
    dense = tiny_model()
    names = [name for name, rank in report.plan.ranks.items() if rank != "dense"]
    truncations = {name: dense_weight(open_loop.get_submodule(name)) for name in names}
    # the gradient of the mean next-token loss over the correction windows, at the truncated model
    truncated = tiny_model()
    for name in names:
        truncated.get_submodule(name).weight.data = truncations[name].float()
    windows = select_windows(ids, WINDOWS, seed=0)
    truncated(input_ids=windows, labels=windows).loss.backward()
    # the dense inputs' Gram of every planned module, over all the calibration windows
    grams, handles = {}, []
    for name in names:
        def hook(_module, inputs, _output, name=name):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            gram, tokens = grams.get(name, (0.0, 0))
            grams[name] = (gram + x.T @ x, tokens + x.shape[0])
        handles.append(dense.get_submodule(name).register_forward_hook(hook))
    with torch.no_grad():
        dense(input_ids=ids)
    for handle in handles:
        handle.remove()
    for name in names:
        weight = dense.get_submodule(name).weight.detach().double()
        gradient = truncated.get_submodule(name).weight.grad.double()
        step = report.diagnostics[name]["correction"]
        assert len(step) == 1
        undone = share * float((gradient * (weight - truncations[name])).sum())
        assert step[0]["first_order_change"] == pytest.approx(undone, rel=1e-3, abs=1e-9)
        pulled, _ = pulled_weight(weight, truncations[name], gradient, share)
        gram = grams[name][0] / grams[name][1]
        root = torch.linalg.cholesky(gram)
        # the best rank-k fit of the pulled weight in the Gram's norm, from the truncated SVD of W' S
        u, sigma, vt = torch.linalg.svd(pulled @ root)
        rank = report.plan.ranks[name]
        best = (u[:, :rank] * sigma[:rank]) @ vt[:rank] @ torch.linalg.inv(root)

        def error(candidate):
            return float(torch.trace((pulled - candidate) @ gram @ (pulled - candidate).T))

        got = dense_weight(corrected.get_submodule(name))
        assert error(got) == pytest.approx(error(best), rel=1e-3)
        assert error(got) < 0.99 * error(truncations[name])  # not merely the open-loop truncation again


def test_rounds_chain_and_keep_the_plan_and_the_parameter_count():
    ids = calibration_ids(12, 32, seed=3)
    _, open_report = run("none", ids)
    model, report = run("correct", ids, correction_rounds=2, correction_windows=WINDOWS)
    assert report.plan.ranks == open_report.plan.ranks
    assert report.measured["target_params"] == open_report.measured["target_params"]
    steps = [report.diagnostics[name]["correction"] for name, rank in report.plan.ranks.items() if rank != "dense"]
    assert steps and all(len(rounds) == 2 for rounds in steps)
    assert torch.isfinite(model(input_ids=ids).logits).all()


@pytest.mark.parametrize("settings, message", [
    ({"closed_loop": "correct", "correction_rounds": 0}, "correction_rounds must be an integer >= 1"),
    ({"closed_loop": "correct", "correction_windows": 2.5}, "correction_windows must be an integer >= 1"),
    ({"closed_loop": "correct", "correction_rounds": True}, "correction_rounds must be"),
    ({"closed_loop": "compensate", "correction_rounds": 2}, "need closed_loop 'correct'"),
    ({"closed_loop": "none", "correction_windows": 8}, "need closed_loop 'correct'"),
    ({"closed_loop": "correct", "correction_step": 0.0}, r"correction_step must be in \(0, 1\]"),
    ({"closed_loop": "correct", "correction_step": 1.5}, "correction_step must be in"),
    ({"closed_loop": "compensate", "correction_step": 0.25}, "need closed_loop 'correct'"),
    ({"closed_loop": "correct", "whitening": "none"}, "whitening")])
def test_bad_correction_settings_are_clear_errors(settings, message):
    with pytest.raises(ConfigError, match=message):
        CompressionConfig(**settings)


def test_the_estimate_counts_the_correction_s_sweep_pass_and_disk():
    from rankcut.estimate import estimate_compression

    plain = estimate_compression(tiny_config("llama"), CompressionConfig(closed_loop="none"))
    one = estimate_compression(tiny_config("llama"), CompressionConfig())  # the default: one round
    two = estimate_compression(tiny_config("llama"), CompressionConfig(closed_loop="correct", correction_rounds=2))
    assert {"correct: gradients", "correct: decompose"} <= set(one.stages) and "correct: gradients" not in plain.stages
    assert one.stages["correct: decompose"] >= one.stages["calibrate"]
    assert plain.disk_bytes < one.disk_bytes < two.disk_bytes


def test_the_default_closed_loop_is_the_half_step_correction_and_older_configs_keep_their_meaning():
    config = CompressionConfig()
    assert (config.closed_loop, config.correction_step) == ("correct", 0.5)
    assert CompressionConfig(whitening="none").closed_loop == "none"  # nothing to decompose the pull under
    # a version 4 config with the correction knew only the whole step
    old = CompressionConfig.from_dict({"closed_loop": "correct", "version": 4})
    assert (old.closed_loop, old.correction_step) == ("correct", 1.0)
    assert CompressionConfig.from_dict({"closed_loop": "none", "version": 4}).correction_step == 0.5
    # a version 5 config without a closed loop was made open loop, the default then
    assert CompressionConfig.from_dict({"keep_ratio": 0.6, "version": 5}).closed_loop == "none"
    assert CompressionConfig.from_dict({"keep_ratio": 0.6}).closed_loop == "correct"
