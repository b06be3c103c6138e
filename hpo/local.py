"""``hpo run``: a complete search on this machine, no server; the job lives in the same database."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import optuna
from rich.console import Console
from rich.table import Table

from hpo.progress import JobProgress
from search_spaces import FixedParam
from service.config import Settings
from service.db import Job, JobStore, create_schema, make_engine, spec_hash
from service.results import best_view, progress, top_trials
from service.spec import JobSpec
from service.states import JobState
from service.studies import make_storage
from service.submission import submit


class _Listener:
    def __init__(self, study: optuna.Study, progress: JobProgress) -> None:
        self.study, self.progress = study, progress
        self.refresh("")

    def refresh(self, status: str) -> None:
        # Counted in SQL, as the API's job detail is: loading every trial after each one grew
        # with the study (2 ms per refresh at 48 trials, quadratic over a long run).
        counts, best = progress(self.study)
        self.progress.update(
            done=counts["complete"] + counts["pruned"],
            pruned=counts["pruned"],
            failed=counts["fail"],
            best=None if best is None else best.value,
            status=status,
        )

    def epoch_done(self, job: Job, number: int, metrics: Any) -> None:
        self.progress.progress.update(
            self.progress.task, status=f"trial {number} epoch {metrics.epoch}"
        )

    def trials_done(self, job: Job, outcomes: list[Any]) -> None:
        # Once per population, not per member: the counts are three queries and a trial load
        # (~5 ms), and a stack of 8 finishes its members together.
        self.refresh(outcomes_status(outcomes))


def outcomes_status(outcomes: list[Any]) -> str:
    """``trial 7 complete``, or for a population ``trials 8-15: 6 complete, 2 pruned``."""
    if len(outcomes) == 1:
        return f"trial {outcomes[0].number} {outcomes[0].outcome}"
    numbers = sorted(o.number for o in outcomes)
    tally = Counter(str(o.outcome) for o in outcomes)
    return f"trials {numbers[0]}-{numbers[-1]}: " + ", ".join(f"{n} {k}" for k, n in tally.items())


def find_or_create_job(
    spec: JobSpec, settings: Settings, jobs: JobStore, storage: Any
) -> tuple[Job, bool]:
    """Continue the newest local job with this name and the same spec, else create one."""
    digest = spec_hash(spec)
    for job in jobs.find_by_name(spec.name, owner="local"):
        if job.spec_hash == digest and job.state not in (JobState.CANCELLED, JobState.FAILED):
            return job, False
    return submit(
        spec,
        settings=settings,
        jobs=jobs,
        storage=storage,
        owner="local",
        enforce_active_limit=False,
    )


def run_local(spec: JobSpec, settings: Settings, console: Console) -> int:
    from worker.loop import Worker  # torch is imported only for commands that train

    url = settings.resolved_database_url
    engine = make_engine(url)
    create_schema(engine)
    jobs = JobStore(engine)
    storage = make_storage(url, settings)
    job, created = find_or_create_job(spec, settings, jobs, storage)
    console.print(
        f"[bold]{'Created' if created else 'Continuing'} job[/] {job.id} (study [cyan]{job.study_name}[/]) "
        f"in {url}: {job.n_trials} trials"
    )
    study = optuna.load_study(study_name=job.study_name, storage=storage)
    start = time.monotonic()
    with JobProgress(job.n_trials, objective=spec.objective, console=console) as progress:
        listener = _Listener(study, progress)
        worker = Worker(settings, job_id=job.id, allow_local_paths=True, listener=listener)
        worker.install_signal_handlers()
        worker.run()
        listener.refresh("done")
    elapsed = time.monotonic() - start
    job = jobs.get(job.id)
    console.print(
        f"job {job.id} is [bold]{job.state}[/] after {elapsed:.1f} s"
        + (f": {job.error}" if job.error else "")
    )
    print_results(study, spec, console)
    console.print(
        f"\nInspect: [bold]optuna-dashboard {url}[/]  (or: hpo dashboard)   "
        f"Python: optuna.load_study(study_name={job.study_name!r}, storage={url!r})"
    )
    if job.state == JobState.SUCCEEDED:
        return 0
    return 130 if job.state in (JobState.RUNNING, JobState.QUEUED) else 1


def fixed_params(spec: JobSpec) -> dict[str, Any]:
    return {
        n: p.value for n, p in spec.resolved_space().parameters.items() if isinstance(p, FixedParam)
    }


def print_results(study: optuna.Study, spec: JobSpec, console: Console, k: int = 10) -> None:
    top = top_trials(study, k)
    if not top:
        console.print("[yellow]no complete trial[/]")
        return
    names = sorted({n for t in top for n in t.params})
    table = Table(title=f"Top {len(top)} trials by {spec.objective}")
    table.add_column("#", justify="right")
    table.add_column(spec.objective, justify="right")
    for n in names:
        table.add_column(n)
    table.add_column("epochs", justify="right")
    table.add_column("early stop")
    for t in top:
        cells = [_fmt(t.params.get(n, "")) for n in names]
        ua = t.user_attrs
        table.add_row(
            str(t.number),
            f"{t.value:.4f}",
            *cells,
            str(ua.get("epochs_run", "")),
            "yes" if ua.get("stopped_early") else "no",
        )
    console.print(table)
    best = best_view(study, fixed=fixed_params(spec))
    console.print(
        f"[bold green]Best trial #{best['trial_number']}[/]: {spec.objective} = {best['value']:.4f}",
        end="",
    )
    if best.get("test_accuracy") is not None:
        console.print(f", held-out test accuracy = {best['test_accuracy']:.4f}")
    else:
        console.print()
    for k_, v in best["config"].items():
        console.print(f"  {k_}: {_fmt(v)}")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)
