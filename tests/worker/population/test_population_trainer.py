"""train_population against train_trial: the invariant that makes population training safe."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch

from worker.population import auto_population_size, group_configs, sizing, train_population
from worker.population.fused_update import FusedStackOptimizer, stack_optimizer
from worker.training import (
    EpochMetrics,
    TensorSplits,
    TrialConfig,
    TrialResult,
    evaluate,
    train_trial,
)

LOSS_RTOL = 1e-4


def _without_time(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def _assert_same_run(
    got: TrialResult, expected: TrialResult, data: TensorSplits, *, val_rtol: float = LOSS_RTOL
) -> None:
    """Equal within float tolerance: losses relative, accuracies within one sample."""
    n_train, n_val = int(data.y_train.shape[0]), int(data.y_val.shape[0])
    assert got.epochs_run == expected.epochs_run
    assert got.best_epoch == expected.best_epoch
    assert got.stopped_early == expected.stopped_early
    assert got.diverged == expected.diverged
    assert got.diverged_reason == expected.diverged_reason
    assert got.n_parameters == expected.n_parameters
    assert got.seed == expected.seed and got.objective == expected.objective
    assert len(got.history) == len(expected.history)
    for mine, theirs in zip(got.history, expected.history, strict=True):
        assert mine["epoch"] == theirs["epoch"]
        assert mine["lr"] == pytest.approx(theirs["lr"], rel=1e-12)
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=LOSS_RTOL)
        assert mine["val_loss"] == pytest.approx(theirs["val_loss"], rel=val_rtol)
        assert abs(mine["train_accuracy"] - theirs["train_accuracy"]) <= 1 / n_train + 1e-12
        assert abs(mine["val_accuracy"] - theirs["val_accuracy"]) <= 1 / n_val + 1e-12
        assert mine["seconds"] >= 0
    assert type(got.model) is type(expected.model)
    assert [type(m) for m in got.model] == [type(m) for m in expected.model]  # type: ignore[attr-defined]
    assert not got.model.training
    theirs_state = expected.model.state_dict()
    for key, value in got.model.state_dict().items():
        torch.testing.assert_close(value, theirs_state[key], rtol=1e-3, atol=2e-4, msg=key)


BASE: dict[str, Any] = {"hidden_layers": (32, 16), "batch_size": 64, "max_epochs": 5}

MIXED = [  # at least two members per optimizer, so every batched update is exercised
    TrialConfig(**BASE, optimizer="adam", learning_rate=3e-3, patience=None, seed=0),
    TrialConfig(
        **BASE,
        optimizer="adam",
        learning_rate=1e-2,
        weight_decay=1e-3,
        init="xavier_uniform",
        lr_schedule="exponential",
        lr_gamma=0.8,
        objective="val_loss",
        seed=1,
    ),
    TrialConfig(
        **BASE,
        optimizer="adam",
        learning_rate=2e-3,
        beta1=0.8,
        beta2=0.99,
        init="orthogonal",
        patience=2,
        min_delta=1.0,  # nothing beats epoch 1 by 1.0: stops after epoch 3
        seed=2,
    ),
    TrialConfig(
        **BASE,
        optimizer="adamw",
        learning_rate=5e-3,
        weight_decay=1e-2,
        init="lecun_normal",
        lr_schedule="cosine",
        seed=3,
    ),
    TrialConfig(**BASE, optimizer="adamw", learning_rate=1e-3, weight_decay=0.1, seed=4),
    TrialConfig(**BASE, optimizer="sgd", learning_rate=0.2, init="he_uniform", seed=5),
    TrialConfig(
        **BASE, optimizer="sgd", learning_rate=0.1, weight_decay=1e-3, lr_schedule="cosine", seed=6
    ),
    TrialConfig(
        **BASE,
        optimizer="nesterov",
        learning_rate=0.05,
        momentum=0.8,
        patience=3,
        min_delta=1.0,  # stops after epoch 4
        seed=7,
    ),
    TrialConfig(**BASE, optimizer="nesterov", learning_rate=0.02, seed=8),
    TrialConfig(**BASE, optimizer="momentum", learning_rate=0.02, seed=9),
    TrialConfig(
        **BASE, optimizer="momentum", learning_rate=0.05, momentum=0.5, weight_decay=1e-3, seed=10
    ),
    TrialConfig(**BASE, optimizer="rmsprop", learning_rate=1e-3, momentum=0.5, seed=11),
    TrialConfig(**BASE, optimizer="rmsprop", learning_rate=3e-3, weight_decay=1e-4, seed=12),
    TrialConfig(**BASE, optimizer="adagrad", learning_rate=0.05, init="xavier_normal", seed=13),
    TrialConfig(
        **BASE,
        optimizer="adagrad",
        learning_rate=0.02,
        init="normal_0.01",
        objective="val_loss",
        seed=14,
    ),
]


def test_members_equal_their_sequential_runs(small_digits: TensorSplits) -> None:
    results = train_population(MIXED, small_digits)
    assert len(results) == len(MIXED)
    for config, result in zip(MIXED, results, strict=True):
        _assert_same_run(result, train_trial(config, small_digits), small_digits)
        assert result.interrupted is None
    stops = {r.epochs_run for r in results}
    assert {3, 4, 5} <= stops  # early stopping at different epochs happened
    assert results[2].stopped_early and results[2].best_epoch == 1


def test_stacks_skip_dead_features_when_enough_are_and_the_copy_fits(
    small_digits: TensorSplits, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The invariant tests above run with dead features skipped: 5 of digits' 64 pixels are 0
    in every training row (7.8%, above MIN_DEAD_SHARE). With fewer, or with a copy of the live
    columns beyond the memory budget, stacks train on every feature."""
    from worker.population import trainer

    live = trainer.live_feature_mask(small_digits)
    assert live is not None and int((~live).sum()) == 5
    assert (~live).sum() >= trainer.MIN_DEAD_SHARE * live.numel()
    revived = _set_train_value(small_digits, column=int((~live).nonzero()[0]), value=1.0)
    assert int((~trainer.live_features(revived.X_train)).sum()) == 4
    assert trainer.live_feature_mask(revived) is not None  # 4 of 64 = 6.25%: still enough
    twice = _set_train_value(revived, column=int((~live).nonzero()[1]), value=1.0)
    assert trainer.live_feature_mask(twice) is None  # 3 of 64 dead: below MIN_DEAD_SHARE
    monkeypatch.setattr(trainer, "memory_budget_bytes", lambda device: 400 * 59 * 4 - 1)
    assert trainer.live_feature_mask(small_digits) is None  # 400 rows x 59 live columns do not fit
    monkeypatch.setattr(trainer, "memory_budget_bytes", lambda device: 400 * 59 * 4)
    assert trainer.live_feature_mask(small_digits) is not None


