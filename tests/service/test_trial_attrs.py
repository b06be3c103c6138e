"""service.trial_attrs: several trial writes in one transaction, on SQLite and PostgreSQL."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import optuna
import pytest
from optuna.exceptions import UpdateFinishedTrialError
from sqlalchemy import event

from service.config import Settings
from service.studies import make_storage, rdb_backend
from service.trial_attrs import (
    held_params,
    record_heartbeats,
    set_intermediate_values,
    set_user_attrs,
    start_trial,
)


def _sample(trial: optuna.Trial) -> dict[str, object]:
    return {
        "lr": trial.suggest_float("lr", 1e-5, 1e-1, log=True),
        "optimizer": trial.suggest_categorical("optimizer", ["sgd", "adam"]),
        "layers": trial.suggest_int("layers", 1, 4),
    }


@pytest.fixture
def study_and_commits(database_url: str) -> Iterator[tuple[optuna.Study, list[int]]]:
    """A study on the product's storage (SQLite file, then PostgreSQL) counting its commits."""
    storage = make_storage(database_url)
    commits: list[int] = []
    event.listen(storage.engine, "commit", lambda _conn: commits.append(1))
    yield optuna.create_study(storage=storage), commits
    storage.engine.dispose()


def test_a_population_epoch_is_one_commit_and_visible_to_pruning(
    study_and_commits: tuple[optuna.Study, list[int]],
) -> None:
    study, commits = study_and_commits
    trials = [study.ask() for _ in range(4)]
    commits.clear()
    set_intermediate_values(study, [(t, 1, 0.1 * i) for i, t in enumerate(trials)])
    assert len(commits) == 1
    stored = {t.number: t.intermediate_values for t in study.get_trials()}
    assert stored == {t.number: {1: pytest.approx(0.1 * i)} for i, t in enumerate(trials)}
    # each trial's own cached copy (what Trial.should_prune reads) has the value too
    assert [t._get_latest_trial().intermediate_values for t in trials] == [
        {1: pytest.approx(0.1 * i)} for i in range(4)
    ]


def test_reports_are_all_or_nothing_when_a_trial_is_finished(
    study_and_commits: tuple[optuna.Study, list[int]],
) -> None:
    study, _ = study_and_commits
    a, b = study.ask(), study.ask()
    study.tell(b, 1.0)  # finished elsewhere (e.g. failed by the reaper)
    with pytest.raises(UpdateFinishedTrialError, match="already finished"):
        set_intermediate_values(study, [(a, 1, 0.5), (b, 1, 0.5)])
    assert study._storage.get_trial(a._trial_id).intermediate_values == {}
    assert a._get_latest_trial().intermediate_values == {}


def test_user_attrs_are_one_commit_an_upsert_and_refused_once_finished(
    study_and_commits: tuple[optuna.Study, list[int]],
) -> None:
    study, commits = study_and_commits
    trial = study.ask()
    attrs = {"history": [{"epoch": 1, "val_accuracy": 0.5}], "epochs_run": 1, "note": None}
    commits.clear()
    set_user_attrs(study, trial, attrs)
    assert len(commits) == 1
    set_user_attrs(study, trial, {"epochs_run": 2, "seed": 7})  # a retry overwrites
    stored = study._storage.get_trial(trial._trial_id).user_attrs
    assert stored == {**attrs, "epochs_run": 2, "seed": 7}
    study.tell(trial, 0.5)
    with pytest.raises(UpdateFinishedTrialError):
        set_user_attrs(study, trial, {"late": True})
    assert "late" not in study._storage.get_trial(trial._trial_id).user_attrs


def test_a_trial_start_is_one_commit_with_the_values_optuna_would_sample(
    study_and_commits: tuple[optuna.Study, list[int]],
) -> None:
    study, commits = study_and_commits
    study.sampler = optuna.samplers.RandomSampler(seed=3)
    trial = study.ask()
    with held_params(trial) as pending:
        values = _sample(trial)
        assert study._storage.get_trial(trial._trial_id).params == {}  # nothing written yet
    assert trial.storage is study._storage  # the trial's own storage is back
    commits.clear()
    start_trial(study, trial, {"worker": "host:1"}, pending)
    assert len(commits) == 1
    stored = study._storage.get_trial(trial._trial_id)
    assert stored.params == values == trial.params
    assert stored.system_attrs["worker"] == "host:1"
    # the same seed through Optuna's ordinary one-write-per-parameter path: the same values
    plain = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    assert _sample(plain.ask()) == values
    # a repeat (the first commit went through but its answer was lost) changes nothing
    start_trial(study, trial, {"worker": "host:1"}, pending)
    assert study._storage.get_trial(trial._trial_id).params == values


