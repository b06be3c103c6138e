"""The search-space schema: every invalid space is refused before anything runs, and the error
says which parameter (and which part of it) is wrong."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from search_spaces import (
    INITS,
    KNOWN_PARAMETERS,
    OPTIMIZERS,
    CategoricalParam,
    FixedParam,
    FloatParam,
    IntParam,
    SearchSpace,
)


def space(**params: Any) -> SearchSpace:
    return SearchSpace.model_validate({"parameters": params})


def error_text(params: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as info:
        SearchSpace.model_validate({"parameters": params})
    return str(info.value)


def test_a_valid_space_keeps_kinds_and_order() -> None:
    s = space(
        optimizer={"type": "categorical", "choices": ["sgd", "momentum"]},
        learning_rate={"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
        batch_size={"type": "int", "low": 16, "high": 128, "step": 16},
        init={"type": "fixed", "value": "he_normal"},
        momentum={"type": "float", "low": 0.5, "high": 0.99, "when": {"optimizer": ["momentum"]}},
    )
    assert list(s.parameters) == ["optimizer", "learning_rate", "batch_size", "init", "momentum"]
    assert isinstance(s.parameters["optimizer"], CategoricalParam)
    assert isinstance(s.parameters["learning_rate"], FloatParam)
    assert s.parameters["learning_rate"].log is True
    assert isinstance(s.parameters["batch_size"], IntParam)
    assert isinstance(s.parameters["init"], FixedParam)
    assert s.parameters["momentum"].when == {"optimizer": ["momentum"]}


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        # unknown names and kinds
        ({"foo": {"type": "fixed", "value": 1}}, ["parameters.foo", "unknown parameter"]),
        (
            {"dropout": {"type": "gaussian", "low": 0, "high": 1}},
            ["parameters.dropout", "gaussian"],
        ),
        ({"dropout": {"type": "float", "low": 0, "high": 0.5, "mean": 1}}, ["dropout", "mean"]),
        # vocabulary of categorical names
        (
            {"optimizer": {"type": "categorical", "choices": ["sgd", "lbfgs"]}},
            ["parameters.optimizer", "unknown optimizer 'lbfgs'"],
        ),
        (
            {"init": {"type": "fixed", "value": "zeros"}},
            ["parameters.init", "unknown init 'zeros'"],
        ),
        ({"activation": {"type": "fixed", "value": "swish"}}, ["parameters.activation", "swish"]),
        (
            {"optimizer": {"type": "float", "low": 0, "high": 1}},
            ["parameters.optimizer", "categorical or fixed"],
        ),
        (
            {"batch_norm": {"type": "fixed", "value": "yes"}},
            ["parameters.batch_norm", "true or false"],
        ),
        # numeric ranges
        (
            {"learning_rate": {"type": "float", "low": 0.0, "high": 1.0}},
            ["parameters.learning_rate", "(0.0, 100.0]"],
        ),
        (
            {"learning_rate": {"type": "float", "low": 0.1, "high": 1000.0}},
            ["parameters.learning_rate", "got 1000.0"],
        ),
        (
            {"dropout": {"type": "float", "low": 0.0, "high": 1.0}},
            ["parameters.dropout", "[0.0, 1.0)"],
        ),
        (
            {"weight_decay": {"type": "float", "low": -1e-4, "high": 1e-3}},
            ["parameters.weight_decay"],
        ),
        (
            {"batch_size": {"type": "float", "low": 16, "high": 64}},
            ["parameters.batch_size", "use type int"],
        ),
        ({"batch_size": {"type": "int", "low": 0, "high": 64}}, ["parameters.batch_size", "got 0"]),
        (
            {"learning_rate": {"type": "categorical", "choices": ["0.1"]}},
            ["parameters.learning_rate", "must be a number"],
        ),
        # float / int shapes
        (
            {"dropout": {"type": "float", "low": 0.4, "high": 0.1}},
            ["dropout", "low (0.4) must be <= high (0.1)"],
        ),
        (
            {"learning_rate": {"type": "float", "low": 0.0, "high": 0.1, "log": True}},
            ["learning_rate", "log scale needs low > 0"],
        ),
        (
            {
                "learning_rate": {
                    "type": "float",
                    "low": 1e-3,
                    "high": 0.1,
                    "log": True,
                    "step": 0.01,
                }
            },
            ["learning_rate", "step cannot be combined with log"],
        ),
        (
            {"dropout": {"type": "float", "low": 0.0, "high": 0.5, "step": 0}},
            ["dropout", "step must be > 0"],
        ),
        (
            {"dropout": {"type": "float", "low": 0.0, "high": 0.5, "grid": []}},
            ["dropout", "at least one value"],
        ),
        (
            {"dropout": {"type": "float", "low": 0.0, "high": 0.5, "grid": [0.1, 0.7]}},
            ["dropout", "[0.7] lie outside"],
        ),
        (
            {"dropout": {"type": "float", "low": 0.0, "high": 0.5, "grid": [0.1, 0.1]}},
            ["dropout", "must not repeat"],
        ),
        (
            {"dropout": {"type": "float", "low": 0.0, "high": 0.5, "step": 0.1, "grid": [0.25]}},
            ["dropout", "low + k * step"],
        ),
        (
            {"batch_size": {"type": "int", "low": 16, "high": 64, "step": 16, "grid": [20]}},
            ["batch_size", "low + k * step"],
        ),
        (
            {"batch_size": {"type": "int", "low": 16, "high": 256, "log": True, "step": 16}},
            ["batch_size", "log"],
        ),
        (
            {"batch_size": {"type": "int", "low": 64, "high": 16}},
            ["batch_size", "low (64) must be <= high (16)"],
        ),
        # categorical shape
        ({"optimizer": {"type": "categorical", "choices": []}}, ["optimizer", "must not be empty"]),
        (
            {"optimizer": {"type": "categorical", "choices": ["sgd", "sgd"]}},
            ["optimizer", "must not repeat"],
        ),
    ],
)
def test_invalid_parameters_name_the_field(params: dict[str, Any], expected: list[str]) -> None:
    text = error_text(params)
    for fragment in expected:
        assert fragment in text, f"{fragment!r} missing from: {text}"


def test_an_empty_space_is_refused() -> None:
    assert "at least one parameter" in error_text({})


def test_unknown_top_level_key_is_refused() -> None:
    with pytest.raises(ValidationError, match="paramters"):
        SearchSpace.model_validate({"paramters": {}})


class TestConditions:
    def test_parent_must_come_first(self) -> None:
        text = error_text(
            {
                "momentum": {
                    "type": "float",
                    "low": 0.5,
                    "high": 0.9,
                    "when": {"optimizer": ["momentum"]},
                },
                "optimizer": {"type": "categorical", "choices": ["sgd", "momentum"]},
            }
        )
        assert "parameters.momentum.when" in text
        assert "defined before 'momentum'" in text

    def test_parent_must_be_categorical_or_fixed(self) -> None:
        text = error_text(
            {
                "learning_rate": {"type": "float", "low": 1e-3, "high": 0.1},
                "dropout": {
                    "type": "float",
                    "low": 0,
                    "high": 0.5,
                    "when": {"learning_rate": [0.01]},
                },
            }
        )
        assert "parameters.dropout.when" in text
        assert "categorical or fixed" in text

    def test_condition_values_must_be_parent_choices(self) -> None:
        text = error_text(
            {
                "optimizer": {"type": "categorical", "choices": ["sgd", "momentum"]},
                "momentum": {
                    "type": "float",
                    "low": 0.5,
                    "high": 0.9,
                    "when": {"optimizer": ["nesterov"]},
                },
            }
        )
        assert "parameters.momentum.when.optimizer" in text
        assert "['nesterov']" in text

    def test_momentum_must_be_conditional_on_optimizers_that_use_it(self) -> None:
        text = error_text(
            {
                "optimizer": {"type": "categorical", "choices": ["sgd", "momentum", "adam"]},
                "momentum": {"type": "float", "low": 0.5, "high": 0.9},
            }
        )
        assert "parameters.momentum" in text
        assert "adam" in text and "sgd" in text

    def test_beta_conditional_on_adam_is_fine(self) -> None:
        s = space(
            optimizer={"type": "categorical", "choices": ["sgd", "adam", "adamw"]},
            beta1={
                "type": "float",
                "low": 0.8,
                "high": 0.95,
                "when": {"optimizer": ["adam", "adamw"]},
            },
        )
        assert s.is_active("beta1", {"optimizer": "adam"})
        assert not s.is_active("beta1", {"optimizer": "sgd"})

    def test_is_active_without_condition(self) -> None:
        s = space(dropout={"type": "float", "low": 0, "high": 0.5})
        assert s.is_active("dropout", {})


def test_vocabulary_matches_the_lectures() -> None:
    assert OPTIMIZERS == ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw")
    assert {
        "xavier_uniform",
        "xavier_normal",
        "he_uniform",
        "he_normal",
        "lecun_normal",
        "orthogonal",
    } <= set(INITS)
    for name in ("learning_rate", "weight_decay", "optimizer", "dropout", "init", "momentum"):
        assert name in KNOWN_PARAMETERS


def test_a_space_round_trips_through_json() -> None:
    s = space(
        optimizer={"type": "categorical", "choices": ["sgd", "momentum"]},
        momentum={"type": "float", "low": 0.5, "high": 0.99, "when": {"optimizer": ["momentum"]}},
    )
    again = SearchSpace.model_validate_json(s.model_dump_json())
    assert again == s
