"""worker.epoch_reports: running trials' epoch reports (a population's, a lone trial's) wait
and are written together, on real SQLite databases (and through a real worker for the whole
run)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState
from sqlalchemy import event
from sqlalchemy.engine import Engine

from service.config import Settings
from service.studies import make_storage
from tests.worker.test_population_runner import submit_job
from worker.epoch_reports import EpochReports
from worker.loop import Worker


@pytest.fixture
def report_writes() -> Iterator[list[int]]:
    """The number of rows of each statement writing intermediate values, by any engine here."""
    seen: list[int] = []

    def record(
        _conn: Any, _cursor: Any, statement: str, params: Any, _ctx: Any, many: bool
    ) -> None:
        if " ".join(statement.split()).lower().startswith("insert into trial_intermediate_values"):
            seen.append(len(params) if many else 1)

    event.listen(Engine, "before_cursor_execute", record)
    yield seen
    event.remove(Engine, "before_cursor_execute", record)


def _study(tmp_path: Path) -> optuna.Study:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    return optuna.create_study(storage=make_storage(url, Settings(data_root=tmp_path)))


def _stored(study: optuna.Study, trial: optuna.Trial) -> dict[int, float]:
    return study._storage.get_trial(trial._trial_id).intermediate_values


def no_retry(fn: Any, what: str) -> Any:
    return fn()


def _run(tmp_path: Path, interval_s: float, population: int = 4) -> tuple[optuna.Study, Settings]:
    """One worker, stacks of ``population`` (1: sequential trials), a median pruner: 12
    trials of 6 epochs."""
    settings, study, jobs, job_id = submit_job(
        tmp_path,
        population,
        n_trials=12,
        training={"max_epochs": 6, "early_stopping": None},
        pruner={"type": "median", "n_startup_trials": 4, "n_warmup_steps": 0},
    )
    settings = settings.model_copy(update={"epoch_report_interval_s": interval_s})
    assert Worker(settings, once=True).run() == 12
    assert jobs.get(job_id).state == "succeeded"
    return study, settings


@pytest.mark.parametrize("population", [4, 1], ids=["stacks", "sequential"])
def test_reports_are_written_with_the_tells_not_after_every_epoch(
    tmp_path: Path, report_writes: list[int], population: int
) -> None:
    study, _ = _run(tmp_path / "long", interval_s=3600, population=population)
    long_writes = list(report_writes)
    report_writes.clear()
    every_epoch, _ = _run(tmp_path / "zero", interval_s=0, population=population)

    for s in (study, every_epoch):
        trials = s.get_trials()
        assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
        assert any(t.state == TrialState.PRUNED for t in trials)
        for t in trials:
            # every epoch trained is stored, as the trial's own history says
            history = {h["epoch"]: h["val_accuracy"] for h in t.user_attrs["history"]}
            assert t.intermediate_values == history, t.number
            if t.state == TrialState.PRUNED:  # Optuna's PRUNED value: its last report
                assert t.value == t.intermediate_values[max(t.intermediate_values)]
    # With a long interval the reports ride in the tells: one write per tell (a few per stack);
    # with none, one per stack and epoch as well (and each member of a stack's epoch in it).
    epochs = sum(len(t.intermediate_values) for t in every_epoch.get_trials())
    assert sum(long_writes) == sum(len(t.intermediate_values) for t in study.get_trials())
    assert sum(report_writes) >= epochs
    assert len(long_writes) < len(report_writes) / 2, (long_writes, report_writes)
    if population == 1:  # one write per trial (in its tell) against one per epoch
        assert len(long_writes) == len(study.get_trials())
        assert len(report_writes) == epochs


def test_pending_reports_are_seen_by_the_trial_at_once_and_written_after_the_interval(
    tmp_path: Path,
) -> None:
    study = _study(tmp_path)
    a, b = study.ask(), study.ask()
    reports = EpochReports(study, interval_s=0.2)
    reports.add([(a, 1, 0.5), (b, 1, 0.6)])
    assert a._get_latest_trial().intermediate_values == {1: 0.5}  # what its pruner reads
    assert _stored(study, a) == {} and not reports.due()
    time.sleep(0.25)
    assert reports.due()
    reports.write(no_retry)
    assert (_stored(study, a), _stored(study, b)) == ({1: 0.5}, {1: 0.6})
    assert not reports.due()  # nothing pending
    reports.add([(a, 2, 0.7)])
    assert reports.take(a) == {2: 0.7} and reports.take(a) == {}  # the teller writes them


def test_a_member_failed_elsewhere_gets_the_error_and_the_others_are_written(
    tmp_path: Path,
) -> None:
    study = _study(tmp_path)
    a, b, c = study.ask(), study.ask(), study.ask()
    reports = EpochReports(study, interval_s=0)
    reports.add([(a, 1, 0.5), (b, 1, 0.6), (c, 1, 0.7)])
    study._storage.set_trial_state_values(b._trial_id, TrialState.FAIL)  # the reaper failed it
    reports.write(no_retry)
    assert (_stored(study, a), _stored(study, b), _stored(study, c)) == ({1: 0.5}, {}, {1: 0.7})
    reports.raise_error(a)  # nothing to raise
    with pytest.raises(UpdateFinishedTrialError):
        reports.raise_error(b)
    reports.raise_error(b)  # raised once: the member has ended


def test_a_stopped_member_gets_its_curve_written_with_its_stack_mates(tmp_path: Path) -> None:
    study = _study(tmp_path)
    a, b, c = study.ask(), study.ask(), study.ask()
    reports = EpochReports(study, interval_s=3600)
    reports.add([(a, 1, 0.5), (a, 2, 0.55), (b, 1, 0.6)])
    # Stack-mates stop together (SIGTERM, cancel): one commit for all that is pending.
    reports.write_trial(a, RuntimeError("worker is shutting down"))
    assert (_stored(study, a), _stored(study, b)) == ({1: 0.5, 2: 0.55}, {1: 0.6})
    assert reports.take(b) == {}
    # A lost trial's values are dropped with it, without a write.
    reports.add([(c, 1, 0.7)])
    reports.write_trial(c, UpdateFinishedTrialError("failed elsewhere"))
    assert _stored(study, c) == {} and reports.take(c) == {}


def test_a_stopped_member_is_written_alone_when_a_stack_mate_is_lost(tmp_path: Path) -> None:
    study = _study(tmp_path)
    a, b = study.ask(), study.ask()
    reports = EpochReports(study, interval_s=3600)
    reports.add([(a, 1, 0.5), (b, 1, 0.6)])
    study._storage.set_trial_state_values(b._trial_id, TrialState.FAIL)  # the reaper failed it
    reports.write_trial(a, RuntimeError("out of memory"))
    assert (_stored(study, a), _stored(study, b)) == ({1: 0.5}, {})
    assert reports.take(b) == {1: 0.6}  # still pending: its own tell or write finds it lost
