"""service.trial_attrs: several trial writes in one transaction, on SQLite and PostgreSQL."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta

import optuna
import pytest
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages._rdb import models
from optuna.trial import TrialState
from sqlalchemy import event, func, select

from service.config import Settings
from service.db import JobStore, create_schema, make_engine
from service.spec import JobSpec
from service.studies import make_storage, rdb_backend, waiting_trial_ids
from service.trial_attrs import (
    REQUEUE_OF_ATTR,
    REQUEUED_ATTR,
    Tell,
    add_requeued_copy,
    claim_waiting_trial,
    create_trials,
    fail_trial,
    held_params,
    new_trials,
    record_heartbeats,
    set_intermediate_values,
    start_trial,
    start_trials,
    tell_trials,
    unsettled_failures,
)
from tests.support.specs import random_spec


def _sample(trial: optuna.Trial) -> dict[str, object]:
    return {
        "lr": trial.suggest_float("lr", 1e-5, 1e-1, log=True),
        "optimizer": trial.suggest_categorical("optimizer", ["sgd", "adam"]),
        "layers": trial.suggest_int("layers", 1, 4),
    }


def recorded_statements(study: optuna.Study) -> list[str]:
    """Every SQL statement the study's storage runs from now on (a live list)."""
    statements: list[str] = []
    backend = rdb_backend(study._storage)
    assert backend is not None
    event.listen(
        backend.engine,
        "before_cursor_execute",
        lambda _c, _cur, statement, *_: statements.append(statement),
    )
    return statements


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
    with held_params(b) as pending:
        values = _sample(b)
    start_trial(study, b, {"worker": "w"}, pending)
    trials = study.get_trials()
    assert [t.intermediate_values for t in trials] == [{2: 0.25}, {2: 0.75}]
    assert trials[1].params == values and trials[1].system_attrs["worker"] == "w"


def test_a_trial_start_is_a_few_statements_whatever_the_number_of_parameters(
    study_and_commits: tuple[optuna.Study, list[int]],
) -> None:
    study, _ = study_and_commits
    statements = recorded_statements(study)
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


def _told(study: optuna.Study) -> list[tuple[object, ...]]:
    """What telling left on each trial, in trial order (completion within a minute of now)."""
    now = datetime.now()
    return [
        (
            t.state,
            t.values,
            t.user_attrs,
            repr(t.intermediate_values),  # NaN != NaN
            t.datetime_complete is not None
            and abs(now - t.datetime_complete) < timedelta(minutes=1),
        )
        for t in study.get_trials()
    ]


def _population(study: optuna.Study) -> list[optuna.Trial]:
    """Five running trials: two reach epoch 3, one stops at 2, one has a NaN last epoch and
    one reported nothing."""
    trials = [study.ask() for _ in range(5)]
    for step in (1, 2, 3):
        set_intermediate_values(
            study, [(t, step, 0.1 * step + 0.01 * i) for i, t in enumerate(trials[:2])]
        )
    set_intermediate_values(study, [(trials[2], 1, 0.3), (trials[2], 2, 0.35)])
    set_intermediate_values(study, [(trials[3], 1, 0.2), (trials[3], 2, float("nan"))])
    return trials


_RESULTS = [  # (state, value, user attrs) per member of _population
    (TrialState.COMPLETE, 0.31, {"epochs_run": 3, "history": [{"epoch": 1}]}),
    (TrialState.COMPLETE, 0.32, {"epochs_run": 3}),
    (TrialState.PRUNED, None, {"epochs_run": 2}),
    (TrialState.PRUNED, None, {}),
    (TrialState.PRUNED, None, {"epochs_run": 0}),
]


