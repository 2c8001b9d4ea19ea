import pytest
import torch

from rankcut.calibration import InputStatistics
from rankcut.decomposition import whitened_svd
from rankcut.errors import ConfigError, FactorizationError
from rankcut.whitening import WHITENERS, create_whitener
from rankcut.whitening.base import CholeskyWhitening, SymmetricWhitening


def stats_from(x: torch.Tensor) -> InputStatistics:
    x = x.double()
    return InputStatistics(["m"], x.T @ x / x.shape[0], x.abs().mean(0), x.shape[0])


def correlated_inputs(tokens=400, n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) * torch.logspace(0, -3, n, dtype=torch.float64)
    return torch.randn(tokens, n, generator=g, dtype=torch.float64) @ mix


@pytest.mark.parametrize("name", ["cholesky", "scale", "none"])
def test_truncation_identity(name):
    """‖(W − W_k) S‖² = Σ_{i>k} σ_i²; for Cholesky without damping S Sᵀ = XᵀX, so it is the
    output error on the calibration inputs."""
    x = correlated_inputs()
    w = torch.randn(16, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    options = {"damping": 0.0} if name == "cholesky" else {}
    whitening = create_whitener(name, options).whiten(stats_from(x))
    spectrum = whitened_svd(w, whitening, "m", storage_dtype=torch.float64)
    for k in (1, 5, 12, 16):
        a, b = spectrum.factors(k, dtype=torch.float64)
        residual = whitening.right_multiply(w - a @ b)
        assert torch.allclose(residual.square().sum(), spectrum.tail_energy()[k], rtol=1e-8, atol=1e-10)
        if name == "cholesky":
            output_error = ((w - a @ b) @ x.T).square().sum() / x.shape[0]
            assert torch.allclose(output_error, spectrum.tail_energy()[k], rtol=1e-6)
    full_a, full_b = spectrum.factors(16, dtype=torch.float64)
    assert torch.allclose(full_a @ full_b, w, atol=1e-8)


def test_cholesky_escalates_damping_on_singular_gram():
    x = correlated_inputs(tokens=8, n=24)  # rank 8 < 24: singular Gram
    whitening = create_whitener("cholesky", {"damping": 0.0}).whiten(stats_from(x))
    assert isinstance(whitening, CholeskyWhitening)
    assert whitening.diagnostics["damping"] > 0 and whitening.diagnostics["attempts"] > 1


def test_eigh_fallback_on_indefinite_gram():
    gram = torch.diag(torch.tensor([3.0, -1.0, 2.0], dtype=torch.float64))  # indefinite: small damping cannot fix it
    stats = InputStatistics(["m"], gram, torch.ones(3, dtype=torch.float64), 10)
    whitening = create_whitener("cholesky", {"max_damping": 1e-2}).whiten(stats)
    assert isinstance(whitening, SymmetricWhitening)
    assert whitening.diagnostics["path"] == "eigh" and whitening.diagnostics["clamped_eigenvalues"] == 1
    w = torch.randn(4, 3, dtype=torch.float64)
    spectrum = whitened_svd(w, whitening, "m", storage_dtype=torch.float64)
    a, b = spectrum.factors(3, dtype=torch.float64)
    assert torch.isfinite(a).all() and torch.allclose(a @ b, w, atol=1e-8)
    with pytest.raises(FactorizationError, match="eigh fallback is disabled"):
        create_whitener("cholesky", {"max_damping": 1e-2, "fallback": False}).whiten(stats)


def test_unusable_statistics_fail_loudly():
    zero = InputStatistics(["layer.q"], torch.zeros(3, 3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), 5)
    with pytest.raises(FactorizationError, match="layer.q"):
        create_whitener("cholesky").whiten(zero)
    nan = InputStatistics(["layer.k"], torch.full((3, 3), float("nan"), dtype=torch.float64), torch.ones(3, dtype=torch.float64), 5)
    with pytest.raises(FactorizationError, match="NaN"):
        create_whitener("cholesky").whiten(nan)
    with pytest.raises(FactorizationError, match="layer.v: weight contains NaN"):
        whitened_svd(torch.full((2, 3), float("nan")), create_whitener("none").whiten(zero), "layer.v")


def test_whitener_registry_validates_options():
    assert WHITENERS.names() == ["cholesky", "none", "scale"]
    with pytest.raises(ConfigError, match="unknown whitening 'zca'"):
        create_whitener("zca")
    with pytest.raises(ConfigError, match="unknown option"):
        create_whitener("cholesky", {"dampning": 1e-3})
    with pytest.raises(ConfigError, match="expects float"):
        create_whitener("cholesky", {"damping": "lots"})
    assert create_whitener("cholesky", {"damping": "1e-4"}).config.damping == 1e-4
