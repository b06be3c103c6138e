"""Response models (``XPublic``); the request body of POST /jobs is the JobSpec itself."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from service.spec import JobSpec


class Links(BaseModel):
    self: str
    trials: str
    best: str
    model: str
    report: str
    cancel: str


class TrialCounts(BaseModel):
    complete: int = 0
    pruned: int = 0
    fail: int = 0
    running: int = 0
    waiting: int = 0
    diverged: int = 0


class BestSummary(BaseModel):
    trial_number: int
    value: float
    params: dict[str, Any]


class JobPublic(BaseModel):
    id: str
    name: str
    owner: str
    state: str
    study_name: str
    n_trials: int
    finished_trials: int
    error: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    links: Links


class JobDetail(JobPublic):
    spec: JobSpec
    trial_counts: TrialCounts
    best: BestSummary | None = None
    elapsed_s: float | None = None
    eta_s: float | None = None


class JobList(BaseModel):
    items: list[JobPublic]
    next_cursor: str | None = Field(default=None, description="Pass as ?cursor= for the next page.")


class TrialPublic(BaseModel):
    number: int
    state: str
    params: dict[str, Any]
    value: float | None = None
    epochs_run: int | None = None
    best_epoch: int | None = None
    stopped_early: bool | None = None
    diverged: bool = False
    reason: str | None = None
    duration_s: float | None = None
    retry_of: int | None = None
    train_accuracy: float | None = Field(default=None, description="Kept model, evaluation mode.")
    train_val_gap: float | None = Field(
        default=None, description="train_accuracy - best val accuracy."
    )
    epochs_to_target: int | None = Field(default=None, description="With training.target_accuracy.")
    test_accuracy: float | None = Field(
        default=None, description="Only for trials that were a new best."
    )


class TrialDetail(TrialPublic):
    history: list[dict[str, Any]] = []
    intermediate_values: dict[str, float | None] = {}
    user_attrs: dict[str, Any] = {}


class TrialList(BaseModel):
    items: list[TrialPublic]
    next_cursor: str | None = None
    total: int


class BestPublic(BaseModel):
    trial_number: int
    params: dict[str, Any]
    config: dict[str, Any]
    objective: str
    value: float
    val_accuracy: float | None = None
    val_loss: float | None = None
    test_accuracy: float | None = None
    best_epoch: int | None = None
    epochs_run: int | None = None
    model_artifact_id: str | None = None


class ValidateResult(BaseModel):
    valid: bool
    search_space: dict[str, Any]
    sampler: str
    grid_size: int | None = None
    n_trials: int
    estimated_parameters: int | None = None
    estimated_seconds: float | None = Field(
        default=None,
        description="Rough: trials x epochs x rows x parameters at a measured CPU rate.",
    )


class SearchSpaceSummary(BaseModel):
    name: str
    description: str
    parameters: list[str]


class Health(BaseModel):
    status: str
    detail: str | None = None


class ProblemItem(BaseModel):
    field: str
    message: str
    location: str | None = None


class Problem(BaseModel):
    """RFC 9457 problem details (``application/problem+json``): every error answer."""

    model_config = ConfigDict(extra="allow")

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    instance: str | None = None
    field: str | None = Field(default=None, description="Where the problem is (dotted path).")
    errors: list[ProblemItem] | None = Field(default=None, description="Every problem found.")


def problem_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries for error statuses (moved to problem+json by the app)."""
    from http import HTTPStatus

    return {code: {"model": Problem, "description": HTTPStatus(code).phrase} for code in codes}
