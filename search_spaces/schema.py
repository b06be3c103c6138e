"""The search-space schema: declarative parameters, validated before anything runs.

A search space is data, never code: a mapping from a known hyperparameter name to one of four
parameter kinds (float, int, categorical, fixed), optionally conditional on an earlier
categorical parameter (``when: {optimizer: [momentum, nesterov]}``).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The names the engine understands, and what values each may take. Keeping the vocabulary
# here (the lowest layer) lets the API validate a spec without importing torch.
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw")
INITS = (
    "xavier_uniform",
    "xavier_normal",
    "he_uniform",
    "he_normal",
    "lecun_normal",
    "normal_0.01",
    "orthogonal",
)
ACTIVATIONS = ("relu", "leaky_relu", "elu", "selu", "gelu", "tanh", "sigmoid")
LR_SCHEDULES = ("none", "exponential", "cosine")

# name -> (python type of a value, allowed categorical values or None, numeric bounds check)
_CATEGORICAL_VOCAB: dict[str, tuple[str, ...]] = {
    "optimizer": OPTIMIZERS,
    "init": INITS,
    "activation": ACTIVATIONS,
    "lr_schedule": LR_SCHEDULES,
}
_NUMERIC: dict[str, tuple[float, float, bool, bool]] = {
    # name: (lowest allowed, highest allowed, low inclusive, high inclusive)
    "learning_rate": (0.0, 100.0, False, True),
    "weight_decay": (0.0, 1.0, True, True),
    "dropout": (0.0, 1.0, True, False),
    "momentum": (0.0, 1.0, True, False),
    "beta1": (0.0, 1.0, True, False),
    "beta2": (0.0, 1.0, True, False),
    "lr_gamma": (0.0, 1.0, False, True),
    "batch_size": (1, 1_000_000, True, True),
    "hidden_width": (1, 1_000_000, True, True),
    "n_hidden_layers": (1, 1_000, True, True),
}
DEFAULT_OPTIMIZER = "adam"  # what a trial uses when the space does not choose an optimizer
_OPTIMIZER_KNOBS = {
    "momentum": {"momentum", "nesterov", "rmsprop"},
    "beta1": {"adam", "adamw"},
    "beta2": {"adam", "adamw"},
}
_INTEGER_PARAMS = {"batch_size", "hidden_width", "n_hidden_layers"}
_BOOL_PARAMS = {"batch_norm"}
KNOWN_PARAMETERS = tuple(sorted([*_CATEGORICAL_VOCAB, *_NUMERIC, *_BOOL_PARAMS]))

ParamValue = float | int | str | bool


class _Param(BaseModel):
    model_config = ConfigDict(extra="forbid")

    when: dict[str, list[ParamValue]] | None = Field(
        default=None,
        description="Only sample this parameter when an earlier categorical parameter takes one of these values.",
    )


def _check_grid_repeats(grid: list[Any]) -> None:
    # A repeated value would enqueue the same grid point twice.
    if len(set(grid)) != len(grid):
        raise ValueError("grid values must not repeat")


def _on_step(offset: float, step: float) -> bool:
    k = offset / step  # the tolerance Optuna's FloatDistribution uses for "contains"
    return abs(k - round(k)) < 1.0e-8


class FloatParam(_Param):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = None
    grid: list[float] | None = Field(default=None, description="Values used by the grid sampler.")

    @model_validator(mode="after")
    def _check(self) -> FloatParam:
        for name in ("low", "high"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number")
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"log scale needs low > 0 (got low={self.low})")
        if self.log and self.step is not None:
            raise ValueError("step cannot be combined with log scale")
        if self.step is not None and self.step <= 0:
            raise ValueError("step must be > 0")
        if self.grid is not None:
            if not self.grid:
                raise ValueError("grid must list at least one value")
            bad = [v for v in self.grid if not math.isfinite(v) or not self.low <= v <= self.high]
            if bad:
                raise ValueError(
                    f"grid values {bad} lie outside [low, high] = [{self.low}, {self.high}]"
                )
            _check_grid_repeats(self.grid)
            if self.step is not None:
                # Optuna refuses an enqueued value off the step lattice; say so before submitting.
                off = [v for v in self.grid if not _on_step(v - self.low, self.step)]
                if off:
                    raise ValueError(
                        f"grid values {off} are not low + k * step (low={self.low}, step={self.step})"
                    )
        return self


class IntParam(_Param):
    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = 1
    grid: list[int] | None = None

    @model_validator(mode="after")
    def _check(self) -> IntParam:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"log scale needs low > 0 (got low={self.low})")
        if self.step <= 0:
            raise ValueError("step must be > 0")
        if self.log and self.step != 1:
            raise ValueError("step cannot be combined with log scale (Optuna needs step 1)")
        if self.grid is not None:
            if not self.grid:
                raise ValueError("grid must list at least one value")
            bad = [v for v in self.grid if not self.low <= v <= self.high]
            if bad:
                raise ValueError(
                    f"grid values {bad} lie outside [low, high] = [{self.low}, {self.high}]"
                )
            _check_grid_repeats(self.grid)
            off = [v for v in self.grid if (v - self.low) % self.step]
            if off:
                raise ValueError(
                    f"grid values {off} are not low + k * step (low={self.low}, step={self.step})"
                )
        return self

    def grid_values(self) -> list[int]:
        return (
            list(self.grid)
            if self.grid is not None
            else list(range(self.low, self.high + 1, self.step))
        )


class CategoricalParam(_Param):
    type: Literal["categorical"]
    choices: list[ParamValue]

    @field_validator("choices")
    @classmethod
    def _non_empty(cls, v: list[ParamValue]) -> list[ParamValue]:
        if not v:
            raise ValueError("choices must not be empty")
        if len({repr(c) for c in v}) != len(v):
            raise ValueError("choices must not repeat")
        return v


class FixedParam(_Param):
    type: Literal["fixed"]
    value: ParamValue


Parameter = Annotated[
    FloatParam | IntParam | CategoricalParam | FixedParam, Field(discriminator="type")
]


def _values_of(param: Parameter) -> list[Any] | None:
    """The finite values a parameter can take, or None when it is continuous without a grid."""
    if isinstance(param, CategoricalParam):
        return list(param.choices)
    if isinstance(param, FixedParam):
        return [param.value]
    if isinstance(param, IntParam):
        return param.grid_values()
    return list(param.grid) if param.grid is not None else None


def _check_value(name: str, value: Any) -> None:
    if name in _CATEGORICAL_VOCAB:
        if value not in _CATEGORICAL_VOCAB[name]:
            raise ValueError(
                f"unknown {name} {value!r}; choose from {', '.join(_CATEGORICAL_VOCAB[name])}"
            )
    elif name in _BOOL_PARAMS:
        if not isinstance(value, bool):
            raise ValueError(f"{name} takes true or false, got {value!r}")
    elif name in _NUMERIC:
        lo, hi, lo_inc, hi_inc = _NUMERIC[name]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{name} must be a number, got {value!r}")
        if name in _INTEGER_PARAMS and not float(value).is_integer():
            raise ValueError(f"{name} must be an integer, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}")
        below = value < lo or (value == lo and not lo_inc)
        above = value > hi or (value == hi and not hi_inc)
        if below or above:
            lb, rb = ("[" if lo_inc else "("), ("]" if hi_inc else ")")
            raise ValueError(f"{name} must lie in {lb}{lo}, {hi}{rb}, got {value!r}")


class SearchSpace(BaseModel):
    """A validated search space.

    Invariants: every parameter name is known to the engine; every value it can produce is legal
    for that name (optimizers, inits, ranges); a ``when`` clause refers to a categorical or fixed
    parameter defined *earlier* and to values that parameter can take.
    """

    model_config = ConfigDict(extra="forbid")

    description: str = ""
    parameters: dict[str, Parameter]

    @model_validator(mode="after")
    def _check_parameters(self) -> SearchSpace:
        if not self.parameters:
            raise ValueError("parameters must define at least one parameter")
        seen: dict[str, Parameter] = {}
        for name, param in self.parameters.items():
            where = f"parameters.{name}"
            if name not in KNOWN_PARAMETERS:
                raise ValueError(
                    f"{where}: unknown parameter; known: {', '.join(KNOWN_PARAMETERS)}"
                )
            _check_param_kind(name, param, where)
            if param.when:
                for parent, values in param.when.items():
                    parent_param = seen.get(parent)
                    if parent_param is None:
                        raise ValueError(
                            f"{where}.when: {parent!r} must be a parameter defined before {name!r}"
                        )
                    parent_values = _values_of(parent_param)
                    if (
                        not isinstance(parent_param, CategoricalParam | FixedParam)
                        or parent_values is None
                    ):
                        raise ValueError(f"{where}.when: {parent!r} must be categorical or fixed")
                    unknown = [v for v in values if v not in parent_values]
                    if unknown or not values:
                        raise ValueError(
                            f"{where}.when.{parent}: values {unknown or values} are not choices of {parent!r}"
                        )
            seen[name] = param
        self._check_optimizer_knobs()
        return self

    def _check_optimizer_knobs(self) -> None:
        """momentum / beta1 / beta2 only mean something for some optimizers; sampling them for
        another would be silently meaningless, so the space must say when they apply."""
        opt = self.parameters.get("optimizer")
        all_opts = set(_values_of(opt) or []) if opt is not None else {DEFAULT_OPTIMIZER}
        for knob, users in _OPTIMIZER_KNOBS.items():
            param = self.parameters.get(knob)
            if param is None:
                continue
            active = (
                set(param.when["optimizer"])
                if param.when and "optimizer" in param.when
                else all_opts
            )
            unused = sorted(str(o) for o in active - users)
            if unused:
                raise ValueError(
                    f"parameters.{knob}: only {', '.join(sorted(users))} use {knob}, but it would also be "
                    f"sampled for {', '.join(unused)}; add `when: {{optimizer: [...]}}` listing the optimizers "
                    "it applies to"
                )

    def is_active(self, name: str, params: dict[str, Any]) -> bool:
        """Whether ``name`` is sampled given the values already chosen for earlier parameters."""
        cond = self.parameters[name].when
        return cond is None or all(params.get(p) in vals for p, vals in cond.items())


def _check_param_kind(name: str, param: Parameter, where: str) -> None:
    if (name in _CATEGORICAL_VOCAB or name in _BOOL_PARAMS) and not isinstance(
        param, CategoricalParam | FixedParam
    ):
        raise ValueError(f"{where}: {name} must be categorical or fixed, not {param.type}")
    if name in _INTEGER_PARAMS and isinstance(param, FloatParam):
        raise ValueError(f"{where}: {name} takes integers; use type int")
    values: list[Any] = []
    if isinstance(param, FloatParam | IntParam):
        values = [param.low, param.high, *(param.grid or [])]
    else:
        values = _values_of(param) or []
    for v in values:
        try:
            _check_value(name, v)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