def test_dead_features_skipped_in_training_still_count_in_validation(
    small_digits: TensorSplits,
) -> None:
    """Validation rows nonzero where no training row is: every member (weight decay moves the
    skipped weights, which these rows then read) still equals its sequential run."""
    from worker.population import trainer

    dead = (~trainer.live_features(small_digits.X_train)).nonzero().view(-1)
    X_val = small_digits.X_val.clone()
    X_val[: X_val.shape[0] // 2, dead] = 1.5
    data = TensorSplits(
        small_digits.X_train,
        small_digits.y_train,
        X_val,
        small_digits.y_val,
        small_digits.X_test,
        small_digits.y_test,
    )
    configs = [MIXED[1], MIXED[3], MIXED[6], MIXED[10], MIXED[12]]  # each with weight decay
    assert all(c.weight_decay > 0 for c in configs)
    results = train_population(configs, data)
    live = data._derived["population.live_features"]  # the stacks skipped the dead features
    assert live is not None and int((~live).sum()) == len(dead) == 5
    assert data._derived[("population.train_inputs", None, 59)].shape == (400, 59)
    for config, result in zip(configs, results, strict=True):
        _assert_same_run(result, train_trial(config, data), data)


def test_a_net_without_hidden_layers_trains_on_every_feature(small_digits: TensorSplits) -> None:
    """Its one layer is the output layer, which the dead-feature skipping does not cover."""
    configs = [
        TrialConfig(hidden_layers=(), optimizer="sgd", learning_rate=0.1, max_epochs=2, seed=0),
        TrialConfig(hidden_layers=(), optimizer="adam", weight_decay=1e-3, max_epochs=2, seed=1),
    ]
    train_population(MIXED[:2], small_digits)  # a hidden-layer stack first: inputs cached
    assert small_digits._derived[("population.train_inputs", None, 59)].shape[1] == 59
    for precision in (None, "bf16"):
        results = train_population(configs, small_digits, autocast=precision)
        if precision is None:
            for config, result in zip(configs, results, strict=True):
                _assert_same_run(result, train_trial(config, small_digits), small_digits)
        assert all(r.epochs_run == 2 and not r.diverged for r in results)


def _set_train_value(data: TensorSplits, *, column: int, value: float) -> TensorSplits:
    """``data`` with one training row's ``column`` set to ``value`` (a copy)."""
    X = data.X_train.clone()
    X[0, column] = value
    return TensorSplits(X, data.y_train, data.X_val, data.y_val, data.X_test, data.y_test)


def test_members_equal_their_sequential_runs_with_default_threads(
    small_digits: TensorSplits, default_threads: int
) -> None:
    assert torch.get_num_threads() == default_threads
    configs = [replace(MIXED[0], max_epochs=2), replace(MIXED[1], max_epochs=2)]
    for config, result in zip(configs, train_population(configs, small_digits), strict=True):
        _assert_same_run(result, train_trial(config, small_digits), small_digits)


def test_rmsprop_without_momentum_equals_its_sequential_runs(small_digits: TensorSplits) -> None:
    """Such a run steps through Adam's fused kernel (beta1 = 0, no bias correction) on CPU;
    the sequential run uses torch.optim.RMSprop."""
    configs = [
        TrialConfig(**BASE, optimizer="rmsprop", learning_rate=1e-3, seed=21),
        TrialConfig(**BASE, optimizer="rmsprop", learning_rate=3e-3, weight_decay=1e-3, seed=22),
    ]
    results = train_population(configs, small_digits)
    for config, result in zip(configs, results, strict=True):
        _assert_same_run(result, train_trial(config, small_digits), small_digits)


def test_batch_norm_members_equal_their_sequential_runs(small_digits: TensorSplits) -> None:
    base = {**BASE, "batch_norm": True, "activation": "tanh", "batch_size": 50}
    configs = [
        TrialConfig(**base, optimizer="sgd", learning_rate=0.1, seed=0),
        TrialConfig(**base, optimizer="sgd", learning_rate=0.03, weight_decay=1e-3, seed=1),
        TrialConfig(**base, optimizer="momentum", learning_rate=0.02, seed=2),
        TrialConfig(**base, optimizer="momentum", learning_rate=0.01, momentum=0.5, seed=3),
    ]
    results = train_population(configs, small_digits)
    for config, result in zip(configs, results, strict=True):
        _assert_same_run(result, train_trial(config, small_digits), small_digits)


def test_batch_norm_with_adaptive_optimizers(small_digits: TensorSplits) -> None:
    """The bias before a BatchNorm gets a pure rounding-noise gradient (BN removes it exactly
    in theory); Adam turns noise into lr-sized steps, so that bias and the running mean that
    tracks it differ between any two summation orders. Training is otherwise identical: the
    train loss matches tightly, the validation loss (which uses the running mean) loosely."""
    base = {**BASE, "batch_norm": True, "max_epochs": 3}
    configs = [
        TrialConfig(**base, optimizer="adam", learning_rate=1e-3, seed=0),
        TrialConfig(**base, optimizer="adam", learning_rate=3e-3, seed=1),
    ]
    results = train_population(configs, small_digits)
    for config, result in zip(configs, results, strict=True):
        expected = train_trial(config, small_digits)
        for mine, theirs in zip(result.history, expected.history, strict=True):
            assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-5)
            assert mine["val_loss"] == pytest.approx(theirs["val_loss"], rel=1e-2)