def test_telling_a_population_stores_what_optunas_tell_stores_in_one_commit(
    study_and_commits: tuple[optuna.Study, list[int]], database_url: str
) -> None:
    study, commits = study_and_commits
    trials = _population(study)
    commits.clear()
    told = tell_trials(
        study,
        [
            Tell(t._trial_id, st, v, attrs)
            for t, (st, v, attrs) in zip(trials, _RESULTS, strict=True)
        ],
    )
    assert told == [True] * 5
    assert len(commits) == 1
    # The same results told trial by trial through Optuna's API, on a twin study.
    twin = optuna.create_study(storage=study._storage)
    twin_trials = _population(twin)
    for t, (state, value, attrs) in zip(twin_trials, _RESULTS, strict=True):
        for key, v in attrs.items():
            t.set_user_attr(key, v)
        twin.tell(t, value) if state == TrialState.COMPLETE else twin.tell(t, state=state)
    assert _told(study) == _told(twin)
    # pruned members' values: their last intermediate value (none for NaN or no report)
    assert [t.values for t in study.get_trials()][2:] == [[0.35], None, None]


def test_telling_skips_a_trial_failed_elsewhere_and_is_safe_to_repeat(
    study_and_commits: tuple[optuna.Study, list[int]],
) -> None:
    study, _ = study_and_commits
    a, b, c = study.ask(), study.ask(), study.ask()
    study._storage.set_trial_state_values(b._trial_id, TrialState.FAIL)  # the reaper's doing
    tells = [
        Tell(a._trial_id, TrialState.COMPLETE, 0.5, {"k": 1}),
        Tell(b._trial_id, TrialState.COMPLETE, 0.9, {"k": 2}),
        Tell(c._trial_id, TrialState.PRUNED, None, {"k": 3}),
    ]
    assert tell_trials(study, tells) == [True, False, True]
    failed = study._storage.get_trial(b._trial_id)
    assert failed.state == TrialState.FAIL and failed.values is None and failed.user_attrs == {}
    before = _told(study)
    # a repeat (the first call's answer lost): ours stay ours, unchanged; the failed one not
    assert tell_trials(study, tells) == [True, False, True]
    assert _told(study) == before


def test_a_tell_writes_the_trials_pending_reports_in_its_commit(
    study_and_commits: tuple[optuna.Study, list[int]],
) -> None:
    # A population's members carry the epoch values not written yet (worker.epoch_reports)
    # into their tell: stored with the result, and a PRUNED trial's value is the last of them.
    study, commits = study_and_commits
    a, b, c = study.ask(), study.ask(), study.ask()
    set_intermediate_values(study, [(a, 1, 0.4), (b, 1, 0.3)])  # written before
    commits.clear()
    told = tell_trials(
        study,
        [
            Tell(a._trial_id, TrialState.COMPLETE, 0.6, {}, {2: 0.5, 3: 0.6}),
            Tell(b._trial_id, TrialState.PRUNED, None, {}, {2: 0.35}),
            Tell(c._trial_id, TrialState.PRUNED, None, {}, {1: 0.1, 2: float("nan")}),
        ],
    )
    assert told == [True, True, True] and len(commits) == 1
    stored = {t.number: (t.intermediate_values, t.values) for t in study.get_trials()}
    assert stored[0] == ({1: 0.4, 2: 0.5, 3: 0.6}, [0.6])
    assert stored[1] == ({1: 0.3, 2: 0.35}, [0.35])
    assert stored[2][1] is None and stored[2][0][1] == 0.1  # last one NaN: no value, as Optuna


def test_a_tell_writes_pending_reports_on_other_storages_too() -> None:
    study = optuna.create_study()  # in memory: through Optuna's public API
    a = study.ask()
    assert tell_trials(study, [Tell(a._trial_id, TrialState.PRUNED, None, {}, {1: 0.2})]) == [True]
    assert (study.trials[0].intermediate_values, study.trials[0].value) == ({1: 0.2}, 0.2)


def test_telling_refuses_bad_results_and_unknown_trials(
    study_and_commits: tuple[optuna.Study, list[int]],
) -> None:
    study, _ = study_and_commits
    trial = study.ask()
    for bad in (
        Tell(trial._trial_id, TrialState.COMPLETE, None),
        Tell(trial._trial_id, TrialState.COMPLETE, float("nan")),
        Tell(trial._trial_id, TrialState.FAIL),
    ):
        with pytest.raises(ValueError, match=f"trial id {trial._trial_id}"):
            tell_trials(study, [bad])
    with pytest.raises(KeyError, match="no trial with id 999"):
        tell_trials(study, [Tell(999, TrialState.PRUNED)])
    assert study._storage.get_trial(trial._trial_id).state == TrialState.RUNNING


