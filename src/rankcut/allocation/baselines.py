"""Training-free baselines: ``uniform`` (SVD-LLM) and ``energy`` (global greedy on whitened σ²)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..plan import Budget, Rank
from ..registry import PluginConfig
from .base import ALLOCATORS, Allocation, AllocationContext, Allocator, Priority


def uniform_rank(out_features: int, in_features: int, keep_ratio: float, factor_format: str) -> int:
    """The rank whose factor cost is ``keep_ratio · m n`` (rounded down): ``⌊ρmn/(m+n)⌋`` for plain
    factors, the smaller root of ``k(m+n) − k² = ρmn`` for PivGa."""
    m, n = out_features, in_features
    if factor_format == "pivga":
        s = m + n
        return math.floor((s - math.sqrt(s * s - 4 * keep_ratio * m * n)) / 2 + 1e-9)
    return math.floor(keep_ratio * m * n / (m + n) + 1e-9)


def deficit_priority(budget: Budget) -> Priority:
    """Spend the rounding remainder on the modules furthest below the common keep ratio."""

    def deficit(name: str, rank: int) -> float:
        m, n = budget.shapes[name]
        return budget.keep_ratio - budget.cost(name, rank) / (m * n)

    return deficit


@dataclass
class UniformConfig(PluginConfig):
    pass


@ALLOCATORS.register("uniform", UniformConfig)
class UniformAllocator(Allocator):
    """Every module keeps the same fraction of its parameters (SVD-LLM's setting)."""

    needs_spectra = False

    def allocate_ranks(self, context: AllocationContext) -> Allocation:
        budget = context.budget
        ranks: dict[str, Rank] = {}
        for name, (m, n) in budget.shapes.items():
            rank = max(1, uniform_rank(m, n, budget.keep_ratio, budget.factor_format))
            ranks[name] = budget.normalize(name, rank)
        return Allocation(ranks, {}, deficit_priority(budget))


@dataclass
class EnergyConfig(PluginConfig):
    pass


@ALLOCATORS.register("energy", EnergyConfig)
class EnergyAllocator(Allocator):
    """Global greedy on whitened ``σ_i²`` per parameter: the exact optimum of the sum of layer-local
    output errors when costs are linear in rank. Starts every module at rank 1 and spends the whole
    budget through :meth:`Budget.fill` with the default (energy) priority."""

    def allocate_ranks(self, context: AllocationContext) -> Allocation:
        return Allocation({name: 1 for name in context.budget.shapes})
