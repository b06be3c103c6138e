"""Submitting: limits (field named, actual vs allowed), the jobs row and the study together."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from service.config import Settings
from service.db import JobStore, create_schema, make_engine
from service.errors import LimitExceededError, TooManyJobsError
from service.spec import JobSpec
from service.studies import make_storage
from service.submission import check_limits, estimate_parameters, submit
from tests.support.specs import grid_spec, random_spec


@pytest.fixture
def env(tmp_path: Path) -> tuple[Settings, JobStore, optuna.storages.BaseStorage]:
    settings = Settings(data_root=tmp_path)
    url = settings.resolved_database_url
    engine = make_engine(url)
    create_schema(engine)
    return settings, JobStore(engine), make_storage(url, settings)


def spec(**over: object) -> JobSpec:
    return JobSpec.model_validate(random_spec(**over))


@pytest.mark.parametrize(
    ("over", "settings", "field", "numbers"),
    [
        ({"n_trials": 11}, {"max_n_trials": 10}, "n_trials", ["11", "10"]),
        ({"training": {"max_epochs": 6}}, {"max_epochs": 5}, "training.max_epochs", ["6", "5"]),
        (
            {"model": {"hidden_layers": [8, 8, 8]}},
            {"max_hidden_layers": 2},
            "model.hidden_layers",
            ["3", "2"],
        ),
        (
            {"model": {"hidden_layers": [300]}},
            {"max_hidden_width": 256},
            "model.hidden_layers",
            ["300", "256"],
        ),
        # digits: 64*4096 + 4096 + 4096*10 + 10 = 307,210 parameters
        (
            {"model": {"hidden_layers": [4096]}},
            {"max_parameters": 300_000},
            "model.hidden_layers",
            ["307,210", "300,000"],
        ),
    ],
)
def test_limits_name_field_and_numbers(
    over: dict[str, object], settings: dict[str, int], field: str, numbers: list[str]
) -> None:
    with pytest.raises(LimitExceededError) as info:
        check_limits(spec(**over), Settings(**settings))  # type: ignore[arg-type]
    assert info.value.field == field
    for n in numbers:
        assert n in str(info.value), str(info.value)


def test_grid_over_limit_is_refused_with_its_size() -> None:
    with pytest.raises(LimitExceededError) as info:
        check_limits(JobSpec.model_validate(grid_spec()), Settings(max_grid_size=15))
    assert info.value.field == "search_space"
    assert "16 points" in str(info.value) and "15" in str(info.value)


def test_parameter_estimate_uses_the_largest_architecture() -> None:
    s = spec(
        model={"hidden_layers": [32]},
        search_space={
            "parameters": {
                "hidden_width": {"type": "int", "low": 16, "high": 100},
                "n_hidden_layers": {"type": "categorical", "choices": [1, 3]},
            }
        },
    )
    assert estimate_parameters(s, 64, 10) == (64 * 100 + 100) + 2 * (100 * 100 + 100) + (
        100 * 10 + 10
    )


def test_submit_creates_row_and_study(env) -> None:  # type: ignore[no-untyped-def]
    settings, jobs, storage = env
    job, created = submit(
        JobSpec.model_validate(grid_spec()), settings=settings, jobs=jobs, storage=storage
    )
    assert created and job.n_trials == 16
    study = optuna.load_study(study_name=job.study_name, storage=storage)
    assert len(study.get_trials()) == 16


def test_active_job_limit(env) -> None:  # type: ignore[no-untyped-def]
    settings, jobs, storage = env
    settings = settings.model_copy(update={"max_active_jobs_per_owner": 2})
    for i in range(2):
        submit(
            spec(name=f"j{i}"),
            settings=settings,
            jobs=jobs,
            storage=storage,
            idempotency_key=f"k{i}",
        )
    with pytest.raises(TooManyJobsError) as info:
        submit(spec(name="j3"), settings=settings, jobs=jobs, storage=storage)
    assert info.value.retry_after > 0
    # replaying an existing key is not a new job and is not refused
    job, created = submit(
        spec(name="j0"), settings=settings, jobs=jobs, storage=storage, idempotency_key="k0"
    )
    assert not created and job.name == "j0"
    # another owner is not affected
    submit(spec(name="j4"), settings=settings, jobs=jobs, storage=storage, owner="bob")


def test_a_failed_study_creation_leaves_no_job(env, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    settings, jobs, storage = env

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("storage hiccup")

    monkeypatch.setattr("service.submission.create_job_study", broken)
    with pytest.raises(RuntimeError):
        submit(spec(), settings=settings, jobs=jobs, storage=storage)
    assert jobs.list_jobs() == []
