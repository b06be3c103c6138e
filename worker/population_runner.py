"""Run several asked trials of one job as populations (one batched model per compatible group).

Each member is asked, prepared, reported, pruned and told exactly like a sequential trial; only
the training in between is batched (``worker.population.train_population``). P=1 never comes
here: the worker uses the sequential ``run_trial`` for it.
"""

from __future__ import annotations

import threading
from types import TracebackType

import optuna

from worker.training import EpochMetrics, TrialConfig
from worker.trial_runner import (
    TrialContext,
    TrialOutcome,
    ask,
    epoch_hook,
    finish,
    finish_interrupted,
    prepare,
)


class MultiHeartbeat:
    """One thread that beats for every trial of a population (instead of P threads)."""

    def __init__(self, storage: optuna.storages.BaseStorage, trial_ids: list[int]) -> None:
        self.storage = storage
        self.trial_ids = trial_ids
        self.interval = getattr(storage, "get_heartbeat_interval", lambda: None)()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _beat(self) -> None:
        assert self.interval is not None
        while True:
            for tid in self.trial_ids:
                self.storage.record_heartbeat(tid)  # type: ignore[attr-defined]
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> MultiHeartbeat:
        if self.interval is not None:
            self._thread = threading.Thread(target=self._beat, name="hpo-heartbeat", daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def run_population(ctx: TrialContext, n: int) -> list[TrialOutcome]:
    """Ask ``n`` trials (the caller reserved n budget slots), train compatible ones together."""
    from worker.population import group_configs, train_population

    rt = ctx.rt
    trials = [ask(rt) for _ in range(n)]
    outcomes: dict[int, TrialOutcome] = {}
    with MultiHeartbeat(rt.study._storage, [t._trial_id for t in trials]):
        prepared: list[tuple[optuna.Trial, TrialConfig]] = []
        for t in trials:
            try:
                prepared.append((t, prepare(rt, t)))
            except Exception as e:
                outcomes[t.number] = finish_interrupted(ctx, t, e)
        for group in group_configs([c for _, c in prepared]):
            members = [prepared[i] for i in group]
            hooks = [epoch_hook(ctx, t) for t, _ in members]

            def on_epoch(i: int, m: EpochMetrics, hooks: list = hooks) -> None:  # type: ignore[type-arg]
                hooks[i](m)

            try:
                results = train_population(
                    [c for _, c in members], rt.data, device=rt.device, on_epoch=on_epoch
                )
            except Exception as e:  # the whole group failed (e.g. out of memory)
                for t, _ in members:
                    outcomes[t.number] = finish_interrupted(ctx, t, e)
                continue
            for (t, _), r in zip(members, results, strict=True):
                outcomes[t.number] = (
                    finish_interrupted(ctx, t, r.interrupted)
                    if r.interrupted
                    else finish(ctx, t, r)
                )
    return [outcomes[t.number] for t in trials]
