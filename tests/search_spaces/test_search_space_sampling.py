"""Sampling through Optuna: conditional parameters are suggested only when their condition holds,
fixed parameters never reach the trial, values respect the declared ranges."""

from __future__ import annotations

import math
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from search_spaces import SearchSpace, load_preset
from search_spaces.sampling import distribution, suggest


def sample(s: SearchSpace, n: int, seed: int = 0) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(returned params, the trial's own params) for n random trials."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        params = suggest(s, trial)
        out.append((params, dict(trial.params)))
        study.tell(trial, 0.0)
    return out


def test_momentum_only_for_momentum_and_nesterov_trials() -> None:
    samples = sample(load_preset("default"), 200)
    seen = set()
    for params, trial_params in samples:
        seen.add(params["optimizer"])
        uses_momentum = params["optimizer"] in ("momentum", "nesterov")
        assert ("momentum" in params) == uses_momentum, params
        assert ("momentum" in trial_params) == uses_momentum, trial_params
        if uses_momentum:
            assert 0.5 <= params["momentum"] <= 0.99
    assert seen == {"sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw"}


def test_default_preset_ranges_and_log_scale() -> None:
    samples = sample(load_preset("default"), 300, seed=1)
    lrs = [p["learning_rate"] for p, _ in samples]
    wds = [p["weight_decay"] for p, _ in samples]
    assert all(1e-4 <= v <= 1e-1 for v in lrs)
    assert all(1e-8 <= v <= 1e-3 for v in wds)
    # log-uniform: about a third of the learning rates in each decade of [1e-4, 1e-1]
    low_decade = sum(v < 1e-3 for v in lrs) / len(lrs)
    assert 0.2 < low_decade < 0.47, low_decade
    assert all(0.0 <= p["dropout"] <= 0.5 for p, _ in samples)


def test_lecture_preset_samples_log_uniform_exponents() -> None:
    samples = sample(load_preset("lecture"), 400, seed=2)
    lr_exp = [math.log10(p["learning_rate"]) for p, _ in samples]
    wd_exp = [math.log10(p["weight_decay"]) for p, _ in samples]
    assert all(-6 <= e <= -2 for e in lr_exp)
    assert all(-8 <= e <= -4 for e in wd_exp)
    # 10^U(-6,-2): the exponent's mean is about -4, and each half of the range gets about half
    assert abs(sum(lr_exp) / len(lr_exp) + 4) < 0.25
    assert 0.4 < sum(e < -4 for e in lr_exp) / len(lr_exp) < 0.6
    assert abs(sum(wd_exp) / len(wd_exp) + 6) < 0.25


def test_fixed_parameters_are_returned_but_not_suggested() -> None:
    samples = sample(load_preset("practical-defaults"), 5)
    for params, trial_params in samples:
        assert params["optimizer"] == "nesterov"
        assert params["momentum"] == 0.9
        assert params["batch_norm"] is True
        assert set(trial_params) == {"learning_rate", "dropout"}


def test_int_step_and_categorical_bool() -> None:
    s = SearchSpace.model_validate(
        {
            "parameters": {
                "batch_size": {"type": "int", "low": 16, "high": 128, "step": 16},
                "batch_norm": {"type": "categorical", "choices": [True, False]},
            }
        }
    )
    for params, _ in sample(s, 50):
        assert params["batch_size"] % 16 == 0 and 16 <= params["batch_size"] <= 128
        assert params["batch_norm"] in (True, False)


def test_same_seed_same_samples() -> None:
    s = load_preset("default")
    assert sample(s, 20, seed=7) == sample(s, 20, seed=7)
    assert sample(s, 20, seed=7) != sample(s, 20, seed=8)


@pytest.mark.parametrize(
    ("param", "expected"),
    [
        (
            {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
            FloatDistribution(1e-4, 1e-1, log=True),
        ),
        ({"type": "int", "low": 16, "high": 64, "step": 16}, IntDistribution(16, 64, step=16)),
        (
            {"type": "categorical", "choices": ["sgd", "adam"]},
            CategoricalDistribution(["sgd", "adam"]),
        ),
        ({"type": "fixed", "value": "adam"}, None),
    ],
)
def test_distribution(param: dict[str, Any], expected: Any) -> None:
    name = (
        "optimizer"
        if param["type"] in ("categorical", "fixed")
        else ("batch_size" if param["type"] == "int" else "learning_rate")
    )
    s = SearchSpace.model_validate({"parameters": {name: param}})
    assert distribution(s, name) == expected
