"""worker.trial_runner pieces that are not exercised end to end elsewhere."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest

from worker import trial_runner
from worker.trial_runner import PruningSnapshot


def _study(tmp_path: Path, pruner: optuna.pruners.BasePruner) -> optuna.Study:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(direction="maximize", storage=storage, pruner=pruner)
    for i in range(6):  # finished trials with learning curves at different heights
        t = study.ask()
        for step in range(1, 6):
            t.report(0.5 + 0.05 * i + 0.01 * step, step)
        study.tell(t, 0.5 + 0.05 * i + 0.05)
    return study


@pytest.mark.parametrize(
    "pruner",
    [
        optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1),
        optuna.pruners.PercentilePruner(25.0, n_startup_trials=3),
        optuna.pruners.SuccessiveHalvingPruner(),
        optuna.pruners.NopPruner(),
    ],
    ids=["median", "percentile", "successive-halving", "nop"],
)
def test_snapshot_decides_as_trial_should_prune(
    tmp_path: Path, pruner: optuna.pruners.BasePruner
) -> None:
    study = _study(tmp_path, pruner)
    members = [study.ask() for _ in range(8)]
    snapshot = PruningSnapshot()
    decisions = []
    for step in range(1, 6):
        for j, t in enumerate(members):
            t.report(0.45 + 0.04 * j + 0.01 * step, step)
            expected = t.should_prune()
            assert snapshot.should_prune(t, step) == expected, (step, j)
            decisions.append(expected)
    if isinstance(pruner, optuna.pruners.PercentilePruner):  # the snapshot's own path
        assert any(decisions) and not all(decisions)  # the case decides both ways


def test_one_read_of_the_finished_trials_per_epoch_and_each_curve_read_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    study = _study(tmp_path, optuna.pruners.MedianPruner(n_startup_trials=3))
    members = [study.ask() for _ in range(8)]
    storage = study._storage
    id_reads: list[Any] = []
    curve_reads: list[list[int]] = []
    real_ids, real_curves = trial_runner.completed_trial_ids, trial_runner.learning_curves

    def counted_ids(*args: Any) -> Any:
        id_reads.append(args)
        return real_ids(*args)

    def counted_curves(storage_: Any, trial_ids: list[int]) -> Any:
        curve_reads.append(list(trial_ids))
        return real_curves(storage_, trial_ids)

    def loads_every_trial(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the snapshot reads only the finished trials' curves")

    monkeypatch.setattr(trial_runner, "completed_trial_ids", counted_ids)
    monkeypatch.setattr(trial_runner, "learning_curves", counted_curves)
    get_all_trials = storage.get_all_trials
    monkeypatch.setattr(storage, "get_all_trials", loads_every_trial)
    snapshot = PruningSnapshot()
    for step in range(1, 4):
        for t in members:
            t.report(0.6, step)
            snapshot.should_prune(t, step)
    assert len(id_reads) == 3  # 3 epochs x 8 members: one read per epoch
    assert len(curve_reads) == 1 and len(curve_reads[0]) == 6  # the six finished, once
    # Another worker finishes a trial: the next epoch reads its curve only, and it counts.
    monkeypatch.setattr(storage, "get_all_trials", get_all_trials)  # Study.tell reads them
    other = study.ask()
    other.report(0.99, 1)
    study.tell(other, 0.99)
    monkeypatch.setattr(storage, "get_all_trials", loads_every_trial)
    members[0].report(0.6, 4)
    snapshot.should_prune(members[0], 4)
    assert curve_reads[1:] == [[other._trial_id]]
    assert len(snapshot._completed or []) == 7


def test_reset_makes_newly_finished_trials_count(tmp_path: Path) -> None:
    """A second stack starts at epoch 1 again after the first stack's trials finished: without
    a reset it would prune against the first stack's stale snapshot."""
    study = _study(tmp_path, optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0))
    snapshot = PruningSnapshot()
    low = study.ask()
    low.report(0.2, 1)
    first = snapshot.should_prune(low, 1)
    for _ in range(6):  # other trials finish with much higher curves meanwhile
        t = study.ask()
        t.report(0.99, 1)
        study.tell(t, 0.99)
    mid = study.ask()
    mid.report(0.85, 1)  # above the first six trials' median (0.635), below the new (0.875)
    assert not snapshot.should_prune(mid, 1)  # the stale snapshot
    snapshot.reset()
    assert snapshot.should_prune(mid, 1)
    assert mid.should_prune()  # as Optuna decides with the fresh trials
    assert first


def test_ask_claims_waiting_trials_oldest_first_and_reads_no_running_trial(
    tmp_path: Path,
) -> None:
    """Optuna's Study.ask reads every unfinished trial to find WAITING ones, so a population's
    P asks read O(P^2) trials; ours is a fixed handful of statements whatever is running."""
    from types import SimpleNamespace

    from optuna.storages._rdb import models
    from sqlalchemy import event

    from service.studies import make_storage, waiting_trial_ids

    storage = make_storage(f"sqlite:///{tmp_path / 'ask.db'}")
    study = optuna.create_study(storage=storage)
    rt: Any = SimpleNamespace(study=study)
    running = [trial_runner.ask(rt) for _ in range(40)]
    for lr in (0.1, 0.2, 0.3):
        study.enqueue_trial({"lr": lr})
    waiting = waiting_trial_ids(study._storage, study._study_id)
    assert len(waiting) == 3
    # another worker claims the oldest WAITING trial between our lookup and our claim
    other = optuna.load_study(study_name=study.study_name, storage=storage).ask()
    assert other._trial_id == waiting[0]
    loaded: list[int] = []  # trial rows read from the database

    def on_load(target: Any, _context: Any) -> None:
        loaded.append(target.trial_id)

    event.listen(models.TrialModel, "load", on_load)
    claimed = trial_runner.ask_population(rt, 3, waiting)
    assert [t.suggest_float("lr", 0.0, 1.0) for t in claimed[:2]] == [0.2, 0.3]  # enqueued
    assert claimed[2].number == len(running) + 3  # then a new trial
    assert waiting == []
    assert len(loaded) <= 3 * 3, loaded  # its own row only (claim, load); Optuna: 41+ per ask
    loaded.clear()
    study.ask()
    assert len(loaded) > len(running)  # what this replaces
    event.remove(models.TrialModel, "load", on_load)
    assert {t.state for t in study.get_trials()} == {optuna.trial.TrialState.RUNNING}
    storage.engine.dispose()
