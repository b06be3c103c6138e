from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from service.errors import SpecError
from worker.training import ACTIVATIONS, INITS, LR_SCHEDULES, OPTIMIZERS, TrialConfig


def test_defaults_are_valid_and_documented_values() -> None:
    config = TrialConfig(hidden_layers=(64, 32))
    assert (config.activation, config.init, config.optimizer) == ("relu", "he_normal", "adam")
    assert (config.batch_size, config.max_epochs, config.patience) == (128, 20, 3)
    assert config.objective == "val_accuracy" and config.direction == "maximize"
    assert TrialConfig(hidden_layers=(8,), objective="val_loss").direction == "minimize"


def test_allowed_names() -> None:
    assert OPTIMIZERS == ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw")
    assert set(INITS) == {
        "xavier_uniform",
        "xavier_normal",
        "he_uniform",
        "he_normal",
        "lecun_normal",
        "normal_0.01",
        "orthogonal",
    }
    assert set(ACTIVATIONS) == {"relu", "leaky_relu", "elu", "selu", "gelu", "tanh", "sigmoid"}
    assert LR_SCHEDULES == ("none", "exponential", "cosine")


def test_json_values_are_normalised() -> None:
    config = TrialConfig(hidden_layers=[16, 8], learning_rate=1, dropout=0)  # type: ignore[arg-type]
    assert config.hidden_layers == (16, 8)
    assert isinstance(config.learning_rate, float) and isinstance(config.dropout, float)
    assert config == TrialConfig(hidden_layers=(16, 8), learning_rate=1.0)
    assert hash(config) == hash(TrialConfig(hidden_layers=(16, 8), learning_rate=1.0))


def test_frozen() -> None:
    config = TrialConfig(hidden_layers=(4,))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.learning_rate = 0.1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("field", "overrides"),
    [
        ("hidden_layers", {"hidden_layers": (64, 0)}),
        ("hidden_layers", {"hidden_layers": "64"}),
        ("hidden_layers", {"hidden_layers": (True,)}),
        ("activation", {"activation": "swish"}),
        ("batch_norm", {"batch_norm": 1}),
        ("dropout", {"dropout": 1.0}),
        ("dropout", {"dropout": -0.1}),
        ("init", {"init": "he"}),
        ("optimizer", {"optimizer": "lbfgs"}),
        ("learning_rate", {"learning_rate": 0.0}),
        ("learning_rate", {"learning_rate": float("nan")}),
        ("learning_rate", {"learning_rate": "0.1"}),
        ("weight_decay", {"weight_decay": -1e-4}),
        ("momentum", {"optimizer": "adam", "momentum": 0.9}),
        ("momentum", {"optimizer": "sgd", "momentum": 0.9}),
        ("momentum", {"optimizer": "nesterov", "momentum": 0.0}),
        ("momentum", {"optimizer": "momentum", "momentum": 1.0}),
        ("beta1", {"optimizer": "sgd", "beta1": 0.9}),
        ("beta2", {"optimizer": "adam", "beta2": 1.0}),
        ("batch_size", {"batch_size": 0}),
        ("batch_size", {"batch_size": 1, "batch_norm": True}),
        ("lr_schedule", {"lr_schedule": "step"}),
        ("lr_gamma", {"lr_gamma": 0.0}),
        ("lr_gamma", {"lr_gamma": 1.5}),
        ("max_epochs", {"max_epochs": 0}),
        ("patience", {"patience": 0}),
        ("min_delta", {"min_delta": -0.1}),
        ("objective", {"objective": "accuracy"}),
        ("seed", {"seed": -1}),
        ("seed", {"seed": 2**63}),
    ],
)
def test_invalid_values_name_the_field(field: str, overrides: dict[str, Any]) -> None:
    values: dict[str, Any] = {"hidden_layers": (8,), **overrides}
    with pytest.raises(ValueError, match=field) as excinfo:
        TrialConfig(**values)
    assert isinstance(excinfo.value, SpecError)
    assert excinfo.value.field == field


def test_optional_knobs_accepted_where_they_apply() -> None:
    TrialConfig(hidden_layers=(8,), optimizer="rmsprop", momentum=0.0)
    TrialConfig(hidden_layers=(8,), optimizer="nesterov", momentum=0.5)
    TrialConfig(hidden_layers=(8,), optimizer="adamw", beta1=0.8, beta2=0.99)
    TrialConfig(hidden_layers=(), patience=None)  # no hidden layer = softmax regression


def test_from_dict_rejects_unknown_keys() -> None:
    assert TrialConfig.from_dict({"hidden_layers": [4], "optimizer": "sgd"}).optimizer == "sgd"
    with pytest.raises(SpecError, match="learning_rat") as excinfo:
        TrialConfig.from_dict({"hidden_layers": [4], "learning_rat": 0.1})
    assert excinfo.value.field == "learning_rat"
