"""Train one trial: minibatch training on resident tensors, early stopping, divergence.

Order of operations (the population trainer must reproduce this exactly for dropout 0):

Setup, inside ``torch.random.fork_rng`` so the caller's RNG state is left untouched:
  1. ``torch.manual_seed(config.seed)``; the model is built and initialised **on CPU**
     (``build_mlp``, layers in order) and then moved to the device, so the initial weights
     do not depend on the device. Dropout masks then continue from the same global stream.
  2. ``order = torch.Generator(device="cpu").manual_seed(config.seed)``: the trial's own
     data-order stream, independent of the global RNG and of every other trial.
  3. optimizer = ``build_optimizer(model.parameters(), config)``; scheduler likewise.

Epoch e = 1 .. max_epochs:
  1. ``model.train()``; lr = ``optimizer.param_groups[0]["lr"]`` (the lr of this epoch).
  2. ``perm = torch.randperm(n_train, generator=order)`` on CPU, then moved to the device.
  3. Minibatch b = 1, 2, ... takes ``perm[(b-1)*batch_size : b*batch_size]`` in order; the
     last one may be smaller (kept), except that with batch_norm a trailing minibatch of one
     sample is skipped (BatchNorm cannot normalise a single sample).
     forward -> ``cross_entropy`` (mean over the minibatch) -> if not finite: diverged, stop
     before any update -> ``zero_grad(set_to_none=True)`` -> ``backward`` -> ``step``.
  4. Train metrics come from the same forward passes (training mode, weights before each
     step): train_loss = sum_b(loss_b * size_b) / n_used, train_accuracy = correct / n_used.
  5. ``scheduler.step()`` once (if any).
  6. ``evaluate`` on the validation split (eval mode, batches of 4096, summed loss / n).
     A non-finite validation loss also counts as divergence.
  7. Early stopping bookkeeping: improved iff val_accuracy > best + min_delta (maximize) or
     val_loss < best - min_delta (minimize); the first epoch always improves. On improvement
     the state_dict (BatchNorm running stats included) is cloned.
  8. The epoch's ``EpochMetrics`` is appended to the history, then ``on_epoch`` is called.
  9. Stop early when ``patience`` epochs in a row did not improve (and e < max_epochs).

At the end (also after divergence, and when ``on_epoch`` raises) the best epoch's weights
are restored and the model is put in eval mode. A diverged epoch is not in the history, and
a diverged trial is reported with ``diverged=True``, never by raising.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from service.errors import TrialDivergedError
from worker.training.config import TrialConfig
from worker.training.data import TensorSplits
from worker.training.model import build_mlp, count_parameters
from worker.training.optimizers import build_optimizer, build_scheduler

# Eval batch: amortises per-batch overhead; 4096 x width-4096 fp32 activations is 64 MB.
EVAL_BATCH_SIZE = 4096

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class EpochMetrics:
    """One finished epoch. ``lr`` is the learning rate the epoch trained with."""

    epoch: int  # 1-based
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    lr: float
    seconds: float  # wall time of training + validation

    def value(self, objective: str) -> float:
        """The metric named by ``config.objective``."""
        return float(getattr(self, objective))


@dataclass
class TrialResult:
    """Outcome of ``train_trial``; ``model`` holds the best epoch's weights, in eval mode.

    The ``best_*`` fields are None only if no epoch finished (divergence in epoch 1).
    """

    history: list[dict[str, Any]] = field(repr=False)
    epochs_run: int  # finished epochs == len(history)
    best_epoch: int | None
    best_value: float | None  # the objective at best_epoch
    best_val_loss: float | None
    best_val_accuracy: float | None
    stopped_early: bool
    diverged: bool
    diverged_reason: str | None
    n_parameters: int
    duration_s: float
    seed: int
    objective: str
    model: nn.Module = field(repr=False)
    # The exception that ended training early (on_epoch's pruning or cancellation, an error in
    # training), best weights restored; only with train_trial(keep_interrupt=True) and the
    # population trainer, else train_trial raises it.
    interrupted: BaseException | None = None

    def raise_if_diverged(self) -> None:
        """Raise ``TrialDivergedError`` for a diverged trial (for callers that fail on it)."""
        if self.diverged:
            raise TrialDivergedError(self.diverged_reason or "loss became non-finite")


@torch.inference_mode()
def evaluate(
    model: nn.Module, X: torch.Tensor, y: torch.Tensor, batch_size: int = EVAL_BATCH_SIZE
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on (X, y), in eval mode.

    The model's train/eval mode is restored afterwards.
    """
    n = int(y.shape[0])
    if n == 0:
        raise ValueError("evaluate: empty split")
    was_training = model.training
    model.eval()
    try:
        # Accumulate on the device; one host sync at the end instead of one per batch.
        loss_sum = torch.zeros((), dtype=torch.float64, device=X.device)
        correct = torch.zeros((), dtype=torch.int64, device=X.device)
        for start in range(0, n, batch_size):
            logits = model(X[start : start + batch_size])
            yb = y[start : start + batch_size]
            loss_sum += F.cross_entropy(logits, yb, reduction="sum").double()
            correct += (logits.argmax(dim=1) == yb).sum()
    finally:
        model.train(was_training)
    return float(loss_sum) / n, int(correct) / n


