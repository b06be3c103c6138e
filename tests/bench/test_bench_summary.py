"""The benchmark's summary: median-wall ratios, and the same ratios within each round."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from bench.run import Result, _by_round_line, _ceiling_line, _summary, _summary_line


def _result(
    name: str,
    walls: list[float],
    best: float = 0.95,
    compute_s: float = 0.0,
    trials: int = 48,
    values: dict[int, float] | None = None,
) -> Result:
    median = sorted(walls)[len(walls) // 2]
    return Result(
        name=name,
        wall_s=median,
        trials=trials,
        model_epochs=180,
        best_val_accuracy=best,
        trials_per_min=trials / median * 60,
        model_epochs_per_s=180 / median,
        peak_share=0.4,
        notes={
            "walls_s": walls,
            "paired_delta_pp": (0.1, 9),
            "sum_epoch_compute_s": compute_s,
            "complete_value_by_trial": values or {},
        },
    )


def test_ratios_over_the_medians_and_within_each_round() -> None:
    results = [
        _result("baseline", [20.0, 24.0, 22.0], best=0.948),
        _result("engine_population", [8.0, 6.0, 5.5], best=0.953, compute_s=5.0),
        _result("service", [10.0, 8.0, 11.0]),
    ]
    summary = _summary(results, "")
    assert round(summary["population_vs_baseline"], 6) == round(22.0 / 6.0, 6)
    assert round(summary["service_vs_baseline"], 6) == round(22.0 / 10.0, 6)
    # Round by round: each contender against the baseline of its own round.
    assert summary["population_vs_baseline_by_round"] == [2.5, 4.0, 4.0]
    assert summary["service_vs_baseline_by_round"] == [2.0, 3.0, 2.0]
    assert _summary_line(summary) == (
        "population_vs_baseline=3.67x service_vs_baseline=2.20x quality_delta=+0.50pp"
    )
    assert _by_round_line(summary) == "population 2.50x, 4.00x, 4.00x; service 2.00x, 3.00x, 2.00x"


def test_ceiling_without_overhead_and_peak_share_needed() -> None:
    results = [
        _result("baseline", [20.0, 24.0, 22.0]),
        # The median run took 6.0 s, 5.0 s of it in its epochs' training and validation.
        _result("engine_population", [8.0, 6.0, 5.5], compute_s=5.0),
        _result("service", [10.0, 8.0, 11.0]),
    ]
    summary = _summary(results, "")
    assert round(summary["population_vs_baseline_without_overhead"], 6) == round(22.0 / 5.0, 6)
    # 22 / 6 = 3.67x at 40% of peak: 5x takes 40% x 5 / 3.67 = 54.5%.
    assert round(summary["peak_share_needed_for_target"], 6) == round(0.4 * 5 / (22.0 / 6.0), 6)
    assert _ceiling_line(summary) == (
        "population without any overhead (its epochs' training and validation alone): "
        "4.40x; 5x at its model-epochs needs 55% of the matmul peak end to end"
    )


def test_a_baseline_of_the_first_trials_is_compared_by_rate_and_over_those_trials() -> None:
    # The baseline ran the first 64 of 512 trials (bench --baseline-trials 64): 64 trials in
    # 40 s; the population all 512 in 10 s, its best (0.97, trial 300) outside the first 64.
    values = {3: 0.951, 63: 0.955, 64: 0.99, 300: 0.97}
    results = [
        _result("baseline", [40.0, 44.0], best=0.952, trials=64),
        _result(
            "engine_population", [10.0, 12.0], best=0.99, compute_s=8.0, trials=512, values=values
        ),
        _result("service", [16.0, 20.0], trials=512),
    ]
    summary = _summary(results, "", first=64)
    # trials per minute: 512 / 12 s against 64 / 44 s
    assert round(summary["population_vs_baseline"], 6) == round((512 / 12) / (64 / 44), 6)
    assert summary["population_vs_baseline_by_round"] == [
        round(40 / 10 * 8, 2),
        round(44 / 12 * 8, 2),
    ]
    assert summary["service_vs_baseline_by_round"] == [20.0, round(44 / 20 * 8, 2)]
    # Quality over the trials both ran (numbers 0-63), and over all of the population's.
    assert round(summary["quality_delta_pp"], 6) == round((0.955 - 0.952) * 100, 6)
    assert round(summary["quality_delta_all_trials_pp"], 6) == round((0.99 - 0.952) * 100, 6)
    # Zero overhead: 512 trials in 8 s of epochs against 64 in 44 s.
    assert round(summary["population_vs_baseline_without_overhead"], 6) == round(
        (512 / 8) / (64 / 44), 6
    )


def test_results_are_kept_as_they_come(tmp_path: Path) -> None:
    """A bench that stops halfway keeps each contender measured until then (the GPU runs of
    session 17 lost theirs when a service contender could not start)."""
    from bench.run import read_partial, record_partial

    path = tmp_path / "results" / "bench-x.partial.jsonl"
    record_partial(None, 0, _result("baseline", [10.0]))  # no file asked for: nothing
    assert not path.parent.exists()
    first, second = _result("baseline", [10.0]), _result("engine_population", [2.0], best=0.96)
    first.notes["walls_s"] = [10.0]
    record_partial(path, 0, first)
    record_partial(path, 1, second)
    # As the full JSON keeps them: JSON's types (tuples come back as lists)
    as_json = [
        (1, json.loads(json.dumps(asdict(first)))),
        (2, json.loads(json.dumps(asdict(second)))),
    ]
    assert [(k, asdict(r)) for k, r in read_partial(path)] == as_json
    assert [r.name for _, r in read_partial(path)] == ["baseline", "engine_population"]
