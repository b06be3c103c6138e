"""The lectures' findings, measured on digits with the real training code (examples/lectures/).

Each test trains tiny MLPs on the same pipeline a job uses (``load_dataset`` -> ``make_splits``
-> ``to_tensors`` -> ``train_trial``) and asserts an effect the lectures claim. Thresholds come
from measurements (torch 2.13 CPU; 1 and 2 threads give the same numbers), written next to each
assertion, and leave a wide margin; where a single seed is noisy the test averages three. The
whole file runs in about 7 s on 2 cores (one intra-op thread, see ``_one_thread``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from service.datasets import DigitsSpec, load_dataset, make_splits
from worker.training import TensorSplits, TrialConfig, build_mlp, evaluate, to_tensors, train_trial

DEEP = (100,) * 6  # the lectures' deep MLP: 6 hidden layers of 100
SEEDS = (0, 1, 2)
CHANCE_LOSS = math.log(10)  # cross-entropy of a uniform guess over 10 classes


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # These MLPs are too small to gain from a second intra-op thread, and when other processes
    # compete for the 2 cores, 2 OpenMP threads spin-wait on each other: measured 82 s for this
    # file with 2 threads on a loaded machine (load average 5) vs 6 s with 1 thread.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _digits(tmp: Path, *, train_subset: int | None = None) -> TensorSplits:
    """The split a digits job uses (validation 0.2, test 0.1, split seed 0), optionally with the
    training rows cut to ``train_subset`` the way ``training.train_subset`` does (stratified,
    seeded with the split seed)."""
    ds = load_dataset(DigitsSpec(), data_dir=tmp, upload_dir=tmp, allow_local_paths=False)
    sp = make_splits(ds, validation_split=0.2, test_split=0.1, seed=0)
    X, y = sp.X_train, sp.y_train
    if train_subset is not None:
        from sklearn.model_selection import train_test_split

        X, _, y, _ = train_test_split(X, y, train_size=train_subset, random_state=0, stratify=y)
    return to_tensors(X, y, sp.X_val, sp.y_val, sp.X_test, sp.y_test, n_classes=sp.n_classes)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> TensorSplits:
    return _digits(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="module")
def digits300(tmp_path_factory: pytest.TempPathFactory) -> TensorSplits:
    """The overfitting set-up: 300 training rows; validation (360) and test (180) unchanged."""
    data = _digits(tmp_path_factory.mktemp("digits300"), train_subset=300)
    assert data.X_train.shape[0] == 300 and data.X_val.shape[0] == 360
    return data


def _overfit_config(**overrides: object) -> TrialConfig:
    # examples/lectures/02-overfitting.yaml: SGD momentum 0.9, lr 0.01, batch 32 (10 steps per
    # epoch on 300 rows), He init, no early stopping.
    values: dict[str, object] = dict(
        hidden_layers=DEEP,
        init="he_normal",
        optimizer="momentum",
        momentum=0.9,
        learning_rate=0.01,
        batch_size=32,
        max_epochs=60,
        patience=None,
    )
    values.update(overrides)
    return TrialConfig(**values)  # type: ignore[arg-type]


# Weight init (examples/lectures/01-init-deep-relu.yaml) ---------------------------------------


def _hidden_stds(model: nn.Sequential, X: torch.Tensor) -> list[float]:
    """Std of each hidden layer's activation output for the batch X."""
    stds = []
    with torch.no_grad():
        for layer in model:
            X = layer(X)
            if isinstance(layer, nn.ReLU):
                stds.append(float(X.std()))
    return stds


def test_small_init_activations_vanish_with_depth_he_keeps_them(digits: TensorSplits) -> None:
    # Measured (seed 0, 1,257 training rows), std after hidden layer 1 .. 6:
    #   normal_0.01   0.046 0.0031 1.9e-4 1.2e-5 8.4e-7 5.7e-8   (x0.07 per layer)
    #   xavier_normal 0.51  0.34   0.21   0.14   0.093  0.063    (ReLU halves the variance)
    #   he_normal     0.81  0.78   0.68   0.62   0.59   0.57
    last = {}
    for init in ("normal_0.01", "xavier_normal", "he_normal"):
        torch.manual_seed(0)
        model = build_mlp(
            digits.n_features, digits.n_classes, TrialConfig(hidden_layers=DEEP, init=init)
        )
        last[init] = _hidden_stds(model, digits.X_train)[-1]
    assert last["normal_0.01"] < 1e-5
    assert 0.01 < last["xavier_normal"] < 0.2
    assert last["he_normal"] > 0.3


