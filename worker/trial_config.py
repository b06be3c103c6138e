"""From a job spec and a trial's sampled parameters to the fully resolved TrialConfig."""

from __future__ import annotations

from typing import Any

from service.spec import JobSpec
from worker.training import TrialConfig

# Searchable names that map 1:1 onto TrialConfig fields.
_DIRECT = (
    "learning_rate",
    "weight_decay",
    "optimizer",
    "dropout",
    "init",
    "momentum",
    "beta1",
    "beta2",
    "batch_size",
    "activation",
    "batch_norm",
    "lr_schedule",
    "lr_gamma",
)


def trial_seed(spec: JobSpec, original_trial_number: int) -> int:
    """A trial's seed: derived from the job's base seed and the trial's (original) number, so a
    retried trial trains with exactly the same seed and data order as the attempt it replaces."""
    return (spec.training.seed * 1_000_003 + original_trial_number * 7_919) % (2**31 - 1)


def resolve_config(spec: JobSpec, params: dict[str, Any], *, seed: int) -> TrialConfig:
    hidden = list(spec.model.hidden_layers)
    if "n_hidden_layers" in params:
        width = hidden[0] if hidden else 128
        hidden = [width] * int(params["n_hidden_layers"])
    if "hidden_width" in params:
        hidden = [int(params["hidden_width"])] * len(hidden)
    kwargs: dict[str, Any] = {
        "hidden_layers": tuple(hidden),
        "activation": spec.model.activation,
        "batch_norm": spec.model.batch_norm,
        "batch_size": spec.training.batch_size,
        "max_epochs": spec.training.max_epochs,
        "patience": spec.training.early_stopping.patience if spec.training.early_stopping else None,
        "min_delta": spec.training.early_stopping.min_delta
        if spec.training.early_stopping
        else 0.0,
        "objective": spec.objective,
        "seed": seed,
    }
    for name in _DIRECT:
        if name in params:
            kwargs[name] = params[name]
    if "batch_size" in kwargs:
        kwargs["batch_size"] = int(kwargs["batch_size"])
    for name in ("learning_rate", "weight_decay", "dropout"):
        if name in kwargs:
            kwargs[name] = float(kwargs[name])
    return TrialConfig(**kwargs)


def architecture_key(config: TrialConfig) -> tuple[Any, ...]:
    """Trials with equal keys can train together as one population."""
    return (config.hidden_layers, config.activation, config.batch_norm)
