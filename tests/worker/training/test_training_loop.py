from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch

from service.errors import TrialDivergedError
from worker.training import (
    EpochMetrics,
    TensorSplits,
    TrialConfig,
    build_mlp,
    build_optimizer,
    build_scheduler,
    evaluate,
    to_tensors,
    train_trial,
)

HISTORY_KEYS = {
    "epoch",
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "lr",
    "seconds",
}


def _without_time(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_learns_digits(digits: TensorSplits) -> None:
    config = TrialConfig(hidden_layers=(64,), learning_rate=3e-3, max_epochs=8, patience=None)
    seen: list[EpochMetrics] = []
    result = train_trial(config, digits, on_epoch=seen.append)
    assert result.best_val_accuracy is not None and result.best_val_accuracy > 0.9
    assert evaluate(result.model, digits.X_test, digits.y_test)[1] > 0.85
    assert [m.epoch for m in seen] == list(range(1, 9))
    assert result.history == [
        {k: getattr(m, k) for k in HISTORY_KEYS} for m in seen
    ]  # the callback saw exactly what the history records
    assert result.epochs_run == 8 and not result.stopped_early and not result.diverged
    assert set(result.history[0]) == HISTORY_KEYS
    json.dumps(result.history)  # storable as JSON
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.n_parameters == 64 * 64 + 64 + 64 * 10 + 10
    assert result.seed == 0 and result.objective == "val_accuracy"
    assert not result.model.training
    result.raise_if_diverged()  # no-op


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_same_seed_bit_identical_other_seed_different(digits: TensorSplits, dropout: float) -> None:
    config = TrialConfig(hidden_layers=(32, 16), batch_norm=True, dropout=dropout, max_epochs=3)
    first, second = train_trial(config, digits), train_trial(config, digits)
    assert _without_time(first.history) == _without_time(second.history)
    for key, value in first.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[key]), key
    other = train_trial(TrialConfig(**{**config.__dict__, "seed": 1}), digits)
    assert _without_time(other.history) != _without_time(first.history)


def test_callers_rng_is_left_alone(digits: TensorSplits) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_trial(TrialConfig(hidden_layers=(8,), dropout=0.5, max_epochs=1), digits)
    assert torch.equal(torch.rand(3), expected)


def test_early_stopping_restores_the_best_epoch(noise: TensorSplits) -> None:
    # Random labels: a wide net memorises the training set and the validation loss rises.
    config = TrialConfig(
        hidden_layers=(256, 256),
        learning_rate=1e-2,
        batch_size=16,
        objective="val_loss",
        patience=2,
        max_epochs=30,
    )
    result = train_trial(config, noise)
    assert result.stopped_early and result.epochs_run < config.max_epochs
    assert result.best_epoch is not None
    assert result.epochs_run == result.best_epoch + config.patience  # type: ignore[operator]
    best = result.history[result.best_epoch - 1]
    assert best["val_loss"] == min(h["val_loss"] for h in result.history)
    assert (result.best_value, result.best_val_loss) == (best["val_loss"], best["val_loss"])
    assert result.best_val_accuracy == best["val_accuracy"]
    # The returned weights are the best epoch's, not the last epoch's.
    assert evaluate(result.model, noise.X_val, noise.y_val) == (
        best["val_loss"],
        best["val_accuracy"],
    )
    assert result.history[-1]["val_loss"] > best["val_loss"]
    assert result.history[-1]["train_accuracy"] > best["train_accuracy"]


def test_no_patience_runs_all_epochs_and_still_restores_best(noise: TensorSplits) -> None:
    config = TrialConfig(
        hidden_layers=(128,),
        learning_rate=1e-2,
        batch_size=16,
        objective="val_loss",
        patience=None,
        max_epochs=12,
    )
    result = train_trial(config, noise)
    assert result.epochs_run == 12 and not result.stopped_early
    losses = [h["val_loss"] for h in result.history]
    assert result.best_epoch == losses.index(min(losses)) + 1 < 12
    assert evaluate(result.model, noise.X_val, noise.y_val)[0] == min(losses)


def test_min_delta_makes_small_gains_not_count(digits: TensorSplits) -> None:
    # No later epoch can beat epoch 1's accuracy by a whole 1.0.
    config = TrialConfig(hidden_layers=(16,), min_delta=1.0, patience=2, max_epochs=10)
    result = train_trial(config, digits)
    assert (result.best_epoch, result.epochs_run, result.stopped_early) == (1, 3, True)
    assert result.history[2]["val_accuracy"] > result.history[0]["val_accuracy"]


def test_huge_learning_rate_diverges_without_raising(noise: TensorSplits) -> None:
    config = TrialConfig(hidden_layers=(32, 32), optimizer="sgd", learning_rate=1e6, batch_size=16)
    result = train_trial(config, noise)
    assert result.diverged and result.diverged_reason is not None
    assert "epoch 1, batch" in result.diverged_reason
    assert "nan" in result.diverged_reason or "inf" in result.diverged_reason
    assert result.epochs_run == 0 and result.history == [] and result.best_epoch is None
    assert all(torch.isfinite(p).all() for p in result.model.parameters())  # initial weights
    with pytest.raises(TrialDivergedError, match="train loss became"):
        result.raise_if_diverged()