def train_trial(
    config: TrialConfig,
    data: TensorSplits,
    *,
    device: torch.device | str | None = None,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    keep_interrupt: bool = False,
) -> TrialResult:
    """Train ``config`` on ``data`` (see the module docstring for the exact order of steps).

    ``device`` defaults to the data's device; data elsewhere is moved there once.
    ``on_epoch`` is called after each epoch's validation and may raise (e.g. to prune or to
    cancel): the exception propagates unchanged after the best weights are restored, or, with
    ``keep_interrupt``, an ``Exception`` is returned in the result's ``interrupted`` together
    with the history so far (a pruned trial's epochs are worth recording). BaseExceptions that
    are not Exceptions (KeyboardInterrupt, SystemExit) always propagate.
    Bit-identical results for equal (config, data) on CPU with the same thread count.
    """
    started = time.perf_counter()
    device = data.device if device is None else torch.device(device)
    data = data.to(device)
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(config.seed)
        with torch.device("cpu"):  # CPU init: the same weights on every device
            model = build_mlp(data.n_features, data.n_classes, config)
        model.to(device)
        order = torch.Generator(device="cpu").manual_seed(config.seed)
        run = _Run(config, data, model, order)
        interrupted: Exception | None = None
        try:
            run.fit(on_epoch)
        except Exception as exc:
            if not keep_interrupt:
                raise
            interrupted = exc
        finally:
            run.restore_best()  # also when on_epoch raised: leave a usable model behind

    best = run.best_metrics
    return TrialResult(
        history=[asdict(m) for m in run.history],
        epochs_run=len(run.history),
        best_epoch=None if best is None else best.epoch,
        best_value=None if best is None else best.value(config.objective),
        best_val_loss=None if best is None else best.val_loss,
        best_val_accuracy=None if best is None else best.val_accuracy,
        stopped_early=run.stopped_early,
        diverged=run.diverged_reason is not None,
        diverged_reason=run.diverged_reason,
        n_parameters=count_parameters(model),
        duration_s=time.perf_counter() - started,
        seed=config.seed,
        objective=config.objective,
        model=model,
        interrupted=interrupted,
    )


