"""Parameter costs, budgets and the serializable rank plan every allocator returns.

A module of shape ``m x n`` (out x in) costs ``k(m+n)`` numbers as plain factors, ``k(m+n) - k²`` in
PivGa's gauge-fixed form and ``mn`` dense. A rank whose factor cost would reach ``mn`` is never used:
the module stays dense instead (exact and no larger).
"""

from __future__ import annotations

import heapq
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

FactorFormat = Literal["plain", "pivga"]
FACTOR_FORMATS: tuple[str, ...] = ("plain", "pivga")
DENSE = "dense"
Rank = int | Literal["dense"]


def factor_cost(out_features: int, in_features: int, rank: int, factor_format: FactorFormat) -> int:
    """Stored numbers of a rank-``rank`` factorization in the given format."""
    m, n, k = out_features, in_features, rank
    if factor_format == "plain":
        return k * (m + n)
    if factor_format == "pivga":
        return k * (m + n) - k * k
    raise ValueError(f"unknown factor format {factor_format!r}; expected one of {FACTOR_FORMATS}")


def max_factor_rank(out_features: int, in_features: int, factor_format: FactorFormat) -> int:
    """Largest rank whose factors are strictly cheaper than the dense weight (0 if none is)."""
    m, n = out_features, in_features
    if factor_format == "pivga":
        # k(m+n) - k² < mn  <=>  (m-k)(n-k) > 0  <=>  k < min(m, n)
        return min(m, n) - 1
    return min(math.ceil(m * n / (m + n)) - 1, min(m, n))


def module_cost(out_features: int, in_features: int, rank: Rank, factor_format: FactorFormat) -> int:
    if rank == DENSE:
        return out_features * in_features
    return factor_cost(out_features, in_features, int(rank), factor_format)


def normalize_rank(out_features: int, in_features: int, rank: Rank, factor_format: FactorFormat) -> Rank:
    """Map a rank at or past break-even to ``"dense"``, and reject ranks below 1."""
    if rank == DENSE:
        return DENSE
    rank = int(rank)
    if rank < 1:
        raise ValueError(f"rank must be >= 1 or 'dense', got {rank}")
    return DENSE if rank > max_factor_rank(out_features, in_features, factor_format) else rank