def test_deep_relu_with_std_0_01_init_stays_at_chance_while_he_learns(digits: TensorSplits) -> None:
    # 6 x 100 ReLU, plain SGD lr 0.1, batch 64, 3 epochs. Measured val accuracy per epoch:
    #   normal_0.01 seeds 0/1/2: [0.100 0.100 0.100] [0.100 0.100 0.100] [0.103 0.100 0.103],
    #                            train loss 2.303 = ln 10 in every epoch (nothing learnt);
    #   xavier_normal:           [0.33 0.50 0.76] [0.27 0.63 0.60] [0.45 0.33 0.82];
    #   he_normal:               [0.79 0.79 0.90] [0.72 0.90 0.92] [0.84 0.86 0.93].
    first_epoch: dict[str, float] = {}
    for init in ("normal_0.01", "xavier_normal", "he_normal"):
        runs = [
            train_trial(
                TrialConfig(
                    hidden_layers=DEEP,
                    init=init,
                    optimizer="sgd",
                    learning_rate=0.1,
                    batch_size=64,
                    max_epochs=3,
                    patience=None,
                    seed=seed,
                ),
                digits,
            )
            for seed in SEEDS
        ]
        first_epoch[init] = float(np.mean([r.history[0]["val_accuracy"] for r in runs]))
        for r in runs:
            assert not r.diverged
            last = r.history[-1]
            if init == "normal_0.01":
                assert max(h["val_accuracy"] for h in r.history) <= 0.2  # chance is 0.1
                assert last["train_loss"] == pytest.approx(CHANCE_LOSS, abs=0.01)
            elif init == "he_normal":
                assert last["val_accuracy"] >= 0.8
    # He is the ReLU match: it learns faster than Xavier (mean after epoch 1: 0.78 vs 0.35).
    assert first_epoch["he_normal"] >= first_epoch["xavier_normal"] + 0.2


# Overfitting and its cures (examples/lectures/02-overfitting.yaml) ----------------------------


def _eval_gap(data: TensorSplits, config: TrialConfig) -> tuple[float, float]:
    """(train - validation accuracy, train accuracy) of the restored best model, both in eval
    mode. The recorded ``train_val_gap`` uses training-mode accuracy (dropout masks on), which
    would make dropout look better than it is; this is the gap the lectures plot."""
    result = train_trial(config, data)
    assert not result.diverged and result.best_val_accuracy is not None
    _, train_acc = evaluate(result.model, data.X_train, data.y_train)
    return train_acc - result.best_val_accuracy, train_acc


def test_dropout_and_weight_decay_shrink_the_train_validation_gap(digits300: TensorSplits) -> None:
    # 300 rows, 6 x 100, 60 epochs. Measured eval-mode gap for seeds 0/1/2:
    #   no regularisation   0.097 0.097 0.083  (mean 0.092; training accuracy 1.0)
    #   dropout 0.2         0.069 0.053 0.050  (mean 0.057)
    #   weight decay 1e-2   0.064 0.075 0.056  (mean 0.065)
    # Weight decay 1e-3 (the grid) only reaches 0.081 - too close to assert; 1e-2 shows
    # the trend. Asserted: each cure lowers the mean gap by >= 0.01 (measured 0.035 / 0.027).
    def mean_gap(**overrides: object) -> tuple[float, float]:
        pairs = [_eval_gap(digits300, _overfit_config(seed=s, **overrides)) for s in SEEDS]
        return float(np.mean([g for g, _ in pairs])), float(np.min([t for _, t in pairs]))

    base, base_train = mean_gap()
    assert base_train >= 0.99, "the set-up must memorise its 300 rows"
    assert base >= 0.05, "and overfit"
    dropout, _ = mean_gap(dropout=0.2)
    decay, _ = mean_gap(weight_decay=1e-2)
    assert dropout <= base - 0.01
    assert decay <= base - 0.01


