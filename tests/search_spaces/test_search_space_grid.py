"""Grid enumeration: sizes are computed before anything runs, conditional parameters branch,
a grid over the limit is refused with its size."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest

from search_spaces import (
    GridError,
    SearchSpace,
    enumerate_grid,
    grid_size,
    grid_values,
    load_preset,
)


def space(**params: Any) -> SearchSpace:
    return SearchSpace.model_validate({"parameters": params})


def key(point: dict[str, Any]) -> str:
    return json.dumps(point, sort_keys=True)


def test_plain_product() -> None:
    s = space(
        optimizer={"type": "categorical", "choices": ["sgd", "adam", "adamw"]},
        learning_rate={
            "type": "float",
            "low": 1e-3,
            "high": 1e-1,
            "log": True,
            "grid": [1e-3, 1e-2],
        },
        batch_size={"type": "int", "low": 32, "high": 128, "step": 32},  # 32, 64, 96, 128
        init={"type": "fixed", "value": "he_normal"},
    )
    assert grid_size(s) == 3 * 2 * 4 * 1
    points = enumerate_grid(s, limit=100)
    assert len(points) == 24
    assert len({key(p) for p in points}) == 24
    expected = {
        key({"optimizer": o, "learning_rate": lr, "batch_size": b, "init": "he_normal"})
        for o, lr, b in itertools.product(["sgd", "adam", "adamw"], [1e-3, 1e-2], [32, 64, 96, 128])
    }
    assert {key(p) for p in points} == expected


def test_conditional_parameter_branches_only_under_its_parent() -> None:
    s = space(
        optimizer={"type": "categorical", "choices": ["sgd", "momentum", "nesterov", "adam"]},
        momentum={
            "type": "float",
            "low": 0.5,
            "high": 0.99,
            "grid": [0.5, 0.9, 0.99],
            "when": {"optimizer": ["momentum", "nesterov"]},
        },
        dropout={"type": "float", "low": 0.0, "high": 0.5, "grid": [0.0, 0.3]},
    )
    # sgd, adam: 1 x 2 each; momentum, nesterov: 3 x 2 each
    assert grid_size(s) == 2 * 2 + 2 * 3 * 2
    points = enumerate_grid(s, limit=1000)
    assert len(points) == 16
    assert len({key(p) for p in points}) == 16
    for p in points:
        assert ("momentum" in p) == (p["optimizer"] in ("momentum", "nesterov")), p
        assert "dropout" in p


def test_nested_conditions_count_like_they_enumerate() -> None:
    s = space(
        optimizer={"type": "categorical", "choices": ["sgd", "momentum", "rmsprop"]},
        lr_schedule={"type": "categorical", "choices": ["none", "exponential"]},
        momentum={
            "type": "categorical",
            "choices": [0.9, 0.99],
            "when": {"optimizer": ["momentum", "rmsprop"]},
        },
        lr_gamma={
            "type": "categorical",
            "choices": [0.9, 0.95, 0.99],
            "when": {"lr_schedule": ["exponential"]},
        },
    )
    points = enumerate_grid(s, limit=1000)
    # optimizer branch: sgd 1, momentum 2, rmsprop 2 = 5; schedule branch: none 1, exp 3 = 4
    assert grid_size(s) == len(points) == 5 * 4
    assert len({key(p) for p in points}) == len(points)


def test_grid_over_the_limit_is_refused_with_its_size() -> None:
    s = space(
        learning_rate={
            "type": "float",
            "low": 1e-4,
            "high": 1e-1,
            "log": True,
            "grid": [1e-4, 1e-3, 1e-2, 1e-1],
        },
        batch_size={"type": "int", "low": 1, "high": 1000},
    )
    assert grid_size(s) == 4000  # computed without building 4000 points
    with pytest.raises(GridError) as info:
        enumerate_grid(s, limit=3999)
    assert "4000" in str(info.value) and "3999" in str(info.value)
    assert len(enumerate_grid(s, limit=4000)) == 4000


def test_grid_size_of_a_huge_space_is_cheap() -> None:
    s = space(
        batch_size={"type": "int", "low": 1, "high": 100_000},
        hidden_width={"type": "int", "low": 1, "high": 100_000},
    )
    assert grid_size(s) == 10**10
    with pytest.raises(GridError, match="10000000000 points"):
        enumerate_grid(s, limit=10_000)


def test_continuous_parameters_without_grid_are_named() -> None:
    s = space(
        optimizer={"type": "categorical", "choices": ["sgd", "adam"]},
        learning_rate={"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
        dropout={"type": "float", "low": 0.0, "high": 0.5},
    )
    with pytest.raises(GridError) as info:
        grid_size(s)
    msg = str(info.value)
    assert "parameters.learning_rate" in msg and "parameters.dropout" in msg
    assert "optimizer" not in msg.split("give")[1].split("a 'grid:'")[0]


def test_grid_values_per_parameter() -> None:
    s = space(
        batch_size={"type": "int", "low": 16, "high": 64, "step": 16},
        n_hidden_layers={"type": "int", "low": 1, "high": 3, "grid": [1, 3]},
        batch_norm={"type": "categorical", "choices": [True, False]},
    )
    assert grid_values(s) == {
        "batch_size": [16, 32, 48, 64],
        "n_hidden_layers": [1, 3],
        "batch_norm": [True, False],
    }


def test_enumeration_order_is_stable() -> None:
    s = load_preset("grid-small")
    assert enumerate_grid(s, limit=100) == enumerate_grid(s, limit=100)