class _Run:
    """Mutable state of one training run; split out so ``train_trial`` reads as the recipe."""

    def __init__(
        self, config: TrialConfig, data: TensorSplits, model: nn.Module, order: torch.Generator
    ) -> None:
        self.config = config
        self.data = data
        self.model = model
        self.order = order
        self.optimizer = build_optimizer(model.parameters(), config)
        self.scheduler = build_scheduler(self.optimizer, config)
        self.maximize = config.direction == "maximize"
        self.history: list[EpochMetrics] = []
        self.best_metrics: EpochMetrics | None = None
        # Until an epoch finishes, "best" is the initial state: a divergence in epoch 1 then
        # still leaves finite weights behind.
        self.best_state: StateDict = _clone_state(model)
        self.stopped_early = False
        self.diverged_reason: str | None = None

    def fit(self, on_epoch: Callable[[EpochMetrics], None] | None) -> None:
        bad_epochs = 0
        for epoch in range(1, self.config.max_epochs + 1):
            epoch_started = time.perf_counter()
            lr = float(self.optimizer.param_groups[0]["lr"])
            train = self._train_epoch(epoch)
            if train is None:
                return  # diverged; reason recorded
            if self.scheduler is not None:
                self.scheduler.step()
            val_loss, val_accuracy = evaluate(self.model, self.data.X_val, self.data.y_val)
            if not math.isfinite(val_loss):
                self.diverged_reason = f"validation loss became {val_loss} at epoch {epoch}"
                return
            metrics = EpochMetrics(
                epoch=epoch,
                train_loss=train[0],
                train_accuracy=train[1],
                val_loss=val_loss,
                val_accuracy=val_accuracy,
                lr=lr,
                seconds=time.perf_counter() - epoch_started,
            )
            if self._improved(metrics):
                self.best_metrics = metrics
                self.best_state = _clone_state(self.model)
                bad_epochs = 0
            else:
                bad_epochs += 1
            self.history.append(metrics)
            if on_epoch is not None:
                on_epoch(metrics)
            patience = self.config.patience
            if patience is not None and bad_epochs >= patience and epoch < self.config.max_epochs:
                self.stopped_early = True
                return

    def _train_epoch(self, epoch: int) -> tuple[float, float] | None:
        """One pass over the training split; (loss, accuracy), or None if the loss diverged."""
        model, optimizer, data = self.model, self.optimizer, self.data
        model.train()
        n_train = int(data.y_train.shape[0])
        batch_size = self.config.batch_size
        perm = torch.randperm(n_train, generator=self.order).to(data.device)
        loss_sum = 0.0
        correct = torch.zeros((), dtype=torch.int64, device=data.device)
        n_used = 0
        for batch, start in enumerate(range(0, n_train, batch_size), start=1):
            idx = perm[start : start + batch_size]
            size = int(idx.shape[0])
            if size == 1 and self.config.batch_norm:
                continue  # BatchNorm cannot normalise one sample; see the module docstring
            xb, yb = data.X_train[idx], data.y_train[idx]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            # One host sync per minibatch: the price of stopping at the exact bad batch
            # before a NaN update reaches the weights.
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                self.diverged_reason = (
                    f"train loss became {loss_value} at epoch {epoch}, batch {batch}"
                )
                return None
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss_value * size
            correct += (logits.detach().argmax(dim=1) == yb).sum()
            n_used += size
        if n_used == 0:
            raise ValueError("train_trial: no usable minibatch in the training split")
        return loss_sum / n_used, int(correct) / n_used

    def _improved(self, metrics: EpochMetrics) -> bool:
        if self.best_metrics is None:
            return True
        value = metrics.value(self.config.objective)
        best = self.best_metrics.value(self.config.objective)
        if self.maximize:
            return value > best + self.config.min_delta
        return value < best - self.config.min_delta

    def restore_best(self) -> None:
        self.model.load_state_dict(self.best_state)
        self.model.eval()


def _clone_state(model: nn.Module) -> StateDict:
    # clone(): state_dict() returns views of the live parameters, which training mutates.
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


__all__ = ["EVAL_BATCH_SIZE", "EpochMetrics", "TrialResult", "evaluate", "train_trial"]
