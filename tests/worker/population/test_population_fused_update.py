"""The fused stack optimizer against torch.optim, member by member, for 50 steps.

Its Triton kernel runs compiled on CUDA and, everywhere else, through Triton's interpreter
on CPU tensors (the same kernel source, executed with numpy), so its arithmetic is checked
on machines without a GPU too. Triton comes with torch's CUDA wheels; on CPU-only machines
``scripts/install.sh test`` installs it for these tests.
"""

from __future__ import annotations

import pytest
import torch

from worker.training import TrialConfig, build_optimizer

pytest.importorskip("triton")

from worker.population.fused_update import (
    FusedStackOptimizer,
    fused_kernel_works,
    stack_optimizer,
)
from worker.population.optimizers import MixedBatchedOptimizer

STEPS = 50
TOLERANCE = 1e-5
# A weight spanning two kernel blocks (1,200 elements per member), a bias, a small weight.
SHAPES = [(40, 30), (7,), (4, 3)]

MEMBERS: list[dict[str, object]] = [
    {"optimizer": "adam", "learning_rate": 0.01, "weight_decay": 1e-3},
    {"optimizer": "sgd", "learning_rate": 0.1, "weight_decay": 0.0},
    {"optimizer": "rmsprop", "learning_rate": 0.003, "weight_decay": 1e-3},
    {"optimizer": "momentum", "learning_rate": 0.05, "weight_decay": 0.1, "momentum": 0.5},
    {"optimizer": "adamw", "learning_rate": 0.003, "weight_decay": 0.1, "beta2": 0.95},
    {"optimizer": "nesterov", "learning_rate": 0.02, "weight_decay": 1e-3, "momentum": 0.8},
    {"optimizer": "adagrad", "learning_rate": 0.1, "weight_decay": 1e-3},
    {"optimizer": "rmsprop", "learning_rate": 0.001, "weight_decay": 0.0, "momentum": 0.9},
    {"optimizer": "adam", "learning_rate": 0.003, "weight_decay": 0.0, "beta1": 0.5, "beta2": 0.9},
    {"optimizer": "momentum", "learning_rate": 0.01, "weight_decay": 1e-3},
    {"optimizer": "adagrad", "learning_rate": 0.05, "weight_decay": 0.0},
    {"optimizer": "adamw", "learning_rate": 0.01, "weight_decay": 1e-3, "beta1": 0.7},
    {"optimizer": "sgd", "learning_rate": 0.03, "weight_decay": 0.1},
]

DEVICES = [
    pytest.param(torch.device("cpu"), id="interpreted"),
    pytest.param(
        torch.device("cuda"),
        id="cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    ),
]


def _configs() -> list[TrialConfig]:
    return [TrialConfig(hidden_layers=(4,), **knobs) for knobs in MEMBERS]  # type: ignore[arg-type]


def _grad(p: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    # Depends on the parameter itself, so a wrong update feeds back into later gradients.
    return torch.sin(3 * p) + noise


@pytest.mark.parametrize("device", DEVICES)
def test_every_optimizer_in_one_stack_matches_torch_optim(device: torch.device) -> None:
    """Members of all seven optimizers, interleaved (the kernel needs no grouping); some
    leave after 20 steps (in a new order), the survivors' lr changes at step 30."""
    configs = _configs()
    P = len(configs)
    gen = torch.Generator().manual_seed(3)
    stacked = [torch.randn(P, *shape, generator=gen).to(device) for shape in SHAPES]
    singles = [[torch.nn.Parameter(t[j].clone()) for t in stacked] for j in range(P)]
    references = [build_optimizer(ps, c) for ps, c in zip(singles, configs, strict=True)]
    fused = FusedStackOptimizer(configs, stacked, interpret=device.type == "cpu")

    alive = list(range(P))
    for step in range(1, STEPS + 1):
        if step == 20:  # four leave; the rest are kept in reverse order
            alive_before = alive
            alive = [j for j in reversed(alive_before) if j not in {1, 4, 6, 11}]
            index = torch.tensor([alive_before.index(j) for j in alive])
            fused.select(index)
            stacked = [t.index_select(0, index.to(device)) for t in stacked]
        if step == 30:
            fused.set_lr([configs[j].learning_rate * 0.5 for j in alive])
            for j in alive:
                references[j].param_groups[0]["lr"] = configs[j].learning_rate * 0.5
        noises = [torch.randn(len(alive), *shape, generator=gen).to(device) for shape in SHAPES]
        fused.step(stacked, [_grad(p, n) for p, n in zip(stacked, noises, strict=True)])
        for pos, j in enumerate(alive):
            for p, n in zip(singles[j], noises, strict=True):
                p.grad = _grad(p.detach(), n[pos])
            references[j].step()

    for pos, j in enumerate(alive):
        for t, p in zip(stacked, singles[j], strict=True):
            diff = (t[pos] - p.detach()).abs().max().item()
            assert diff <= TOLERANCE, (configs[j].optimizer, j, diff)
    # Something happened: the members moved, and differently from each other.
    assert not torch.allclose(stacked[0][0], stacked[0][1])


def test_bad_input_is_refused() -> None:
    configs = _configs()[:2]
    with pytest.raises(ValueError, match="interpreted on CPU"):
        FusedStackOptimizer(configs, [torch.zeros(2, 3)])
    with pytest.raises(ValueError, match="no members"):
        FusedStackOptimizer([], [torch.zeros(2, 3)], interpret=True)
    fused = FusedStackOptimizer(configs, [torch.zeros(2, 3)], interpret=True)
    with pytest.raises(ValueError, match="3 values for 2 members"):
        fused.set_lr([0.1, 0.1, 0.1])
    with pytest.raises(ValueError, match="contiguous"):
        p = torch.zeros(3, 2).t()
        fused.step([p], [p])


def test_cpu_stacks_keep_the_batched_optimizers() -> None:
    """On CPU torch's fused per-member kernels are faster than the interpreted kernel could
    ever be; the fused stack optimizer is for CUDA only."""
    configs = _configs()
    params = [torch.zeros(len(configs), 3)]
    assert isinstance(
        stack_optimizer(sorted(configs, key=lambda c: c.optimizer), params), MixedBatchedOptimizer
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_stacks_use_the_fused_kernel_unless_rmsprop_has_momentum() -> None:
    device = torch.device("cuda")
    assert fused_kernel_works(device)
    configs = [c for c in _configs() if not (c.optimizer == "rmsprop" and c.momentum)]
    params = [torch.zeros(len(configs), 3, device=device)]
    assert isinstance(stack_optimizer(configs, params), FusedStackOptimizer)
    ordered = sorted(_configs(), key=lambda c: c.optimizer)  # with an RMSprop momentum member
    params = [torch.zeros(len(ordered), 3, device=device)]
    assert isinstance(stack_optimizer(ordered, params), MixedBatchedOptimizer)
