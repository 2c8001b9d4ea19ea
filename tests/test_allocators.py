"""The allocator interface (rankcut.allocation.base): ``allocate_ranks`` returns an :class:`Allocation`
that carries its own fill priority, so allocators keep no state between calls."""

from dataclasses import dataclass

import pytest

from conftest import assert_budget_met, calibration_ids, tiny_model
from test_spectral import spectra_of
from rankcut.allocation import ALLOCATORS, Allocation, AllocationContext, Allocator, create_allocator, energy_priority
from rankcut.allocation.baselines import deficit_priority
from rankcut.plan import Budget
from rankcut.registry import PluginConfig

CHEAP = {  # every registered allocator, with settings that take a second or so on the tiny model
    "uniform": {}, "energy": {},
    "zerosum": {"windows": 4, "batch_size": 2},
    "strs": {"windows": 2, "tokens": 16, "keep_ratios": [0.1, 0.3, 0.5, 0.7, 0.9]},
    "ara": {"steps": 4, "seqlen": 16, "batch_size": 4},
    "fermigrad": {"steps": 4, "batch_size": 4, "seqlen": 16},
    "dobi": {"steps": 4, "batch_size": 4, "seqlen": 16},
}


@pytest.fixture(scope="module")
def setup():
    ids = calibration_ids(8, 24, seed=1)
    model = tiny_model()
    targets, spectra = spectra_of(model, ids)
    return model, targets, spectra, ids


def context_for(setup, keep_ratio, factor_format="plain"):
    model, targets, spectra, ids = setup
    budget = Budget({t.name: t.shape for t in targets}, keep_ratio, factor_format)
    return AllocationContext(budget, targets, spectra, model, ids, seed=3, show_progress=False)


def test_every_allocator_is_covered():
    assert set(CHEAP) == set(ALLOCATORS.names())


@pytest.mark.parametrize("name", sorted(CHEAP))
def test_one_instance_allocates_any_number_of_times(setup, name):
    """Reusing an instance, in any order, gives the plans of fresh instances; nothing is left on it."""
    allocator = create_allocator(name, CHEAP[name])
    contexts = [context_for(setup, 0.45), context_for(setup, 0.7, "pivga"), context_for(setup, 0.45)]
    plans = [allocator.allocate(context) for context in contexts]
    assert vars(allocator).keys() == {"config"}
    assert plans[0].ranks == plans[2].ranks
    for context, plan in zip(contexts[:2], plans):
        assert_budget_met(plan.ranks, plan.budget)
        assert plan.ranks == create_allocator(name, CHEAP[name]).allocate(context).ranks


def test_the_allocation_carries_the_fill_priority(setup):
    context = context_for(setup, 0.45)
    budget = context.budget
    uniform = create_allocator("uniform").allocate_ranks(context)
    assert isinstance(uniform, Allocation) and uniform.priority is not None
    assert create_allocator("uniform").allocate(context).ranks == budget.fill(uniform.ranks, deficit_priority(budget))
    energy = create_allocator("energy").allocate_ranks(context)
    assert energy.priority is None and energy.info == {}  # None: the default energy priority
    assert create_allocator("energy").allocate(context).ranks == budget.fill(energy.ranks, energy_priority(context))


@dataclass
class QuarterConfig(PluginConfig):
    pass


class QuarterAllocator(Allocator):
    """A quarter of the break-even rank everywhere, the rest by a custom priority (the README's example)."""

    name = "quarter"
    config_class = QuarterConfig

    def allocate_ranks(self, context: AllocationContext) -> Allocation:
        budget = context.budget
        ranks = {name: max(1, budget.max_rank(name) // 4) for name in budget.shapes}
        return Allocation(ranks, {"start": "a quarter of break-even"}, lambda name, rank: -rank)


def test_a_plugin_allocator_only_returns_an_allocation(setup):
    plan = QuarterAllocator(QuarterConfig()).allocate(context_for(setup, 0.45))
    assert_budget_met(plan.ranks, plan.budget)
    assert plan.info == {"start": "a quarter of break-even"} and plan.allocator == "quarter"


def test_the_old_tuple_interface_is_a_clear_error(setup):
    class Legacy(QuarterAllocator):
        name = "legacy"

        def allocate_ranks(self, context):
            return super().allocate_ranks(context).ranks, {}

    with pytest.raises(TypeError, match="allocate_ranks must return an Allocation, got tuple"):
        Legacy(QuarterConfig()).allocate(context_for(setup, 0.45))
