"""The fully resolved hyperparameters of one trial.

``TrialConfig`` is plain data (no torch import) so the Optuna glue, the population trainer
and tests can build and compare configs cheaply. Every field is validated in
``__post_init__``; an invalid value raises ``SpecError`` (a ``ValueError``) whose ``field`` is
the offending field's name, because a bad config is a search-space problem, not a crash.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, NoReturn

from search_spaces.schema import ACTIVATIONS as _ACTIVATIONS
from search_spaces.schema import INITS as _INITS
from search_spaces.schema import LR_SCHEDULES as _LR_SCHEDULES
from search_spaces.schema import OPTIMIZERS as _OPTIMIZERS
from service import defaults
from service.errors import SpecError

# One vocabulary for the whole project: the search-space schema (the lowest layer) owns it, so a
# value the API accepts is always one the trainer knows.
ACTIVATIONS: tuple[str, ...] = _ACTIVATIONS
INITS: tuple[str, ...] = _INITS  # normal_0.01 is N(0, 0.01^2), the lectures' "too small" baseline
OPTIMIZERS: tuple[str, ...] = _OPTIMIZERS
LR_SCHEDULES: tuple[str, ...] = _LR_SCHEDULES
OBJECTIVES: tuple[str, ...] = ("val_accuracy", "val_loss")

# Which optimizers read which optional knob; passing a knob to another optimizer is an error
# rather than silently ignored, so a searched dimension always means something.
_MOMENTUM_OPTIMIZERS = ("momentum", "nesterov", "rmsprop")
_BETA_OPTIMIZERS = ("adam", "adamw")
_MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed accepts at most a signed 64-bit value


@dataclass(frozen=True)
class TrialConfig:
    """Hyperparameters of one trial; equal configs on equal data train to equal results (CPU).

    ``momentum``/``beta1``/``beta2`` = None means the optimizer's default (0.9 for
    momentum/nesterov, 0 for rmsprop, torch's (0.9, 0.999) for adam/adamw).
    ``objective`` is maximized for ``val_accuracy`` and minimized for ``val_loss``.
    """

    hidden_layers: tuple[int, ...]
    activation: str = "relu"
    batch_norm: bool = False
    dropout: float = 0.0
    init: str = "he_normal"
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    momentum: float | None = None
    beta1: float | None = None
    beta2: float | None = None
    batch_size: int = defaults.BATCH_SIZE
    lr_schedule: str = "none"
    lr_gamma: float = 0.95
    max_epochs: int = defaults.MAX_EPOCHS
    patience: int | None = defaults.PATIENCE
    min_delta: float = 0.0
    objective: str = "val_accuracy"
    seed: int = 0

    def __post_init__(self) -> None:
        # Accept a list from JSON/YAML but store a tuple so the config stays hashable.
        if isinstance(self.hidden_layers, list):
            object.__setattr__(self, "hidden_layers", tuple(self.hidden_layers))
        if not isinstance(self.hidden_layers, tuple) or not all(
            _is_int(w) and w >= 1 for w in self.hidden_layers
        ):
            _fail("hidden_layers", f"must be a tuple of positive ints, got {self.hidden_layers!r}")
        _choice("activation", self.activation, ACTIVATIONS)
        if not isinstance(self.batch_norm, bool):
            _fail("batch_norm", f"must be a bool, got {self.batch_norm!r}")
        self._float("dropout", lo=0.0, hi=1.0, hi_open=True)
        _choice("init", self.init, INITS)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        self._float("learning_rate", lo=0.0, lo_open=True)
        self._float("weight_decay", lo=0.0)
        self._optional_float("momentum", lo=0.0, hi=1.0, hi_open=True)
        if self.momentum is not None:
            if self.optimizer not in _MOMENTUM_OPTIMIZERS:
                _fail("momentum", f"is only used by {_MOMENTUM_OPTIMIZERS}, not {self.optimizer!r}")
            if self.optimizer in ("momentum", "nesterov") and self.momentum == 0.0:
                _fail("momentum", f"must be > 0 for {self.optimizer!r} (0 is plain 'sgd')")
        for beta in ("beta1", "beta2"):
            self._optional_float(beta, lo=0.0, hi=1.0, hi_open=True)
            if getattr(self, beta) is not None and self.optimizer not in _BETA_OPTIMIZERS:
                _fail(beta, f"is only used by {_BETA_OPTIMIZERS}, not {self.optimizer!r}")
        _positive_int("batch_size", self.batch_size)
        if self.batch_norm and self.batch_size < 2:
            # BatchNorm cannot compute batch statistics from a single sample.
            _fail("batch_size", "must be >= 2 with batch_norm")
        _choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        self._float("lr_gamma", lo=0.0, hi=1.0, lo_open=True)
        _positive_int("max_epochs", self.max_epochs)
        if self.patience is not None:
            _positive_int("patience", self.patience)
        self._float("min_delta", lo=0.0)
        _choice("objective", self.objective, OBJECTIVES)
        if not _is_int(self.seed) or not 0 <= self.seed <= _MAX_SEED:
            _fail("seed", f"must be an int in [0, 2**63), got {self.seed!r}")

    @property
    def direction(self) -> str:
        """``"maximize"`` for val_accuracy, ``"minimize"`` for val_loss (Optuna's wording)."""
        return "maximize" if self.objective == "val_accuracy" else "minimize"

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrialConfig:
        """Build from a plain mapping (e.g. Optuna params merged with fixed settings).

        Unknown keys raise instead of being dropped: a misspelled hyperparameter would
        otherwise silently train with the default.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            _fail(unknown[0], f"unknown hyperparameter(s) {unknown}")
        return cls(**values)

    def _float(
        self,
        name: str,
        *,
        lo: float | None = None,
        hi: float | None = None,
        lo_open: bool = False,
        hi_open: bool = False,
    ) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            _fail(name, f"must be a number, got {value!r}")
        value = float(value)  # ints from JSON become floats so equal configs compare equal
        if not math.isfinite(value):
            _fail(name, f"must be finite, got {value!r}")
        if lo is not None and (value < lo or (lo_open and value == lo)):
            _fail(name, f"must be {'>' if lo_open else '>='} {lo}, got {value!r}")
        if hi is not None and (value > hi or (hi_open and value == hi)):
            _fail(name, f"must be {'<' if hi_open else '<='} {hi}, got {value!r}")
        object.__setattr__(self, name, value)

    def _optional_float(self, name: str, **bounds: Any) -> None:
        if getattr(self, name) is not None:
            self._float(name, **bounds)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        _fail(name, f"must be a positive int, got {value!r}")


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        _fail(name, f"must be one of {allowed}, got {value!r}")


def _fail(name: str, message: str) -> NoReturn:
    raise SpecError(message, field=name)


__all__ = ["ACTIVATIONS", "INITS", "LR_SCHEDULES", "OBJECTIVES", "OPTIMIZERS", "TrialConfig"]
