"""worker.population_runner: a population's members are finished best first and counted into
their job once, on a real SQLite database through a real worker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState
from sqlalchemy import event
from sqlalchemy.engine import Engine

from service.config import Settings
from service.db import JobStore, create_schema, make_engine
from service.results import MODEL_ARTIFACT_ATTR
from service.spec import JobSpec
from service.studies import make_storage
from service.submission import submit
from tests.support.specs import random_spec
from worker import population_runner, trial_runner
from worker.loop import Worker


@pytest.fixture
def job_count_updates() -> Iterator[list[str]]:
    """Every UPDATE of a job's finished count, by any engine of this process."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        normalized = " ".join(statement.split()).lower()
        if normalized.startswith("update hpo_jobs set finished"):
            seen.append(normalized)

    event.listen(Engine, "before_cursor_execute", record)
    yield seen
    event.remove(Engine, "before_cursor_execute", record)


def submit_job(
    root: Path, population: int, **spec: Any
) -> tuple[Settings, optuna.Study, JobStore, str]:
    """A SQLite service in ``root`` for workers with ``population``, and a job submitted to it."""
    settings = Settings(data_root=root, population=population, heartbeat_interval_s=60)
    engine = make_engine(settings.resolved_database_url)
    create_schema(engine)
    jobs = JobStore(engine)
    storage = make_storage(settings.resolved_database_url, settings)
    job = submit(
        JobSpec.model_validate(random_spec(**spec)), settings=settings, jobs=jobs, storage=storage
    )[0]
    return settings, optuna.load_study(study_name=job.study_name, storage=storage), jobs, job.id


def run_one_population(
    root: Path, n_trials: int, seed: int = 0
) -> tuple[optuna.Study, JobStore, str]:
    """One worker, P = n_trials, a job of n_trials trials (no pruner): one population."""
    settings, study, jobs, job_id = submit_job(
        root,
        n_trials,
        n_trials=n_trials,
        training={"max_epochs": 3},
        sampler={"type": "random", "seed": seed},
    )
    assert Worker(settings, once=True).run() == n_trials
    return study, jobs, job_id


def test_a_population_counts_its_trials_into_the_job_once(
    tmp_path: Path, job_count_updates: list[str]
) -> None:
    study, jobs, job_id = run_one_population(tmp_path, 6)
    job = jobs.get(job_id)
    assert job.state == "succeeded"
    assert job.finished == 6 == len(study.get_trials(states=(TrialState.COMPLETE,)))
    # one count for the six members (it was one per member: six)
    assert len(job_count_updates) == 1, job_count_updates


def test_only_the_populations_best_member_saves_a_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    best_queries: list[float] = []
    is_new_best = trial_runner._is_new_best

    def counted(study: optuna.Study, value: float) -> bool:
        best_queries.append(value)
        return is_new_best(study, value)

    monkeypatch.setattr(trial_runner, "_is_new_best", counted)
    # Sampler seed 2: told in trial order, trials 0, 1 and 4 were each better than the ones
    # before them, so each was a new best, saved its weights and touched the test split.
    study, _, _ = run_one_population(tmp_path, 6, seed=2)
    saved = [t.number for t in study.get_trials() if MODEL_ARTIFACT_ATTR in t.user_attrs]
    assert best_queries == [study.best_value]  # the others cannot be better than the first
    assert saved == [study.best_trial.number]
    assert "test_accuracy" in study.best_trial.user_attrs
    assert all("test_accuracy" not in t.user_attrs for t in study.trials if t.number not in saved)


