"""Submitting a job: limits, the jobs row and the Optuna study, in that order."""

from __future__ import annotations

import contextlib
from itertools import pairwise
from typing import Any

import optuna

from search_spaces import GridError
from service.config import Settings
from service.db import Job, JobStore
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
    job, created = jobs.create(spec, owner=owner, idempotency_key=idempotency_key)
    if created:
        try:
            create_job_study(
                storage, job.study_name, spec, job_id=job.id, max_grid_size=settings.max_grid_size
            )
        except Exception as e:
            # Never leave a job without its study, nor a half-made study behind.
            jobs.delete(job.id)
            with contextlib.suppress(KeyError):
                optuna.delete_study(study_name=job.study_name, storage=storage)
            if isinstance(e, GridError):  # already checked above; kept for a clear message
                raise SpecError(str(e), field="search_space") from None
            raise
    return job, created
