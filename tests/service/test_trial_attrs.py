"""service.trial_attrs: several trial writes in one transaction, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator

import optuna
import pytest
from optuna.exceptions import UpdateFinishedTrialError
from sqlalchemy import event

from service.studies import make_storage
from service.trial_attrs import set_intermediate_values, set_user_attrs


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


def test_other_storages_fall_back_to_the_public_api() -> None:
    study = optuna.create_study()  # in-memory
    a, b = study.ask(), study.ask()
    set_intermediate_values(study, [(a, 2, 0.25), (b, 2, 0.75)])
    set_user_attrs(study, a, {"k": [1, 2]})
    trials = study.get_trials()
    assert [t.intermediate_values for t in trials] == [{2: 0.25}, {2: 0.75}]
    assert trials[0].user_attrs == {"k": [1, 2]}