def test_one_member_is_exactly_the_sequential_path(small_digits: TensorSplits) -> None:
    config = TrialConfig(
        hidden_layers=(16,), batch_norm=True, dropout=0.3, max_epochs=3, batch_size=64, seed=3
    )
    seen: list[tuple[int, int]] = []
    (result,) = train_population(
        [config], small_digits, on_epoch=lambda i, m: seen.append((i, m.epoch))
    )
    expected = train_trial(config, small_digits)
    assert _without_time(result.history) == _without_time(expected.history)
    for key, value in expected.model.state_dict().items():
        assert torch.equal(result.model.state_dict()[key], value), key
    assert seen == [(0, 1), (0, 2), (0, 3)]


class _Prune(Exception):
    pass


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])  # batched and single-member groups
def test_a_member_whose_callback_raises_leaves_the_stack(
    small_digits: TensorSplits, optimizer: str
) -> None:
    configs = [
        TrialConfig(**BASE, optimizer="adam", learning_rate=3e-3, patience=None, seed=0),
        TrialConfig(**BASE, optimizer=optimizer, learning_rate=1e-2, patience=None, seed=1),
        TrialConfig(**BASE, optimizer="adam", learning_rate=1e-3, patience=None, seed=2),
    ]
    error = _Prune("pruned at epoch 2")
    calls: list[tuple[int, int]] = []

    def on_epoch(index: int, metrics: EpochMetrics) -> None:
        calls.append((index, metrics.epoch))
        if index == 1 and metrics.epoch == 2:
            raise error

    batches: list[list[tuple[int, int]]] = []

    def on_epochs(batch: list[tuple[int, EpochMetrics]]) -> None:
        assert all(m.epoch == batch[0][1].epoch for _, m in batch)  # one epoch at a time
        batches.append([(i, m.epoch) for i, m in batch])

    finished: list[tuple[int, TrialResult, int]] = []  # (index, result, epochs reported by then)

    def on_finish(batch: list[tuple[int, TrialResult]]) -> None:
        finished.extend((i, r, len(calls)) for i, r in batch)

    results = train_population(
        configs, small_digits, on_epoch=on_epoch, on_epochs=on_epochs, on_finish=on_finish
    )
    # The member that left was handed over as it left (after epoch 2's reports), with the
    # result that comes back at the end; the two that end the population are not.
    [(index, early, reported)] = finished
    assert index == 1 and early.interrupted is error and early.epochs_run == 2
    assert reported == 6 and early.history == results[1].history
    assert early.model is results[1].model
    # on_epochs saw, once per epoch and before them, exactly the calls on_epoch then got
    assert [call for batch in batches for call in batch] == calls
    assert [len(batch) for batch in batches] == [3, 3, 2, 2, 2]
    assert [e for i, e in calls if i == 1] == [1, 2]  # no epoch after the raise is reported
    assert [e for i, e in calls if i == 0] == [1, 2, 3, 4, 5]
    assert [e for i, e in calls if i == 2] == [1, 2, 3, 4, 5]
    if optimizer == "adam":  # one batched group: each epoch reports members in order
        assert calls[:6] == [(0, 1), (1, 1), (2, 1), (0, 2), (1, 2), (2, 2)]
    pruned = results[1]
    assert pruned.interrupted is error and pruned.epochs_run == 2
    assert not pruned.stopped_early and not pruned.diverged
    # Its model holds the best of its two epochs: what a 2-epoch solo run restores.
    solo = train_trial(replace(configs[1], max_epochs=2), small_digits)
    _assert_same_run(replace(pruned, interrupted=None), solo, small_digits)
    for i in (0, 2):  # the others never noticed
        assert results[i].interrupted is None
        _assert_same_run(results[i], train_trial(configs[i], small_digits), small_digits)


