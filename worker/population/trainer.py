"""Train many trials of one architecture together; each member's result is its solo result.

``train_population`` reproduces ``worker.training.train_trial`` member by member (see the
order of operations in ``worker/training/loop.py``): the same initial weights (``build_mlp``
under ``torch.manual_seed(seed)`` inside ``fork_rng``), the same data order (``randperm``
from a per-member ``torch.Generator`` seeded with the trial's seed, drawn once per epoch),
the same minibatches (trailing single-sample batch skipped with batch norm), the same lr
schedule (each member's own torch scheduler, stepped once per epoch), the same train/val
metrics, early stopping, divergence handling and best-weight restore. Only the arithmetic is
batched, so histories agree within float tolerance (dropout 0) and in distribution (dropout
> 0: the masks are drawn from one generator for the whole stack). One known amplifier of
float noise: with batch norm, the bias of the Linear before each BatchNorm has a gradient
that is exactly 0 in theory and rounding noise in practice; adaptive optimizers (adam,
adamw, rmsprop, adagrad) turn that noise into lr-sized steps, so that bias and the running
mean tracking it drift apart from the sequential run's and validation losses agree to ~1e-3
rather than ~1e-6 (train losses still agree tightly). Two sequential runs with different
thread counts drift the same way.

Stack order: all members train in one stack, reordered so that each optimizer's members are
adjacent (``optimizer_order``; one batched optimizer per run, ``MixedBatchedOptimizer``; on
CUDA one fused kernel per stacked parameter updates every member, ``fused_update``);
``on_epoch`` is called in that order and results come back in the order of ``configs``. A
population of one member runs the sequential code itself (``P = 1`` is exactly the sequential
path) except with ``autocast="bf16"``, which only the batched path implements.

Time: ``duration_s`` is the member's share of the population's wall time: the group's setup
and each epoch's shared work (training, validation, bookkeeping) split equally among the
members in the stack at the time, plus the member's own ``on_epoch`` calls and model export.
The shares of a group add up to its wall time. ``EpochMetrics.seconds`` is the member's share
of that epoch's training + validation.

Divergence: a member whose minibatch loss is non-finite is diverged at that batch (epoch and
batch number in the reason, as sequentially). The check costs no host sync per step: the
per-member losses are kept on the device and inspected once per epoch; the diverged member's
later steps in that epoch touch only its own (discarded) slices, and its best snapshot, taken
at its last good epoch (or the initial weights), is what it returns.
"""

from __future__ import annotations

import functools
import hashlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LRScheduler

from worker.population.fused_update import FusedStackOptimizer, stack_optimizer
from worker.population.grouping import grouped_indices
from worker.population.optimizers import optimizer_order
from worker.population.sizing import memory_budget_bytes
from worker.population.stacked import StackedMLP, live_features
from worker.population.step_graph import StepGraph
from worker.training import (
    EpochMetrics,
    TensorSplits,
    TrialConfig,
    TrialResult,
    build_mlp,
    build_optimizer,
    build_scheduler,
    count_parameters,
    train_trial,
)

AUTOCAST_MODES: tuple[str, ...] = ("tf32", "bf16")
# Whether CUDA stacks replay their training step as a CUDA graph (step_graph); tests switch
# it off to compare.
STEP_GRAPHS = True
# Features 0 in every training row are skipped when at least this share is (live_feature_mask).
MIN_DEAD_SHARE = 1 / 16
# What must be equal for trials to share one stack (the rest is per member).
POPULATION_KEY_FIELDS: tuple[str, ...] = (
    "hidden_layers",
    "activation",
    "batch_norm",
    "batch_size",
    "max_epochs",
)

_T = TypeVar("_T")
OnEpoch = Callable[[int, EpochMetrics], None]
# Called with (index, result) of the members that leave the stack while others still train.
OnFinish = Callable[[list[tuple[int, TrialResult]]], None]
# Called once per epoch, before the members' on_epoch calls, with every (index, metrics)
# about to be passed to on_epoch: lets the caller write them all in one go.
OnEpochs = Callable[[list[tuple[int, EpochMetrics]]], None]


def population_key(config: TrialConfig) -> tuple[object, ...]:
    """Configs with equal keys can train in one population."""
    return tuple(getattr(config, name) for name in POPULATION_KEY_FIELDS)


