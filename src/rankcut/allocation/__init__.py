"""Rank allocators: plug-ins that turn spectra and a parameter budget into a :class:`RankPlan`."""

from .base import (
    ALLOCATORS, Allocation, AllocationContext, Allocator, Priority, create_allocator, energy_priority,
)
from . import baselines as _baselines  # noqa: F401  registers uniform and energy
from . import ara as _ara  # noqa: F401
from . import zerosum as _zerosum  # noqa: F401
from . import strs as _strs  # noqa: F401
from . import fermi as _fermi  # noqa: F401

__all__ = ["ALLOCATORS", "Allocation", "AllocationContext", "Allocator", "Priority", "create_allocator",
           "energy_priority"]
