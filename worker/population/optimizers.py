"""Batched optimizers: one update for P stacked models, each member with its own numbers.

Every parameter is a stacked tensor ``[P, ...]`` (member on the leading axis) and is updated
through its ``[P, k]`` view; the per-member learning rate, weight decay, momentum and betas
are ``[P, 1]`` tensors that broadcast over ``k``. A step is a fixed handful of in-place
tensor ops per stacked parameter, whatever P is: no Python loop over members.

Each class reproduces the single-tensor torch.optim algorithm (torch's CPU default) of the
optimizer ``worker.training.build_optimizer`` builds for a member's config, with the same
formulas and the same order of floating-point operations where torch's scalar arguments can
be replaced by per-member tensors; the hyperparameters themselves are read from a torch
optimizer that ``build_optimizer`` makes for each member, so defaults (eps, RMSprop alpha,
Adagrad lr_decay, ...) have one source of truth. Agreement with torch.optim, member by
member, is pinned by tests/worker/population/test_population_optimizers.py (50 steps,
max abs difference <= 1e-5).

All members of one batched optimizer use the same optimizer name; ``MixedBatchedOptimizer``
trains several in one stack, one batched optimizer per contiguous run of members. Buffers (state, scratch) are allocated once and reused every step:
on CPU a fresh multi-megabyte temporary per op costs page faults that are comparable to
the update itself.

On CPU, sgd / momentum / nesterov / adagrad / adam / adamw instead call torch's fused CPU
kernel (``torch._fused_adam_`` & co., what ``torch.optim`` runs with ``fused=True``) once per
member on views into the stacks: one vectorised pass over each tensor instead of 5-8
memory-bound elementwise passes, measured 3x faster per step for P=8 on the 784-128-10 MLP
(0.18 vs 0.56 ms for adam). A per-member call is cheap on CPU; on CUDA each would be a kernel
launch, so there the batched ops (a few launches whatever P is) stay. RMSprop has no fused
kernel of its own; without momentum it is Adam with beta1 = 0 and no bias correction, so on
CPU it runs ``torch._fused_adam_`` that way (see ``BatchedRMSprop``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import ClassVar

import torch
from torch import Tensor

from worker.population.grouping import grouped_indices
from worker.training import FUSED_ON_CPU, TrialConfig, build_optimizer

# Group keys read from each member's torch optimizer (see _hyperparameters).
_KEYS: dict[str, tuple[str, ...]] = {
    "sgd": ("lr", "weight_decay", "momentum", "dampening"),
    "adagrad": ("lr", "weight_decay", "lr_decay", "eps", "initial_accumulator_value"),
    "rmsprop": ("lr", "weight_decay", "alpha", "eps", "momentum"),
    "adam": ("lr", "weight_decay", "beta1", "beta2", "eps"),
}


class BatchedOptimizer:
    """Updates stacked parameters in place; ``step`` takes the parameters and their gradients.

    Parameters and gradients are passed to each ``step`` (the caller may replace the stacked
    tensors when members leave); the optimizer's own state follows via ``select``. Gradients
    are scratch: ``step`` may overwrite them (as torch's coupled weight decay would copy).
    """

    family: ClassVar[str]
    names: ClassVar[tuple[str, ...]]

    def __init__(
        self, configs: Sequence[TrialConfig], params: Sequence[Tensor], *, fused: bool | None = None
    ) -> None:
        if not configs:
            raise ValueError("batched optimizer: no members")
        names = sorted({c.optimizer for c in configs})
        if len(names) != 1 or names[0] not in self.names:
            raise ValueError(f"{type(self).__name__}: members use optimizers {names}")
        self.name = names[0]
        self.n_members = len(configs)
        self.device = params[0].device
        # Per-member hyperparameters, float64 on the device: per-step coefficients (bias
        # corrections) are computed there in double, as torch does in Python floats.
        self.hp = {
            key: torch.tensor(values, dtype=torch.float64, device=self.device)
            for key, values in _hyperparameters(configs, _KEYS[self.family]).items()
        }
        # fused=None: the fused per-member kernels on CPU, the batched ops elsewhere; True: the
        # fused kernels on any device; False: the batched ops. Without a kernel: batched ops.
        self.fused = self.name in FUSED_ON_CPU and (
            self.device.type == "cpu" if fused is None else fused
        )
        self.steps = 0
        # The fused kernels read the step count (bias corrections, adagrad's decay) from a tensor.
        self.step_tensor = torch.zeros((), dtype=torch.float32, device=self.device)
        self.state: dict[str, list[Tensor]] = {}
        self.scratch = [torch.empty_like(p) for p in params]
        self._views_key: tuple[tuple[int, int], ...] | None = None
        self._views: list[list[list[Tensor]]] = []
        self._init_state(params)
        self._refresh()

    def set_lr(self, lrs: Sequence[float]) -> None:
        """The learning rate of each member for the next steps (schedules step per epoch)."""
        if len(lrs) != self.n_members:
            raise ValueError(f"set_lr: {len(lrs)} values for {self.n_members} members")
        self.hp["lr"] = torch.tensor(list(lrs), dtype=torch.float64, device=self.device)
        self._refresh()

    def select(self, index: Tensor) -> None:
        """Keep only the members at ``index`` (positions in the current stack), in that order."""
        index = index.to(self.device)
        self.hp = {k: v.index_select(0, index) for k, v in self.hp.items()}
        self.state = {k: [t.index_select(0, index) for t in ts] for k, ts in self.state.items()}
        self.scratch = [t.index_select(0, index) for t in self.scratch]
        self.n_members = int(index.numel())
        self._views_key = None
        self._refresh()

    def step(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
        self.steps += 1
        if self.fused:
            self.step_tensor.fill_(self.steps)
            self._fused_update(params, grads)
        else:
            self._update(params, grads)

    # -- for subclasses ------------------------------------------------------------------

    def _init_state(self, params: Sequence[Tensor]) -> None:
        pass

    def _refresh(self) -> None:
        """Recompute the cached [P, 1] coefficients (after set_lr / select)."""
        self.neg_lr = self._coef(-self.hp["lr"])
        self.wd = self._coef(self.hp["weight_decay"])
        self.any_wd = bool((self.hp["weight_decay"] != 0).any())
        self._member_hp: list[dict[str, float]] | None = None

    @property
    def member_hp(self) -> list[dict[str, float]]:
        """Each member's numbers as Python floats (doubles, as torch.optim), for the fused
        per-member kernels. Read on demand: on a GPU every number read is a device sync, and
        the batched ops there never need them (a 507-member stack spent 0.3 s of its run
        reading them at every set_lr)."""
        if self._member_hp is None:
            columns = {key: values.tolist() for key, values in self.hp.items()}
            self._member_hp = [
                {key: column[i] for key, column in columns.items()} for i in range(self.n_members)
            ]
        return self._member_hp

    def _update(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
        raise NotImplementedError

    def _fused_update(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
        raise NotImplementedError

    def _member_views(self, *groups: Sequence[Tensor]) -> list[list[list[Tensor]]]:
        """Per group, per member: that member's tensors, as views into the stacked tensors.

        Cached while the stacked tensors stay the same (they change only when members leave):
        unbinding every tensor each step would cost about as much as a fused member update.
        """
        key = tuple((t.data_ptr(), t.shape[0]) for group in groups for t in group)
        if key != self._views_key:
            self._views = [
                [list(member) for member in zip(*(t.unbind(0) for t in group), strict=True)]
                for group in groups
            ]
            self._views_key = key
        return self._views

    def _steps_for(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        return [self.step_tensor] * len(tensors)

    def _coef(self, values: Tensor) -> Tensor:
        return _as_coef(values)

    def _uniform(self, key: str) -> float | None:
        """The common value when every member shares it (lets a step use torch's scalar op)."""
        values = self.hp[key]
        first = float(values[0])
        return first if bool((values == first).all()) else None

    def _each(self, *groups: Sequence[Tensor]) -> Iterator[tuple[Tensor, ...]]:
        """Per stacked parameter: the [P, k] views of its tensors (param, grad, states...).

        (Tiling k into cache-sized blocks was measured and did not pay: the update is bound
        by sqrt/division throughput as much as by memory traffic.)
        """
        for tensors in zip(*groups, strict=True):
            yield tuple(t.view(self.n_members, -1) for t in tensors)

    def _coupled_decay(self, p: Tensor, g: Tensor) -> None:
        # torch: grad = grad.add(param, alpha=weight_decay); a member with wd 0 adds 0.
        if self.any_wd:
            g.addcmul_(p, self.wd)


class BatchedSGD(BatchedOptimizer):
    """sgd / momentum / nesterov: ``torch.optim.SGD`` (dampening as configured, 0 here)."""

    family = "sgd"
    names = ("sgd", "momentum", "nesterov")

    def _init_state(self, params: Sequence[Tensor]) -> None:
        self.nesterov = self.name == "nesterov"
        if self.name != "sgd":
            self.state["momentum_buffer"] = [torch.zeros_like(p) for p in params]

    def _refresh(self) -> None:
        super()._refresh()
        self.momentum = self._coef(self.hp["momentum"])
        self.one_minus_dampening = self._coef(1 - self.hp["dampening"])

    def _update(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
        if "momentum_buffer" not in self.state:
            for p, g in self._each(params, grads):
                self._coupled_decay(p, g)
                p.addcmul_(g, self.neg_lr)
            return
        for p, g, buf in self._each(params, grads, self.state["momentum_buffer"]):
            self._coupled_decay(p, g)
            if self.steps == 1:
                buf.copy_(g)  # torch: buf = clone(grad) on the first step
            else:
                buf.mul_(self.momentum).addcmul_(g, self.one_minus_dampening)
            if self.nesterov:
                g.addcmul_(buf, self.momentum)
                p.addcmul_(g, self.neg_lr)
            else:
                p.addcmul_(buf, self.neg_lr)

    def _fused_update(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
        if "momentum_buffer" in self.state:
            ps, gs, bufs = self._member_views(params, grads, self.state["momentum_buffer"])
        else:
            ps, gs = self._member_views(params, grads)
            bufs = [[] for _ in ps]  # plain sgd: momentum 0, no buffer (as torch.optim)
        for p, g, buf, hp in zip(ps, gs, bufs, self.member_hp, strict=True):
            torch._fused_sgd_(
                p,
                g,
                buf,
                weight_decay=hp["weight_decay"],
                momentum=hp["momentum"],
                lr=hp["lr"],
                dampening=hp["dampening"],
                nesterov=self.nesterov,
                maximize=False,
                is_first_step=self.steps == 1,
            )


class BatchedAdagrad(BatchedOptimizer):
    """adagrad: ``torch.optim.Adagrad``."""

    family = "adagrad"
    names = ("adagrad",)

    def _init_state(self, params: Sequence[Tensor]) -> None:
        initial = self._coef(self.hp["initial_accumulator_value"])
        self.state["sum"] = [
            torch.zeros_like(p).view(self.n_members, -1).add_(initial).view_as(p) for p in params
        ]

    def _update(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
        # torch: clr = lr / (1 + (step - 1) * lr_decay); param -= clr * grad / (sqrt(sum) + eps)
        neg_clr = -self.hp["lr"] / (1 + (self.steps - 1) * self.hp["lr_decay"])
        scale, shift = _folded_denominator(neg_clr, self.hp["eps"])
        for p, g, total, s in self._each(params, grads, self.state["sum"], self.scratch):
            self._coupled_decay(p, g)
            total.addcmul_(g, g, value=1)
            torch.sqrt(total, out=s).mul_(scale).add_(shift)
            p.addcdiv_(g, s)

    def _fused_update(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
        ps, gs, sums = self._member_views(params, grads, self.state["sum"])
        steps = self._steps_for(params)
        for p, g, total, hp in zip(ps, gs, sums, self.member_hp, strict=True):
            torch._fused_adagrad_(
                p,
                g,
                total,
                steps,
                lr=hp["lr"],
                lr_decay=hp["lr_decay"],
                weight_decay=hp["weight_decay"],
                eps=hp["eps"],
                maximize=False,
            )


class BatchedRMSprop(BatchedOptimizer):
    """rmsprop: ``torch.optim.RMSprop`` (not centered), per-member momentum (0 allowed).

    Without momentum (the default) RMSprop's step is Adam's with beta1 = 0 and beta2 = alpha
    once the bias corrections are 1: ``exp_avg`` becomes the gradient, ``exp_avg_sq`` the
    square average, and the update ``lr * grad / (sqrt(square_avg) + eps)`` (L2 decay coupled
    into the gradient in both). On CPU such a stack calls ``torch._fused_adam_`` with a step
    count so large that ``1 - beta ** step`` is exactly 1 in double: one vectorised pass per
    tensor instead of five elementwise ones. On the 784-128-10 MLP a step took 36 against
    114 us for one member and 248 against 417 us for eight; 50 steps agree with
    torch.optim.RMSprop to 5e-7 (as the batched ops do, within the tests' 1e-5).
    """

    family = "rmsprop"
    names = ("rmsprop",)
    # Adam's bias corrections 1 - beta ** step: 0.99 ** 2 ** 100 (and 0 ** it) is 0 in double.
    # A power of two is exact in the float32 step tensor the kernel reads.
    _NO_BIAS_CORRECTION_STEP = 2.0**100

    def __init__(
        self, configs: Sequence[TrialConfig], params: Sequence[Tensor], *, fused: bool | None = None
    ) -> None:
        super().__init__(configs, params, fused=fused)
        no_momentum = not bool((self.hp["momentum"] > 0).any())
        # The base class offers fused kernels to FUSED_ON_CPU names only; torch.optim has none
        # for RMSprop, so here fused means "through Adam's kernel", which needs momentum 0.
        self.fused = no_momentum and (self.device.type == "cpu" if fused is None else fused)
        self.constant_step = torch.full(
            (), self._NO_BIAS_CORRECTION_STEP, dtype=torch.float32, device=self.device
        )
        if self.fused:
            # Adam's exp_avg: the kernel computes 0 * exp_avg + grad, and 0 * NaN from
            # uninitialised memory would be NaN. From here on it only ever holds gradients.
            for t in self.scratch:
                t.zero_()

    def _init_state(self, params: Sequence[Tensor]) -> None:
        self.state["square_avg"] = [torch.zeros_like(p) for p in params]
        if bool((self.hp["momentum"] > 0).any()):  # torch: zeros, only when momentum > 0
            self.state["momentum_buffer"] = [torch.zeros_like(p) for p in params]

    def _steps_for(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        return [self.constant_step] * len(tensors)

    def _fused_update(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
        # exp_avg: scratch (zeroed in __init__), overwritten with the gradient each step.
        ps, gs, sqs, firsts = self._member_views(
            params, grads, self.state["square_avg"], self.scratch
        )
        steps = self._steps_for(params)
        for p, g, sq, first, hp in zip(ps, gs, sqs, firsts, self.member_hp, strict=True):
            torch._fused_adam_(
                p,
                g,
                first,
                sq,
                [],  # no amsgrad
                steps,
                amsgrad=False,
                lr=hp["lr"],
                beta1=0.0,
                beta2=hp["alpha"],
                weight_decay=hp["weight_decay"],
                eps=hp["eps"],
                maximize=False,
            )

    def _refresh(self) -> None:
        super()._refresh()
        self.eps = self._coef(self.hp["eps"])
        self.momentum = self._coef(self.hp["momentum"])
        self.alpha = self._uniform("alpha")
        self.alpha_t = self._coef(self.hp["alpha"])
        self.one_minus_alpha_t = self._coef(1 - self.hp["alpha"])
        self.scale, self.shift = _folded_denominator(-self.hp["lr"], self.hp["eps"])

    def _update(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
        buffers = self.state.get("momentum_buffer", self.scratch)  # scratch: a placeholder
        for p, g, sq, buf, s in self._each(
            params, grads, self.state["square_avg"], buffers, self.scratch
        ):
            self._coupled_decay(p, g)
            _ema_square_(sq, g, s, self.alpha, self.alpha_t, self.one_minus_alpha_t)
            torch.sqrt(sq, out=s)
            if "momentum_buffer" in self.state:
                # A member with momentum 0 gets buf = g / avg: torch's momentum-free update.
                s.add_(self.eps)  # avg
                buf.mul_(self.momentum).addcdiv_(g, s)
                p.addcmul_(buf, self.neg_lr)
            else:  # torch: param.addcdiv_(grad, avg, value=-lr), lr folded into avg
                s.mul_(self.scale).add_(self.shift)
                p.addcdiv_(g, s)


class BatchedAdam(BatchedOptimizer):
    """adam (coupled L2) / adamw (decoupled decay): ``torch.optim.Adam`` / ``AdamW``."""

    family = "adam"
    names = ("adam", "adamw")

    def _init_state(self, params: Sequence[Tensor]) -> None:
        self.decoupled = self.name == "adamw"
        self.state["exp_avg"] = [torch.zeros_like(p) for p in params]
        self.state["exp_avg_sq"] = [torch.zeros_like(p) for p in params]

    def _refresh(self) -> None:
        super()._refresh()
        self.one_minus_beta1 = self._coef(1 - self.hp["beta1"])
        self.beta2 = self._uniform("beta2")
        self.beta2_t = self._coef(self.hp["beta2"])
        self.one_minus_beta2_t = self._coef(1 - self.hp["beta2"])
        self.decay = self._coef(1 - self.hp["lr"] * self.hp["weight_decay"])

    def _update(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
        hp, t = self.hp, self.steps
        # torch: step_size = lr / (1 - beta1**t); denom = sqrt(v) / sqrt(1 - beta2**t) + eps;
        # param -= step_size * m / denom, with -step_size folded into denom as torch's
        # capturable Adam does: one pass fewer than dividing and scaling separately.
        neg_step_size = -hp["lr"] / (1 - hp["beta1"] ** t)
        scale, shift = _folded_denominator(neg_step_size, hp["eps"], (1 - hp["beta2"] ** t).sqrt())
        for p, g, m, v, s in self._each(
            params, grads, self.state["exp_avg"], self.state["exp_avg_sq"], self.scratch
        ):
            if self.decoupled:
                if self.any_wd:
                    p.mul_(self.decay)  # torch AdamW: param.mul_(1 - lr * weight_decay)
            else:
                self._coupled_decay(p, g)
            m.lerp_(g, self.one_minus_beta1)
            _ema_square_(v, g, s, self.beta2, self.beta2_t, self.one_minus_beta2_t)
            torch.sqrt(v, out=s).mul_(scale).add_(shift)
            p.addcdiv_(m, s)

    def _fused_update(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
        ps, gs, ms, vs = self._member_views(
            params, grads, self.state["exp_avg"], self.state["exp_avg_sq"]
        )
        kernel = torch._fused_adamw_ if self.decoupled else torch._fused_adam_
        steps = self._steps_for(params)
        for p, g, m, v, hp in zip(ps, gs, ms, vs, self.member_hp, strict=True):
            kernel(
                p,
                g,
                m,
                v,
                [],  # no amsgrad
                steps,
                amsgrad=False,
                lr=hp["lr"],
                beta1=hp["beta1"],
                beta2=hp["beta2"],
                weight_decay=hp["weight_decay"],
                eps=hp["eps"],
                maximize=False,
            )


_CLASSES: tuple[type[BatchedOptimizer], ...] = (
    BatchedSGD,
    BatchedAdagrad,
    BatchedRMSprop,
    BatchedAdam,
)


def build_batched_optimizer(
    configs: Sequence[TrialConfig], params: Sequence[Tensor], *, fused: bool | None = None
) -> BatchedOptimizer:
    """The batched optimizer for members that all use the same ``config.optimizer``.

    ``fused``: None picks by device (torch's fused kernels on CPU, batched ops elsewhere);
    True / False force one path where torch has a fused kernel for the optimizer.
    """
    names = {c.optimizer for c in configs}
    if len(names) == 1:
        for cls in _CLASSES:
            if names <= set(cls.names):
                return cls(configs, params, fused=fused)
    raise ValueError(f"batched optimizer: members must share one optimizer, got {sorted(names)}")


class MixedBatchedOptimizer:
    """Members of several optimizers in one stack: one batched optimizer per contiguous run.

    The stack is ordered so that each optimizer's members sit next to each other (see
    ``optimizer_order``); a run's update works on the ``[start:end]`` slices of the stacked
    tensors, which are contiguous views, so the per-member numbers are exactly those of a
    stack of that optimizer alone. Mixing optimizers costs a few extra small ops per step (one
    set per run) instead of training each optimizer's members as a separate, narrower stack.
    """

    def __init__(
        self, configs: Sequence[TrialConfig], params: Sequence[Tensor], *, fused: bool | None = None
    ) -> None:
        if not configs:
            raise ValueError("batched optimizer: no members")
        self.runs: list[tuple[int, int, BatchedOptimizer]] = []
        start = 0
        for _name, group in itertools.groupby(configs, key=lambda c: c.optimizer):
            end = start + len(list(group))
            sliced = [p[start:end] for p in params]
            run = build_batched_optimizer(configs[start:end], sliced, fused=fused)
            self.runs.append((start, end, run))
            start = end
        names = [run.name for _, _, run in self.runs]
        if len(set(names)) != len(names):
            raise ValueError(
                f"batched optimizer: members of one optimizer must be adjacent: {names}"
            )
        self.n_members = len(configs)
        self._slices_key: tuple[tuple[int, ...], tuple[int, ...]] | None = None
        self._slices_cache: list[tuple[BatchedOptimizer, list[Tensor], list[Tensor]]] = []

    def set_lr(self, lrs: Sequence[float]) -> None:
        if len(lrs) != self.n_members:
            raise ValueError(f"set_lr: {len(lrs)} values for {self.n_members} members")
        for start, end, run in self.runs:
            run.set_lr(lrs[start:end])

    def select(self, index: Tensor) -> None:
        """Keep only the members at ``index`` (ascending positions in the current stack)."""
        positions = [int(i) for i in index]
        if positions != sorted(positions):
            raise ValueError("select: positions must be ascending (runs stay contiguous)")
        runs, start = [], 0
        for lo, hi, run in self.runs:
            local = [pos - lo for pos in positions if lo <= pos < hi]
            if local:
                run.select(torch.tensor(local, dtype=torch.int64))
                runs.append((start, start + len(local), run))
                start += len(local)
        self.runs = runs
        self.n_members = start
        self._slices_key = None  # the runs' bounds moved

    def step(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
        for run, run_params, run_grads in self._slices(params, grads):
            run.step(run_params, run_grads)

    def _slices(
        self, params: Sequence[Tensor], grads: Sequence[Tensor]
    ) -> list[tuple[BatchedOptimizer, list[Tensor], list[Tensor]]]:
        """Each run with its ``[start:end]`` views of the stacked tensors, cached while those
        stay the same (until members leave): slicing every tensor for every run each step was
        56 slices per step for a stack of seven optimizers, ~80 us of a 3.8 ms P=8 step."""
        key = (tuple(t.data_ptr() for t in (*params, *grads)), tuple(id(r) for *_, r in self.runs))
        if key != self._slices_key:
            self._slices_cache = [
                (run, [p[start:end] for p in params], [g[start:end] for g in grads])
                for start, end, run in self.runs
            ]
            self._slices_key = key
        return self._slices_cache


def optimizer_order(configs: Sequence[TrialConfig]) -> list[int]:
    """Indices of ``configs`` with each optimizer's members adjacent, in order of appearance."""
    return [i for group in grouped_indices(configs, lambda c: c.optimizer) for i in group]


def _folded_denominator(
    neg_step: Tensor, eps: Tensor, divisor: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(scale, shift) with ``sqrt(x) * scale + shift == (sqrt(x) / divisor + eps) / neg_step``.

    So ``param.addcdiv_(numerator, sqrt(x) * scale + shift)`` is torch's
    ``param.addcdiv_(numerator, sqrt(x) / divisor + eps, value=neg_step)`` with a per-member
    step and no extra pass for it. (In-place ``mul_``/``add_`` with a [P, 1] operand run at
    memory speed; an out-of-place ``addcmul`` whose first operand broadcasts is ~7x slower.)
    """
    denom = neg_step if divisor is None else divisor * neg_step
    return _as_coef(1 / denom), _as_coef(eps / neg_step)


def _as_coef(values: Tensor) -> Tensor:
    """[P] float64 -> [P, 1] float32 (torch rounds its Python-float scalars likewise)."""
    return values.to(torch.float32).view(-1, 1)


def _ema_square_(
    avg: Tensor,
    g: Tensor,
    scratch: Tensor,
    beta: float | None,
    beta_t: Tensor,
    one_minus_beta_t: Tensor,
) -> None:
    """avg = beta * avg + (1 - beta) * g**2, torch's op order when beta is shared."""
    if beta is not None:
        avg.mul_(beta).addcmul_(g, g, value=1 - beta)
    else:
        torch.mul(g, one_minus_beta_t, out=scratch)
        avg.mul_(beta_t).addcmul_(g, scratch)


def member_hyperparameters(config: TrialConfig) -> dict[str, float]:
    """A member's numbers as torch.optim would use them, read from ``build_optimizer``: the
    keys its optimizer family's batched optimizer reads (``lr``, ``weight_decay``, ...)."""
    family = next(cls.family for cls in _CLASSES if config.optimizer in cls.names)
    dummy = torch.zeros(1, requires_grad=True)
    group = build_optimizer([dummy], config).param_groups[0]
    _check_supported(config.optimizer, group)
    values = {}
    for key in _KEYS[family]:
        if key in ("beta1", "beta2"):
            values[key] = float(group["betas"][0 if key == "beta1" else 1])
        else:
            values[key] = float(group[key])
    return values


def _hyperparameters(
    configs: Sequence[TrialConfig], keys: tuple[str, ...]
) -> dict[str, list[float]]:
    """Each member's ``keys``, one list per key (see ``member_hyperparameters``)."""
    members = [member_hyperparameters(config) for config in configs]
    return {key: [values[key] for values in members] for key in keys}


def _check_supported(name: str, group: dict[str, object]) -> None:
    # Flags build_optimizer never sets; refuse them rather than silently train differently.
    for flag in ("maximize", "amsgrad", "centered"):
        if group.get(flag):
            raise ValueError(f"batched optimizer: {name} with {flag}=True is not supported")


__all__ = [
    "BatchedAdagrad",
    "BatchedAdam",
    "BatchedOptimizer",
    "BatchedRMSprop",
    "BatchedSGD",
    "MixedBatchedOptimizer",
    "build_batched_optimizer",
    "member_hyperparameters",
    "optimizer_order",
]