def test_telling_a_population_is_a_few_statements_whatever_its_size(
    study_and_commits: tuple[optuna.Study, list[int]],
) -> None:
    study, _ = study_and_commits
    backend = rdb_backend(study._storage)
    assert backend is not None
    statements: list[str] = []
    event.listen(
        backend.engine,
        "before_cursor_execute",
        lambda _c, _cur, statement, *_: statements.append(statement),
    )
    for size in (2, 16):
        trials = [study.ask() for _ in range(size)]
        set_intermediate_values(study, [(t, 1, 0.5) for t in trials])
        statements.clear()
        tells = [
            Tell(t._trial_id, TrialState.PRUNED if i % 2 else TrialState.COMPLETE, 0.5, {"a": i})
            for i, t in enumerate(trials)
        ]
        assert tell_trials(study, tells) == [True] * size
        # begin, lock, last intermediate values, attrs, values, state (one executemany each);
        # Optuna's tell runs about ten per trial, and each set_user_attr one transaction
        assert len(statements) <= 7, statements


def test_telling_on_other_storages_uses_optunas_tell() -> None:
    study = optuna.create_study()  # in-memory
    a, b, c = study.ask(), study.ask(), study.ask()
    a.report(0.4, 1)
    study.tell(c, state=TrialState.FAIL)
    told = tell_trials(
        study,
        [
            Tell(a._trial_id, TrialState.PRUNED, None, {"k": 1}),
            Tell(b._trial_id, TrialState.COMPLETE, 0.7),
            Tell(c._trial_id, TrialState.COMPLETE, 0.9),
        ],
    )
    assert told == [True, True, False]
    trials = study.get_trials()
    assert [(t.state, t.values) for t in trials] == [
        (TrialState.PRUNED, [0.4]),
        (TrialState.COMPLETE, [0.7]),
        (TrialState.FAIL, None),
    ]
    assert trials[0].user_attrs == {"k": 1}


def test_a_population_starts_in_one_commit_or_not_at_all(
    study_and_commits: tuple[optuna.Study, list[int]],
) -> None:
    study, commits = study_and_commits
    statements = recorded_statements(study)
    for size in (2, 9):
        trials = [study.ask() for _ in range(size)]
        starts, values = [], []
        for t in trials:
            with held_params(t) as pending:
                values.append(_sample(t))
            starts.append((t, {"worker": f"host:{t.number}"}, pending))
        commits.clear()
        statements.clear()
        start_trials(study, starts)
        assert len(commits) == 1
        assert len(statements) <= 8, statements  # whatever the population's size
        stored = [study._storage.get_trial(t._trial_id) for t in trials]
        assert [s.params for s in stored] == values
        assert [s.system_attrs["worker"] for s in stored] == [f"host:{t.number}" for t in trials]
    # one member finished meanwhile (the reaper failed it): nothing of the others is written
    trials = [study.ask() for _ in range(3)]
    starts = []
    for t in trials:
        with held_params(t) as pending:
            _sample(t)
        starts.append((t, {"worker": "host:x"}, pending))
    study.tell(trials[1], state=TrialState.FAIL)
    with pytest.raises(UpdateFinishedTrialError):
        start_trials(study, starts)
    assert all(study._storage.get_trial(t._trial_id).params == {} for t in trials)


def test_a_populations_new_trials_are_one_commit_numbered_as_optuna_numbers_them(
    study_and_commits: tuple[optuna.Study, list[int]],
) -> None:
    study, commits = study_and_commits
    assert study.ask().number == 0  # Optuna's own path first
    commits.clear()
    ids = create_trials(study, 5)
    assert len(commits) == 1
    trials = [optuna.Trial(study, trial_id) for trial_id in ids]
    assert [t.number for t in trials] == [1, 2, 3, 4, 5]
    assert study.ask().number == 6  # and Optuna's path goes on from there
    stored = study.get_trials()
    assert [t.number for t in stored] == list(range(7))
    assert all(t.state == TrialState.RUNNING and t.datetime_start for t in stored)
    trials[2].report(0.5, 1)  # Optuna's own writes work on them (its cache knows them)
    study.tell(trials[2], 0.5)
    assert study.get_trials()[3].value == 0.5


