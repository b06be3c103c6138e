"""``hpo run``'s progress line, read from a real SQLite study."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState
from rich.console import Console

from hpo.local import _Listener, outcomes_status
from hpo.progress import JobProgress
from worker.trial_runner import Outcome, TrialOutcome


class _Recording(JobProgress):
    """The real progress display, keeping what each update was told."""

    def __init__(self, *, maximize: bool) -> None:
        objective = "val_accuracy" if maximize else "val_loss"
        super().__init__(4, objective=objective, console=Console(file=io.StringIO()))
        self.updates: list[dict[str, Any]] = []

    def update(self, **kwargs: Any) -> None:  # type: ignore[override]
        self.updates.append(kwargs)
        super().update(**kwargs)


@pytest.mark.parametrize(("direction", "best"), [("maximize", 0.9), ("minimize", 0.7)])
def test_refresh_counts_states_and_the_best_value(
    tmp_path: Path, direction: str, best: float
) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'db.sqlite'}", direction=direction)
    for value in (0.7, 0.9):
        study.add_trial(optuna.trial.create_trial(value=value, state=TrialState.COMPLETE))
    study.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED))
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL))
    study.ask()  # one running: counted nowhere
    with _Recording(maximize=direction == "maximize") as progress:
        listener = _Listener(study, progress)
        listener.refresh("trial 3 failed")
    assert progress.updates[-1] == {
        "done": 3,
        "pruned": 1,
        "failed": 1,
        "best": best,
        "status": "trial 3 failed",
    }


def test_a_population_refreshes_once_with_a_tally(tmp_path: Path) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'db.sqlite'}", direction="maximize")
    study.add_trial(optuna.trial.create_trial(value=0.8, state=TrialState.COMPLETE))
    study.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED))
    study.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED))
    wave = [
        TrialOutcome(Outcome.PRUNED, 10),
        TrialOutcome(Outcome.COMPLETE, 8, value=0.8),
        TrialOutcome(Outcome.PRUNED, 9),
    ]
    with _Recording(maximize=True) as progress:
        listener = _Listener(study, progress)
        before = len(progress.updates)
        listener.trials_done(None, wave)  # type: ignore[arg-type]
    assert len(progress.updates) == before + 1
    assert progress.updates[-1]["status"] == "trials 8-10: 2 pruned, 1 complete"
    assert progress.updates[-1]["done"] == 3


def test_a_single_trial_names_its_outcome() -> None:
    assert outcomes_status([TrialOutcome(Outcome.DIVERGED, 4)]) == "trial 4 diverged"
