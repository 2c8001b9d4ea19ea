"""The allocator interface: spectra + budget (+ model and calibration data) in, a RankPlan out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from ..decomposition import Spectrum
from ..plan import Budget, RankPlan, Rank
from ..registry import PluginConfig, Registry
from ..targets import TargetModule


@dataclass
class AllocationContext:
    """Everything an allocator may use. Data-free allocators read only ``budget`` (and spectra)."""

    budget: Budget
    targets: list[TargetModule]
    spectra: Mapping[str, Spectrum] = field(default_factory=dict)
    model: nn.Module | None = None  # the dense model, frozen; for allocators that train or evaluate
    calibration: torch.Tensor | None = None  # nsamples x seqlen token ids
    seed: int = 0
    show_progress: bool = True
    output_dir: Path | None = None  # where an allocator may leave plots and caches
    cache_dir: Path | None = None  # shared cache for expensive, reusable intermediate results
    # This run's own checkpoint folder (None: not resumable). A long-training allocator may save its
    # state here (atomically: temp file + os.replace) and pick it up when the interrupted run is rerun;
    # the folder is deleted once the run's result is saved. See rankcut.workdir.
    work_dir: Path | None = None


class Allocator(ABC):
    name: ClassVar[str]
    config_class: ClassVar[type[PluginConfig]]
    needs_spectra: ClassVar[bool] = True  # False: the plan depends on shapes alone (uniform)
    needs_model: ClassVar[bool] = False  # True: the allocator runs the model on calibration data

    def __init__(self, config: PluginConfig) -> None:
        self.config = config

    @abstractmethod
    def allocate_ranks(self, context: AllocationContext) -> tuple[dict[str, Rank], dict[str, Any]]:
        """Ranks within ``context.budget`` (not necessarily filled) and a JSON summary of the run."""

    def priority(self, context: AllocationContext):
        """How :meth:`Budget.fill` spends the leftover budget: by default, the whitened energy gained
        per parameter by the next rank (a module going dense gains its whole tail)."""
        return energy_priority(context)

    def allocate(self, context: AllocationContext) -> RankPlan:
        ranks, info = self.allocate_ranks(context)
        budget = context.budget
        filled = budget.fill(ranks, self.priority(context))
        plan = RankPlan(filled, dict(budget.shapes), budget.keep_ratio, budget.factor_format,
                        self.name, self.config.to_dict(), info)
        plan.check_budget()
        return plan


def energy_priority(context: AllocationContext):
    budget = context.budget
    tails = {name: spectrum.tail_energy() for name, spectrum in context.spectra.items()}

    def priority(name: str, rank: int) -> float:
        step = budget.next_rank(name, rank)
        gain = float(tails[name][rank] if step == "dense" else tails[name][rank] - tails[name][rank + 1])
        return gain / (budget.cost(name, step) - budget.cost(name, rank))

    return priority


ALLOCATORS: Registry[Allocator] = Registry("allocator")


def create_allocator(name: str, options: Mapping[str, Any] | PluginConfig | None = None) -> Allocator:
    return ALLOCATORS.create(name, options)
