"""Denormal (subnormal) floats: flushed to zero while a worker trains.

Training drives some numbers toward zero until they leave fp32's normal range (< 1.2e-38):
softmax probabilities of confidently wrong classes, the gradients they carry back, Adagrad's
and Adam's squared-gradient statistics of dead units. x86 CPUs compute with such denormal
operands through a microcode assist that is one to two orders of magnitude slower per
operation, and a matmul whose inputs hold a few of them slows down as a whole. Measured on the
benchmark's job (48 trials of a 784-128-10 MLP on MNIST, Xeon, 2 threads): the population
run's batched matmuls took 1.76 s with denormals and 1.00 s flushed, the fused Adagrad update
0.36 s and 0.10 s, end to end 6.6 s and 5.3 s, with the same trials, epochs and accuracies.

Flushing (the CPU's FTZ and DAZ modes: denormal results and operands read as zero) changes a
value only where it is below 1.2e-38, which no model here can tell from zero; TensorFlow's
executor threads run this way by default. The mode is a per-thread CPU register, and torch's
intra-op threads (GNU OpenMP in torch's Linux builds) copy it from the thread that starts them:
it must be switched before a process's first parallel torch op, which the worker does
(``Worker.run``). ``flush_denormals``
reports when it came too late, as in a process that trained before: then only the calling
thread flushes.
``HPO_FLUSH_DENORMALS=false`` keeps IEEE denormals, for bit-for-bit comparisons with code
that runs without it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

# 1e-39 is denormal in fp32: it survives a multiplication by one only when denormals are kept.
_DENORMAL = 1e-39
# Elements of the every-thread probe: enough for torch to split an elementwise op over threads.
_PROBE_ELEMENTS = 1 << 20


def denormals_flushed() -> bool:
    """Whether the calling thread's CPU flushes denormal floats to zero now."""
    return bool(torch.full((1,), _DENORMAL).mul_(1.0).item() == 0.0)


def flushed_on_every_thread() -> bool:
    """Whether a parallel op flushes denormals on all of torch's intra-op threads (~1 ms)."""
    return not bool(_denormal_products().any())


def _kept_on_every_thread() -> bool:
    return bool(_denormal_products().all())


def _denormal_products() -> torch.Tensor:
    # Bit pattern 1 is the smallest denormal (1.4e-45); times 2**100 it is 1.8e-15, or 0 on a
    # thread that reads denormal operands as zero. Integer ones: no float rounding on creation.
    smallest = torch.ones(_PROBE_ELEMENTS, dtype=torch.int32).view(torch.float32)
    return smallest.mul(2.0**100)


@contextmanager
def flush_denormals(enabled: bool = True) -> Iterator[bool]:
    """Flush denormals to zero (``enabled``) or keep them on this thread; restored on exit.

    Yields whether every intra-op thread now runs in the requested mode. False where the CPU
    has no such mode (``torch.set_flush_denormal`` supports x86 with SSE3 and ARM64) or where
    torch's thread pool started before the switch (its threads keep the mode they began with).
    """
    previous = denormals_flushed()
    if enabled != previous:
        torch.set_flush_denormal(enabled)
    try:
        yield flushed_on_every_thread() if enabled else _kept_on_every_thread()
    finally:
        if denormals_flushed() != previous:
            torch.set_flush_denormal(previous)


__all__ = ["denormals_flushed", "flush_denormals", "flushed_on_every_thread"]
