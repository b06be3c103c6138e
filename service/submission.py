"""Submitting a job: limits, the jobs row and the Optuna study, in that order."""

from __future__ import annotations

import contextlib
from itertools import pairwise
from typing import Any

import optuna

from search_spaces import GridError
from service.config import Settings
from service.db import Job, JobStore, new_job_id, study_name_for
from service.errors import LimitExceededError, SpecError, TooManyJobsError
from service.spec import JobSpec
from service.studies import create_job_study

# Input widths of the built-in datasets, for the parameter-count limit before any data is loaded.
_KNOWN_FEATURES = {"digits": (64, 10), "mnist": (784, 10), "fashion_mnist": (784, 10)}


def estimate_parameters(spec: JobSpec, n_features: int, n_classes: int) -> int:
    widths = [n_features, *spec.model.hidden_layers, n_classes]
    space = spec.resolved_space().parameters
    if "hidden_width" in space or "n_hidden_layers" in space:
        # The largest architecture the space can produce.
        w = _max_of(space.get("hidden_width"), max(spec.model.hidden_layers))
        depth = _max_of(space.get("n_hidden_layers"), len(spec.model.hidden_layers))
        widths = [n_features, *([w] * depth), n_classes]
    return sum(a * b + b for a, b in pairwise(widths))


def _max_of(param: Any, default: int) -> int:
    if param is None:
        return default
    for attr in ("high", "value"):
        if hasattr(param, attr):
            return int(getattr(param, attr))
    return int(max(param.choices))


def dataset_shape(spec: JobSpec) -> tuple[int, int] | None:
    d = spec.dataset
    if d.name in _KNOWN_FEATURES:
        return _KNOWN_FEATURES[d.name]
    if d.name == "synthetic":
        return d.n_features, d.n_classes  # type: ignore[union-attr]
    return None


def check_limits(spec: JobSpec, settings: Settings, shape: tuple[int, int] | None = None) -> None:
    """Raise LimitExceededError (field named, actual vs allowed) for anything over a limit."""
    if spec.sampler.type == "grid":
        try:
            spec.grid_points(limit=settings.max_grid_size)
        except GridError as e:
            raise LimitExceededError(str(e), field="search_space") from None
    budget = spec.budget()
    if budget > settings.max_n_trials:
        raise LimitExceededError(
            f"{budget} trials exceed the limit of {settings.max_n_trials}", field="n_trials"
        )
    if spec.training.max_epochs > settings.max_epochs:
        raise LimitExceededError(
            f"{spec.training.max_epochs} epochs exceed the limit of {settings.max_epochs}",
            field="training.max_epochs",
        )
    layers = spec.model.hidden_layers
    if len(layers) > settings.max_hidden_layers:
        raise LimitExceededError(
            f"{len(layers)} hidden layers exceed the limit of {settings.max_hidden_layers}",
            field="model.hidden_layers",
        )
    if max(layers) > settings.max_hidden_width:
        raise LimitExceededError(
            f"hidden width {max(layers)} exceeds the limit of {settings.max_hidden_width}",
            field="model.hidden_layers",
        )
    d = spec.dataset
    if d.name == "synthetic":  # generated on every worker: the dataset limits apply as to files
        if d.n_samples > settings.max_dataset_rows:  # type: ignore[union-attr]
            raise LimitExceededError(
                f"{d.n_samples:,} samples exceed the limit of {settings.max_dataset_rows:,} "  # type: ignore[union-attr]
                "(max_dataset_rows)",
                field="dataset.n_samples",
            )
        if d.n_features > settings.max_dataset_features:  # type: ignore[union-attr]
            raise LimitExceededError(
                f"{d.n_features:,} features exceed the limit of "  # type: ignore[union-attr]
                f"{settings.max_dataset_features:,} (max_dataset_features)",
                field="dataset.n_features",
            )
    shape = shape or dataset_shape(spec)
    if shape is not None:
        n = estimate_parameters(spec, *shape)
        if n > settings.max_parameters:
            raise LimitExceededError(
                f"the model has {n:,} parameters, more than the limit of {settings.max_parameters:,}",
                field="model.hidden_layers",
            )


def submit(
    spec: JobSpec,
    *,
    settings: Settings,
    jobs: JobStore,
    storage: optuna.storages.BaseStorage,
    owner: str = "local",
    idempotency_key: str | None = None,
    shape: tuple[int, int] | None = None,
    enforce_active_limit: bool = True,
) -> tuple[Job, bool]:
    """Create the job row and its study. Returns (job, created)."""
    check_limits(spec, settings, shape)
    replay = (
        idempotency_key is not None and jobs.by_idempotency_key(owner, idempotency_key) is not None
    )
    if enforce_active_limit and not replay:
        active = jobs.count_active(owner)
        if active >= settings.max_active_jobs_per_owner:
            raise TooManyJobsError(
                f"{owner} already has {active} active jobs (limit {settings.max_active_jobs_per_owner}); "
                "wait for one to finish or cancel one",
                retry_after=30,
            )
    if replay:  # the same key again: the stored job, or ConflictError for another spec
        return jobs.create(spec, owner=owner, idempotency_key=idempotency_key)
    # The study is created before the job row: workers and the API only reach a study through
    # its job, so a process killed in between leaves at most an unreferenced study behind, never
    # a job whose study is missing (which no worker could run and no one could cancel).
    job_id = new_job_id()
    study_name = study_name_for(spec.name, job_id)
    try:
        create_job_study(
            storage, study_name, spec, job_id=job_id, max_grid_size=settings.max_grid_size
        )
    except Exception as e:
        _delete_study(storage, study_name)
        if isinstance(e, GridError):  # already checked above; kept for a clear message
            raise SpecError(str(e), field="search_space") from None
        raise
    try:
        job, created = jobs.create(
            spec, owner=owner, idempotency_key=idempotency_key, job_id=job_id
        )
    except BaseException:
        _delete_study(storage, study_name)
        raise
    if not created:  # an idempotent replay (or the loser of a race): the first job stands
        _delete_study(storage, study_name)
    return job, created


def _delete_study(storage: optuna.storages.BaseStorage, study_name: str) -> None:
    with contextlib.suppress(Exception):  # best effort: an orphan study is harmless
        optuna.delete_study(study_name=study_name, storage=storage)