def group_configs(configs: Sequence[TrialConfig]) -> list[list[int]]:
    """Indices of ``configs`` grouped by ``population_key``, groups and members in order."""
    return grouped_indices(configs, population_key)


def train_population(
    configs: Sequence[TrialConfig],
    data: TensorSplits,
    *,
    device: torch.device | str | None = None,
    on_epoch: OnEpoch | None = None,
    autocast: str | None = None,
    on_epochs: OnEpochs | None = None,
    on_finish: OnFinish | None = None,
) -> list[TrialResult]:
    """Train every config as ``train_trial`` would; results in the order of ``configs``.

    All configs must share ``POPULATION_KEY_FIELDS`` (ValueError otherwise; see
    ``group_configs``). ``device`` defaults to the data's device; the data is moved there
    once. ``on_epoch(i, metrics)`` is called for member ``configs[i]`` after each of its
    epochs, in stack order (see the module doc); if it raises an ``Exception`` the
    member stops: its best weights are restored, the exception is stored in its result's
    ``interrupted`` and the others continue. ``BaseException``s that are not ``Exception``s
    (KeyboardInterrupt, SystemExit) propagate at once.

    ``autocast``: None (fp32, the sequential numerics), ``"tf32"`` (CUDA: fp32 matmuls may use
    TF32 during the call; no effect on CPU) or ``"bf16"`` (the hidden layers' batched matmuls
    take bfloat16 inputs; the output layer's, weights, loss and optimizer stay fp32).

    ``on_epochs(batch)``: called once per epoch of a population (not for a lone fp32 member,
    which runs the sequential code), before the members' ``on_epoch`` calls, with every
    ``(i, metrics)`` that on_epoch is about to get; an exception from it ends the population.

    ``on_finish(batch)``: called at the end of an epoch with ``(i, result)`` of every member
    that leaves the stack then (pruned, stopped early, diverged, interrupted) while others go
    on training, so the caller can record them without waiting for the whole stack; members
    that leave with the last ones only come back in the returned list, which holds every
    member's result either way. An exception from it ends the population.
    """
    configs = list(configs)
    if not configs:
        return []
    if len(group_configs(configs)) != 1:
        fields = ", ".join(POPULATION_KEY_FIELDS)
        raise ValueError(f"train_population: all configs must share {fields}; see group_configs")
    if autocast is not None and autocast not in AUTOCAST_MODES:
        raise ValueError(f"autocast: must be None or one of {AUTOCAST_MODES}, got {autocast!r}")
    device = data.device if device is None else torch.device(device)
    data = data.to(device)
    results: list[TrialResult | None] = [None] * len(configs)
    with _matmul_precision(autocast, device):
        if len(configs) == 1 and autocast != "bf16":
            return [_train_alone(configs[0], 0, data, device, on_epoch)]
        order = optimizer_order(configs)
        population = _Population(
            [configs[i] for i in order],
            order,
            data,
            device,
            on_epoch,
            torch.bfloat16 if autocast == "bf16" else None,
            on_epochs,
            on_finish,
        )
        for i, result in zip(order, population.run(), strict=True):
            results[i] = result
    return [r for r in results if r is not None]


@contextmanager
def _matmul_precision(autocast: str | None, device: torch.device) -> Iterator[None]:
    if autocast != "tf32" or device.type != "cuda":
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 tensor cores for fp32 matmuls
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _train_alone(
    config: TrialConfig,
    index: int,
    data: TensorSplits,
    device: torch.device,
    on_epoch: OnEpoch | None,
) -> TrialResult:
    """``train_trial`` itself, with an ``on_epoch`` exception returned, not raised."""
    return train_trial(
        config,
        data,
        device=device,
        on_epoch=None if on_epoch is None else functools.partial(on_epoch, index),
        keep_interrupt=True,
    )


def _result(
    config: TrialConfig,
    history: list[EpochMetrics],
    best: EpochMetrics | None,
    *,
    stopped_early: bool,
    diverged_reason: str | None,
    interrupted: BaseException | None,
    duration_s: float,
    model: nn.Module,
) -> TrialResult:
    return TrialResult(
        history=[asdict(m) for m in history],
        epochs_run=len(history),
        best_epoch=None if best is None else best.epoch,
        best_value=None if best is None else best.value(config.objective),
        best_val_loss=None if best is None else best.val_loss,
        best_val_accuracy=None if best is None else best.val_accuracy,
        stopped_early=stopped_early,
        diverged=diverged_reason is not None,
        diverged_reason=diverged_reason,
        n_parameters=count_parameters(model),
        duration_s=duration_s,
        seed=config.seed,
        objective=config.objective,
        model=model,
        interrupted=interrupted,
    )


