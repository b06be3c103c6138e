"""Seeded samplers whose randomness belongs to the trial, not to the worker process.

Optuna's seeded samplers keep one random stream per sampler instance. Every worker process
builds its own instance for a job, so N workers of a seeded random search would each draw the
same sequence: their first trials all get the same parameters, and the job spends its budget
on duplicates (found with ``hpo worker --processes 2``: trial k of one process repeated trial
k of the other). Here each draw comes from a stream seeded by (job seed, trial number,
parameter name), so trial k has the same parameters whichever worker samples it and in
whatever order, different from every other trial's, and a seed still reproduces the search.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
from optuna import Study
from optuna.distributions import BaseDistribution
from optuna.samplers import RandomSampler, TPESampler
from optuna.samplers._lazy_random_state import LazyRandomState
from optuna.trial import FrozenTrial


def trial_stream(seed: int, number: int, name: str) -> LazyRandomState:
    """The random state for one draw: a function of (seed, trial number, name) only."""
    entropy = [seed, number, zlib.crc32(name.encode())]
    return LazyRandomState(int(np.random.SeedSequence(entropy).generate_state(1)[0]))


class _DrawsPerTrial:
    """Mixin for a sampler with a ``_rng``: each independent draw gets its own stream."""

    seed: int
    _rng: LazyRandomState

    def sample_independent(
        self,
        study: Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        self._rng = trial_stream(self.seed, trial.number, param_name)
        return super().sample_independent(study, trial, param_name, param_distribution)  # type: ignore[misc]


class TrialSeededRandomSampler(_DrawsPerTrial, RandomSampler):
    """``RandomSampler(seed)`` with one stream per (trial, parameter)."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.seed = seed


class TrialSeededTPESampler(_DrawsPerTrial, TPESampler):
    """``TPESampler(seed)`` whose start-up draws and candidate draws are per (trial, parameter):
    concurrent workers that see the same finished trials still propose different points."""

    def __init__(self, seed: int, **kwargs: Any) -> None:
        super().__init__(seed=seed, **kwargs)
        self.seed = seed
        self._random_sampler = TrialSeededRandomSampler(seed)

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        self._rng = trial_stream(self.seed, trial.number, "")  # multivariate: one draw for all
        return super().sample_relative(study, trial, search_space)
