"""Rank allocators: plug-ins that turn spectra and a parameter budget into a :class:`RankPlan`."""

from .base import ALLOCATORS, AllocationContext, Allocator, create_allocator, energy_priority
from . import baselines as _baselines  # noqa: F401  registers uniform and energy

__all__ = ["ALLOCATORS", "AllocationContext", "Allocator", "create_allocator", "energy_priority"]
