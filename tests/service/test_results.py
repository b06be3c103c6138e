"""Read-side views: trial rows, counts, and the best trial (never a diverged one; among ties the
one whose weights were saved)."""

from __future__ import annotations

import math

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from service.results import (
    MODEL_ARTIFACT_ATTR,
    best_trial,
    best_view,
    progress,
    state_counts,
    top_trials,
    trial_row,
)

D = {"learning_rate": FloatDistribution(1e-4, 1.0, log=True)}
# Every kind of parameter: a trial's stored parameters are read back (progress's _params).
ALL_KINDS = {"learning_rate": 0.01, "optimizer": "adamw", "width": 64}
ADD_D = {
    **D,
    "optimizer": CategoricalDistribution(["sgd", "adam", "adamw"]),
    "width": IntDistribution(16, 256, log=True),
}


def add(
    study: optuna.Study,
    value: float | None,
    state: TrialState = TrialState.COMPLETE,
    params: dict[str, object] | None = None,
    **attrs: object,
) -> None:
    study.add_trial(
        create_trial(
            state=state,
            value=value if state == TrialState.COMPLETE else None,
            params=params or {"learning_rate": 0.01},
            distributions=ADD_D if params else D,
            user_attrs=attrs,
            intermediate_values={0: 0.5, 1: 0.6} if state != TrialState.WAITING else None,
        )
    )


def study(direction: str = "maximize") -> optuna.Study:
    return optuna.create_study(direction=direction)


def test_best_is_none_without_complete_trials() -> None:
    s = study()
    add(s, None, TrialState.PRUNED, diverged=True)
    assert best_trial(s) is None


def test_diverged_and_pruned_trials_are_never_best() -> None:
    s = study()
    add(s, 0.5)
    add(s, None, TrialState.PRUNED, diverged=True, diverged_reason="loss is nan")
    add(s, None, TrialState.FAIL)
    t = best_trial(s)
    assert t is not None and t.number == 0


def test_direction() -> None:
    s = study("minimize")
    add(s, 0.3)
    add(s, 0.1)
    add(s, 0.2)
    assert best_trial(s).number == 1  # type: ignore[union-attr]
    assert [t.number for t in top_trials(s, 2)] == [1, 2]


def test_ties_prefer_the_trial_with_saved_weights() -> None:
    # Two workers: trial 0 and trial 1 tie; trial 1 finished first and saved its weights, trial 0
    # finished later and (not strictly better) saved none. /best must name the one with a model.
    s = study()
    add(s, 0.9)
    add(s, 0.9, **{MODEL_ARTIFACT_ATTR: "abc"})
    add(s, 0.8, **{MODEL_ARTIFACT_ATTR: "old"})
    assert best_trial(s).number == 1  # type: ignore[union-attr]
    assert best_view(s)["model_artifact_id"] == "abc"


def test_ties_without_weights_break_toward_the_earlier_trial() -> None:
    s = study()
    add(s, 0.7)
    add(s, 0.9)
    add(s, 0.9)
    assert best_trial(s).number == 1  # type: ignore[union-attr]


def test_best_view_carries_fixed_params_into_the_config() -> None:
    s = study()
    add(s, 0.9, best_val_accuracy=0.9, best_epoch=3, epochs_run=5, test_accuracy=0.88)
    view = best_view(s, fixed={"optimizer": "sgd"})
    assert view["config"] == {"optimizer": "sgd", "learning_rate": 0.01}
    assert (view["value"], view["val_accuracy"], view["test_accuracy"]) == (0.9, 0.9, 0.88)
    assert (view["best_epoch"], view["epochs_run"]) == (3, 5)