def test_a_trial_start_is_refused_whole_once_finished_or_incompatible(
    study_and_commits: tuple[optuna.Study, list[int]],
) -> None:
    study, _ = study_and_commits
    first = study.ask()
    with held_params(first) as pending:
        _sample(first)
    start_trial(study, first, {}, pending)
    finished = study.ask()
    with held_params(finished) as pending:
        _sample(finished)
    study.tell(finished, state=optuna.trial.TrialState.FAIL)  # e.g. the reaper failed it
    with pytest.raises(UpdateFinishedTrialError):
        start_trial(study, finished, {"worker": "host:2"}, pending)
    assert study._storage.get_trial(finished._trial_id).params == {}
    # a parameter whose distribution contradicts the study's: nothing of the start is written
    other = study.ask()
    with held_params(other) as pending:
        other.suggest_float("dropout", 0.0, 0.5)
        other.suggest_categorical("lr", ["a", "b"])  # "lr" is a log-float in this study
    with pytest.raises(ValueError, match="parameter 'lr': Cannot set different distribution"):
        start_trial(study, other, {"worker": "host:3"}, pending)
    stored = study._storage.get_trial(other._trial_id)
    assert stored.params == {} and "worker" not in stored.system_attrs


def test_a_grid_sampler_trial_starts_with_its_grid_point(database_url: str) -> None:
    storage = make_storage(database_url)
    grid = {"lr": [1e-3, 1e-2], "optimizer": ["sgd", "adam"], "layers": [1, 2]}
    study = optuna.create_study(storage=storage, sampler=optuna.samplers.GridSampler(grid, seed=0))
    seen = set()
    for _ in range(8):  # all asked before any is told: grid points are handed out at ask
        trial = study.ask()
        with held_params(trial) as pending:
            values = _sample(trial)
        start_trial(study, trial, {}, pending)
        seen.add(tuple(values.values()))
    assert len(seen) == 8  # every grid point once
    assert {tuple(t.params[k] for k in ("lr", "optimizer", "layers")) for t in study.trials} == seen
    storage.engine.dispose()


def test_other_storages_fall_back_to_the_public_api() -> None:
    study = optuna.create_study()  # in-memory
    a, b = study.ask(), study.ask()
    set_intermediate_values(study, [(a, 2, 0.25), (b, 2, 0.75)])
    set_user_attrs(study, a, {"k": [1, 2]})
    with held_params(b) as pending:
        values = _sample(b)
    start_trial(study, b, {"worker": "w"}, pending)
    trials = study.get_trials()
    assert [t.intermediate_values for t in trials] == [{2: 0.25}, {2: 0.75}]
    assert trials[0].user_attrs == {"k": [1, 2]}
    assert trials[1].params == values and trials[1].system_attrs["worker"] == "w"


def test_a_trial_start_is_a_few_statements_whatever_the_number_of_parameters(
    study_and_commits: tuple[optuna.Study, list[int]],
) -> None:
    study, _ = study_and_commits
    statements: list[str] = []
    backend = rdb_backend(study._storage)
    assert backend is not None
    event.listen(
        backend.engine,
        "before_cursor_execute",
        lambda _c, _cur, statement, *_: statements.append(statement),
    )
    for n_params in (1, 12):
        trial = study.ask()
        with held_params(trial) as pending:
            values = {f"p{i}": trial.suggest_float(f"p{i}", 0.0, 1.0) for i in range(n_params)}
        statements.clear()
        start_trial(study, trial, {"worker": "host:1"}, pending)
        # begin, lock, claim, stored names, earlier distributions, one insert (no per-row
        # statements: Optuna's own path runs three per parameter)
        assert len(statements) <= 7, statements
        assert study._storage.get_trial(trial._trial_id).params == values


def test_a_population_heartbeat_is_one_commit_on_the_database_clock(
    database_url: str,
) -> None:
    settings = Settings(heartbeat_interval_s=1, heartbeat_grace_s=1)
    storage = make_storage(database_url, settings, heartbeat=True)
    commits: list[int] = []
    event.listen(storage.engine, "commit", lambda _conn: commits.append(1))
    study = optuna.create_study(storage=storage)
    trials = [study.ask() for _ in range(4)]
    backend = rdb_backend(storage)
    assert backend is not None
    for _ in range(2):  # the first beat inserts the rows, the second updates them
        commits.clear()
        record_heartbeats(storage, [t._trial_id for t in trials[:3]])
        assert len(commits) == 1
        assert backend._get_stale_trial_ids(study._study_id) == []
    time.sleep(2.2)  # past the 1 s grace by the database's own clock: all three are stale
    record_heartbeats(storage, [trials[0]._trial_id])  # ... but this one beat again
    stale = set(backend._get_stale_trial_ids(study._study_id))
    assert stale == {t._trial_id for t in trials[1:3]}  # the 4th never beat: not judged
    storage.engine.dispose()


def test_a_heartbeat_is_stored_in_the_form_the_stale_check_compares_with(
    database_url: str,
) -> None:
    """Optuna's stale check compares stored beats with a bound datetime (now - grace); on SQLite
    that is a string comparison, so a beat stored as a raw CURRENT_TIMESTAMP ("12:00:05",
    what Optuna's own first beat stores) sorts before "12:00:05.000000" and is judged up to a
    second early. Ours are bound datetimes too, on the first beat and every later one."""
    storage = make_storage(database_url, Settings(), heartbeat=True)
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    for _ in range(2):  # insert, then update
        record_heartbeats(storage, [trial._trial_id])
        with storage.engine.connect() as conn:
            text = conn.exec_driver_sql("SELECT CAST(heartbeat AS TEXT) FROM trial_heartbeats")
            (stored,) = text.scalars().all()
        if database_url.startswith("sqlite"):  # PostgreSQL: a timestamp column, no text form
            assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}", stored), stored
    storage.engine.dispose()
