"""On CUDA, a stack's optimizer step is one Triton kernel per stacked parameter.

The batched optimizers (``optimizers``) update each optimizer's run of members with a
handful of elementwise ops per stacked parameter. On a GPU every op is a kernel launch and
a pass over memory: a stack of all seven optimizers issues about 140 per step on the
784-128-10 MLP, and on an H200 a 507-member stack spent 2.9 s of a 7.2 s run (sampled)
issuing them while the GPU waited. ``FusedStackOptimizer`` updates every member of a
stacked parameter in one launch, whatever its optimizer: each member's row reads its
parameter, gradient and optimizer state once and writes them once
(``stack_update_kernel``). The numbers are those of ``torch.optim`` member by member, as
for the batched optimizers (tests/worker/population/test_population_fused_update.py: 50
steps, max abs difference <= 1e-5).

Every member has two state tensors whatever its optimizer (momentum buffer; adagrad's sum;
RMSprop's square average and momentum buffer; Adam's two averages), the most any
optimizer needs: ``sizing`` budgets two states per parameter already.

``stack_optimizer`` picks it on CUDA when Triton can compile there (torch's CUDA wheels
bring Triton, but it also needs a C compiler on the machine); otherwise, and on CPU, where
torch's fused per-member kernels are faster, the batched optimizers train the stack. The
kernel also runs on CPU tensors through Triton's interpreter (``interpret=True``): that is
how the tests check its arithmetic on machines without a GPU.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from worker.population.optimizers import MixedBatchedOptimizer, member_hyperparameters
from worker.training import TrialConfig

log = logging.getLogger(__name__)

# Elements of a member's row per program. The rows of the bench's first layer (784 x 128)
# take 98 programs per member; a bias of 10 takes one.
BLOCK = 1024
# Each op rounds on its own unless the kernel asks for a fused multiply-add: torch's rounding
# (see stack_update_kernel). The interpreter ignores compile options.
_ROUNDING = {"enable_fp_fusion": False}


class FusedStackOptimizer:
    """Every member of a stack updated in one kernel launch per stacked parameter.

    The same interface as ``MixedBatchedOptimizer`` (``step``, ``set_lr``, ``select``), but
    members need not be grouped by optimizer and ``select`` takes positions in any order.
    Parameters and gradients must be contiguous ``[P, ...]`` tensors of one device.
    """

    def __init__(
        self, configs: Sequence[TrialConfig], params: Sequence[Tensor], *, interpret: bool = False
    ) -> None:
        if not configs:
            raise ValueError("fused optimizer: no members")
        from worker.population import stack_update_kernel as k

        self.device = params[0].device
        if interpret != (self.device.type == "cpu"):
            raise ValueError(
                "fused optimizer: runs compiled on CUDA tensors, interpreted on CPU tensors; "
                f"got interpret={interpret} for {self.device}"
            )
        # Triton's launchers are indexed by their grid: kernel[grid](args...)
        self._kernel: Any = _interpreted_kernel() if interpret else k.update_rows_jit
        members = [member_hyperparameters(c) for c in configs]
        for values in members:  # RMSprop's alpha is read from the beta2 column
            values.setdefault("beta2", values.get("alpha", 0.0))
        self.hp = torch.tensor(
            [[values.get(column, 0.0) for column in k.COLUMNS] for values in members],
            dtype=torch.float64,
            device=self.device,
        )
        self._lr_column = k.COLUMNS.index("lr")
        self._n_columns = len(k.COLUMNS)
        self.kind = torch.tensor(
            [k.KINDS.index(c.optimizer) for c in configs], dtype=torch.int32, device=self.device
        )
        self.n_members = len(configs)
        # Steps taken, on the device: counted by each step's own launch stream, so that a CUDA
        # graph replaying the step counts too (see step_graph).
        self.step_count = torch.zeros((), dtype=torch.float64, device=self.device)
        initial = torch.tensor(
            [values.get("initial_accumulator_value", 0.0) for values in members],
            dtype=torch.float32,
            device=self.device,
        ).view(-1, 1)
        # (first, second) state per stacked parameter; adagrad's sum starts at its initial value.
        self.state = [
            (
                torch.zeros_like(p).view(self.n_members, -1).add_(initial).view_as(p),
                torch.zeros_like(p),
            )
            for p in params
        ]

    def set_lr(self, lrs: Sequence[float]) -> None:
        """The learning rate of each member for the next steps (schedules step per epoch)."""
        if len(lrs) != self.n_members:
            raise ValueError(f"set_lr: {len(lrs)} values for {self.n_members} members")
        lr = torch.tensor(list(lrs), dtype=torch.float64)
        self.hp[:, self._lr_column].copy_(lr, non_blocking=False)

    def select(self, index: Tensor) -> None:
        """Keep only the members at ``index`` (positions in the current stack), in that order."""
        index = index.to(self.device)
        self.hp = self.hp.index_select(0, index)
        self.kind = self.kind.index_select(0, index)
        self.state = [(a.index_select(0, index), b.index_select(0, index)) for a, b in self.state]
        self.n_members = int(index.numel())

    def step(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
        self.step_count.add_(1)
        for p, g, (first, second) in zip(params, grads, self.state, strict=True):
            if not (p.is_contiguous() and g.is_contiguous()) or p.shape[0] != self.n_members:
                raise ValueError(
                    f"fused optimizer: need contiguous [{self.n_members}, ...] parameters and "
                    f"gradients, got {tuple(p.shape)} / {tuple(g.shape)}"
                )
            row = p[0].numel()
            grid = (self.n_members, -(-row // BLOCK))
            self._kernel[grid](
                p,
                g,
                first,
                second,
                self.kind,
                self.hp,
                self.step_count,
                row,
                N_HP=self._n_columns,
                BLOCK=BLOCK,
                **_ROUNDING,
            )


def stack_optimizer(
    configs: Sequence[TrialConfig], params: Sequence[Tensor]
) -> FusedStackOptimizer | MixedBatchedOptimizer:
    """The optimizer a population trains with: one fused kernel per parameter on CUDA where
    Triton works, else the batched optimizers (configs grouped by optimizer, see
    ``optimizer_order``)."""
    device = params[0].device
    if device.type == "cuda" and not _drifts(configs) and fused_kernel_works(device):
        return FusedStackOptimizer(configs, params)
    return MixedBatchedOptimizer(configs, params)


def _drifts(configs: Sequence[TrialConfig]) -> bool:
    """Whether a member is RMSprop with momentum, which the kernel does not train closely
    enough yet: on an H200, such a member of the tests' mixed stack ended 1.3e-4 (relative)
    from its sequential run's validation loss after 5 epochs, the batched optimizers 1.3e-7,
    though 50 steps of the kernel alone match torch.optim within 1e-5 on random data and
    the interpreted kernel trains that member within 8e-8 on the CPU. Not explained yet, so
    such stacks keep the batched optimizers. (The default search space gives RMSprop no
    momentum.)"""
    return any(c.optimizer == "rmsprop" and (c.momentum or 0.0) > 0 for c in configs)


@functools.cache
def fused_kernel_works(device: torch.device) -> bool:
    """Whether the kernel compiles and runs on ``device``: once per process and device.

    Compiles both of the variants a stack needs (rows whose length is a multiple of 16, and
    rows whose length is not), so a population never meets a compile error halfway through
    its first step: Triton needs a C compiler, which a slim image may lack.
    """
    try:
        configs = [TrialConfig(hidden_layers=(1,))]
        for row in (16, 10):
            p = torch.zeros(1, row, device=device)
            FusedStackOptimizer(configs, [p]).step([p], [torch.ones_like(p)])
        torch.cuda.synchronize(device)
    except Exception as exc:  # ImportError (no Triton), compiler or driver errors
        log.warning(
            "the fused CUDA optimizer is unavailable (%s: %s); populations use the batched "
            "optimizers",
            type(exc).__name__,
            exc,
        )
        return False
    return True


@functools.cache
def _interpreted_kernel() -> Any:
    from triton.runtime.interpreter import InterpretedFunction

    from worker.population.stack_update_kernel import update_rows

    return InterpretedFunction(update_rows)


__all__ = ["FusedStackOptimizer", "fused_kernel_works", "stack_optimizer"]