def test_new_trials_equal_what_optuna_reads_back(
    study_and_commits: tuple[optuna.Study, list[int]],
) -> None:
    """``new_trials`` builds ``optuna.Trial`` objects from the rows it wrote instead of reading
    each back: every attribute must be what ``optuna.Trial(study, id)`` sets (an attribute that
    a new Optuna adds to ``Trial.__init__`` fails here)."""
    study, commits = study_and_commits
    study.ask()
    commits.clear()
    made = new_trials(study, 3)
    assert len(commits) == 1
    assert [t.number for t in made] == [1, 2, 3]
    for trial in made:
        read = optuna.Trial(study, trial._trial_id)
        assert vars(trial).keys() == vars(read).keys()
        for key, value in vars(read).items():
            if key in ("study", "storage"):
                assert getattr(trial, key) is value
            else:
                assert getattr(trial, key) == value, key
    first = made[0]
    cache = study._storage._studies[study._study_id].trials  # type: ignore[attr-defined]
    assert first._cached_frozen_trial is not cache[first.number]  # its own copy
    x = first.suggest_float("x", 0.0, 1.0)  # they work as asked trials do
    first.report(0.25, 1)
    study.tell(first, x)
    stored = study.get_trials()[1]
    assert stored.params == {"x": x} and stored.intermediate_values == {1: 0.25}
    assert stored.state == TrialState.COMPLETE


def test_concurrent_creators_never_share_a_trial_number(database_url: str) -> None:
    import threading

    name = optuna.create_study(storage=make_storage(database_url)).study_name
    errors: list[BaseException] = []

    def create() -> None:
        try:
            study = optuna.load_study(study_name=name, storage=make_storage(database_url))
            for _ in range(5):
                create_trials(study, 4)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=create) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    study = optuna.load_study(study_name=name, storage=make_storage(database_url))
    assert sorted(t.number for t in study.trials) == list(range(3 * 5 * 4))


@pytest.mark.parametrize("n", [1, 4])
def test_trials_turned_running_by_a_worker_carry_a_beat_from_that_commit(
    database_url: str, n: int
) -> None:
    """New trials and a claimed WAITING one get their first heartbeat in the commit that makes
    them RUNNING: a worker killed before its heartbeat thread's first beat left trials that no
    stale check ever judged (a RUNNING trial without a beat is not judged), holding the job."""
    settings = Settings(heartbeat_interval_s=1, heartbeat_grace_s=1)
    storage = make_storage(database_url, settings, heartbeat=True)
    study = optuna.create_study(storage=storage)
    commits: list[int] = []
    event.listen(storage.engine, "commit", lambda _conn: commits.append(1))
    ids = create_trials(study, n)
    study.enqueue_trial({})
    [waiting] = waiting_trial_ids(storage, study._study_id)
    commits.clear()
    assert claim_waiting_trial(storage, waiting)
    assert len(commits) == 1
    assert not claim_waiting_trial(storage, waiting)  # RUNNING now: another worker's to run
    assert study._storage.get_trial(waiting).state == TrialState.RUNNING
    backend = rdb_backend(storage)
    assert backend is not None
    assert backend._get_stale_trial_ids(study._study_id) == []  # beats are fresh
    time.sleep(2.2)  # nobody beats again (the worker died): past the 1 s grace, all stale
    assert sorted(backend._get_stale_trial_ids(study._study_id)) == sorted([*ids, waiting])
    study.tell(study._storage.get_trial(waiting).number, state=TrialState.FAIL)
    with pytest.raises(UpdateFinishedTrialError):
        claim_waiting_trial(storage, waiting)
    storage.engine.dispose()


def test_without_heartbeats_no_beat_is_written(database_url: str) -> None:
    storage = make_storage(database_url)  # the API's storage: no heartbeat
    study = optuna.create_study(storage=storage)
    create_trials(study, 3)
    backend = rdb_backend(storage)
    assert backend is not None
    with backend.engine.connect() as conn:
        assert (
            conn.execute(select(func.count()).select_from(models.TrialHeartbeatModel)).scalar() == 0
        )
    storage.engine.dispose()


