"""PivGa gauge fixing: exactness, stored size, maxvol bound, degenerate factors, serialization."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from rankcut.gauge import PivGaFactors, choose_variant, maxvol_refine, pivga_factors
from rankcut.layers.lowrank import LowRankLinear
from rankcut.layers.pivga import PivGaLinear
from rankcut.plan import factor_cost

VARIANTS = ["column", "row"]
# (out, in, rank): wide, tall, square, rank = min(out, in) (no coefficients in one variant)
SHAPES = [(12, 20, 5), (20, 12, 5), (16, 16, 8), (9, 14, 9), (14, 9, 9)]


def random_factors(m: int, n: int, k: int, seed: int = 0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k, generator=generator, dtype=torch.float64)
    b = torch.randn(k, n, generator=generator, dtype=torch.float64)
    return a.to(dtype), b.to(dtype)


def svd_factors(m: int, n: int, k: int, seed: int = 0, dtype=torch.float32):
    """Truncated SVD of a random matrix whose singular values decay like a trained weight's."""
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=generator, dtype=torch.float64))
    spectrum = torch.arange(1, min(m, n) + 1, dtype=torch.float64) ** -1.5
    weight = (u * spectrum) @ v.T
    left, singular, right = torch.linalg.svd(weight, full_matrices=False)
    return (left[:, :k] * singular[:k]).to(dtype), right[:k].to(dtype)


def relative_error(factors: PivGaFactors, a: torch.Tensor, b: torch.Tensor) -> float:
    """Error of the stored (possibly low-precision) numbers, reconstructed in float64."""
    exact = a.double() @ b.double()
    stored = dataclasses.replace(factors, pivot=factors.pivot.double(), coeff=factors.coeff.double())
    return float((stored.dense() - exact).norm() / exact.norm())


def float_parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.is_floating_point())


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("make_factors", [random_factors, svd_factors])
@pytest.mark.parametrize("shape", SHAPES)
def test_gauge_fixing_is_lossless_in_float32(shape, make_factors, variant):
    a, b = make_factors(*shape)
    factors = pivga_factors(a, b, variant=variant)
    assert factors.variant == variant and factors.pivot.dtype == torch.float32
    assert relative_error(factors, a, b) < 1e-6


@settings(max_examples=40, deadline=None, derandomize=True)
@given(m=st.integers(1, 24), n=st.integers(1, 24), rank_fraction=st.floats(0, 1), seed=st.integers(0, 2**16),
       variant=st.sampled_from(VARIANTS))