def test_divergence_after_a_good_epoch_keeps_that_epoch() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 5)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    data = to_tensors(X[:80], y[:80], X[80:100], y[80:100], X[100:], y[100:])
    good = _weights(train_trial(TrialConfig(hidden_layers=(8,), max_epochs=1), data).model)

    def poison(metrics: EpochMetrics) -> None:
        data.X_train[0, 0] = math.inf  # every later epoch sees a non-finite loss

    config = TrialConfig(hidden_layers=(8,), max_epochs=5, batch_size=128)
    result = train_trial(config, data, on_epoch=poison)
    assert result.diverged and result.diverged_reason == "train loss became nan at epoch 2, batch 1"
    assert result.epochs_run == 1 and result.best_epoch == 1
    for key, value in result.model.state_dict().items():
        assert torch.equal(value, good[key]), key


class _Stop(Exception):
    pass


def test_on_epoch_exception_propagates_unchanged(digits: TensorSplits) -> None:
    calls: list[int] = []
    error = _Stop("pruned")

    def prune_at_two(metrics: EpochMetrics) -> None:
        calls.append(metrics.epoch)
        if metrics.epoch == 2:
            raise error

    with pytest.raises(_Stop) as excinfo:
        train_trial(TrialConfig(hidden_layers=(8,), max_epochs=5), digits, on_epoch=prune_at_two)
    assert excinfo.value is error and calls == [1, 2]


def test_keep_interrupt_returns_the_epochs_trained_so_far(digits: TensorSplits) -> None:
    error = _Stop("pruned")

    def prune_at_two(metrics: EpochMetrics) -> None:
        if metrics.epoch == 2:
            raise error

    config = TrialConfig(hidden_layers=(8,), max_epochs=5)
    result = train_trial(config, digits, on_epoch=prune_at_two, keep_interrupt=True)
    assert result.interrupted is error
    assert result.epochs_run == 2 and [h["epoch"] for h in result.history] == [1, 2]
    assert result.duration_s > 0 and result.best_epoch in (1, 2)
    # the same two epochs as a run that was not interrupted
    full = train_trial(replace(config, max_epochs=2), digits)
    assert result.history[1]["val_loss"] == full.history[1]["val_loss"]
    assert full.interrupted is None

    def interrupt(metrics: EpochMetrics) -> None:
        raise KeyboardInterrupt  # not an Exception: never kept

    with pytest.raises(KeyboardInterrupt):
        train_trial(config, digits, on_epoch=interrupt, keep_interrupt=True)


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("none", [0.1, 0.1, 0.1, 0.1]),
        ("exponential", [0.1, 0.05, 0.025, 0.0125]),
        ("cosine", [0.1 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)]),
    ],
)
def test_schedule_steps_once_per_epoch(
    digits: TensorSplits, schedule: str, expected: list[float]
) -> None:
    config = TrialConfig(
        hidden_layers=(8,),
        optimizer="sgd",
        learning_rate=0.1,
        lr_schedule=schedule,
        lr_gamma=0.5,
        max_epochs=4,
        patience=None,
        batch_size=64,  # 19 minibatches per epoch: a per-batch step would show
    )
    lrs = [h["lr"] for h in train_trial(config, digits).history]
    assert lrs == pytest.approx(expected, rel=1e-12)


def test_batch_norm_with_a_trailing_single_sample(noise: TensorSplits) -> None:
    # 128 training samples, batches of 127: the second minibatch holds one sample.
    config = TrialConfig(hidden_layers=(8,), batch_norm=True, batch_size=127, max_epochs=2)
    result = train_trial(config, noise, device="cpu")
    assert result.epochs_run == 2 and not result.diverged


def test_evaluate_is_batch_size_invariant_and_keeps_the_mode(digits: TensorSplits) -> None:
    model = train_trial(TrialConfig(hidden_layers=(16,), max_epochs=1), digits).model
    model.train()
    big = evaluate(model, digits.X_val, digits.y_val)
    small = evaluate(model, digits.X_val, digits.y_val, batch_size=7)
    assert model.training
    assert small[1] == big[1] and small[0] == pytest.approx(big[0], rel=1e-5)
    logits = model.eval()(digits.X_val)
    expected = torch.nn.functional.cross_entropy(logits, digits.y_val).item()
    assert big[0] == pytest.approx(expected, rel=1e-5)


def test_matches_the_documented_recipe(digits: TensorSplits) -> None:
    """The order of operations in loop.py's docstring, written out by hand (dropout 0).

    The population trainer must reproduce train_trial; this pins what it must reproduce.
    """
    config = TrialConfig(
        hidden_layers=(24,),
        optimizer="nesterov",
        learning_rate=0.05,
        lr_schedule="exponential",
        lr_gamma=0.8,
        batch_size=100,
        max_epochs=3,
        patience=None,
        seed=7,
    )
    torch.manual_seed(config.seed)
    model = build_mlp(digits.n_features, digits.n_classes, config)
    optimizer = build_optimizer(model.parameters(), config)
    scheduler = build_scheduler(optimizer, config)
    order = torch.Generator().manual_seed(config.seed)
    n = digits.y_train.shape[0]
    expected = []
    for epoch in range(1, config.max_epochs + 1):
        model.train()
        lr = optimizer.param_groups[0]["lr"]
        perm = torch.randperm(n, generator=order)
        loss_sum, correct = 0.0, 0
        for start in range(0, n, config.batch_size):
            idx = perm[start : start + config.batch_size]
            logits = model(digits.X_train[idx])
            loss = torch.nn.functional.cross_entropy(logits, digits.y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == digits.y_train[idx]).sum())
        assert scheduler is not None
        scheduler.step()
        val_loss, val_accuracy = evaluate(model, digits.X_val, digits.y_val)
        expected.append(
            {
                "epoch": epoch,
                "train_loss": loss_sum / n,
                "train_accuracy": correct / n,
                "val_loss": val_loss,
                "val_accuracy": val_accuracy,
                "lr": lr,
            }
        )
    assert _without_time(train_trial(config, digits).history) == expected
