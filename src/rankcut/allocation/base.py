"""The allocator interface: spectra + budget (+ model and calibration data) in, a RankPlan out.

An allocator implements :meth:`Allocator.allocate_ranks`, which returns an :class:`Allocation`: ranks
within the budget, a JSON summary, and the priority by which :meth:`Budget.fill` spends what is left
of the budget. Everything an allocation needs travels in its result, so allocator objects hold only
their config: one instance can allocate any number of times, for any contexts, in any order.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import nn

from ..decomposition import Spectrum
from ..plan import Budget, RankPlan, Rank
from ..registry import PluginConfig, Registry
from ..sweep import ModelStream
from ..targets import TargetModule

Priority = Callable[[str, int], float]
"""``priority(name, rank)``: how much adding one step to module ``name``, now at ``rank``, is worth
(per parameter); :meth:`Budget.fill` takes the highest first."""


@dataclass
class AllocationContext:
    """Everything an allocator may use. Data-free allocators read only ``budget`` (and spectra)."""

    budget: Budget
    targets: list[TargetModule]
    spectra: Mapping[str, Spectrum] = field(default_factory=dict)
    model: nn.Module | None = None  # a dense model in memory: ``stream`` is built from it when not given
    calibration: torch.Tensor | None = None  # nsamples x seqlen token ids
    seed: int = 0
    show_progress: bool = True
    output_dir: Path | None = None  # where an allocator may leave plots and caches
    cache_dir: Path | None = None  # shared cache for expensive, reusable intermediate results
    # This run's own checkpoint folder (None: not resumable). A long-training allocator may save its
    # state here (atomically: rankcut.workdir.write_atomically) and pick it up when the interrupted run
    # is rerun; the folder is deleted once the run's result is saved. See rankcut.workdir.
    work_dir: Path | None = None
    # What the training allocators (ara, fermigrad, dobi) minimise, with its gate gradients
    # (rankcut.allocation.spectral.GatedObjective); None: the next-token loss through ``stream``. Tests
    # inject losses whose constrained optimum is known.
    objective: Callable[[torch.Tensor, Mapping[str, torch.Tensor]], tuple[float, dict[str, torch.Tensor]]] | None = None
    # The dense model block by block, one block resident at a time: how allocators that need the model
    # (``needs_model``) run it. Given ``model`` alone, it runs that model's blocks.
    stream: ModelStream | None = None

    def __post_init__(self) -> None:
        if self.stream is None and self.model is not None:
            self.stream = ModelStream(self.model, self.targets)


@dataclass
class Allocation:
    """What :meth:`Allocator.allocate_ranks` decided.

    ``ranks`` lie within the budget but need not fill it; ``info`` is a JSON-serializable summary of
    the run (saved in the plan); ``priority`` is how :meth:`Budget.fill` spends the leftover budget
    (None: :func:`energy_priority`, the whitened energy gained per parameter). An allocator that
    fills or rescales its ranks itself should return the priority it used, so the final fill agrees.
    """

    ranks: dict[str, Rank]
    info: dict[str, Any] = field(default_factory=dict)
    priority: Priority | None = None


class Allocator(ABC):
    """A rank allocator: a registered plug-in holding only its (validated) config; see :class:`Allocation`."""

    name: ClassVar[str]
    config_class: ClassVar[type[PluginConfig]]
    needs_spectra: ClassVar[bool] = True  # False: the plan depends on shapes alone (uniform)
    needs_model: ClassVar[bool] = False  # True: the allocator runs the model (``context.stream``) on calibration data

    def __init__(self, config: PluginConfig) -> None:
        self.config = config

    @abstractmethod
    def allocate_ranks(self, context: AllocationContext) -> Allocation:
        """Ranks within ``context.budget`` (not necessarily filled), a JSON summary of the run, and the
        fill priority. Keep results in the returned :class:`Allocation`, not on ``self``."""

    def allocate(self, context: AllocationContext) -> RankPlan:
        """:meth:`allocate_ranks`, then fill the budget exactly with the allocation's priority."""
        allocation = self.allocate_ranks(context)
        if not isinstance(allocation, Allocation):
            raise TypeError(f"allocator {self.name!r}: allocate_ranks must return an Allocation, "
                            f"got {type(allocation).__name__}")
        budget = context.budget
        priority = allocation.priority if allocation.priority is not None else energy_priority(context)
        filled = budget.fill(allocation.ranks, priority)
        plan = RankPlan(filled, dict(budget.shapes), budget.keep_ratio, budget.factor_format,
                        self.name, self.config.to_dict(), allocation.info)
        plan.check_budget()
        return plan


def energy_priority(context: AllocationContext) -> Priority:
    """The whitened energy ``σ²`` gained per parameter by the next rank of a module (going dense
    gains its whole tail): the default fill priority."""
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