@dataclass
class _Member:
    """One trial's bookkeeping; the weights live in the stack while it trains."""

    index: int  # position in train_population's configs
    config: TrialConfig
    model: nn.Sequential  # build_mlp's model: initial weights, then the exported best
    order: torch.Generator
    lr_holder: torch.optim.Optimizer  # owns the lr that the member's scheduler updates
    scheduler: LRScheduler | None
    history: list[EpochMetrics] = field(default_factory=list)
    best: EpochMetrics | None = None
    bad_epochs: int = 0
    stopped_early: bool = False
    diverged_reason: str | None = None
    interrupted: Exception | None = None
    duration_s: float = 0.0

    def improved(self, metrics: EpochMetrics) -> bool:
        if self.best is None:
            return True
        value, best = metrics.value(self.config.objective), self.best.value(self.config.objective)
        if self.config.direction == "maximize":
            return value > best + self.config.min_delta
        return value < best - self.config.min_delta

    @property
    def lr(self) -> float:
        return float(self.lr_holder.param_groups[0]["lr"])

    def step_schedule(self) -> None:
        if self.scheduler is not None:
            self.lr_holder.step()  # no gradients: a no-op that keeps torch's order check happy
            self.scheduler.step()


class _Population:
    """Members that share architecture, batch size and max_epochs, each optimizer's adjacent."""

    def __init__(
        self,
        configs: list[TrialConfig],
        indices: list[int],
        data: TensorSplits,
        device: torch.device,
        on_epoch: OnEpoch | None,
        matmul_dtype: torch.dtype | None,
        on_epochs: OnEpochs | None = None,
        on_finish: OnFinish | None = None,
    ) -> None:
        started = time.perf_counter()
        self.data = data
        self.device = device
        self.on_epoch = on_epoch
        self.on_epochs = on_epochs
        self.on_finish = on_finish
        first = configs[0]
        self.max_epochs = first.max_epochs
        n_train, batch_size = int(data.y_train.shape[0]), first.batch_size
        # (batch number, start, size) of every minibatch the sequential loop trains on.
        self.steps = [
            (number, start, min(batch_size, n_train - start))
            for number, start in enumerate(range(0, n_train, batch_size), start=1)
            if not (first.batch_norm and n_train - start == 1)
        ]
        if not self.steps:
            raise ValueError("train_population: no usable minibatch in the training split")
        self.members = self._members(configs, indices)
        # Per worker process, not per stack: the features the training rows use, and the
        # training inputs restricted to them (see worker.population.stacked).
        live = data.derived("population.live_features", lambda: live_feature_mask(data))
        self.stack = StackedMLP(
            [m.model for m in self.members],
            activation=first.activation,
            dropouts=[c.dropout for c in configs],
            device=device,
            dropout_seed=_mixed_seed(configs),
            matmul_dtype=matmul_dtype,
            live=live,
        )
        self.optimizer = stack_optimizer(configs, self.stack.params)
        self.X_train = data.derived(
            # n_live: a stack without hidden layers trains on every feature (see StackedMLP)
            ("population.train_inputs", matmul_dtype, self.stack.n_live),
            lambda: self.stack.inputs_for(data.X_train),
        )
        self.X_val = data.derived(
            ("population.val_inputs", self.stack.n_live),
            lambda: self.stack.eval_inputs_for(data.X_val),
        )
        # CUDA with the fused optimizer: full minibatches replay a recorded step (step_graph).
        self.graph = (
            StepGraph(self.stack, self.optimizer, self.X_train, data.y_train, batch_size)
            if STEP_GRAPHS
            and device.type == "cuda"
            and isinstance(self.optimizer, FusedStackOptimizer)
            else None
        )
        setup_share = (time.perf_counter() - started) / len(configs)
        for m in self.members:
            m.duration_s += setup_share

    def _members(self, configs: list[TrialConfig], indices: list[int]) -> list[_Member]:
        """Every member's initial model; a GPU-sized population's on several threads (the
        weight draws dominate and release the GIL; see ``_map_members``)."""
        return _map_members(self._member, configs, indices)

    def _member(self, config: TrialConfig, index: int) -> _Member:
        # The trial's own generator, seeded as train_trial seeds the global RNG: the same
        # weights, on the CPU whatever the device (then stacked onto it), with no global
        # state touched (members are built on several threads).
        weights = torch.Generator(device="cpu").manual_seed(config.seed)
        model = build_mlp(
            self.data.n_features, self.data.n_classes, config, generator=weights, device="cpu"
        )
        lr_holder = build_optimizer([torch.zeros(1, requires_grad=True)], config)
        return _Member(
            index=index,
            config=config,
            model=model,
            order=torch.Generator(device="cpu").manual_seed(config.seed),
            lr_holder=lr_holder,
            scheduler=build_scheduler(lr_holder, config),
        )

    def run(self) -> list[TrialResult]:
        active = list(self.members)
        for epoch in range(1, self.max_epochs + 1):
            if not active:
                break
            leaving = self._epoch(epoch, active)
            if leaving:
                self._finish([(pos, active[pos]) for pos in leaving])
                kept = [pos for pos in range(len(active)) if pos not in set(leaving)]
                if kept and self.on_finish is not None:
                    self.on_finish(
                        [(active[pos].index, self._result(active[pos])) for pos in leaving]
                    )
                active = [active[pos] for pos in kept]
                if active:
                    self.stack.select(kept)
                    self.optimizer.select(torch.tensor(kept, dtype=torch.int64))
                    if self.graph is not None:
                        self.graph.reset()
        return [self._result(m) for m in self.members]

    @staticmethod
    def _result(m: _Member) -> TrialResult:
        return _result(
            m.config,
            m.history,
            m.best,
            stopped_early=m.stopped_early,
            diverged_reason=m.diverged_reason,
            interrupted=m.interrupted,
            duration_s=m.duration_s,
            model=m.model,
        )

    def _epoch(self, epoch: int, active: list[_Member]) -> list[int]:
        """Train, validate and report one epoch; the stack positions of members that leave."""
        started = time.perf_counter()
        data, stack, P = self.data, self.stack, len(active)
        lrs = [m.lr for m in active]
        self.optimizer.set_lr(lrs)
        n_train = int(data.y_train.shape[0])
        perm = torch.stack(
            _map_members(lambda m: torch.randperm(n_train, generator=m.order), active)
        )
        perm = perm.to(self.device)
        losses = torch.empty(len(self.steps), P, device=self.device)
        correct = torch.zeros(P, dtype=torch.int64, device=self.device)
        graph = self.graph
        for slot, (_, start, size) in enumerate(self.steps):
            if graph is not None and size == graph.batch_size:
                graph.step(perm[:, start : start + size], losses[slot])
                continue
            rows = perm[:, start : start + size].reshape(-1)
            correct += stack.train_step(self.X_train, data.y_train, rows, losses[slot])
            self.optimizer.step(stack.params, stack.grads)
        if graph is not None:
            correct += graph.correct
            graph.correct.zero_()
        for m in active:
            m.step_schedule()
        val_loss_sum, val_correct = stack.evaluate(self.X_val, data.y_val)

        # The epoch's one host sync: every member's per-batch losses and counts.
        losses_h, correct_h = losses.cpu(), correct.cpu()
        val_loss_h, val_correct_h = val_loss_sum.cpu(), val_correct.cpu()
        sizes = torch.tensor([size for _, _, size in self.steps], dtype=torch.float64)
        n_used, n_val = int(sizes.sum()), int(data.y_val.shape[0])
        train_loss = (losses_h.double() * sizes[:, None]).sum(dim=0) / n_used
        finite = torch.isfinite(losses_h)
        share = (time.perf_counter() - started) / P

        improved: list[int] = []
        for pos, m in enumerate(active):
            m.duration_s += share
            if not bool(finite[:, pos].all()):
                slot = int((~finite[:, pos]).nonzero()[0])
                value = float(losses_h[slot, pos])
                batch = self.steps[slot][0]
                m.diverged_reason = f"train loss became {value} at epoch {epoch}, batch {batch}"
                continue
            val_loss = float(val_loss_h[pos]) / n_val
            if not math.isfinite(val_loss):
                m.diverged_reason = f"validation loss became {val_loss} at epoch {epoch}"
                continue
            metrics = EpochMetrics(
                epoch=epoch,
                train_loss=float(train_loss[pos]),
                train_accuracy=int(correct_h[pos]) / n_used,
                val_loss=val_loss,
                val_accuracy=int(val_correct_h[pos]) / n_val,
                lr=lrs[pos],
                seconds=share,
            )
            if m.improved(metrics):
                m.best = metrics
                m.bad_epochs = 0
                improved.append(pos)
            else:
                m.bad_epochs += 1
            m.history.append(metrics)
        stack.save_best(improved)  # before on_epoch, as sequentially: a raise keeps this epoch

        reporting = [pos for pos, m in enumerate(active) if m.diverged_reason is None]
        if self.on_epochs is not None and self.on_epoch is not None and reporting:
            called = time.perf_counter()
            self.on_epochs([(active[pos].index, active[pos].history[-1]) for pos in reporting])
            share = (time.perf_counter() - called) / len(reporting)
            for pos in reporting:
                active[pos].duration_s += share

        leaving: list[int] = []
        for pos, m in enumerate(active):
            if m.diverged_reason is not None:
                leaving.append(pos)
                continue
            if self.on_epoch is not None:
                called = time.perf_counter()
                try:
                    self.on_epoch(m.index, m.history[-1])
                except Exception as exc:
                    m.interrupted = exc
                    leaving.append(pos)
                    continue
                finally:
                    m.duration_s += time.perf_counter() - called
            patience = m.config.patience
            if patience is not None and m.bad_epochs >= patience and epoch < self.max_epochs:
                m.stopped_early = True
                leaving.append(pos)
            elif epoch == self.max_epochs:
                leaving.append(pos)
        return leaving

    def _finish(self, leaving: list[tuple[int, _Member]]) -> None:
        """Export the leaving members' best weights into their models, on the device."""
        started = time.perf_counter()
        self.stack.export_best([pos for pos, _ in leaving], [m.model for _, m in leaving])
        for _, member in leaving:
            member.model.to(self.device).eval()
        share = (time.perf_counter() - started) / len(leaving)
        for _, member in leaving:
            member.duration_s += share