# Early stopping (examples/lectures/06-early-stopping.yaml, on the overfitting set-up) ---------


def test_early_stopping_stops_before_the_limit_and_restores_the_best_epoch(
    digits300: TensorSplits,
) -> None:
    # Measured: best val accuracy 0.903 at epoch 24, stop after epoch 34 at 0.894 (of 100).
    # (Patience 5 stops at epoch 10 on a noisy plateau at 0.88: patience is a real knob.)
    patience = 10
    config = _overfit_config(max_epochs=100, patience=patience)
    result = train_trial(config, digits300)
    assert result.stopped_early and not result.diverged
    assert result.best_epoch is not None and result.best_val_accuracy is not None
    assert result.epochs_run < config.max_epochs
    # It stopped exactly `patience` epochs after the last improvement ...
    assert result.epochs_run == result.best_epoch + patience
    accs = [h["val_accuracy"] for h in result.history]
    assert accs[result.best_epoch - 1] == max(accs) == result.best_val_accuracy
    assert accs[-1] < result.best_val_accuracy  # so restoring the best epoch matters here
    # ... and the model it hands back is the best epoch's, not the last one's.
    val_loss, val_acc = evaluate(result.model, digits300.X_val, digits300.y_val)
    assert val_acc == result.best_val_accuracy
    assert val_loss == pytest.approx(result.best_val_loss, rel=1e-6)
    assert not result.model.training


# Batch normalization (examples/lectures/04-batch-norm.yaml) -----------------------------------


def test_batch_norm_in_eval_mode_uses_running_statistics(digits: TensorSplits) -> None:
    config = TrialConfig(hidden_layers=(32, 32), batch_norm=True, max_epochs=2, patience=None)
    model = train_trial(config, digits).model  # returned in eval mode, running stats learnt
    bn = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(bn) == 2
    running_mean, tracked = bn[0].running_mean, bn[0].num_batches_tracked
    assert running_mean is not None and tracked is not None and int(tracked) > 0
    assert not torch.allclose(running_mean, torch.zeros_like(running_mean))
    X = digits.X_val[:64]
    with torch.no_grad():
        batch = model(X)
        for i in (0, 17, 63):
            single = model(X[i : i + 1])  # one sample: impossible with batch statistics
            torch.testing.assert_close(single[0], batch[i], rtol=1e-5, atol=1e-5)
        # The same model in training mode normalises with the batch's own statistics, so a
        # sample's output depends on its batch: the check above is not vacuous.
        model.train()
        try:
            in_small_batch = model(X[:8])[0]
            in_large_batch = model(X)[0]
        finally:
            model.eval()
    assert not torch.allclose(in_small_batch, in_large_batch, atol=1e-3)


def test_batch_norm_makes_the_deep_sigmoid_net_learn_from_any_init(digits: TensorSplits) -> None:
    # 6 x 100 sigmoid, SGD momentum 0.9 lr 0.01, batch 64, 5 epochs (seed 0). Measured best
    # val accuracy: without BN 0.10 for normal_0.01, xavier_normal and he_normal alike (the
    # sigmoid's slope <= 1/4 shrinks the gradient 4x per layer); with BN 0.953 / 0.950 / 0.925.
    for init in ("normal_0.01", "xavier_normal"):
        accs: dict[bool, float] = {}
        for bn in (False, True):
            config = TrialConfig(
                hidden_layers=DEEP,
                activation="sigmoid",
                batch_norm=bn,
                init=init,
                optimizer="momentum",
                momentum=0.9,
                learning_rate=0.01,
                batch_size=64,
                max_epochs=5,
                patience=None,
            )
            best = train_trial(config, digits).best_val_accuracy
            assert best is not None
            accs[bn] = best
        assert accs[False] <= 0.2, (init, accs)
        assert accs[True] >= 0.8, (init, accs)