def test_trial_row_and_counts() -> None:
    s = study()
    add(s, 0.9, epochs_run=2, duration_s=1.5)
    add(s, None, TrialState.PRUNED, diverged=True, diverged_reason="loss is inf")
    add(s, None, TrialState.WAITING)
    rows = [trial_row(t, with_history=True) for t in s.get_trials()]
    assert (
        rows[0]["state"] == "complete" and rows[0]["value"] == 0.9 and rows[0]["duration_s"] == 1.5
    )
    assert rows[0]["intermediate_values"] == {"0": 0.5, "1": 0.6}
    assert (
        rows[1]["diverged"] is True
        and rows[1]["reason"] == "loss is inf"
        and rows[1]["value"] is None
    )
    assert rows[2]["state"] == "waiting"
    counts = state_counts(s.get_trials())
    assert (counts["complete"], counts["pruned"], counts["waiting"], counts["diverged"]) == (
        1,
        1,
        1,
        1,
    )


def test_non_finite_intermediate_values_become_none() -> None:
    s = study()
    s.add_trial(
        create_trial(
            state=TrialState.PRUNED,
            params={"learning_rate": 5.0 / 10},
            distributions=D,
            intermediate_values={0: 0.4, 1: math.inf},
        )
    )
    row = trial_row(s.get_trials()[0], with_history=True)
    assert row["intermediate_values"] == {"0": 0.4, "1": None}


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_progress_answers_as_the_full_read_without_it(database_url: str, direction: str) -> None:
    """progress() (the polled job detail) equals state_counts + best_trial, on SQLite, on
    PostgreSQL and on a storage that is not an RDB one."""
    from service.studies import make_storage

    for s in (
        optuna.create_study(direction=direction, storage=make_storage(database_url)),
        study(direction),  # in-memory: the fallback
    ):
        counts, best = progress(s)
        assert best is None and counts["complete"] == 0 and counts["diverged"] == 0
        add(s, 0.7, params=ALL_KINDS)
        add(s, 0.9, params=ALL_KINDS)
        add(s, 0.9, params=ALL_KINDS, **{MODEL_ARTIFACT_ATTR: "abc"})  # the tie with weights wins
        add(s, 0.1, params=ALL_KINDS)
        add(s, None, TrialState.PRUNED, diverged=True, diverged_reason="loss is nan")
        add(s, None, TrialState.PRUNED, diverged=False)
        add(s, None, TrialState.FAIL)
        add(s, None, TrialState.WAITING)
        s.ask()  # RUNNING
        counts, best = progress(s)
        assert counts == state_counts(s.get_trials(deepcopy=False))
        assert counts["complete"] == 4 and counts["diverged"] == 1 and counts["running"] == 1
        expected = best_trial(s)
        assert expected is not None and best is not None
        assert (best.number, best.value, best.params) == (
            expected.number,
            expected.value,
            expected.params,
        )
        assert best.number == (2 if direction == "maximize" else 3)


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_top_trials_on_a_database_ranks_as_the_full_read(database_url: str, direction: str) -> None:
    """top_trials loads only the k best from an RDB storage; the same trials, in the same
    order (ties: saved weights first, then the earlier trial), as ranking every trial."""
    from service.studies import make_storage

    s = optuna.create_study(direction=direction, storage=make_storage(database_url))
    memory = study(direction)
    for target in (s, memory):
        for value, attrs in [
            (0.7, {}),
            (0.9, {}),
            (0.9, {MODEL_ARTIFACT_ATTR: "abc"}),
            (0.1, {}),
            (0.5, {}),
            (0.5, {}),
            (float("inf"), {}),
        ]:
            add(target, value, **attrs)
        add(target, None, TrialState.PRUNED, diverged=True)
        add(target, None, TrialState.FAIL)

    def ranked(st: optuna.Study, k: int) -> list[tuple[int, float | None, dict[str, object]]]:
        return [(t.number, t.value, t.user_attrs) for t in top_trials(st, k)]

    for k in (1, 3, 10):
        assert ranked(s, k) == ranked(memory, k)
    expected_first = [6, 2, 1] if direction == "maximize" else [3, 4, 5]
    assert [n for n, _, _ in ranked(s, 3)] == expected_first
    assert len(ranked(s, 10)) == 7  # COMPLETE trials only