def test_a_base_exception_from_the_callback_stops_everything(small_digits: TensorSplits) -> None:
    configs = [TrialConfig(**BASE, seed=s) for s in range(2)]

    def interrupt(index: int, metrics: EpochMetrics) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_population(configs, small_digits, on_epoch=interrupt)


def test_a_diverging_member_does_not_affect_the_others(small_digits: TensorSplits) -> None:
    configs = [
        TrialConfig(**BASE, optimizer="sgd", learning_rate=0.1, seed=0),
        TrialConfig(**BASE, optimizer="sgd", learning_rate=1e6, seed=1),
        TrialConfig(**BASE, optimizer="sgd", learning_rate=0.05, seed=2),
    ]
    results = train_population(configs, small_digits)
    diverged = results[1]
    expected = train_trial(configs[1], small_digits)
    assert diverged.diverged and diverged.diverged_reason == expected.diverged_reason
    assert diverged.diverged_reason is not None and "epoch 1, batch" in diverged.diverged_reason
    assert diverged.epochs_run == 0 and diverged.best_epoch is None
    assert all(torch.isfinite(p).all() for p in diverged.model.parameters())  # initial weights
    for key, value in expected.model.state_dict().items():
        assert torch.equal(diverged.model.state_dict()[key], value), key
    for i in (0, 2):
        assert not results[i].diverged
        _assert_same_run(results[i], train_trial(configs[i], small_digits), small_digits)


