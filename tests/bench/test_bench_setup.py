"""The benchmark's set-up per device: trial budgets, the one-model-at-a-time subset, contenders."""

from __future__ import annotations

from pathlib import Path

from bench.run import (
    BASELINE_TRIALS_CUDA,
    TRIALS_CUDA,
    _precision_of,
    contenders,
    job_spec,
    make_setup,
    run_engine,
    slow_bf16_reason,
)

NO_MNIST = Path("/nonexistent")  # digits: the bench's fallback data


def test_cpu_runs_every_contender_on_every_trial() -> None:
    setup = make_setup(False, "cpu", NO_MNIST)
    assert setup.baseline_trials is None and setup.n_baseline_trials == setup.n_trials
    assert job_spec(setup, "x")["training"]["device"] == "cpu"
    names = [c[0] for c in contenders("cpu")]
    assert names[0] == "baseline" and "baseline_flushed" in names and "service_1proc" in names


def test_cuda_runs_hundreds_of_trials_and_the_baseline_on_the_first_ones() -> None:
    setup = make_setup(False, "cuda", NO_MNIST)
    assert (setup.n_trials, setup.baseline_trials) == (TRIALS_CUDA, BASELINE_TRIALS_CUDA)
    spec = job_spec(setup, "x", "tf32", setup.n_baseline_trials)
    assert spec["n_trials"] == BASELINE_TRIALS_CUDA
    assert spec["training"]["device"] == "cuda" and spec["training"]["precision"] == "tf32"
    quick = make_setup(True, "cuda", NO_MNIST)
    assert (quick.n_trials, quick.baseline_trials) == (TRIALS_CUDA // 4, BASELINE_TRIALS_CUDA // 4)
    # CPU-only contenders are left out; tf32 is in, in each contender's precision
    by_name = {name: precision for name, _kind, precision, _arg in contenders("cuda")}
    assert "baseline_flushed" not in by_name and "service_1proc" not in by_name
    assert by_name["engine_population_tf32"] == by_name["service_tf32"] == "tf32"
    assert all(_precision_of(name) == p for name, p in by_name.items())


def test_bf16_contenders_are_left_out_on_a_cpu_without_fast_bf16() -> None:
    # an AVX2-only CPU: bf16 matmuls through a reference kernel, 0.7 against 154 GFLOP/s
    reason = slow_bf16_reason("cpu", speedup=0.7 / 154)
    assert reason == (
        "training.precision bf16: this CPU multiplies bf16 matrices at 0.00x its fp32 speed "
        "(it lacks fast bf16 matrix instructions such as AMX), so this job trains slower than "
        "it would with training.precision fp32"
    )
    assert slow_bf16_reason("cpu", speedup=3.9) is None  # AMX
    assert slow_bf16_reason("cuda") is None  # not measured: a GPU has fast bf16
    kept = contenders("cpu", ["fp32"])
    assert [c[0] for c in kept] == [c[0] for c in contenders("cpu") if c[2] == "fp32"]
    assert len(kept) == len(contenders("cpu")) - 2  # engine_population_bf16, service_bf16
    assert {c[2] for c in contenders("cuda", ["fp32", "tf32"])} == {"fp32", "tf32"}


def test_overrides_and_a_subset_as_large_as_the_job_is_the_whole_job() -> None:
    setup = make_setup(False, "cuda", NO_MNIST, trials=100, epochs=3, baseline_trials=20)
    assert (setup.n_trials, setup.epochs, setup.baseline_trials) == (100, 3, 20)
    whole = make_setup(False, "cuda", NO_MNIST, trials=50, baseline_trials=50)
    assert whole.baseline_trials is None and whole.n_baseline_trials == 50


def test_an_engine_run_reports_the_stacks_its_trials_trained_in(tmp_path: Path) -> None:
    """run_engine reads each stack once, by the ``population`` attribute's ``first`` trial;
    trials trained alone belong to none."""
    setup = make_setup(True, "cpu", NO_MNIST, trials=7, epochs=1)
    result, _curve = run_engine(setup, job_spec(setup, "engine_population"), 3, tmp_path)
    sizes = result.notes["stack_sizes"]
    assert sizes and all(2 <= s <= 3 for s in sizes), sizes
    assert result.population == max(sizes)
    assert result.trials == 7 and 7 - sum(sizes) >= 0