def test_a_failure_owes_its_slot_release_until_it_is_made_once(database_url: str) -> None:
    """fail_trial records what the failure owes (FAIL_SETTLE_ATTR); unsettled_failures lists
    the worker-failed trials older than the cut-off whose slot was not released; a release
    naming the trial happens once, also when racing threads try it together."""
    engine = make_engine(database_url)
    create_schema(engine)
    jobs = JobStore(engine)
    storage = make_storage(database_url)
    job, _ = jobs.create(JobSpec.model_validate(random_spec(n_trials=4)))
    assert jobs.reserve_slots(job.id, 4) == 4
    study = optuna.create_study(storage=storage)
    a, b, c = (study.ask() for _ in range(3))
    assert fail_trial(study, a._trial_id, "requeued: stop", requeue=True)
    assert fail_trial(study, b._trial_id, "ValueError: boom", counts_as_failure=True)
    storage.set_trial_state_values(c._trial_id, TrialState.FAIL)  # as the stale reaper fails

    later = time.time() + 60
    owed = unsettled_failures(study, later)
    assert [(u.number, u.requeue, u.counts_as_failure, u.reason) for u in owed] == [
        (a.number, True, False, "requeued: stop"),
        (b.number, False, True, "ValueError: boom"),
    ]
    assert all(later - 70 < u.failed_at < later for u in owed)
    assert unsettled_failures(study, time.time() - 60) == []  # too recent

    assert jobs.release_slot(job.id, trial_id=a._trial_id)
    assert not jobs.release_slot(job.id, trial_id=a._trial_id)  # repeated: nothing happens
    with ThreadPoolExecutor(4) as pool:  # racing releases of b: one wins
        won = list(
            pool.map(
                lambda _: jobs.release_slot(job.id, failed=True, trial_id=b._trial_id), range(4)
            )
        )
    assert won.count(True) == 1, won
    j = jobs.get(job.id)
    assert (j.reserved, j.failures) == (2, 1)
    assert unsettled_failures(study, later) == []
    storage.engine.dispose()
    engine.dispose()


def test_a_failed_trial_gets_one_requeued_copy_however_many_try_at_once(
    database_url: str,
) -> None:
    """The worker retrying through an outage and a reaper settling its failure may re-queue
    the same trial at the same moment: the copy's transaction marks the failed trial
    (REQUEUED_ATTR, unique), so one of them makes the copy and the others are told so."""
    storage = make_storage(database_url)
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    assert fail_trial(study, trial._trial_id, "requeued: stop", requeue=True)
    frozen = storage.get_trial(trial._trial_id)
    template = optuna.trial.create_trial(
        state=TrialState.WAITING, params=frozen.params, distributions=frozen.distributions
    )
    start = threading.Barrier(4)

    def requeue(_: int) -> bool:
        start.wait()
        return add_requeued_copy(study, trial._trial_id, template)

    with ThreadPoolExecutor(4) as pool:
        made = list(pool.map(requeue, range(4)))
    assert made.count(True) == 1, made
    assert not add_requeued_copy(study, trial._trial_id, template)  # and later: none either
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    assert len(waiting) == 1 and waiting[0].params == frozen.params
    assert waiting[0].number == 1 and REQUEUED_ATTR not in waiting[0].system_attrs
    assert REQUEUED_ATTR in storage.get_trial(trial._trial_id).system_attrs
    storage.engine.dispose()


def test_a_requeued_copy_on_other_storages_is_found_by_the_attempt_it_replaces() -> None:
    """In memory (one process) a finished trial cannot be marked: a copy carrying the failed
    trial's number in REQUEUE_OF_ATTR is what makes a second re-queue a no-op."""
    study = optuna.create_study()
    trial = study.ask()
    trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    assert fail_trial(study, trial._trial_id, "requeued: stop", requeue=True)
    template = optuna.trial.create_trial(
        state=TrialState.WAITING,
        params=trial.params,
        distributions=trial.distributions,
        system_attrs={REQUEUE_OF_ATTR: trial.number},
    )
    assert add_requeued_copy(study, trial._trial_id, template)
    assert not add_requeued_copy(study, trial._trial_id, template)
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    assert [t.params for t in waiting] == [trial.params]