def test_dropout_matches_in_distribution(digits: TensorSplits) -> None:
    base: dict[str, Any] = {
        "hidden_layers": (64,),
        "dropout": 0.4,
        "max_epochs": 4,
        "patience": None,
    }
    configs = [TrialConfig(**base, learning_rate=3e-3, seed=s) for s in range(6)]
    results = train_population(configs, digits)
    solo = [train_trial(c, digits) for c in configs]
    mine = [r.history[-1]["val_accuracy"] for r in results]
    theirs = [r.history[-1]["val_accuracy"] for r in solo]
    assert sum(mine) / 6 == pytest.approx(sum(theirs) / 6, abs=0.02)
    assert min(mine) > 0.8
    # Masks differ from the solo runs (same distribution, other draws) ...
    assert [r.history for r in results] != [r.history for r in solo]
    for result in results:
        # ... and dropout is off at evaluation: the model reproduces its best val metrics.
        assert isinstance(result.model[2], torch.nn.Dropout) and not result.model.training  # type: ignore[index]
        val_loss, val_acc = evaluate(result.model, digits.X_val, digits.y_val)
        assert val_loss == pytest.approx(result.best_val_loss, rel=1e-5)
        assert val_acc == pytest.approx(result.best_val_accuracy, abs=1 / 300 + 1e-12)


def test_a_dropout_free_member_is_unaffected_by_its_neighbours_dropout(
    small_digits: TensorSplits,
) -> None:
    base = {**BASE, "max_epochs": 3}
    configs = [
        TrialConfig(**base, dropout=0.5, seed=0),
        TrialConfig(**base, dropout=0.0, seed=1),
    ]
    results = train_population(configs, small_digits)
    _assert_same_run(results[1], train_trial(configs[1], small_digits), small_digits)