@dataclass(frozen=True)
class Budget:
    """The parameter budget over the target modules: ``floor(keep_ratio * dense parameters)``."""

    shapes: Mapping[str, tuple[int, int]]  # name -> (out_features, in_features)
    keep_ratio: float
    factor_format: FactorFormat = "plain"

    def __post_init__(self) -> None:
        if not (isinstance(self.keep_ratio, (int, float)) and 0.0 < self.keep_ratio <= 1.0):
            raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio!r}")
        if self.factor_format not in FACTOR_FORMATS:
            raise ValueError(f"unknown factor format {self.factor_format!r}; expected one of {FACTOR_FORMATS}")
        if not self.shapes:
            raise ValueError("the budget covers no target modules")

    @property
    def dense_total(self) -> int:
        return sum(m * n for m, n in self.shapes.values())

    @property
    def target(self) -> int:
        return math.floor(self.keep_ratio * self.dense_total)

    def cost(self, name: str, rank: Rank) -> int:
        m, n = self.shapes[name]
        return module_cost(m, n, rank, self.factor_format)

    def total(self, ranks: Mapping[str, Rank]) -> int:
        return sum(self.cost(name, rank) for name, rank in ranks.items())

    def max_rank(self, name: str) -> int:
        m, n = self.shapes[name]
        return max_factor_rank(m, n, self.factor_format)

    def normalize(self, name: str, rank: Rank) -> Rank:
        m, n = self.shapes[name]
        return normalize_rank(m, n, rank, self.factor_format)

    def next_rank(self, name: str, rank: Rank) -> Rank | None:
        """The rank one step up (``"dense"`` after the last useful rank), or None when dense."""
        if rank == DENSE:
            return None
        return DENSE if rank >= self.max_rank(name) else rank + 1

    def fill(self, ranks: Mapping[str, Rank], priority: Callable[[str, int], float]) -> dict[str, Rank]:
        """Greedily add one rank at a time, best ``priority(name, current_rank)`` first, while the
        total stays within the target; a module past its last useful rank becomes dense.

        The result cannot grow any module by one step without leaving the budget.
        """
        ranks = {name: self.normalize(name, rank) for name, rank in ranks.items()}
        total = self.total(ranks)
        if total > self.target:
            raise ValueError(f"plan costs {total} parameters, over the budget of {self.target}")
        heap = [(-priority(name, rank), name) for name, rank in ranks.items() if rank != DENSE]
        heapq.heapify(heap)
        while heap:
            _, name = heapq.heappop(heap)
            rank = ranks[name]
            step = self.next_rank(name, rank)
            increment = self.cost(name, step) - self.cost(name, rank)
            if total + increment > self.target:
                continue  # this module cannot grow any more; others still may
            ranks[name], total = step, total + increment
            if step != DENSE:
                heapq.heappush(heap, (-priority(name, step), name))
        return ranks

    def rescale(self, ranks: Mapping[str, Rank], priority: Callable[[str, int], float]) -> dict[str, Rank]:
        """Scale all ranks by one global factor (bisection) to the largest plan within the budget,
        then :meth:`fill` the remainder. Proportional rescaling as ARA does after training."""
        def scaled(factor: float) -> dict[str, Rank]:
            out: dict[str, Rank] = {}
            for name, rank in ranks.items():
                m, n = self.shapes[name]
                full = min(m, n) if rank == DENSE else int(rank)
                out[name] = self.normalize(name, max(1, math.floor(factor * full)))
            return out

        low, high = 0.0, 1.0
        while self.total(scaled(high)) <= self.target and high < 1e6:
            low, high = high, 2 * high
        for _ in range(60):
            mid = (low + high) / 2
            low, high = (mid, high) if self.total(scaled(mid)) <= self.target else (low, mid)
        base = scaled(low)
        if self.total(base) > self.target:
            raise ValueError(
                f"budget {self.target} is below the cost of rank 1 in every module ({self.total(base)})"
            )
        return self.fill(base, priority)


@dataclass
class RankPlan:
    """Module name -> rank (or ``"dense"``), plus how the plan was made. JSON-serializable."""

    ranks: dict[str, Rank]
    shapes: dict[str, tuple[int, int]]
    keep_ratio: float
    factor_format: FactorFormat = "plain"
    allocator: str = "manual"
    allocator_config: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # allocator-specific summary (curves, timings)

    def __post_init__(self) -> None:
        missing = set(self.ranks) ^ set(self.shapes)
        if missing:
            raise ValueError(f"ranks and shapes name different modules: {sorted(missing)[:5]}")
        budget = self.budget
        self.ranks = {name: budget.normalize(name, rank) for name, rank in self.ranks.items()}

    @property
    def budget(self) -> Budget:
        return Budget(self.shapes, self.keep_ratio, self.factor_format)

    @property
    def total_cost(self) -> int:
        return self.budget.total(self.ranks)

    @property
    def achieved_keep_ratio(self) -> float:
        return self.total_cost / self.budget.dense_total

    def check_budget(self) -> None:
        if self.total_cost > self.budget.target:
            raise ValueError(f"rank plan costs {self.total_cost} parameters, over its budget {self.budget.target}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "keep_ratio": self.keep_ratio,
            "factor_format": self.factor_format,
            "allocator": self.allocator,
            "allocator_config": self.allocator_config,
            "ranks": dict(self.ranks),
            "shapes": {name: list(shape) for name, shape in self.shapes.items()},
            "budget": {"target": self.budget.target, "total": self.total_cost, "dense": self.budget.dense_total},
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RankPlan":
        try:
            return cls(
                ranks={k: (DENSE if v == DENSE else int(v)) for k, v in data["ranks"].items()},
                shapes={k: (int(v[0]), int(v[1])) for k, v in data["shapes"].items()},
                keep_ratio=float(data["keep_ratio"]),
                factor_format=data.get("factor_format", "plain"),
                allocator=data.get("allocator", "manual"),
                allocator_config=dict(data.get("allocator_config", {})),
                info=dict(data.get("info", {})),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"invalid rank plan: {error}") from error

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "RankPlan":
        return cls.from_dict(json.loads(Path(path).read_text()))
