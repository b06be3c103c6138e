"""Grid enumeration: every combination of the finite values, respecting conditional parameters."""

from __future__ import annotations

from typing import Any

from search_spaces.schema import FloatParam, SearchSpace, _values_of


class GridError(ValueError):
    """The space cannot be gridded (a continuous parameter without ``grid:``) or is too large."""


def grid_values(space: SearchSpace) -> dict[str, list[Any]]:
    """Finite values per parameter; raises GridError naming each continuous parameter."""
    values: dict[str, list[Any]] = {}
    missing = []
    for name, param in space.parameters.items():
        vals = _values_of(param)
        if vals is None:
            missing.append(name)
        else:
            values[name] = vals
    if missing:
        raise GridError(
            "grid search needs finite values: give "
            + ", ".join(f"parameters.{m}" for m in missing)
            + " a 'grid:' list (continuous parameters cannot be enumerated)"
        )
    return values


def grid_size(space: SearchSpace) -> int:
    """Number of grid points, computed without building them (conditional params branch)."""
    values = grid_values(space)
    return _count(space, values, list(space.parameters), {})


def _count(
    space: SearchSpace, values: dict[str, list[Any]], names: list[str], chosen: dict[str, Any]
) -> int:
    # Conditions only refer to categorical parents, so we branch on those and multiply the rest.
    if not names:
        return 1
    name, rest = names[0], names[1:]
    if not space.is_active(name, chosen):
        return _count(space, values, rest, chosen)
    is_parent = any(p.when and name in p.when for p in space.parameters.values())
    if not is_parent:
        return len(values[name]) * _count(space, values, rest, chosen)
    return sum(_count(space, values, rest, {**chosen, name: v}) for v in values[name])


def enumerate_grid(space: SearchSpace, *, limit: int) -> list[dict[str, Any]]:
    """All grid points in a stable order; refuses (GridError) a grid larger than ``limit``."""
    size = grid_size(space)
    if size > limit:
        raise GridError(f"grid has {size} points, more than the limit of {limit}")
    values = grid_values(space)
    points: list[dict[str, Any]] = [{}]
    for name in space.parameters:
        nxt: list[dict[str, Any]] = []
        for point in points:
            if space.is_active(name, point):
                nxt.extend({**point, name: v} for v in values[name])
            else:
                nxt.append(point)
        points = nxt
    assert len(points) == size
    return points


def is_float_param(space: SearchSpace, name: str) -> bool:
    return isinstance(space.parameters[name], FloatParam)
