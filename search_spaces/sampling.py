"""Turn a SearchSpace into Optuna suggestions and Optuna distributions."""

from __future__ import annotations

from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from search_spaces.schema import CategoricalParam, FixedParam, FloatParam, IntParam, SearchSpace


def suggest(space: SearchSpace, trial: optuna.Trial) -> dict[str, Any]:
    """Ask the trial for each active parameter, in declaration order (conditions see parents).

    Fixed parameters are returned without touching the trial's parameters (they are not searched),
    so optuna-dashboard only shows the dimensions that vary.
    """
    params: dict[str, Any] = {}
    for name, param in space.parameters.items():
        if not space.is_active(name, params):
            continue
        if isinstance(param, FixedParam):
            params[name] = param.value
        elif isinstance(param, FloatParam):
            params[name] = trial.suggest_float(
                name, param.low, param.high, log=param.log, step=param.step
            )
        elif isinstance(param, IntParam):
            params[name] = trial.suggest_int(
                name, param.low, param.high, log=param.log, step=param.step
            )
        else:
            params[name] = trial.suggest_categorical(name, param.choices)
    return params


def distribution(space: SearchSpace, name: str) -> BaseDistribution | None:
    """The Optuna distribution a parameter is suggested from (None for fixed parameters)."""
    param = space.parameters[name]
    if isinstance(param, FloatParam):
        return FloatDistribution(param.low, param.high, log=param.log, step=param.step)
    if isinstance(param, IntParam):
        return IntDistribution(param.low, param.high, log=param.log, step=param.step)
    if isinstance(param, CategoricalParam):
        return CategoricalDistribution(param.choices)
    return None