# Per-member host work (building the initial models, drawing each epoch's data order) runs
# on threads for populations of at least this many members: a GPU's hundreds. A CPU stack has
# tens, and its worker processes run one torch thread each.
THREADED_MIN_MEMBERS = 64
# At most this many threads. Measured on an H200's 16-core host, building 507 members of the
# 784-128-10 MLP took 1.03 s on one thread, 0.39 s on 8 and 0.69 s on 16.
MAX_MEMBER_THREADS = 8


def _map_members(fn: Callable[..., _T], *iterables: Sequence[Any]) -> list[_T]:
    """``list(map(fn, *iterables))``, on threads for a GPU-sized population.

    Meanwhile torch runs each op on the calling thread alone: with its intra-op threads on
    top of the member threads, the H200 host's 16 cores were oversubscribed and the 507
    members took 2.3-2.8 s, slower than on one thread.
    """
    n = len(iterables[0])
    workers = min(n, torch.get_num_threads(), MAX_MEMBER_THREADS)
    if n < THREADED_MIN_MEMBERS or workers <= 1:
        return list(map(fn, *iterables))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="hpo-member") as pool:
            return list(pool.map(fn, *iterables))
    finally:
        torch.set_num_threads(threads)


def live_feature_mask(data: TensorSplits) -> Tensor | None:
    """The live-feature mask for ``StackedMLP(live=...)``, or None (train on every feature).

    Skipping dead features costs a copy of the training split's live columns, kept for the
    worker process: it is made only when at least ``MIN_DEAD_SHARE`` of the features are dead
    (fewer save too little of the first layer's work) and the copy fits the population memory
    budget (``sizing.memory_budget_bytes``).
    """
    live = live_features(data.X_train)
    n_features, n_live = int(live.numel()), int(live.sum())
    if (n_features - n_live) < MIN_DEAD_SHARE * n_features:
        return None
    if int(data.X_train.shape[0]) * n_live * 4 > memory_budget_bytes(data.device):
        return None
    return live


def _mixed_seed(configs: Sequence[TrialConfig]) -> int:
    """The stack's dropout seed: a function of all members' seeds, so reruns repeat."""
    text = ",".join(str(c.seed) for c in configs).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & (2**63 - 1)


__all__ = [
    "AUTOCAST_MODES",
    "POPULATION_KEY_FIELDS",
    "group_configs",
    "population_key",
    "train_population",
]
