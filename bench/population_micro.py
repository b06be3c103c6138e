"""Micro-benchmark: population training vs. one train_trial per trial, and vs. matmul peak.

Synthetic MNIST-like data (7,000 x 784 training rows, 1,000 validation rows, 10 classes), a
784-128-10 MLP, batch 128, 3 epochs, Adam, early stopping off. Prints one table:

- ``sequential``: ``worker.training.train_trial``, one trial at a time;
- ``P=k``: ``worker.population.train_population`` with k members (different lr and seed);
- model-epochs/s, achieved GFLOP/s (forward + backward ~ 6 x params x training rows, plus
  evaluation 2 x params x validation rows, per model-epoch), the share of the measured
  matmul peak (a large fp32 ``torch.mm``) and the speed-up over sequential.

    python bench/population_micro.py                 # sizes 1 2 4 8 16 32 64
    python bench/population_micro.py --sizes 16 32 --repeats 3 --threads 2
    python bench/population_micro.py --denormals keep   # IEEE denormals (workers flush them)

Each figure is the best of ``--repeats`` rounds, and a round runs everything once (matmul,
sequential, each P), so on a shared machine every run gets several chances at a quiet
moment; the minimum is the least disturbed measurement. ``--clock cpu`` times CPU seconds of this process instead of
wall seconds: with ``--threads 1`` that is immune to other processes on the machine (the
peak is then one core's).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script too

from worker.population import auto_population_size, train_population
from worker.training import TensorSplits, TrialConfig, to_tensors, train_trial

N_TRAIN, N_VAL, N_FEATURES, N_CLASSES = 7000, 1000, 784, 10
HIDDEN = (128,)
BATCH, EPOCHS = 128, 3


def make_data(seed: int = 0) -> TensorSplits:
    """Pixel-like features in [0, 1] with labels from a random linear teacher (learnable)."""
    rng = np.random.default_rng(seed)
    n = N_TRAIN + 2 * N_VAL
    X = rng.random((n, N_FEATURES), dtype=np.float32)
    teacher = rng.normal(size=(N_FEATURES, N_CLASSES)).astype(np.float32)
    y = (X @ teacher).argmax(axis=1)
    a, b = N_TRAIN, N_TRAIN + N_VAL
    return to_tensors(X[:a], y[:a], X[a:b], y[a:b], X[b:], y[b:])


def configs(n: int) -> list[TrialConfig]:
    return [
        TrialConfig(
            hidden_layers=HIDDEN,
            optimizer="adam",
            learning_rate=1e-3 * (1 + i % 4),
            batch_size=BATCH,
            max_epochs=EPOCHS,
            patience=None,
            seed=i,
        )
        for i in range(n)
    ]


def n_params() -> int:
    widths = [N_FEATURES, *HIDDEN, N_CLASSES]
    return sum(a * b + b for a, b in itertools.pairwise(widths))


def flops_per_model_epoch() -> float:
    from bench.run import flops_per_model_epoch as needed_flops

    return needed_flops(N_FEATURES, list(HIDDEN), N_CLASSES, N_TRAIN, N_VAL)


MATMUL_N = 2048  # fp32 torch.mm of 2048 x 2048 matrices: 17 GFLOP, big enough for peak


CLOCK = time.perf_counter


def _five_mm(a: torch.Tensor, b: torch.Tensor) -> None:
    for _ in range(5):
        torch.mm(a, b)


def best_times(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best time of each run over ``repeats`` rounds; rounds interleave the runs, so on a
    shared machine each run gets several chances at an undisturbed moment."""
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, fn in runs.items():
            started = CLOCK()
            fn()
            best[name] = min(best[name], CLOCK() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    parser.add_argument(
        "--denormals",
        choices=["flush", "keep"],
        default="flush",
        help="flush denormal floats to zero, as workers do (HPO_FLUSH_DENORMALS), or keep them",
    )
    args = parser.parse_args()
    # Before the first torch op, so torch's intra-op threads start in this mode too.
    torch.set_flush_denormal(args.denormals == "flush")
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)

    data = make_data()
    train_population(configs(2), data)  # warm-up: allocator, MKL/oneDNN kernel selection
    per_epoch = flops_per_model_epoch()
    a, b = torch.randn(MATMUL_N, MATMUL_N), torch.randn(MATMUL_N, MATMUL_N)
    runs: dict[str, Callable[[], object]] = {
        "matmul": functools.partial(_five_mm, a, b),
        "sequential": functools.partial(train_trial, configs(1)[0], data),
    }
    for size in args.sizes:
        runs[f"P={size}"] = functools.partial(train_population, configs(size), data)
    best = best_times(runs, args.repeats)
    peak = 5 * 2 * MATMUL_N**3 / best.pop("matmul") / 1e9
    seq = best["sequential"]
    seq_rate = EPOCHS / seq
    rows = [("sequential", seq, seq_rate)]
    rows += [(f"P={k}", best[f"P={k}"], k * EPOCHS / best[f"P={k}"]) for k in args.sizes]

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{N_FEATURES}-{'-'.join(map(str, HIDDEN))}-{N_CLASSES} MLP ({n_params():,} params), "
        f"{N_TRAIN} train / {N_VAL} val rows, batch {BATCH}, {EPOCHS} epochs, adam; "
        f"{args.clock} clock, best of {args.repeats}, denormals {args.denormals}"
    )
    print(f"matmul peak (fp32 torch.mm): {peak:.1f} GFLOP/s")
    print(f"sequential train_trial: {seq:.2f} s per trial")
    print(f"{'run':>11} {'wall s':>8} {'model-ep/s':>11} {'GFLOP/s':>8} {'% peak':>7} {'x seq':>6}")
    for name, wall, rate in rows:
        gflops = rate * per_epoch / 1e9
        print(
            f"{name:>11} {wall:8.2f} {rate:11.2f} {gflops:8.1f} "
            f"{100 * gflops / peak:6.1f}% {rate / seq_rate:6.2f}"
        )
    auto = auto_population_size(n_params(), N_TRAIN, torch.device("cpu"))
    print(f"auto_population_size -> {auto}")


if __name__ == "__main__":
    main()
