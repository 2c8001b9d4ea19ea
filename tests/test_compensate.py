"""The compensating closed loop: the fit of W X by W_k X̃ (dense inputs X, compressed-path inputs X̃)
is the truncated SVD of the whitened target W (X X̃ᵀ) S⁻ᵀ, its residual has a closed form, it is the
open-loop fit when X̃ = X, and on a model it brings the compressed outputs closer to the dense ones."""

from __future__ import annotations

import pytest
import torch

from conftest import calibration_ids, tiny_model
from rankcut import CompressionConfig, compress
from rankcut.calibration import InputStatistics
from rankcut.decomposition import whitened_svd
from rankcut.errors import ConfigError
from rankcut.whitening import create_whitener


def inputs(n: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Correlated dense inputs X (n x tokens) and a perturbed copy X̃, float64."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(n, n, generator=generator, dtype=torch.float64)
    x = mixing @ torch.randn(n, tokens, generator=generator, dtype=torch.float64)
    x_tilde = x + 0.3 * mixing @ torch.randn(n, tokens, generator=generator, dtype=torch.float64)
    return x, x_tilde


def fit(weight, x, x_tilde, *, compensate: bool = True):
    tokens = x.shape[1]
    gram = x_tilde @ x_tilde.T / tokens
    statistics = InputStatistics(["m"], gram, x_tilde.abs().mean(dim=1), tokens)
    whitening = create_whitener("cholesky", {"damping": 0.0}).whiten(statistics)
    cross = x @ x_tilde.T / tokens if compensate else None
    return whitened_svd(weight, whitening, "m", storage_dtype=torch.float64, cross=cross)


@pytest.mark.parametrize("shape", [(24, 16), (12, 20)])
def test_residual_identity_of_the_compensating_fit(shape):
    """‖W X − W_k X̃‖²/T = ‖W X‖²/T − ‖T‖² + Σ_{i>k} σ_i² for every k."""
    m, n = shape
    x, x_tilde = inputs(n, 200, seed=m)
    weight = torch.randn(m, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    spectrum = fit(weight, x, x_tilde)
    tokens = x.shape[1]
    output = (weight @ x).square().sum() / tokens
    tail = spectrum.tail_energy()
    for rank in range(1, spectrum.full_rank + 1):
        a, b = spectrum.factors(rank, dtype=torch.float64)
        residual = (weight @ x - a @ b @ x_tilde).square().sum() / tokens
        expected = output - tail[0] + tail[rank]
        assert float(residual) == pytest.approx(float(expected), rel=1e-9, abs=1e-9 * float(output))


def test_it_beats_the_open_loop_fit_to_the_same_inputs_and_is_it_when_they_match():
    x, x_tilde = inputs(16, 300, seed=2)
    weight = torch.randn(20, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    compensating, open_loop = fit(weight, x, x_tilde), fit(weight, x, x_tilde, compensate=False)
    for rank in (2, 5, 9):
        errors = []
        for spectrum in (compensating, open_loop):
            a, b = spectrum.factors(rank, dtype=torch.float64)
            errors.append(float((weight @ x - a @ b @ x_tilde).square().sum()))
        assert errors[0] < errors[1]
    same, reference = fit(weight, x, x), fit(weight, x, x, compensate=False)  # X̃ = X: the open-loop fit
    torch.testing.assert_close(same.sigma, reference.sigma, rtol=1e-10, atol=1e-12)
    for rank in (3, 8):
        product = [torch.matmul(*s.factors(rank, dtype=torch.float64)) for s in (same, reference)]
        torch.testing.assert_close(product[0], product[1], rtol=1e-8, atol=1e-10)


def paired_fit(weight, x, x_tilde, compensation: float, anchor: float = 0.0):
    """The fit of :meth:`PairedStatistics.fit_grams` from explicit inputs, undamped, float64."""
    from rankcut.calibration import PairedStatistics

    tokens = x.shape[1]
    statistics = PairedStatistics(["m"], x_tilde @ x_tilde.T / tokens, x_tilde.abs().mean(dim=1), tokens,
                                  x @ x_tilde.T / tokens, x @ x.T / tokens)
    gram, cross = statistics.fit_grams(compensation, anchor)
    whitening = create_whitener("cholesky", {"damping": 0.0}).whiten(
        InputStatistics(["m"], gram, statistics.abs_mean, tokens))
    return whitened_svd(weight, whitening, "m", storage_dtype=torch.float64, cross=cross)


@pytest.mark.parametrize("compensation, anchor", [(0.0, 0.0), (0.3, 0.0), (0.7, 0.0), (1.0, 0.5), (0.5, 2.0)])
def test_a_blended_anchored_fit_is_the_optimum_of_its_objective(compensation, anchor):
    """With ``α``, ``β`` the fit minimises ``α‖W X − W_k X̃‖² + (1 − α)‖W X̃ − W_k X̃‖² + β‖W X − W_k X‖²``:
    at every rank it is no worse on that objective than the fits with other settings."""
    x, x_tilde = inputs(14, 250, seed=4)
    weight = torch.randn(18, 14, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def objective(spectrum, rank: int) -> float:
        w_k = torch.matmul(*spectrum.factors(rank, dtype=torch.float64))
        return float(compensation * (weight @ x - w_k @ x_tilde).square().sum()
                     + (1 - compensation) * (weight @ x_tilde - w_k @ x_tilde).square().sum()
                     + anchor * (weight @ x - w_k @ x).square().sum())

    mine = paired_fit(weight, x, x_tilde, compensation, anchor)
    others = [paired_fit(weight, x, x_tilde, *setting) for setting in ((1.0, 0.0), (0.0, 0.0), (1.0, 3.0))
              if setting != (compensation, anchor)]
    for rank in (2, 6, 11):
        assert objective(mine, rank) <= min(objective(other, rank) for other in others) * (1 + 1e-12)
    own = paired_fit(weight, x, x_tilde, 0.0)
    reference = fit(weight, x, x_tilde, compensate=False)  # α = 0, β = 0: the plain whitened fit on X̃
    torch.testing.assert_close(own.sigma, reference.sigma, rtol=1e-10, atol=1e-12)


def test_the_anchor_keeps_the_weight_where_the_compressed_inputs_lost_a_direction():
    """X̃ keeps 1% of X's first channel (plus noise): the compensating regression scales that column of
    W up to recover it from its remnant, the anchored fit leaves it near W's."""
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(8, 400, generator=generator, dtype=torch.float64)
    x_tilde = x.clone()
    x_tilde[0] = 0.01 * x[0] + 0.001 * torch.randn(400, generator=generator, dtype=torch.float64)
    weight = torch.randn(12, 8, generator=generator, dtype=torch.float64)

    def lost_column_growth(anchor: float) -> float:
        w_k = torch.matmul(*paired_fit(weight, x, x_tilde, 1.0, anchor).factors(8, dtype=torch.float64))
        return float(w_k[:, 0].norm() / weight[:, 0].norm())

    assert lost_column_growth(0.0) > 20
    assert 0.5 < lost_column_growth(1.0) < 1.5


def final_hidden(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states[-1]


def test_compensate_brings_the_outputs_closest_to_the_dense_model():
    ids = calibration_ids(16, 24, seed=7)
    dense = final_hidden(tiny_model(), ids)
    errors = {}
    for mode in ("none", "sequential", "compensate"):
        config = CompressionConfig(keep_ratio=0.5, allocator="uniform", closed_loop=mode)
        model, report = compress(tiny_model(), config, calibration=ids, show_progress=False)
        assert report.measured["target_params"] == report.plan.total_cost <= report.measured["budget"]
        errors[mode] = float((final_hidden(model, ids) - dense).square().mean())
    assert errors["compensate"] < errors["none"] and errors["compensate"] < errors["sequential"]


@pytest.mark.parametrize("anchor", [0.0, 1.0])
def test_the_first_group_sees_the_dense_inputs_so_it_gets_the_open_loop_factors(anchor):
    ids = calibration_ids(8, 24, seed=1)
    factors = {}
    for mode in ("none", "compensate"):
        config = CompressionConfig(keep_ratio=0.5, allocator="uniform", closed_loop=mode, factor_format="plain",
                                   anchor=anchor if mode == "compensate" else 0.0)
        model, report = compress(tiny_model(), config, calibration=ids, show_progress=False)
        layer = model.get_submodule("model.layers.0.self_attn.q_proj")
        factors[mode] = layer.weight_a.detach().double() @ layer.weight_b.detach().double()
        assert report.diagnostics["model.layers.1.mlp.down_proj"].get("anchor", 0.0) == config.anchor
    torch.testing.assert_close(factors["compensate"], factors["none"], rtol=1e-4, atol=1e-5)


def test_compensate_is_anchored_by_default_and_older_configs_keep_what_they_meant():
    assert CompressionConfig(closed_loop="compensate").anchor == 1.0
    assert CompressionConfig(closed_loop="compensate", anchor=0.0).anchor == 0.0
    assert CompressionConfig().anchor == 0.0 and CompressionConfig(closed_loop="sequential").anchor == 0.0
    saved = CompressionConfig(closed_loop="compensate").to_dict()
    assert CompressionConfig.from_dict(saved).anchor == 1.0
    before_anchors = {key: value for key, value in saved.items() if key != "anchor"} | {"version": 2}
    assert CompressionConfig.from_dict(before_anchors).anchor == 0.0  # version 2 compensated unanchored


@pytest.mark.parametrize("settings, message", [({"closed_loop": "compensating"}, "closed_loop must be one of"),
                                               ({"closed_loop": "compensate", "whitening": "none"}, "whitening"),
                                               ({"closed_loop": "compensate", "compensation": 1.5}, "in \\[0, 1\\]"),
                                               ({"closed_loop": "compensate", "compensation": True}, "in \\[0, 1\\]"),
                                               ({"closed_loop": "sequential", "compensation": 0.5}, "needs closed_loop"),
                                               ({"closed_loop": "compensate", "anchor": -1.0}, "anchor must be"),
                                               ({"closed_loop": "compensate", "anchor": float("inf")}, "anchor must be"),
                                               ({"closed_loop": "compensate", "anchor": True}, "anchor must be"),
                                               ({"closed_loop": "none", "anchor": 1.0}, "needs closed_loop")])
def test_bad_closed_loop_settings_are_clear_errors(settings, message):
    with pytest.raises(ConfigError, match=message):
        CompressionConfig(**settings)


def test_version_1_configs_with_the_sequential_flag_still_read():
    assert CompressionConfig.from_dict({"sequential": True, "version": 1}).closed_loop == "sequential"
    assert CompressionConfig.from_dict({"sequential": False, "version": 1}).closed_loop == "none"


def test_the_estimate_counts_the_closed_loops_streams():
    from conftest import tiny_config
    from rankcut.estimate import estimate_compression

    factorize = {mode: estimate_compression(tiny_config("llama"), CompressionConfig(closed_loop=mode)).stages["factorize"]
                 for mode in ("none", "sequential", "compensate")}
    assert factorize["none"] < factorize["sequential"] < factorize["compensate"]
    refined = estimate_compression(tiny_config("llama"), CompressionConfig(closed_loop="compensate", refine_steps=10))
    assert refined.stages["factorize"] > factorize["compensate"]
    open_refined = estimate_compression(tiny_config("llama"), CompressionConfig(closed_loop="none", refine_steps=10))
    assert open_refined.stages["factorize"] > factorize["compensate"]  # both streams, and the refinement's terms


REFINED_AFTER = ["compensate", "none", "correct"]  # the fits refinement follows


def refined_run(steps, lr=1e-3, work=None, ids=None, closed_loop="compensate"):
    config = CompressionConfig(keep_ratio=0.5, allocator="uniform", closed_loop=closed_loop, refine_steps=steps,
                               refine_lr=lr)
    return compress(tiny_model(), config, calibration=calibration_ids(16, 24, seed=7) if ids is None else ids,
                    show_progress=False, work_dir=work)


@pytest.mark.parametrize("closed_loop", REFINED_AFTER)
def test_refinement_lowers_the_block_errors_and_keeps_the_parameter_count(closed_loop):
    ids = calibration_ids(16, 24, seed=7)
    dense = final_hidden(tiny_model(), ids)
    plain, plain_report = refined_run(0, closed_loop=closed_loop)
    model, report = refined_run(30, closed_loop=closed_loop)
    assert report.measured["target_params"] == plain_report.measured["target_params"] == report.plan.total_cost
    refinements = [d["refinement"] for d in report.diagnostics.values()]
    assert len(refinements) == len(report.plan.ranks)  # every module was refined, with its block
    assert all(r["error_after"] <= r["error_before"] for r in refinements)
    assert any(r["kept"] and r["error_after"] < 0.9 * r["error_before"] for r in refinements)
    assert (final_hidden(model, ids) - dense).square().mean() < (final_hidden(plain, ids) - dense).square().mean()


def test_refinement_starts_from_the_fit_it_follows():
    """Refinement after the open loop starts from the open-loop factors: the first block's error before
    refinement is that of the unrefined run's first block on the dense outputs."""
    ids = calibration_ids(16, 24, seed=7)
    plain, _ = refined_run(0, closed_loop="none")
    _, report = refined_run(30, closed_loop="none")
    from rankcut.calibration import BlockStream
    from rankcut.refine import block_error

    stream = BlockStream(tiny_model(), [], ids, 8)
    hidden, kwargs = stream.capture()
    dense_outputs = stream.forward_block(tiny_model().model.layers[0], hidden, kwargs[0])
    first = report.diagnostics["model.layers.0.self_attn.q_proj"]["refinement"]
    assert first["error_before"] == pytest.approx(block_error(plain.model.layers[0], hidden, dense_outputs, kwargs[0]),
                                                  rel=1e-9)


def test_refinement_that_would_raise_the_error_is_undone():
    from rankcut.calibration import BlockStream
    from rankcut.refine import block_error, factor_parameters, refine_block

    model, _ = refined_run(0)
    ids = calibration_ids(16, 24, seed=7)
    stream = BlockStream(tiny_model(), [], ids, 8)  # block 0's inputs: the embeddings are not compressed
    hidden, kwargs = stream.capture()
    block = model.model.layers[0]
    modules = [m for m in block.modules() if type(m).__name__ == "PivGaLinear"]
    targets = [h + 0.1 for h in stream.forward_block(block, hidden, kwargs[0])]
    before = [p.detach().clone() for p in factor_parameters(modules)]
    report = refine_block(block, modules, hidden, targets, kwargs[0], steps=5, lr=10.0, seed=0)  # diverges
    assert not report["kept"] and report["error_after"] == report["error_before"]
    assert all(torch.equal(p, q) for p, q in zip(factor_parameters(modules), before))
    assert block_error(block, hidden, targets, kwargs[0]) == report["error_before"]


@pytest.mark.parametrize("closed_loop", REFINED_AFTER)
def test_a_run_killed_mid_refinement_resumes_to_identical_logits(tmp_path, monkeypatch, closed_loop):
    import importlib

    compress_module = importlib.import_module("rankcut.compress")
    ids = calibration_ids(16, 24, seed=7)
    reference, expected = refined_run(10, closed_loop=closed_loop)
    calls = []
    original = compress_module.refine_block

    def crash_in_block_1(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(compress_module, "refine_block", crash_in_block_1)
    with pytest.raises(KeyboardInterrupt):
        refined_run(10, work=tmp_path / "work", closed_loop=closed_loop)
    monkeypatch.setattr(compress_module, "refine_block", original)
    model, report = refined_run(10, work=tmp_path / "work", closed_loop=closed_loop)
    assert report.plan.ranks == expected.plan.ranks
    assert torch.equal(final_hidden(model, ids), final_hidden(reference, ids))


@pytest.mark.parametrize("settings, message", [
    ({"closed_loop": "compensate", "refine_steps": -1}, "refine_steps must be"),
    ({"closed_loop": "compensate", "refine_steps": 5, "refine_lr": 0}, "refine_lr must be"),
    ({"closed_loop": "sequential", "refine_steps": 5}, "use closed_loop 'none', 'correct' or 'compensate'"),
    ({"closed_loop": "none", "whitening": "none", "refine_steps": 5}, "needs a whitening")])
def test_bad_refinement_settings_are_clear_errors(settings, message):
    with pytest.raises(ConfigError, match=message):
        CompressionConfig(**settings)