def test_device_and_autocast_flags(small_digits: TensorSplits) -> None:
    configs = [TrialConfig(**BASE, learning_rate=3e-3, seed=s) for s in range(2)]
    plain = train_population(configs, small_digits, device=torch.device("cpu"))
    tf32 = train_population(configs, small_digits, device="cpu", autocast="tf32")
    for a, b in zip(plain, tf32, strict=True):  # TF32 is a CUDA feature: no effect on CPU
        assert _without_time(a.history) == _without_time(b.history)
        assert all(p.device.type == "cpu" for p in a.model.parameters())
    bf16 = train_population(configs, small_digits, autocast="bf16")
    for a, b in zip(plain, bf16, strict=True):
        assert a.best_val_accuracy is not None and b.best_val_accuracy is not None
        assert b.best_val_accuracy == pytest.approx(a.best_val_accuracy, abs=0.05)
        assert _without_time(a.history) != _without_time(b.history)  # really ran in bf16
        assert all(p.dtype == torch.float32 for p in b.model.parameters())
    with pytest.raises(ValueError, match="autocast"):
        train_population(configs, small_digits, autocast="fp8")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_members_match_the_cpu_sequential_runs(small_digits: TensorSplits) -> None:
    configs = [TrialConfig(**BASE, learning_rate=3e-3, seed=s) for s in range(3)]
    on_gpu = small_digits.to("cuda")
    # "cuda" names the device its tensors report as cuda:N: the same splits, whose derived
    # tensors (the live features, the stacks' inputs) are then made once, not per stack.
    assert on_gpu.to("cuda") is on_gpu and on_gpu.to(on_gpu.device) is on_gpu
    results = train_population(configs, on_gpu)
    for config, result in zip(configs, results, strict=True):
        assert all(p.device.type == "cuda" for p in result.model.parameters())
        result.model.to("cpu")
        _assert_same_run(result, train_trial(config, small_digits), small_digits, val_rtol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_stacks_of_every_optimizer_match_their_sequential_runs(
    small_digits: TensorSplits,
) -> None:
    """The invariant on a GPU: seven optimizers, schedules, early stopping, both objectives,
    against each trial trained alone on the same GPU. (Against the CPU's sequential runs the
    weights of one RMSprop member differed by 4.8e-3 after 5 epochs on an H200, and its
    sequential GPU run by as much: torch's own arithmetic differs between the devices.)"""
    on_gpu = small_digits.to("cuda")
    results = train_population(MIXED, on_gpu)
    for config, result in zip(MIXED, results, strict=True):
        assert all(p.device.type == "cuda" for p in result.model.parameters())
        _assert_same_run(result, train_trial(config, on_gpu), small_digits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fused_stacks_match_their_sequential_runs(small_digits: TensorSplits) -> None:
    """The invariant with the fused optimizer kernel and replayed steps: the mixed stack
    without its RMSprop momentum member (which keeps a stack on the batched optimizers)."""
    configs = [c for c in MIXED if not (c.optimizer == "rmsprop" and c.momentum)]
    on_gpu = small_digits.to("cuda")
    params = [torch.zeros(len(configs), 2, device="cuda")]
    assert isinstance(stack_optimizer(configs, params), FusedStackOptimizer)
    results = train_population(configs, on_gpu)
    for config, result in zip(configs, results, strict=True):
        _assert_same_run(result, train_trial(config, on_gpu), small_digits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_autocast_modes_train_close_to_fp32_and_restore_the_matmul_precision(
    small_digits: TensorSplits,
) -> None:
    configs = [TrialConfig(**BASE, learning_rate=3e-3, seed=s) for s in range(3)]
    on_gpu = small_digits.to("cuda")
    plain = train_population(configs, on_gpu)
    before = torch.get_float32_matmul_precision()
    for mode in ("tf32", "bf16"):
        fast = train_population(configs, on_gpu, autocast=mode)
        assert torch.get_float32_matmul_precision() == before  # TF32 only during the call
        for a, b in zip(plain, fast, strict=True):
            assert a.best_val_accuracy is not None and b.best_val_accuracy is not None
            assert b.best_val_accuracy == pytest.approx(a.best_val_accuracy, abs=0.05), mode
            assert all(p.dtype == torch.float32 for p in b.model.parameters())
            if mode == "bf16":  # really ran in bf16
                assert _without_time(a.history) != _without_time(b.history)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_dropout_members_train_like_their_cpu_runs(digits: TensorSplits) -> None:
    """With dropout, the same distribution: GPU stacks against the CPU's sequential runs."""
    configs = [
        TrialConfig(hidden_layers=(64,), max_epochs=4, dropout=0.3, learning_rate=3e-3, seed=s)
        for s in range(6)
    ]
    gpu = [r.best_val_accuracy or 0.0 for r in train_population(configs, digits.to("cuda"))]
    cpu = [train_trial(c, digits).best_val_accuracy or 0.0 for c in configs]
    assert sum(gpu) / len(gpu) == pytest.approx(sum(cpu) / len(cpu), abs=0.03), (gpu, cpu)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_population_size_on_a_real_gpu_is_in_the_hundreds() -> None:
    free, _total = torch.cuda.mem_get_info()
    p = auto_population_size(MNIST_MLP, 7000, torch.device("cuda"))
    expected = min(
        sizing.CUDA_MAX, int(0.5 * free) // (sizing.BYTES_PER_PARAM * MNIST_MLP + 8 * 7000)
    )
    assert abs(p - expected) <= 1  # free memory moves a little between the two reads
    if free > 2**30:
        assert p >= 100


def test_configs_that_cannot_share_a_stack_are_refused(small_digits: TensorSplits) -> None:
    a = TrialConfig(hidden_layers=(8,), max_epochs=2)
    for other in (
        replace(a, hidden_layers=(16,)),
        replace(a, activation="tanh"),
        replace(a, batch_norm=True),
        replace(a, batch_size=32),
        replace(a, max_epochs=3),
    ):
        with pytest.raises(ValueError, match="group_configs"):
            train_population([a, other], small_digits)
    assert train_population([], small_digits) == []


def test_group_configs() -> None:
    a = TrialConfig(hidden_layers=(8,))
    configs = [
        a,
        replace(a, hidden_layers=(16,)),
        replace(a, optimizer="sgd", learning_rate=0.1, dropout=0.2, seed=5),  # same stack as a
        replace(a, batch_size=32),
        replace(a, hidden_layers=(16,), init="orthogonal"),
        replace(a, max_epochs=3),
    ]
    assert group_configs(configs) == [[0, 2], [1, 4], [3], [5]]
    assert group_configs([]) == []


def test_results_account_for_the_wall_time(small_digits: TensorSplits) -> None:
    import time

    configs = [TrialConfig(**BASE, learning_rate=1e-3 * (s + 1), seed=s) for s in range(4)]
    started = time.perf_counter()
    results = train_population(configs, small_digits)
    wall = time.perf_counter() - started
    total = sum(r.duration_s for r in results)
    assert all(r.duration_s > 0 for r in results)
    assert 0.5 * wall < total <= wall


MNIST_MLP = 784 * 128 + 128 + 128 * 10 + 10


def test_auto_population_size_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    assert sizing.last_level_cache_bytes() >= 2**20  # sysfs, or the 32 MiB default
    monkeypatch.setattr(sizing, "last_level_cache_bytes", lambda: 32 * 2**20)  # this machine's
    cpu = torch.device("cpu")
    assert auto_population_size(MNIST_MLP, 7000, cpu) == 8  # the measured sweet spot
    assert auto_population_size(100, 1000, "cpu") == sizing.CPU_MAX  # tiny models
    assert auto_population_size(2_000_000, 7000, cpu) == sizing.CPU_MIN  # big models
    assert auto_population_size(10**10, 7000, cpu) == 1  # nothing fits: sequential
    monkeypatch.setattr(sizing, "last_level_cache_bytes", lambda: 256 * 2**20)  # a big server
    assert auto_population_size(MNIST_MLP, 7000, cpu) == 64
    with pytest.raises(ValueError):
        auto_population_size(0, 7000, cpu)


def test_auto_population_size_on_cuda_follows_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    free = 8 * 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 2 * free))
    cuda = torch.device("cuda")
    assert auto_population_size(MNIST_MLP, 7000, cuda) == 512  # hundreds: the CUDA cap
    big = auto_population_size(50_000_000, 7000, cuda)  # 2 GB per member, 4 GB budget
    assert big == 2


def test_member_work_runs_on_threads_for_gpu_sized_populations_only() -> None:
    """A population of hundreds builds its members on threads, each torch op on its own
    thread meanwhile (oversubscribed cores were slower than one thread); small ones stay
    on the calling thread. Results keep their order and the thread count comes back."""
    import threading

    from worker.population.trainer import MAX_MEMBER_THREADS, THREADED_MIN_MEMBERS, _map_members

    def probe(i: int) -> tuple[int, str, int]:
        return i, threading.current_thread().name, torch.get_num_threads()

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        small = _map_members(probe, list(range(THREADED_MIN_MEMBERS - 1)))
        assert [i for i, _, _ in small] == list(range(THREADED_MIN_MEMBERS - 1))
        assert {name for _, name, _ in small} == {threading.current_thread().name}
        large = _map_members(probe, list(range(200)))
        assert [i for i, _, _ in large] == list(range(200))
        names = {name for _, name, _ in large}
        assert all(name.startswith("hpo-member") for name in names)
        assert 1 <= len(names) <= min(2, MAX_MEMBER_THREADS)
        assert {threads for _, _, threads in large} == {1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
