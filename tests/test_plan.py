import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_budget_met

from rankcut.allocation.baselines import uniform_rank
from rankcut.plan import DENSE, Budget, RankPlan, factor_cost, max_factor_rank, module_cost


def test_costs_and_break_even():
    assert factor_cost(576, 576, 10, "plain") == 10 * 1152
    assert factor_cost(576, 576, 10, "pivga") == 10 * 1152 - 100
    # plain: largest k with k(m+n) < mn
    k = max_factor_rank(576, 576, "plain")
    assert factor_cost(576, 576, k, "plain") < 576 * 576 <= factor_cost(576, 576, k + 1, "plain")
    # pivga: every rank below min(m, n) is cheaper than dense
    assert max_factor_rank(192, 576, "pivga") == 191
    assert factor_cost(192, 576, 191, "pivga") < 192 * 576 == factor_cost(192, 576, 192, "pivga")
    assert module_cost(3, 4, DENSE, "plain") == 12


def test_uniform_rank_matches_the_issue_example():
    # 576 x 576 at keep 0.8: rank 230 with plain factors, 318 with PivGa (issue #4)
    assert uniform_rank(576, 576, 0.8, "plain") == 230
    assert uniform_rank(576, 576, 0.8, "pivga") == 318
    # 4096 x 4096 at 80%: 1638 plain -> 2264 with PivGa (METHODS §5)
    assert uniform_rank(4096, 4096, 0.8, "plain") == 1638
    assert uniform_rank(4096, 4096, 0.8, "pivga") == 2264


def test_budget_rejects_bad_keep_ratio():
    for bad in (0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="keep_ratio"):
            Budget({"a": (4, 4)}, bad)


shapes_strategy = st.dictionaries(
    st.text("abcdefgh", min_size=1, max_size=4),
    st.tuples(st.integers(1, 64), st.integers(1, 64)),
    min_size=1, max_size=8,
)


@settings(max_examples=150, deadline=None)
@given(shapes=shapes_strategy, keep=st.floats(0.05, 1.0), fmt=st.sampled_from(["plain", "pivga"]))
def test_fill_is_exact(shapes, keep, fmt):
    """The filled plan is within budget and no module can take one more step without leaving it."""
    budget = Budget(shapes, keep, fmt)
    start = {name: 1 for name in shapes}
    # rank 1 of an m x 1 or 1 x n module already costs its dense weight: it counts as dense
    if budget.total({name: budget.normalize(name, 1) for name in shapes}) > budget.target:
        with pytest.raises(ValueError, match="over the budget"):
            budget.fill(start, lambda name, rank: 0.0)
        return
    assert_budget_met(budget.fill(start, lambda name, rank: -rank), budget)


@settings(max_examples=100, deadline=None)
@given(shapes=shapes_strategy, keep=st.floats(0.2, 1.0), fmt=st.sampled_from(["plain", "pivga"]))
def test_rescale_meets_budget(shapes, keep, fmt):
    budget = Budget(shapes, keep, fmt)
    proposal = {name: min(m, n) for name, (m, n) in shapes.items()}  # far over budget
    if budget.total({n: 1 for n in shapes}) > budget.target:
        return
    ranks = budget.rescale(proposal, lambda name, rank: 0.0)
    assert budget.total(ranks) <= budget.target


def test_rank_plan_round_trip(tmp_path):
    plan = RankPlan({"a": 3, "b": 40}, {"a": (8, 8), "b": (8, 8)}, 0.9, "plain", "manual", {"x": 1})
    assert plan.ranks["b"] == DENSE  # past break-even becomes dense
    plan.save(tmp_path / "plan.json")
    again = RankPlan.load(tmp_path / "plan.json")
    assert again.ranks == plan.ranks and again.shapes == plan.shapes and again.total_cost == plan.total_cost
    assert json.loads((tmp_path / "plan.json").read_text())["budget"]["total"] == plan.total_cost
    with pytest.raises(ValueError, match="invalid rank plan"):
        RankPlan.from_dict({"ranks": {"a": "x"}, "shapes": {"a": [8, 8]}, "keep_ratio": 0.5})
