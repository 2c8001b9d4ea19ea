"""Learned allocators on a problem whose constrained optimum is known exactly.

Four modules with orthonormal whitened factors, decreasing spectra and sensitivities 10 : 1 : 1 : 0.1
folded into their singular values (``σ'_l = √w_l σ_l``). The injected calibration loss is the summed
output error of the gated layers on inputs that span each module's whitened basis,
``Σ_l ‖layer_l(X_l) − W_l X_l‖² = Σ_l Σ_i (1 − g_{l,i})² σ'²_{l,i}``, which at a hard rank-``k`` gate is
the separable ``Σ_l w_l Σ_{i>k_l} σ²_{l,i}``. With decreasing ``σ²`` its optimum under the budget is the
greedy gain-per-parameter plan (the ``energy`` allocator on ``σ'``). Each allocator runs through its real
code path (:class:`SpectralLinear` gates, the allocator's own training loop and readout) and must close
at least 90% of the loss gap between the uniform plan and that optimum.

zerosum is not among them, by nature rather than by omission: its first-order scores are ``∂L/∂g`` at
the gates of the plan so far, and this loss is flat there (``∂/∂g (1 − g)² = 0`` at ``g = 1``), so it
cannot rank components on it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rankcut.allocation import AllocationContext, create_allocator
from rankcut.allocation.spectral import spectral_view
from rankcut.decomposition import Spectrum
from rankcut.plan import DENSE, Budget, RankPlan
from rankcut.targets import TargetModule

SENSITIVITIES = (10.0, 1.0, 1.0, 0.1)
SHAPES = ((64, 64), (64, 64), (96, 96), (96, 96))


class SeparableProblem(nn.Module):
    """The modules as plain linears, their spectra, and the injected objective."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.layers = nn.ModuleList()
        self.spectra: dict[str, Spectrum] = {}
        self.inputs: list[torch.Tensor] = []
        for index, ((m, n), weight) in enumerate(zip(SHAPES, SENSITIVITIES)):
            rank = min(m, n)
            u, _ = torch.linalg.qr(torch.randn(m, rank, generator=generator, dtype=torch.float64))
            b_full, _ = torch.linalg.qr(torch.randn(n, rank, generator=generator, dtype=torch.float64))
            b_full = b_full.T.contiguous()  # orthonormal rows: b_full @ b_full.T = I
            sigma = weight ** 0.5 * torch.exp(-torch.arange(rank, dtype=torch.float64) / (rank / 4))
            linear = nn.Linear(n, m, bias=False, dtype=torch.float64)
            with torch.no_grad():
                linear.weight.copy_((u * sigma) @ b_full)
            self.layers.append(linear)
            self.spectra[f"layers.{index}"] = Spectrum(u, sigma, b_full)
            self.inputs.append(b_full)  # rows span the whitened basis: b_full X = I

    @property
    def targets(self) -> list[TargetModule]:
        return [TargetModule(f"layers.{i}", i, m, n, False) for i, (m, n) in enumerate(SHAPES)]

    def loss(self) -> torch.Tensor:
        """``Σ_l ‖layer_l(X_l) − W_l X_l‖²`` through the (possibly gated) layers."""
        loss = torch.zeros((), dtype=torch.float64)
        for index, x in enumerate(self.inputs):
            spectrum = self.spectra[f"layers.{index}"]
            dense = x @ ((spectrum.u * spectrum.sigma) @ spectrum.b_full).T
            loss = loss + (self.get_submodule(f"layers.{index}")(x) - dense).square().sum()
        return loss

    def objective(self, _batch: torch.Tensor, gates: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
        """The allocators' :data:`~rankcut.allocation.spectral.GatedObjective`: :meth:`loss` with the
        layers gated, and its gradient with respect to each gate."""
        with spectral_view(self, self.targets, self.spectra) as layers:
            leaves = {name: gate.clone().requires_grad_() for name, gate in gates.items()}
            for name, layer in layers.items():
                layer.gate = leaves.get(name)
            loss = self.loss()
            gradients = torch.autograd.grad(loss, list(leaves.values())) if leaves else []
        return float(loss.detach()), dict(zip(leaves, gradients))

    def plan_loss(self, plan: RankPlan) -> float:
        """The separable loss of a hard plan: the weighted tail energy each module drops."""
        return sum(0.0 if rank == DENSE else float(self.spectra[name].tail_energy()[rank])
                   for name, rank in plan.ranks.items())


def allocate(problem: SeparableProblem, name: str, options: dict, keep: float, factor_format: str) -> RankPlan:
    budget = Budget({t.name: t.shape for t in problem.targets}, keep, factor_format)
    context = AllocationContext(budget, problem.targets, problem.spectra, problem,
                                torch.zeros(4, 8, dtype=torch.long), show_progress=False,
                                objective=problem.objective)
    return create_allocator(name, options).allocate(context)


# Steps each needs on this problem (measured): fermigrad 200; ara 1000 (at lr 0.05 200 steps closed 71-87%);
# dobi 1000 at a penalty of 20 (97-100%). At Dobi-SVD's penalty of 200, stiff for this loss's scale, 3000 steps
# close only 91-99%, too near the bar to hold across thread counts.
LEARNED = {"fermigrad": {"steps": 200, "batch_size": 1}, "ara": {"steps": 1000, "batch_size": 1},
           "dobi": {"steps": 1000, "batch_size": 1, "penalty": 20.0}}


@pytest.mark.parametrize("factor_format", ["plain", "pivga"])
@pytest.mark.parametrize("keep", [0.5, 0.3])
@pytest.mark.parametrize("name", list(LEARNED))
def test_learned_allocators_close_the_gap_to_the_known_optimum(name, keep, factor_format):
    problem = SeparableProblem()
    uniform = problem.plan_loss(allocate(problem, "uniform", {}, keep, factor_format))
    optimum = problem.plan_loss(allocate(problem, "energy", {}, keep, factor_format))
    assert optimum < 0.5 * uniform  # the problem separates the plans
    plan = allocate(problem, name, LEARNED[name], keep, factor_format)
    learned = problem.plan_loss(plan)
    closed = (uniform - learned) / (uniform - optimum)
    assert closed >= 0.9, (f"closed {closed:.1%} of the gap: uniform {uniform:.4g}, optimum {optimum:.4g}, "
                           f"{name} {learned:.4g}, ranks {plan.ranks}")


def test_the_loss_is_the_separable_tail_energy_at_hard_gates():
    """The injected objective through the gated layers equals the plan's tail energy (the premise)."""
    problem = SeparableProblem()
    ranks = {"layers.0": 40, "layers.1": 7, "layers.2": 50, "layers.3": 1}
    with spectral_view(problem, problem.targets, problem.spectra) as layers:
        for name, layer in layers.items():
            layer.gate = torch.ones(ranks[name], dtype=torch.float64)
        loss = float(problem.loss())
    expected = sum(float(problem.spectra[name].tail_energy()[rank]) for name, rank in ranks.items())
    assert loss == pytest.approx(expected, rel=1e-10)
