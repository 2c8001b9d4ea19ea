"""Whitened SVD (METHODS §1): ``W S = U Σ Vᵀ``, ``Bfull = Vᵀ S⁻¹``, rank-k factors from the top k.

For every k, ``A_k B_k = U_k Σ_k Vᵀ_k S⁻¹`` and ``‖(W − A_k B_k) S‖_F² = Σ_{i>k} σ_i²``: with
``S Sᵀ`` the input Gram, that is the output error on the calibration inputs.

**Compensating fit.** When the module will see the inputs ``X̃`` of an already compressed upstream
while the dense model saw ``X``, the fit that matters is ``min ‖W X − W_k X̃‖_F`` over rank k. With
``X̃ X̃ᵀ = S Sᵀ`` and ``M = W_k S`` it is ``‖W X‖² − 2 tr(W X X̃ᵀ S⁻ᵀ Mᵀ) + ‖M‖² = ‖W X‖² − ‖T‖² +
‖M − T‖²`` with the whitened target ``T = W (X X̃ᵀ) S⁻ᵀ``, so (Eckart–Young) ``M`` is T's truncated SVD
and ``W_k = U_k Σ_k Vᵀ_k S⁻¹``: the same factor form, from a different target. The error left is
``‖W X‖² − ‖T‖² + Σ_{i>k} σ_i(T)²``; with ``X̃ = X`` the cross-Gram is ``S Sᵀ``, ``T = W S``, and the
fit is the open-loop one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import FactorizationError
from .whitening import Whitening


@dataclass
class Spectrum:
    """The whitened SVD of one module, kept so any rank can be cut later without recomputing."""

    u: torch.Tensor  # m x r
    sigma: torch.Tensor  # r, float64, descending
    b_full: torch.Tensor  # r x n, = Vᵀ S⁻¹

    @property
    def full_rank(self) -> int:
        return self.sigma.numel()

    def factors(self, rank: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``A = U_k Σ_k^{1/2}`` (m x k) and ``B = Σ_k^{1/2} Bfull_k`` (k x n), balanced."""
        if not 0 < rank <= self.full_rank:
            raise ValueError(f"rank must be in [1, {self.full_rank}], got {rank}")
        root = self.sigma[:rank].sqrt()
        a = self.u[:, :rank].double() * root
        b = root[:, None] * self.b_full[:rank].double()
        return a.to(dtype), b.to(dtype)

    def truncation(self, rank: int) -> torch.Tensor:
        """``A_k B_k`` (float64): the weight the rank-``k`` factors apply."""
        a, b = self.factors(rank, dtype=torch.float64)
        return a @ b

    def leading(self, rank: int) -> "Spectrum":
        """The first ``rank`` components: the same rank-``k`` factors for every ``k <= rank``, bit for bit."""
        return Spectrum(self.u[:, :rank], self.sigma[:rank], self.b_full[:rank])

    def tail_energy(self) -> torch.Tensor:
        """``tail[k] = Σ_{i>k} σ_i²`` for k = 0..r: the whitened error left at rank k."""
        squares = self.sigma.double().square()
        tail = squares.flip(0).cumsum(0).flip(0)
        return torch.cat([tail, tail.new_zeros(1)])


def whitened_svd(weight: torch.Tensor, whitening: Whitening, name: str, storage_dtype: torch.dtype = torch.float32,
                 cross: torch.Tensor | None = None) -> Spectrum:
    """Decompose ``weight`` (``m x n``) under ``whitening``, in float64. With ``cross`` (``X X̃ᵀ``, the
    whitening being that of ``X̃ X̃ᵀ``) the target is the compensating fit's ``W (X X̃ᵀ) S⁻ᵀ``."""
    w = weight.detach().double().cpu()
    if not torch.isfinite(w).all():
        raise FactorizationError(f"{name}: weight contains NaN or Inf")
    try:
        target = whitening.right_multiply(w) if cross is None else whitening.right_solve_transposed(w @ cross.double())
        u, sigma, vt = torch.linalg.svd(target, full_matrices=False)
        b_full = whitening.right_solve(vt)
    except RuntimeError as error:  # LAPACK did not converge
        raise FactorizationError(f"{name}: whitened SVD failed ({error})") from error
    if not (torch.isfinite(u).all() and torch.isfinite(sigma).all() and torch.isfinite(b_full).all()):
        raise FactorizationError(f"{name}: whitened SVD produced NaN/Inf (whitening {whitening.diagnostics})")
    return Spectrum(u.to(storage_dtype), sigma, b_full.to(storage_dtype))


class RemoteSpectrum(Spectrum):
    """A module's spectrum in a run of several processes whose factors another rank (``owner``) holds:
    its singular values, all that allocation by spectra needs, and where the rest is."""

    def __init__(self, sigma: torch.Tensor, owner: int) -> None:  # noqa: D107 (no dataclass init)
        self.sigma, self.owner = sigma, owner

    def _elsewhere(self) -> torch.Tensor:
        raise FactorizationError(f"this module's factors live on rank {self.owner}, not in this process")

    u = property(_elsewhere)  # type: ignore[assignment]
    b_full = property(_elsewhere)  # type: ignore[assignment]
