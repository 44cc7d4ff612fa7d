"""The seen-cluster runs behave like a set, merge as they should and stay inside their budget."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmpbackup.vma.cluster_map import ClusterMap, RunBudget, TooManyRuns


def _runs(clusters: set[int]) -> int:
    return sum(1 for c in clusters if c - 1 not in clusters)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 2000), max_size=1500), st.integers(1, 2100))
def test_behaves_like_a_set(adds: list[int], count: int) -> None:
    seen = ClusterMap(count)
    model: set[int] = set()
    for cluster in adds:
        assert seen.add(cluster) == (cluster not in model)
        model.add(cluster)
    assert seen.seen == len(model)
    assert seen.runs == _runs(model)  # adjacent clusters always merge
    assert all((c in seen) == (c in model) for c in range(-1, 2002))
    missing = next((c for c in range(count) if c not in model), None)
    assert seen.first_missing() == missing


@settings(max_examples=200, deadline=None)
@given(st.permutations(list(range(600))))
def test_values_count_up_within_a_run(order: list[int]) -> None:
    """With values, a run holds only clusters whose values follow on (the spill slots of the checksums)."""
    held = ClusterMap(600, values=True)
    value_of: dict[int, int] = {}
    for slot, cluster in enumerate(order):
        value = -1 if cluster % 7 == 0 else slot
        value_of[cluster] = value
        held.add(cluster, value)
    frontier = 0
    while (run := held.first_run()) is not None:
        start, end, value = run
        assert start == frontier
        for offset, cluster in enumerate(range(start, end)):
            assert value_of[cluster] == (-1 if value < 0 else value + offset)
        held.pop_first()
        frontier = end
    assert frontier == 600 and held.seen == 0 and held.runs == 0


def test_descending_order_is_one_run() -> None:
    seen = ClusterMap(1 << 32)
    for cluster in range(100_000, 0, -1):
        seen.add(cluster)
    assert seen.runs == 1 and seen.first_missing() == 0


def test_budget_is_shared_and_given_back() -> None:
    budget = RunBudget(limit=10)
    a, b = ClusterMap(100, budget=budget), ClusterMap(100, budget=budget)
    for cluster in range(0, 10, 2):
        a.add(cluster)
        b.add(cluster)
    assert budget.used == 10
    with pytest.raises(TooManyRuns, match="more than 10 separate runs"):
        a.add(50)
    assert 50 not in a
    a.add(1)  # joins two runs: one comes back
    assert budget.used == 9
    a.add(50)
    b.release()
    assert budget.used == 5 and b.first_missing() == 0
