"""Optuna glue: storage on the shared database, samplers and pruners from the spec, grid
enqueueing (exactly one WAITING trial per grid point, also when the study is created twice)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from service.config import Settings
from service.spec import JobSpec
from service.studies import (
    GRID_ENQUEUED_ATTR,
    JOB_ID_ATTR,
    SPEC_ATTR,
    best_complete_value,
    completed_trial_ids,
    count_trials_by_state,
    create_job_study,
    learning_curves,
    load_job_study,
    make_pruner,
    make_sampler,
    make_storage,
)
from tests.support.specs import grid_spec, random_spec


def key(params: dict[str, object]) -> str:
    return json.dumps(params, sort_keys=True)


def test_grid_job_enqueues_each_point_once(database_url: str) -> None:
    storage = make_storage(database_url, Settings())
    spec = JobSpec.model_validate(grid_spec())
    study = create_job_study(storage, "g", spec, job_id="j1", max_grid_size=100)
    # created again (a retried submit, a second API replica): nothing is enqueued twice
    create_job_study(storage, "g", spec, job_id="j1", max_grid_size=100)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 16
    assert all(t.state == TrialState.WAITING for t in trials)
    points = {key(t.params) for t in trials}
    assert points == {key(p) for p in spec.grid_points(limit=100)}
    assert storage.get_study_system_attrs(study._study_id)[GRID_ENQUEUED_ATTR] is True
    assert study.user_attrs[JOB_ID_ATTR] == "j1"
    assert JobSpec.model_validate(study.user_attrs[SPEC_ATTR]) == spec


def test_grid_points_are_popped_once_each(tmp_path) -> None:  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'g.db'}"
    storage = make_storage(url, Settings())
    spec = JobSpec.model_validate(grid_spec())
    create_job_study(storage, "g", spec, job_id="j", max_grid_size=100)
    study = load_job_study(storage, "g", spec)
    asked = []
    for _ in range(16):
        t = study.ask()
        asked.append(key(t.params))
        study.tell(t, 0.5)
    assert len(set(asked)) == 16
    # nothing waits any more: a 17th ask samples fresh parameters instead of repeating a point
    assert not study.get_trials(deepcopy=False, states=(TrialState.WAITING,))


def test_grid_with_fixed_and_conditional_parameters() -> None:
    storage = optuna.storages.InMemoryStorage()
    spec = JobSpec.model_validate(
        random_spec(
            sampler={"type": "grid"},
            n_trials=None,
            search_space={
                "parameters": {
                    "init": {"type": "fixed", "value": "he_normal"},
                    "optimizer": {"type": "categorical", "choices": ["sgd", "momentum"]},
                    "momentum": {
                        "type": "categorical",
                        "choices": [0.5, 0.9],
                        "when": {"optimizer": ["momentum"]},
                    },
                }
            },
        )
    )
    study = create_job_study(storage, "c", spec, job_id="j", max_grid_size=10)
    params = sorted(key(t.params) for t in study.get_trials(deepcopy=False))
    # fixed parameters are not trial parameters; momentum only where the optimizer uses it
    assert params == sorted(
        key(p)
        for p in [
            {"optimizer": "sgd"},
            {"optimizer": "momentum", "momentum": 0.5},
            {"optimizer": "momentum", "momentum": 0.9},
        ]
    )


def test_random_job_enqueues_nothing() -> None:
    storage = optuna.storages.InMemoryStorage()
    study = create_job_study(
        storage, "r", JobSpec.model_validate(random_spec()), job_id="j", max_grid_size=10
    )
    assert study.get_trials() == []
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE


def test_val_loss_objective_minimizes() -> None:
    storage = optuna.storages.InMemoryStorage()
    spec = JobSpec.model_validate(random_spec(objective="val_loss"))
    study = create_job_study(storage, "r", spec, job_id="j", max_grid_size=10)
    assert study.direction == optuna.study.StudyDirection.MINIMIZE


@pytest.mark.parametrize(
    ("pruner", "cls"),
    [
        ({"type": "none"}, optuna.pruners.NopPruner),
        (
            {"type": "median", "n_startup_trials": 2, "n_warmup_steps": 1},
            optuna.pruners.MedianPruner,
        ),
        ({"type": "percentile", "percentile": 40}, optuna.pruners.PercentilePruner),
        ({"type": "successive_halving"}, optuna.pruners.SuccessiveHalvingPruner),
        ({"type": "hyperband", "min_resource": 1}, optuna.pruners.HyperbandPruner),
    ],
)
def test_pruners(pruner: dict[str, object], cls: type) -> None:
    assert isinstance(make_pruner(JobSpec.model_validate(random_spec(pruner=pruner))), cls)


def test_samplers_are_seeded() -> None:
    tpe = make_sampler(JobSpec.model_validate(random_spec(sampler={"type": "tpe", "seed": 3})))
    assert isinstance(tpe, optuna.samplers.TPESampler)
    rnd = make_sampler(JobSpec.model_validate(random_spec(sampler={"type": "random", "seed": 3})))
    assert isinstance(rnd, optuna.samplers.RandomSampler)


def test_completed_curves_are_what_the_percentile_pruner_reads(database_url: str) -> None:
    storage = make_storage(database_url, Settings())
    study = optuna.create_study(storage=storage, direction="maximize")
    for i in range(3):  # COMPLETE, with curves
        t = study.ask()
        for step in (3, 1, 2):
            t.report(0.1 * i + 0.01 * step, step)
        study.tell(t, 0.5)
    study.tell(study.ask(), 0.4)  # COMPLETE, reported nothing: still counts as a finished trial
    pruned = study.ask()
    pruned.report(0.9, 1)
    study.tell(pruned, state=TrialState.PRUNED)
    study.ask().report(float("nan"), 1)  # running: not finished
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    ids = completed_trial_ids(storage, study._study_id)
    assert ids == [t._trial_id for t in complete]
    curves = learning_curves(storage, ids)
    assert list(curves.values()) == [t.intermediate_values for t in complete]
    assert curves[ids[3]] == {} and list(curves[ids[0]]) == [1, 2, 3]  # steps in order
    assert learning_curves(storage, ids[1:2]) == {ids[1]: complete[1].intermediate_values}
    assert learning_curves(storage, []) == {}
    assert completed_trial_ids(optuna.storages.InMemoryStorage(), 0) is None


@pytest.mark.parametrize(
    "sampler",
    [
        {"type": "random", "seed": 3},
        {"type": "random"},
        {"type": "tpe", "seed": 3},
        {"type": "tpe"},
    ],
)
def test_the_service_samplers_do_nothing_after_a_trial(sampler: dict[str, object]) -> None:
    """service.trial_attrs.tell_trials tells a population without Optuna's tell, so without
    ``sampler.after_trial``: that is right only while every sampler built here does nothing
    there. A sampler that does (GridSampler, TPE with constraints) must be told through it."""
    s = make_sampler(JobSpec.model_validate(random_spec(sampler=sampler)))
    after_trial = type(s).after_trial
    assert after_trial in (
        optuna.samplers.BaseSampler.after_trial,
        optuna.samplers.TPESampler.after_trial,
    )
    if isinstance(s, optuna.samplers.TPESampler):
        assert s._constraints_func is None
        assert type(s._random_sampler).after_trial is optuna.samplers.BaseSampler.after_trial
    grid = make_sampler(JobSpec.model_validate(grid_spec()))
    assert type(grid).after_trial is optuna.samplers.BaseSampler.after_trial


@pytest.mark.parametrize("backend", ["sqlite", "memory"])
def test_trials_are_counted_by_state_in_one_query(tmp_path: Path, backend: str) -> None:
    storage: optuna.storages.BaseStorage | None = None
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'hpo.db'}"
        storage = make_storage(url, Settings(data_root=tmp_path))
    study = optuna.create_study(storage=storage, direction="maximize")
    for value in (0.1, 0.2):
        study.add_trial(optuna.trial.create_trial(value=value))
    study.add_trial(
        optuna.trial.create_trial(state=TrialState.PRUNED, intermediate_values={0: 0.1})
    )
    study.enqueue_trial({"x": 1.0})
    study.ask()  # takes the enqueued trial: RUNNING
    study.ask()  # a new one: RUNNING
    study.enqueue_trial({"x": 2.0})  # WAITING
    counts = count_trials_by_state(study._storage, study._study_id)
    assert counts == {
        TrialState.COMPLETE: 2,
        TrialState.PRUNED: 1,
        TrialState.RUNNING: 2,
        TrialState.WAITING: 1,
    }


def test_new_databases_are_stamped_with_the_scripts_read_once(tmp_path: Path) -> None:
    """make_storage's process reads Optuna's alembic scripts once (``_reuse_alembic_scripts``),
    and a database it creates passes Optuna's own, unpatched compatibility check."""
    import subprocess
    import sys

    from optuna.storages._rdb import storage as rdb

    manager = rdb._VersionManager
    assert getattr(manager._create_alembic_script, "reused", False)  # the hook is in place
    urls = [f"sqlite:///{tmp_path / f'db{i}.sqlite'}" for i in range(2)]
    storages = [make_storage(url) for url in urls]
    scripts = [s._version_manager._create_alembic_script() for s in storages]
    assert scripts[0] is scripts[1]
    check = (
        "import optuna, sys; from optuna.storages._rdb import storage as rdb\n"
        "assert not hasattr(rdb._VersionManager._create_alembic_script, 'reused')\n"
        "s = optuna.storages.RDBStorage(sys.argv[1])\n"  # raises if the schema is not current
        "m = s._version_manager\n"
        "print(m.get_current_version() == m.get_head_version())\n"
    )
    for url in urls:
        out = subprocess.run(
            [sys.executable, "-c", check, url], capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == "True", out.stderr
    for s in storages:
        s.engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "memory"])
@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_best_complete_value_is_optunas_best_value(
    tmp_path: Path, backend: str, direction: str
) -> None:
    storage: optuna.storages.BaseStorage | None = None
    if backend == "sqlite":
        storage = make_storage(f"sqlite:///{tmp_path / 'hpo.db'}", Settings(data_root=tmp_path))
    study = optuna.create_study(storage=storage, direction=direction)

    def best() -> float | None:
        return best_complete_value(study._storage, study._study_id, study.direction)

    assert best() is None  # no trial yet
    study.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED, value=None))
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL))
    study.ask()  # RUNNING, no value
    assert best() is None  # still no COMPLETE trial
    for value in (0.3, 0.9, 0.1):
        study.add_trial(optuna.trial.create_trial(value=value))
        assert best() == study.best_value
    assert best() == (0.9 if direction == "maximize" else 0.1)
    # Infinite values are stored apart from the finite ones (as NULL and a type).
    worst, better = (-math.inf, math.inf) if direction == "maximize" else (math.inf, -math.inf)
    study.add_trial(optuna.trial.create_trial(value=worst))
    assert best() == study.best_value == (0.9 if direction == "maximize" else 0.1)
    study.add_trial(optuna.trial.create_trial(value=better))
    assert best() == study.best_value == better