def test_gauge_fixing_is_exact_in_float64_for_any_shape(m, n, rank_fraction, seed, variant):
    k = 1 + round(rank_fraction * (min(m, n) - 1))
    a, b = random_factors(m, n, k, seed, dtype=torch.float64)
    factors = pivga_factors(a, b, variant=variant)
    assert factors.shape == (m, n) and factors.rank == k
    assert factors.num_parameters == k * (m + n) - k * k
    assert sorted(factors.perm.tolist()) == list(range(n if variant == "column" else m))
    assert relative_error(factors, a, b) < 1e-12


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_layer_stores_exactly_the_pivga_parameter_count(shape, variant):
    m, n, k = shape
    expected = k * (m + n) - k * k
    assert PivGaLinear.parameter_cost(m, n, k) == factor_cost(m, n, k, "pivga") == expected
    assert float_parameter_count(PivGaLinear(n, m, k, variant=variant)) == expected
    assert float_parameter_count(PivGaLinear(n, m, k, bias=True, variant=variant)) == expected + m
    layer = PivGaLinear.from_factors(*random_factors(m, n, k), variant=variant)
    assert float_parameter_count(layer) == expected
    assert float_parameter_count(LowRankLinear.from_factors(*random_factors(m, n, k))) == expected + k * k


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_layer_matches_plain_low_rank_layer(shape, with_bias, variant):
    m, n, k = shape
    a, b = svd_factors(m, n, k, seed=1)
    bias = torch.randn(m, generator=torch.Generator().manual_seed(2)) if with_bias else None
    reference, layer = LowRankLinear.from_factors(a, b, bias), PivGaLinear.from_factors(a, b, bias, variant=variant)
    x = torch.randn(3, 5, n, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(x)
        for inputs in (x, x[0, 0], x.reshape(15, n)):  # batched 3-D, a single vector, 2-D
            torch.testing.assert_close(layer(inputs), reference(inputs), rtol=1e-5, atol=1e-5)
        assert layer(x).shape == expected.shape
        torch.testing.assert_close(layer.dense_weight(), reference.dense_weight(), rtol=1e-5, atol=1e-5)


def test_auto_variant_follows_the_documented_rule():
    for m, n, k in SHAPES:
        layer = PivGaLinear.from_factors(*random_factors(m, n, k))
        assert layer.variant == choose_variant(m, n) == ("row" if m <= n else "column")
        assert layer.layer_options() == {"variant": layer.variant}


@pytest.mark.parametrize("variant", VARIANTS)
def test_maxvol_bounds_the_coefficients(variant):
    # Seeds and shape chosen so that pivoted QR alone leaves some |T| > 1: the test can fail.
    m, n, k = 40, 60, 12
    found_unbounded = False
    for seed in range(10):
        a, b = random_factors(m, n, k, seed, dtype=torch.float64)
        qr_only = pivga_factors(a, b, variant=variant, maxvol=False)
        refined = pivga_factors(a, b, variant=variant)
        found_unbounded |= bool(qr_only.coeff.abs().max() > 1 + 1e-6)
        assert refined.coeff.abs().max() <= 1 + 1e-6
        assert relative_error(refined, a, b) < 1e-12
    assert found_unbounded


def test_maxvol_refine_keeps_a_valid_interpolation():
    generator = torch.Generator().manual_seed(0)
    b = torch.randn(6, 30, generator=generator, dtype=torch.float64)
    perm = torch.arange(30)  # deliberately poor pivots: the first six columns
    coeff = torch.linalg.solve(b[:, :6], b[:, 6:])
    assert coeff.abs().max() > 1
    refined, new_perm, swaps = maxvol_refine(coeff, perm)
    assert swaps > 0 and refined.abs().max() <= 1 + 1e-6
    torch.testing.assert_close(b[:, new_perm[:6]] @ refined, b[:, new_perm[6:]], rtol=0, atol=1e-12)
    _, _, capped = maxvol_refine(coeff, perm, max_swaps=1)
    assert capped == 1


@pytest.mark.parametrize("variant", VARIANTS)
def test_rank_deficient_factors_stay_exact_with_zero_coefficient_rows(variant):
    m, n, k, true_rank = 18, 24, 6, 3
    generator = torch.Generator().manual_seed(4)
    a, b = random_factors(m, n, k, seed=5, dtype=torch.float64)
    low = torch.randn(k, true_rank, generator=generator, dtype=torch.float64)
    if variant == "column":  # B (k x n) of rank 3
        b = low @ torch.randn(true_rank, n, generator=generator, dtype=torch.float64)
    else:  # A (m x k) of rank 3
        a = torch.randn(m, true_rank, generator=generator, dtype=torch.float64) @ low.T
    factors = pivga_factors(a, b, variant=variant)
    assert factors.effective_rank == true_rank and factors.rank == k
    coeff_rows = factors.coeff if variant == "column" else factors.coeff.T
    assert torch.all(coeff_rows[true_rank:] == 0)
    assert torch.isfinite(factors.coeff).all() and factors.coeff.abs().max() <= 1 + 1e-6
    assert relative_error(factors, a, b) < 1e-12
    layer = PivGaLinear.from_factors(a.float(), b.float(), variant=variant)
    x = torch.randn(4, n, generator=generator)
    torch.testing.assert_close(layer(x), LowRankLinear.from_factors(a.float(), b.float())(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_factor_gives_zero_layer_without_nan(variant):
    a, b = random_factors(10, 12, 4)
    a, b = (a, torch.zeros_like(b)) if variant == "column" else (torch.zeros_like(a), b)
    factors = pivga_factors(a, b, variant=variant)
    assert factors.effective_rank == 0
    assert torch.all(factors.dense() == 0) and torch.all(factors.coeff == 0)
    layer = PivGaLinear.from_factors(a, b, variant=variant)
    assert torch.all(layer(torch.randn(2, 12)) == 0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_ill_conditioned_factor_stays_accurate(variant):
    m, n, k = 30, 40, 10
    generator = torch.Generator().manual_seed(6)
    left, _ = torch.linalg.qr(torch.randn(m, k, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=torch.float64))
    decay = torch.logspace(0, -12, k, dtype=torch.float64)  # condition number 1e12, still full rank
    a, b = (left, decay[:, None] * right.T) if variant == "column" else (left * decay, right.T)
    factors = pivga_factors(a, b, variant=variant)
    assert factors.effective_rank == k
    assert torch.isfinite(factors.pivot).all() and factors.coeff.abs().max() <= 1 + 1e-6
    assert relative_error(factors, a, b) < 1e-12
    assert relative_error(pivga_factors(a.float(), b.float(), variant=variant), a.float(), b.float()) < 1e-6


def test_invalid_factors_are_rejected():
    a, b = random_factors(8, 10, 3)
    with pytest.raises(ValueError, match="NaN"):
        pivga_factors(a, b.index_put((torch.tensor([0]), torch.tensor([0])), torch.tensor(float("nan"))))
    with pytest.raises(ValueError, match="shapes"):
        pivga_factors(a, b[:2])
    with pytest.raises(ValueError, match="rank"):
        pivga_factors(torch.randn(8, 9), torch.randn(9, 10))
    with pytest.raises(ValueError, match="variant"):
        pivga_factors(a, b, variant="diagonal")
    with pytest.raises(ValueError, match="variant"):
        PivGaLinear(10, 8, 3, variant="auto")


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_round_trip_into_a_fresh_skeleton(tmp_path, variant):
    m, n, k = 14, 22, 6
    a, b = svd_factors(m, n, k, seed=7)
    layer = PivGaLinear.from_factors(a, b, torch.randn(m), variant=variant)
    x = torch.randn(2, 3, n)
    expected = layer(x)

    skeleton = PivGaLinear(n, m, k, bias=True, variant=variant)
    skeleton.load_state_dict(layer.state_dict())
    assert torch.equal(skeleton(x), expected)

    path = tmp_path / "layer.safetensors"
    save_file(layer.state_dict(), str(path))
    loaded = load_file(str(path))
    assert loaded[f"{'input' if variant == 'column' else 'output'}_perm"].dtype == torch.int32
    on_meta = PivGaLinear(n, m, k, bias=True, variant=variant, device="meta")
    on_meta.load_state_dict(loaded, assign=True)
    assert torch.equal(on_meta(x), expected)

    other = "row" if variant == "column" else "column"
    with pytest.raises(RuntimeError, match="perm"):  # never loads silently into the other variant
        PivGaLinear(n, m, k, bias=True, variant=other).load_state_dict(layer.state_dict())


@pytest.mark.parametrize("variant", VARIANTS)
def test_bfloat16_build_and_cast_keep_dtype_device_and_indices(variant):
    m, n, k = 16, 24, 6
    a, b = svd_factors(m, n, k, seed=8)
    bias = torch.randn(m)
    layer = PivGaLinear.from_factors(a.bfloat16(), b.bfloat16(), bias.bfloat16(), variant=variant)
    assert {p.dtype for p in layer.parameters()} == {torch.bfloat16}
    assert {p.device for p in layer.parameters()} == {a.device}
    factors = pivga_factors(a.bfloat16(), b.bfloat16(), variant=variant)
    assert relative_error(factors, a.bfloat16(), b.bfloat16()) < 1e-2  # bfloat16 rounding, nothing worse
    x = torch.randn(5, n)
    reference = LowRankLinear.from_factors(a, b, bias)(x)
    torch.testing.assert_close(layer(x.bfloat16()).float(), reference, rtol=0.05, atol=0.05)

    cast = PivGaLinear.from_factors(a.double(), b.double(), bias.double(), variant=variant).to(torch.bfloat16)
    index = cast.input_perm if variant == "column" else cast.output_perm
    assert index.dtype == torch.int32 and cast.weight_pivot.dtype == torch.bfloat16
    torch.testing.assert_close(cast(x.bfloat16()).float(), reference, rtol=0.05, atol=0.05)
