"""Run several asked trials of one job as populations (one batched model per compatible group).

Each member is asked, claimed, prepared, reported, pruned and told exactly like a sequential
trial (``worker.trial_runner.run_trial``); only the training in between is batched
(``worker.population.train_population``). A single fp32 trial never comes here (the worker
uses ``run_trial``); a job with ``training.precision`` bf16 or tf32 always does, since only the
population trainer implements those.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import replace

import optuna

from service.studies import waiting_trial_ids
from worker.training import EpochMetrics, TrialConfig, TrialResult
from worker.trial_runner import (
    Heartbeat,
    Outcome,
    TrialContext,
    TrialOutcome,
    ask,
    count_finished_into_job,
    epoch_hook,
    finish_interrupted,
    finish_trials,
    interruptible,
    prepare,
    release_unasked,
    report_epochs,
)


def run_population(ctx: TrialContext, n: int) -> list[TrialOutcome]:
    """Ask ``n`` trials (the caller reserved n budget slots) and train compatible ones together."""
    from worker.population import group_configs, train_population

    rt = ctx.rt
    ctx = replace(ctx, defer_job_count=True)  # counted once, below
    precision = rt.spec.training.precision
    trials: list[optuna.Trial] = []
    try:
        waiting = waiting_trial_ids(rt.study._storage, rt.study._study_id)
        for _ in range(n):
            trials.append(ask(rt, waiting))
    except BaseException:
        release_unasked(ctx, n - len(trials))  # slots of the trials that were never asked
        if not trials:
            raise
    outcomes: dict[int, TrialOutcome] = {}
    with Heartbeat(rt.study._storage, [t._trial_id for t in trials]):
        prepared: list[tuple[optuna.Trial, TrialConfig]] = []
        for t in trials:
            try:
                prepared.append((t, prepare(ctx, t)))
            except Exception as e:
                outcomes[t.number] = finish_interrupted(ctx, t, e)
        for group in group_configs([c for _, c in prepared]):
            ctx.pruning.reset()  # the previous stack's trials are finished: epoch 1 again
            members = [prepared[i] for i in group]
            hooks = [epoch_hook(ctx, t) for t, _ in members]

            def on_epoch(i: int, m: EpochMetrics, hooks: list = hooks) -> None:  # type: ignore[type-arg]
                hooks[i](m)

            def on_epochs(
                batch: list[tuple[int, EpochMetrics]],
                members: list[tuple[optuna.Trial, TrialConfig]] = members,
            ) -> None:
                report_epochs(ctx, [(members[i][0], m) for i, m in batch])

            try:
                with interruptible():
                    results = train_population(
                        [c for _, c in members],
                        rt.data,
                        device=rt.device,
                        on_epoch=on_epoch,
                        autocast=None if precision == "fp32" else precision,
                        on_epochs=on_epochs,
                    )
            except Exception as e:  # the whole group ended (stop grace over, out of memory, ...)
                for t, _ in members:
                    outcomes[t.number] = finish_interrupted(ctx, t, e)
                continue
            ordered = _best_first(rt.study, zip(members, results, strict=True))
            outcomes.update(finish_trials(ctx, [(t, r) for (t, _), r in ordered]))
    if any(o.outcome in _TOLD for o in outcomes.values()):
        count_finished_into_job(ctx)
    return [outcomes[t.number] for t in trials]


_TOLD = (Outcome.COMPLETE, Outcome.PRUNED, Outcome.DIVERGED)


def _best_first(
    study: optuna.Study, finished: Iterable[tuple[tuple[optuna.Trial, TrialConfig], TrialResult]]
) -> list[tuple[tuple[optuna.Trial, TrialConfig], TrialResult]]:
    """Members in the order ``finish_trials`` wants them: the best value first."""
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE

    def key(item: tuple[tuple[optuna.Trial, TrialConfig], TrialResult]) -> float:
        r = item[1]
        if r.interrupted or r.diverged or r.best_value is None:
            return math.inf  # not ranked: last
        return -r.best_value if maximize else r.best_value

    return sorted(finished, key=key)