def test_a_pruned_member_is_told_while_its_population_trains_on(tmp_path: Path) -> None:
    """Pruned members are recorded when they leave the stack, not when the stack ends."""
    settings, study, jobs, job_id = submit_job(
        tmp_path,
        4,
        n_trials=12,
        training={"max_epochs": 6, "early_stopping": None},
        pruner={"type": "median", "n_startup_trials": 4, "n_warmup_steps": 0},
    )
    pruned_while_training: list[tuple[int, int]] = []  # (pruned trial, a stack-mate training on)

    class Listener:
        def epoch_done(self, job_: Any, number: int, metrics: Any) -> None:
            pruned = {t.number for t in study.get_trials(states=(TrialState.PRUNED,))}
            stack_mates = {p for p in pruned if p // 4 == number // 4 and p != number}
            pruned_while_training.extend((p, number) for p in stack_mates)

        def trials_done(self, job_: Any, outcomes: Any) -> None:
            pass

    assert Worker(settings, once=True, listener=Listener()).run() == 12
    pruned = {t.number for t in study.get_trials(states=(TrialState.PRUNED,))}
    # Stacks: trials 0-3 (the pruner's start-up trials), then 4-7 and 8-11, pruned against the
    # finished ones; some members of the last two were pruned, each told while a stack-mate
    # still trained (before, they stayed RUNNING until their stack ended).
    assert pruned and pruned <= set(range(4, 12))
    # Members pruned while a stack-mate trained on (more epochs than they did): each was
    # PRUNED in storage by the stack-mate's next epoch. (A member pruned at the same epoch as
    # the last of its stack-mates leaves with them; which members those are depends on the
    # arithmetic's rounding, so the test does not fix them.)
    epochs = {t.number: len(t.intermediate_values) for t in study.trials}
    outlived = {
        p
        for p in pruned
        if any(epochs[q] > epochs[p] for q in range(p // 4 * 4, p // 4 * 4 + 4) if q != p)
    }
    assert outlived, epochs
    assert outlived <= {p for p, _ in pruned_while_training}, epochs
    assert jobs.get(job_id).finished == 12


def test_a_member_failed_before_its_claim_fails_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A population is claimed in one transaction; when one member was finished meanwhile
    (the reaper failed it) the others are claimed one by one and train as usual."""
    real = trial_runner.start_trials
    failed: list[int] = []

    def reaper_first(study: optuna.Study, starts: Any) -> None:
        if not failed:
            victim = starts[1][0]
            study._storage.set_trial_state_values(victim._trial_id, TrialState.FAIL)
            failed.append(victim.number)
        real(study, starts)

    monkeypatch.setattr(trial_runner, "start_trials", reaper_first)
    study, _, _ = run_one_population(tmp_path, 3)
    by_number = {t.number: t for t in study.trials}
    assert by_number[failed[0]].state == TrialState.FAIL
    assert by_number[failed[0]].params == {}  # nothing of the refused batch was written
    others = [t for n, t in by_number.items() if n != failed[0] and n < 3]
    assert [t.state for t in others] == [TrialState.COMPLETE] * 2
    assert all(t.params and "hpo_worker" in t.system_attrs for t in others)


def test_each_member_records_the_stack_it_trained_in(tmp_path: Path) -> None:
    settings, study, _, _ = submit_job(
        tmp_path,
        4,
        n_trials=10,
        training={"max_epochs": 3, "early_stopping": None},
        pruner={"type": "median", "n_startup_trials": 2, "n_warmup_steps": 0},
    )
    assert Worker(settings, once=True).run() == 10
    stacks = {}
    for t in study.trials:
        assert t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        stack = t.user_attrs["population"]
        assert t.number in stack["trials"] and stack["size"] == len(stack["trials"])
        assert stack["first"] == min(stack["trials"])
        stacks[t.number] = tuple(stack["trials"])
    # the stacks partition the job's trials: every member names the same stack-mates
    assert all(stacks[n] == stack for stack in set(stacks.values()) for n in stack)
    assert sorted(n for stack in set(stacks.values()) for n in stack) == list(range(10))
    assert len(set(stacks.values())) >= 3  # 2 start-up trials, then stacks of at most 4


def test_a_large_stack_names_itself_by_its_first_trial_without_listing_its_members(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above LISTED_MEMBERS_MAX members (hundreds on a GPU) each member records the stack's
    size and first trial only: listing every member in every member is O(P^2) storage."""
    monkeypatch.setattr(population_runner, "LISTED_MEMBERS_MAX", 3)
    settings, study, _, _ = submit_job(
        tmp_path, 4, n_trials=8, training={"max_epochs": 2, "early_stopping": None}
    )
    assert Worker(settings, once=True).run() == 8
    by_first: dict[int, list[int]] = {}
    for t in study.trials:
        stack = t.user_attrs["population"]
        by_first.setdefault(stack["first"], []).append(t.number)
        assert ("trials" in stack) == (stack["size"] <= 3), stack
    # ``first`` names each stack: its members, the lowest first, as many as its size
    assert sorted(n for ns in by_first.values() for n in ns) == list(range(8))
    for first, members in by_first.items():
        assert min(members) == first
        assert all(
            study.trials[n].user_attrs["population"]["size"] == len(members) for n in members
        )
    assert any(len(members) == 4 for members in by_first.values())  # unlisted, above 3


def test_a_sequential_trial_records_no_stack(tmp_path: Path) -> None:
    settings, study, _, _ = submit_job(tmp_path, 1, n_trials=2, training={"max_epochs": 2})
    assert Worker(settings, once=True).run() == 2
    assert all("population" not in t.user_attrs for t in study.trials)


def test_a_stack_of_one_fp32_member_trains_and_records_as_a_sequential_trial(
    tmp_path: Path,
) -> None:
    """A population whose trials differ in architecture trains one stack per architecture; a
    stack of one fp32 member runs the sequential code and records no stack."""
    space = {
        "parameters": {
            "learning_rate": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True},
            "hidden_width": {"type": "categorical", "choices": [8, 16, 24, 32, 40, 48]},
        }
    }
    settings, study, _, _ = submit_job(tmp_path, 4, n_trials=4, search_space=space)
    assert Worker(settings, once=True).run() == 4
    by_width: dict[int, list[optuna.trial.FrozenTrial]] = {}
    for t in study.trials:
        by_width.setdefault(t.params["hidden_width"], []).append(t)
    assert any(len(ts) == 1 for ts in by_width.values())  # the sampler's seed makes one
    for ts in by_width.values():
        for t in ts:
            if len(ts) == 1:
                assert "population" not in t.user_attrs
            else:
                assert t.user_attrs["population"]["trials"] == sorted(u.number for u in ts)
