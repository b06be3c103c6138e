"""Run several asked trials of one job as populations (one batched model per compatible group).

Each member is asked, claimed, prepared, reported, pruned and told exactly like a sequential
trial (``worker.trial_runner.run_trial``); only the training in between is batched
(``worker.population.train_population``). Members that leave a stack while it trains on
(pruned, stopped early, diverged) are told then, best first among those leaving together; the
rest when the stack ends. A single fp32 trial never comes here (the worker
uses ``run_trial``); a job with ``training.precision`` bf16 or tf32 always does, since only the
population trainer implements those.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import optuna

from worker.epoch_reports import EpochReports
from worker.training import EpochMetrics, TrialConfig, TrialResult
from worker.trial_runner import (
    Heartbeat,
    Outcome,
    TrialContext,
    TrialOutcome,
    ask_population,
    count_finished_into_job,
    epoch_hook,
    finish_interrupted,
    finish_trials,
    interruptible,
    prepare_population,
    reason_to_stop,
    release_unasked,
    report_epochs,
    uninterruptible,
)


def run_population(ctx: TrialContext, n: int) -> list[TrialOutcome]:
    """Ask ``n`` trials (the caller reserved n budget slots) and train compatible ones together."""
    from worker.population import group_configs, train_population

    rt = ctx.rt
    # Counted into the job once, below; epoch reports written together (worker.epoch_reports).
    ctx = replace(ctx, defer_job_count=True, reports=EpochReports(rt.study, ctx.report_interval_s))
    precision = rt.spec.training.precision
    claimed: list[int] = []
    try:
        trials = ask_population(rt, n, claimed=claimed)
    except BaseException:
        # The slots of the trials that were never asked; claimed ones are the reaper's to free.
        release_unasked(ctx, n - len(claimed))
        raise
    if len(trials) < n:
        release_unasked(ctx, n - len(trials))
    outcomes: dict[int, TrialOutcome] = {}
    heartbeat = Heartbeat(rt.study._storage, [t._trial_id for t in trials])
    trial_ids = {t.number: t._trial_id for t in trials}

    def settled(new: dict[int, TrialOutcome]) -> None:
        """Keep members' outcomes; the heartbeat stops beating for them (see Heartbeat.drop)."""
        outcomes.update(new)
        heartbeat.drop(trial_ids[number] for number in new)

    def tell(
        finished: list[tuple[tuple[optuna.Trial, TrialConfig], TrialResult]],
        stack: dict[str, Any],
    ) -> None:
        """Finish trained members, best first (see _best_first), and keep their outcomes."""
        ordered = _best_first(rt.study, finished)
        settled(finish_trials(ctx, [(t, r) for (t, _), r in ordered], stack))

    with heartbeat:
        prepared, unprepared = prepare_population(ctx, trials)
        settled(unprepared)
        for group in group_configs([c for _, c in prepared]):
            ctx.pruning.reset()  # the previous stack's trials are finished: epoch 1 again
            members = [prepared[i] for i in group]
            stop = reason_to_stop(ctx, fresh=True)  # a query per stack, not an epoch's training
            if stop is not None:  # SIGTERM or a cancel during an earlier stack: train no more
                settled({t.number: finish_interrupted(ctx, t, stop) for t, _ in members})
                continue
            hooks = [epoch_hook(ctx, t) for t, _ in members]
            # Recorded with each member: which trials trained together (their durations are
            # shares of this stack's time, and they were pruned against trials finished
            # before it started). A lone fp32 member trains as a sequential trial: none.
            alone = len(members) == 1 and precision == "fp32"
            stack = {} if alone else {"population": _stack_attr([t for t, _ in members])}

            def on_epoch(i: int, m: EpochMetrics, hooks: list = hooks) -> None:  # type: ignore[type-arg]
                hooks[i](m)

            def on_epochs(
                batch: list[tuple[int, EpochMetrics]],
                members: list[tuple[optuna.Trial, TrialConfig]] = members,
            ) -> None:
                report_epochs(ctx, [(members[i][0], m) for i, m in batch])

            def on_finish(
                batch: list[tuple[int, TrialResult]],
                members: list[tuple[optuna.Trial, TrialConfig]] = members,
                stack: dict[str, Any] = stack,
            ) -> None:
                # Members leaving while the stack trains on (pruned, stopped early) are told
                # now: the dashboard shows them finished, and a worker killed later in the
                # stack loses only the members still training.
                with uninterruptible():
                    tell([(members[i], r) for i, r in batch], stack)

            try:
                with interruptible():
                    results = train_population(
                        [c for _, c in members],
                        rt.data,
                        device=rt.device,
                        on_epoch=on_epoch,
                        autocast=None if precision == "fp32" else precision,
                        on_epochs=on_epochs,
                        on_finish=on_finish,
                    )
            except Exception as e:  # the whole group ended (stop grace over, out of memory, ...)
                # One event of the stack: counted once against max_trial_failures, as the
                # same error would be for one sequential trial.
                first = True
                for t, _ in members:
                    if t.number not in outcomes:  # not told when it left the stack
                        settled({t.number: finish_interrupted(ctx, t, e, counts_as_failure=first)})
                        first = False
                continue
            tell(
                [
                    (m, r)
                    for m, r in zip(members, results, strict=True)
                    if m[0].number not in outcomes
                ],
                stack,
            )
    if any(o.outcome in _TOLD for o in outcomes.values()):
        count_finished_into_job(ctx)
    return [outcomes[t.number] for t in trials]


# Stacks up to this size list their members in each member's ``population`` attribute. A
# GPU stack holds hundreds: listing them all in every member would write O(P^2) numbers
# (1.3 MB of JSON for the bench's 507-member stack); its members name the stack by ``first``.
LISTED_MEMBERS_MAX = 64


def _stack_attr(trials: list[optuna.Trial]) -> dict[str, Any]:
    """The ``population`` user attribute of a stack's members: its size, its first (lowest)
    trial number, which names the stack within the study (a trial trains in one stack), and,
    up to LISTED_MEMBERS_MAX members, their numbers."""
    numbers = sorted(t.number for t in trials)
    attr: dict[str, Any] = {"size": len(numbers), "first": numbers[0]}
    if len(numbers) <= LISTED_MEMBERS_MAX:
        attr["trials"] = numbers
    return attr


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
