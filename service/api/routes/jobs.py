"""/jobs: submit, list, inspect, cancel, delete; trials, best, model download, report."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
from datetime import UTC, datetime
from typing import Annotated, Any

import optuna
from fastapi import APIRouter, Header, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from optuna.trial import TrialState

from search_spaces import FixedParam
from service.api.commit_signal import CommitSignal
from service.api.deps import JobsDep, OwnerDep, SettingsDep, StorageDep
from service.api.schemas import (
    BestPublic,
    BestSummary,
    JobDetail,
    JobList,
    JobPublic,
    Links,
    TrialCounts,
    TrialDetail,
    TrialList,
    TrialPublic,
    ValidateResult,
)
from service.db import Job
from service.errors import ConflictError, DatasetError, NotFoundError, SpecError
from service.results import (
    MODEL_ARTIFACT_ATTR,
    best_view,
    progress,
    trial_row,
)
from service.spec import JobSpec
from service.states import JobState
from service.submission import check_limits, dataset_shape, estimate_parameters, submit

router = APIRouter(prefix="/jobs", tags=["jobs"])

# Rough CPU cost per (sample x parameter x epoch) of forward+backward, from digits runs on 2 cores.
_SECONDS_PER_SAMPLE_PARAM_EPOCH = 6e-9


def _links(job_id: str) -> Links:
    base = f"/jobs/{job_id}"
    return Links(
        self=base,
        trials=f"{base}/trials",
        best=f"{base}/best",
        model=f"{base}/best/model",
        report=f"{base}/report",
        cancel=f"{base}/cancel",
    )


def _public(job: Job) -> JobPublic:
    return JobPublic(
        id=job.id,
        name=job.name,
        owner=job.owner,
        state=job.state,
        study_name=job.study_name,
        n_trials=job.n_trials,
        finished_trials=job.finished,
        error=job.error,
        created_at=_aware(job.created_at),
        started_at=_aware(job.started_at),
        finished_at=_aware(job.finished_at),
        links=_links(job.id),
    )


def _aware(ts: datetime | None) -> datetime | None:
    if ts is None:
        return None
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def _spec(job: Job) -> JobSpec:
    return JobSpec.model_validate(json.loads(job.spec_json))


def _study(job: Job, storage: optuna.storages.BaseStorage) -> optuna.Study:
    try:
        return optuna.load_study(study_name=job.study_name, storage=storage)
    except KeyError:
        raise NotFoundError(f"the study of job {job.id} no longer exists", field="job_id") from None


def _fixed(spec: JobSpec) -> dict[str, Any]:
    return {
        n: p.value for n, p in spec.resolved_space().parameters.items() if isinstance(p, FixedParam)
    }


def _encode_cursor(payload: list[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode()


def _decode_cursor(cursor: str) -> list[Any]:
    try:
        value = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        if not isinstance(value, list):
            raise ValueError
        return value
    except Exception:
        raise SpecError(
            "malformed cursor; pass the next_cursor of a previous page", field="cursor"
        ) from None


@router.post("", status_code=status.HTTP_201_CREATED, response_model=JobPublic)
def create_job(
    spec: JobSpec,
    response: Response,
    jobs: JobsDep,
    storage: StorageDep,
    settings: SettingsDep,
    owner: OwnerDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JobPublic:
    """Submit a job. The same Idempotency-Key with the same body returns the same job (200)."""
    _check_dataset_reference(spec, settings, owner)
    job, created = submit(
        spec,
        settings=settings,
        jobs=jobs,
        storage=storage,
        owner=owner,
        idempotency_key=idempotency_key,
        shape=_upload_shape(spec, settings, owner),
    )
    response.headers["Location"] = f"/jobs/{job.id}"
    if not created:
        response.status_code = status.HTTP_200_OK
    return _public(job)


def _check_dataset_reference(spec: JobSpec, settings: Any, owner: str) -> None:
    """The server never opens a path from a request: csv/npz need a path under the data dir,
    checked by the dataset layer; uploads must exist and belong to the owner."""
    from service.datasets.paths import resolve_dataset_path

    d = spec.dataset
    if d.name in ("csv", "npz"):
        try:
            resolve_dataset_path(
                d.path, data_dir=settings.resolved_data_dir, allow_local_paths=False
            )  # type: ignore[union-attr]
        except DatasetError as e:
            raise SpecError(e.message, field="dataset.path") from None
    elif d.name == "upload":
        _upload_info(d.id, settings, owner)  # type: ignore[union-attr]


def _upload_info(upload_id: str, settings: Any, owner: str) -> Any:
    from service.datasets import get_upload_info

    try:
        return get_upload_info(upload_id, settings.upload_dir_for(owner))
    except (NotFoundError, KeyError):
        raise SpecError(f"no uploaded dataset with id {upload_id!r}", field="dataset.id") from None


def _upload_shape(spec: JobSpec, settings: Any, owner: str) -> tuple[int, int] | None:
    if spec.dataset.name == "upload":
        info = _upload_info(spec.dataset.id, settings, owner)  # type: ignore[union-attr]
        return int(info.features), int(info.n_classes)
    return None


@router.post("/validate", response_model=ValidateResult)
def validate_job(spec: JobSpec, settings: SettingsDep, owner: OwnerDep) -> ValidateResult:
    """Dry run: resolve the space, size the grid or budget, estimate run time; creates nothing."""
    _check_dataset_reference(spec, settings, owner)
    shape = _upload_shape(spec, settings, owner) or dataset_shape(spec)
    check_limits(spec, settings, shape)
    n = spec.budget()
    params = estimate_parameters(spec, *shape) if shape else None
    rows = {"digits": 1797, "mnist": 60000, "fashion_mnist": 60000}.get(spec.dataset.name)
    if spec.dataset.name == "synthetic":
        rows = spec.dataset.n_samples  # type: ignore[union-attr]
    seconds = None
    if params and rows:
        train_rows = rows * (1 - spec.training.validation_split - spec.training.test_split)
        seconds = round(
            n * spec.training.max_epochs * train_rows * params * _SECONDS_PER_SAMPLE_PARAM_EPOCH, 1
        )
    return ValidateResult(
        valid=True,
        search_space=spec.resolved_space().model_dump(mode="json"),
        sampler=spec.sampler.type,
        grid_size=n if spec.sampler.type == "grid" else None,
        n_trials=n,
        estimated_parameters=params,
        estimated_seconds=seconds,
    )


@router.get("", response_model=JobList)
def list_jobs(
    jobs: JobsDep,
    owner: OwnerDep,
    state: Annotated[JobState | None, Query(description="Only jobs in this state.")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
) -> JobList:
    """Jobs newest first, paginated with an opaque cursor."""
    before = None
    if cursor:
        raw = _decode_cursor(cursor)
        try:
            before = (datetime.fromisoformat(raw[0]), str(raw[1]))
        except (IndexError, ValueError, TypeError):
            raise SpecError("malformed cursor", field="cursor") from None
    items = jobs.list_jobs(
        owner=owner, state=state.value if state else None, limit=limit + 1, before=before
    )
    nxt = None
    if len(items) > limit:
        items = items[:limit]
        last = items[-1]
        nxt = _encode_cursor([last.created_at.isoformat(), last.id])
    return JobList(items=[_public(j) for j in items], next_cursor=nxt)


# Long polling (``Prefer: wait=N`` with ``If-None-Match``): the longest wait granted, how often
# the job's row is looked at meanwhile (one primary-key read; on SQLite also after each commit
# to the database, within 10 ms: service.api.commit_signal), and how often the trial counts
# are recounted (a trial starting changes them without touching the job's row). The cap also
# bounds how long a waiting request can hold up the server's graceful shutdown.
MAX_WAIT_S = 10.0
_ROW_CHECK_S = 0.1
_RECOUNT_S = 1.0


@router.get(
    "/{job_id}",
    response_model=JobDetail,
    responses={304: {"description": "Not modified: the job still matches If-None-Match."}},
)
async def get_job(
    request: Request,
    job_id: str,
    jobs: JobsDep,
    storage: StorageDep,
    owner: OwnerDep,
    if_none_match: Annotated[
        str | None,
        Header(description="ETag of a previous answer: 304 while the job still matches it."),
    ] = None,
    prefer: Annotated[
        str | None,
        Header(
            description=f"`wait=N` (RFC 7240) with If-None-Match: hold the answer up to N "
            f"seconds (at most {MAX_WAIT_S:g}) until the job changes, instead of polling."
        ),
    ] = None,
) -> Response:
    """The job with its trial counts and best trial so far.

    Every answer carries an ETag of its content (all but the clock-driven ``elapsed_s`` and
    ``eta_s``). A client that follows a job (``hpo submit --wait``) sends the last ETag in
    If-None-Match with ``Prefer: wait=10``: the server answers as soon as the job changes (a
    trial finishes, the state moves), or 304 after the wait, so the client learns of the
    change within ~0.1 s without asking several times a second.
    """
    job = await run_in_threadpool(jobs.get, job_id, owner=owner)
    detail = await run_in_threadpool(_job_detail, job, storage)
    etag = _etag(detail)
    seen = _etags(if_none_match)
    wait = _wait_preference(prefer) if seen else 0.0
    if etag in seen and wait > 0:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        row, recounted = _row_version(job), loop.time()
        commits: CommitSignal = request.app.state.commits
        while etag in seen and loop.time() < deadline:
            # Sooner when the database says someone committed (SQLite; see CommitSignal).
            await commits.wait(min(_ROW_CHECK_S, max(0.0, deadline - loop.time())))
            if await request.is_disconnected():  # nobody to answer: stop reading the database
                break
            job = await run_in_threadpool(jobs.get, job_id)
            if _row_version(job) != row or loop.time() - recounted >= _RECOUNT_S:
                detail = await run_in_threadpool(_job_detail, job, storage)
                etag, row, recounted = _etag(detail), _row_version(job), loop.time()
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if wait > 0:
        headers["Preference-Applied"] = f"wait={wait:g}"
    if etag in seen or "*" in seen:  # "*": any current representation (RFC 9110)
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    return JSONResponse(detail.model_dump(mode="json"), headers=headers)


def _job_detail(job: Job, storage: Any) -> JobDetail:
    study = _study(job, storage)
    counts, top = progress(study)
    best = (
        BestSummary(trial_number=top.number, value=top.value, params=top.params)
        if top is not None
        else None
    )
    elapsed = eta = None
    if job.started_at is not None:
        end = _aware(job.finished_at) or datetime.now(UTC)
        elapsed = max(0.0, (end - _aware(job.started_at)).total_seconds())  # type: ignore[operator]
        if job.state == JobState.RUNNING and job.finished > 0:
            eta = elapsed / job.finished * max(0, job.n_trials - job.finished)
    base = _public(job)
    return JobDetail(
        **base.model_dump(),
        spec=_spec(job),
        trial_counts=TrialCounts(
            **{k: v for k, v in counts.items() if k in TrialCounts.model_fields}
        ),
        best=best,
        elapsed_s=elapsed,
        eta_s=eta,
    )


def _etag(detail: JobDetail) -> str:
    content = detail.model_dump_json(exclude={"elapsed_s", "eta_s"})
    return '"' + hashlib.sha256(content.encode()).hexdigest()[:32] + '"'


def _etags(header: str | None) -> set[str]:
    """The entity tags in an If-None-Match header (weak ones compared by their opaque part)."""
    if not header:
        return set()
    return {t.strip().removeprefix("W/") for t in header.split(",") if t.strip()}


def _wait_preference(prefer: str | None) -> float:
    """Seconds from ``Prefer: wait=N`` (RFC 7240), capped at MAX_WAIT_S; 0 when absent or not
    understood (an unknown or malformed preference is ignored, as the RFC asks)."""
    for pref in (prefer or "").split(","):
        name, _, value = pref.partition("=")
        if name.strip().lower() == "wait":
            try:
                seconds = float(value.strip().strip('"'))
            except ValueError:
                return 0.0
            return min(seconds, MAX_WAIT_S) if math.isfinite(seconds) and seconds > 0 else 0.0
    return 0.0


def _row_version(job: Job) -> tuple[Any, ...]:
    return (job.state, job.reserved, job.finished, job.failures, job.updated_at)


@router.post("/{job_id}/cancel", response_model=JobPublic)
def cancel_job(job_id: str, jobs: JobsDep, storage: StorageDep, owner: OwnerDep) -> JobPublic:
    """queued -> cancelled; running -> cancelling (workers stop their trials within one epoch),
    or cancelled at once when no trial is running."""
    job = jobs.get(job_id, owner=owner)
    if job.state == JobState.QUEUED:
        jobs.transition(job.id, JobState.CANCELLED)  # False: a worker started it meanwhile
    job = jobs.get(job_id)
    if job.state == JobState.RUNNING:
        jobs.transition(job.id, JobState.CANCELLING)
        running = _study(job, storage).get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running:
            jobs.try_transition(job.id, JobState.CANCELLED)
    elif job.state not in (JobState.CANCELLING, JobState.CANCELLED):
        jobs.transition(job.id, JobState.CANCELLING)  # raises the named 409 for terminal states
    return _public(jobs.get(job_id))


@router.delete("/{job_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_job(
    job_id: str, jobs: JobsDep, storage: StorageDep, settings: SettingsDep, owner: OwnerDep
) -> Response:
    """Delete a job that is not running, with its study and model files."""
    job = jobs.get(job_id, owner=owner)
    if job.state in (JobState.RUNNING, JobState.CANCELLING):
        raise ConflictError(
            f"job {job.id} is {job.state}; cancel it and wait until it is cancelled", field="state"
        )
    try:
        study = optuna.load_study(study_name=job.study_name, storage=storage)
        _delete_artifacts(study, settings)
        optuna.delete_study(study_name=job.study_name, storage=storage)
    except KeyError:
        pass
    jobs.delete(job.id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def _delete_artifacts(study: optuna.Study, settings: Any) -> None:
    root = settings.resolved_artifact_dir
    for t in study.get_trials(deepcopy=False):
        aid = t.user_attrs.get(MODEL_ARTIFACT_ATTR)
        if isinstance(aid, str) and aid.replace("-", "").isalnum():
            (root / aid).unlink(missing_ok=True)


@router.get("/{job_id}/trials", response_model=TrialList)
def list_trials(
    job_id: str,
    jobs: JobsDep,
    storage: StorageDep,
    owner: OwnerDep,
    state: Annotated[str | None, Query(pattern="^(complete|pruned|fail|running|waiting)$")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
) -> TrialList:
    """Trials by number, paginated (cursor = the last number seen)."""
    job = jobs.get(job_id, owner=owner)
    trials = _study(job, storage).get_trials(deepcopy=False)
    if state:
        trials = [t for t in trials if t.state.name.lower() == state]
    after = -1
    if cursor:
        raw = _decode_cursor(cursor)
        if not raw or not isinstance(raw[0], int):
            raise SpecError("malformed cursor", field="cursor")
        after = raw[0]
    page = [t for t in trials if t.number > after][:limit]
    more = len([t for t in trials if t.number > after]) > limit
    return TrialList(
        items=[TrialPublic(**trial_row(t)) for t in page],
        next_cursor=_encode_cursor([page[-1].number]) if more and page else None,
        total=len(trials),
    )


@router.get("/{job_id}/trials/{number}", response_model=TrialDetail)
def get_trial(
    job_id: str, number: int, jobs: JobsDep, storage: StorageDep, owner: OwnerDep
) -> TrialDetail:
    job = jobs.get(job_id, owner=owner)
    trials = _study(job, storage).get_trials(deepcopy=False)
    for t in trials:
        if t.number == number:
            return TrialDetail(**_json_safe(trial_row(t, with_history=True)))
    raise NotFoundError(f"job {job_id} has no trial {number}", field="number")


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_json_safe(x) for x in v]
    return v


@router.get("/{job_id}/best", response_model=BestPublic)
def get_best(job_id: str, jobs: JobsDep, storage: StorageDep, owner: OwnerDep) -> BestPublic:
    job = jobs.get(job_id, owner=owner)
    return BestPublic(**_json_safe(best_view(_study(job, storage), fixed=_fixed(_spec(job)))))


@router.get(
    "/{job_id}/best/model",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "safetensors file"}
    },
)
def download_model(
    job_id: str, jobs: JobsDep, storage: StorageDep, settings: SettingsDep, owner: OwnerDep
) -> FileResponse:
    """The best trial's weights as safetensors (architecture in the file's metadata)."""
    job = jobs.get(job_id, owner=owner)
    view = best_view(_study(job, storage))
    aid = view.get("model_artifact_id")
    path = settings.resolved_artifact_dir / str(aid) if aid else None
    if not aid or not str(aid).replace("-", "").isalnum() or path is None or not path.is_file():
        raise NotFoundError(f"no saved model for the best trial of job {job_id}", field="model")
    return FileResponse(
        path,
        media_type="application/octet-stream",
        filename=f"{job.name}-trial{view['trial_number']}.safetensors",
    )


@router.get("/{job_id}/report", response_class=HTMLResponse)
def get_report(job_id: str, jobs: JobsDep, storage: StorageDep, owner: OwnerDep) -> HTMLResponse:
    """A self-contained HTML report of the job."""
    from service.report import render_report

    job = jobs.get(job_id, owner=owner)
    return HTMLResponse(render_report(job, _study(job, storage), _spec(job)))
