"""On CUDA, a stack's training step is replayed as one CUDA graph.

A step of the batched model is ~35 kernel launches (gather, forward, loss, backward) plus
the fused optimizer's one per stacked parameter, each costing the host ~10-20 us of
Python and driver time. For a GPU stack the host is then the bottleneck: on an H200 a
507-member stack's steps took 0.8 ms of host time each (sampled), about what its GPU work
takes, and a small stack (the pruner's start-up trials, or a stack that pruning has
thinned) is all host time. ``StepGraph`` records the step once as a CUDA graph and then
launches it whole: per step the host copies the minibatch's rows in, draws the dropout
bits (the generator must advance every step, so the draw stays outside the graph, in the
same order as an eager step draws), replays the graph and copies the losses out.

A graph is recorded for one membership of the stack: ``reset`` after members leave, and the
next step records it again. The step that records it runs eagerly first (a real training
step, which also warms cuBLAS up on the recording stream), so recording costs one step's
host time. Only full minibatches replay; an epoch's last, smaller one runs eagerly.

Replays run the same kernels on the same buffers as eager steps, so a member's numbers
do not depend on whether its steps were replayed (tests/worker/population/
test_population_step_graph.py, on a GPU). If recording fails, the population warns and
trains eagerly from there on (through the same buffers, so nothing else changes).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from worker.population.fused_update import FusedStackOptimizer
from worker.population.stacked import StackedMLP

log = logging.getLogger(__name__)


class StepGraph:
    """The full-minibatch training step of one CUDA stack with a fused optimizer, replayed."""

    def __init__(
        self,
        stack: StackedMLP,
        optimizer: FusedStackOptimizer,
        X: Tensor,
        y: Tensor,
        batch_size: int,
    ) -> None:
        if stack.device.type != "cuda":
            raise ValueError(f"StepGraph: CUDA stacks only, got {stack.device}")
        self.stack, self.optimizer, self.X, self.y = stack, optimizer, X, y
        self.batch_size = batch_size
        self.enabled = True
        self.replays = 0  # steps replayed (not recorded), for tests and profiles
        self._stream = torch.cuda.Stream(device=stack.device)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._allocate()

    def _allocate(self) -> None:
        P, b, device = self.stack.n_members, self.batch_size, self.stack.device
        self._rows = torch.empty(P, b, dtype=torch.int64, device=device)
        self._loss = torch.empty(P, device=device)
        self.correct = torch.zeros(P, dtype=torch.int64, device=device)

    def reset(self) -> None:
        """The stack's members changed (``select``): record again at the next step. Counts in
        ``correct`` are dropped (take them first)."""
        self._graph = None
        self._allocate()

    def step(self, rows: Tensor, loss_out: Tensor) -> None:
        """One training step on ``rows`` [P, batch_size]: ``loss_out`` [P] gets each member's
        mean loss, ``correct`` accumulates each member's correct predictions."""
        self.stack.draw_dropout_bits(self.batch_size)
        self._rows.copy_(rows)
        if self._graph is not None:
            self._graph.replay()
            self.replays += 1
            if self.stack.batch_norm:
                self.stack.batches_tracked += 1  # train_step's host-side count
        elif self.enabled:
            self._record()
        else:  # recording failed once: every later step runs eagerly, without retrying
            self._body()
        loss_out.copy_(self._loss)

    def _body(self) -> None:
        rows = self._rows.view(-1)
        correct = self.stack.train_step(self.X, self.y, rows, self._loss, drawn=True)
        self.correct.add_(correct)
        self.optimizer.step(self.stack.params, self.stack.grads)

    def _record(self) -> None:
        """This step eagerly on the recording stream, then the same step recorded."""
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._body()
        tracked = self.stack.batches_tracked
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.stream(stream):
                # Each recording has its own memory pool: re-recording into the pool of a
                # dropped graph tripped an internal assert of torch's allocator (2.11, H200).
                graph.capture_begin()
                try:
                    self._body()  # recorded, not run
                finally:
                    graph.capture_end()
        except Exception as exc:  # a step that cannot be recorded: train eagerly
            log.warning("CUDA graph of the training step unavailable (%s); stepping eagerly", exc)
            self.enabled = False
        else:
            self._graph = graph
        finally:
            self.stack.batches_tracked = tracked
            torch.cuda.current_stream().wait_stream(stream)


__all__ = ["StepGraph"]
