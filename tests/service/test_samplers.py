"""service.samplers: a seeded search draws per trial, so several workers (each with its own
sampler instance, as every worker process has) never repeat each other's parameters."""

from __future__ import annotations

import optuna
import pytest
from optuna.samplers._lazy_random_state import LazyRandomState

from service.samplers import TrialSeededRandomSampler, TrialSeededTPESampler, stream_seed


def objective_params(trial: optuna.Trial) -> tuple[object, ...]:
    return (
        trial.suggest_float("lr", 1e-5, 1e-1, log=True),
        trial.suggest_float("dropout", 0.0, 0.5),
        trial.suggest_categorical("optimizer", ["sgd", "adam", "adamw"]),
        trial.suggest_int("width", 16, 512, log=True),
    )


def run(workers: int, n: int, make: type, order: str = "round-robin") -> dict[int, tuple]:
    """``n`` trials asked by ``workers`` sampler instances on one storage; params by number."""
    storage = optuna.storages.InMemoryStorage()
    studies = [
        optuna.create_study(study_name="s", storage=storage, sampler=make(7), load_if_exists=True)
        for _ in range(workers)
    ]
    params: dict[int, tuple] = {}
    for i in range(n):
        k = i % workers if order == "round-robin" else (workers - 1 if i < n // 2 else 0)
        trial = studies[k].ask()
        params[trial.number] = objective_params(trial)
        studies[k].tell(trial, float(sum(hash(str(p)) % 97 for p in params[trial.number])))
    return params


@pytest.mark.parametrize("make", [TrialSeededRandomSampler, TrialSeededTPESampler])
def test_workers_never_repeat_each_other_and_trial_k_is_the_same_anywhere(make: type) -> None:
    alone = run(1, 16, make)
    two = run(2, 16, make)
    three = run(3, 16, make, order="blocks")
    assert len(set(two.values())) == 16  # no duplicates across the two instances
    assert len(set(three.values())) == 16
    if make is TrialSeededRandomSampler:
        # random search: trial k's parameters do not depend on who sampled it, or when
        assert alone == two == three
    else:
        # TPE's start-up trials (10 by default) are random draws: the same everywhere
        assert [alone[k] for k in range(10)] == [two[k] for k in range(10)]


def test_optunas_own_seeded_sampler_repeats_across_workers() -> None:
    """What this module fixes: one stream per instance, so two workers duplicate trials."""
    two = run(2, 16, lambda seed: optuna.samplers.RandomSampler(seed=seed))  # type: ignore[arg-type, return-value]
    assert len(set(two.values())) == 8


def test_a_seed_reproduces_the_search() -> None:
    assert run(2, 8, TrialSeededRandomSampler) == run(2, 8, TrialSeededRandomSampler)
    assert run(1, 8, TrialSeededRandomSampler) != run(
        1,
        8,
        lambda seed: TrialSeededRandomSampler(seed + 1),  # type: ignore[arg-type, return-value]
    )


def test_tpe_workers_with_the_same_history_propose_different_points() -> None:
    storage = optuna.storages.InMemoryStorage()
    a, b = (
        optuna.create_study(
            study_name="t",
            storage=storage,
            sampler=TrialSeededTPESampler(3, n_startup_trials=4),
            load_if_exists=True,
        )
        for _ in range(2)
    )
    for _ in range(4):  # start-up trials, finished
        t = a.ask()
        a.tell(t, objective_params(t)[0])  # type: ignore[arg-type]
    ta, tb = a.ask(), b.ask()  # both past start-up, same finished history
    assert objective_params(ta) != objective_params(tb)


def _fresh_stream(seed: int, number: int, name: str) -> LazyRandomState:
    return LazyRandomState(stream_seed(seed, number, name))


class _FreshRandom(TrialSeededRandomSampler):
    """The per-draw stream as a new RandomState every time (what the samplers did before
    they re-seeded one): the reference for the re-seeded one."""

    def _stream(self, number: int, name: str) -> LazyRandomState:
        return _fresh_stream(self.seed, number, name)


class _FreshTPE(TrialSeededTPESampler):
    def __init__(self, seed: int, **kwargs: object) -> None:
        super().__init__(seed, **kwargs)  # type: ignore[arg-type]
        self._random_sampler = _FreshRandom(seed)

    def _stream(self, number: int, name: str) -> LazyRandomState:
        return _fresh_stream(self.seed, number, name)


@pytest.mark.parametrize(
    ("make", "fresh"),
    [
        (TrialSeededRandomSampler, _FreshRandom),
        (
            lambda seed: TrialSeededTPESampler(seed, n_startup_trials=4),
            lambda seed: _FreshTPE(seed, n_startup_trials=4),
        ),
        (
            lambda seed: TrialSeededTPESampler(seed, n_startup_trials=4, multivariate=True),
            lambda seed: _FreshTPE(seed, n_startup_trials=4, multivariate=True),
        ),
    ],
    ids=["random", "tpe", "tpe-multivariate"],
)
def test_one_reseeded_random_state_draws_what_a_new_one_per_draw_did(
    make: type, fresh: type
) -> None:
    """Re-seeding the sampler's RandomState per draw changes no trial's parameters (TPE: its
    start-up draws and the guided ones after them, whose candidates come from the same
    streams), and two workers still draw alike."""
    assert run(2, 24, make) == run(2, 24, fresh)
    assert run(1, 24, make) == run(1, 24, fresh)
