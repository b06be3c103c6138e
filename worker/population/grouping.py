"""Grouping members while keeping their order: populations by architecture, runs by optimizer."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

T = TypeVar("T")


def grouped_indices(items: Sequence[T], key: Callable[[T], Hashable]) -> list[list[int]]:
    """Indices of ``items`` grouped by ``key``: groups in order of first appearance, members in
    their original order."""
    groups: dict[Hashable, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(key(item), []).append(i)
    return list(groups.values())
