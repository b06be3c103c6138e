"""worker.population.grouping: order-keeping groups."""

from __future__ import annotations

from worker.population.grouping import grouped_indices


def test_groups_in_order_of_first_appearance_members_in_order() -> None:
    items = ["adam", "sgd", "adam", "rmsprop", "sgd", "adam"]
    assert grouped_indices(items, lambda x: x) == [[0, 2, 5], [1, 4], [3]]
    assert grouped_indices([], lambda x: x) == []
    assert grouped_indices([3, 1, 4, 1, 5], lambda x: x % 2) == [[0, 1, 3, 4], [2]]
