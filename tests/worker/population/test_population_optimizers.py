"""Each batched optimizer against torch.optim, member by member, for 50 steps."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from worker.population import (
    BatchedOptimizer,
    MixedBatchedOptimizer,
    build_batched_optimizer,
    optimizer_order,
)
from worker.training import TrialConfig, build_optimizer

STEPS = 50
TOLERANCE = 1e-5
SHAPES = [(5, 4), (4,), (4, 3)]  # a weight [in, out], a bias, a second weight

LRS = {
    "sgd": [0.1, 0.03, 0.01],
    "momentum": [0.05, 0.02, 0.01],
    "nesterov": [0.05, 0.02, 0.01],
    "adagrad": [0.1, 0.05, 0.02],
    "rmsprop": [0.01, 0.003, 0.001],
    "adam": [0.01, 0.003, 0.001],
    "adamw": [0.01, 0.003, 0.001],
}
WEIGHT_DECAYS = [0.0, 1e-3, 0.1]

# Per member knobs (None = the optimizer's default): shared and mixed defaults both occur.
VARIANTS: list[tuple[str, list[dict[str, Any]]]] = [
    ("sgd", [{}, {}, {}]),
    ("momentum", [{}, {}, {}]),
    ("momentum", [{"momentum": 0.5}, {}, {"momentum": 0.99}]),
    ("nesterov", [{"momentum": 0.8}, {}, {"momentum": 0.3}]),
    ("adagrad", [{}, {}, {}]),
    ("rmsprop", [{}, {}, {}]),
    ("rmsprop", [{"momentum": 0.5}, {}, {"momentum": 0.9}]),  # 0 mixed with > 0
    ("adam", [{}, {}, {}]),
    ("adam", [{"beta1": 0.8, "beta2": 0.99}, {}, {"beta1": 0.5, "beta2": 0.9}]),
    ("adamw", [{}, {}, {}]),
    ("adamw", [{"beta2": 0.95}, {"beta1": 0.7}, {}]),
]


def _configs(name: str, knobs: list[dict[str, Any]]) -> list[TrialConfig]:
    return [
        TrialConfig(
            hidden_layers=(4,),
            optimizer=name,
            learning_rate=lr,
            weight_decay=wd,
            **extra,
        )
        for lr, wd, extra in zip(LRS[name], WEIGHT_DECAYS, knobs, strict=True)
    ]


def _grad(p: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    # Depends on the parameter itself, so a wrong update feeds back into later gradients.
    return torch.sin(3 * p) + noise


@pytest.mark.parametrize("fused", [False, True], ids=["batched-ops", "fused-kernels"])
@pytest.mark.parametrize(
    ("name", "knobs"), VARIANTS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(VARIANTS)]
)
def test_matches_torch_optim(name: str, knobs: list[dict[str, Any]], fused: bool) -> None:
    _check_matches_torch_optim(name, knobs, fused, torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_every_variant_matches_torch_optim_on_cuda() -> None:
    """The same check on a GPU: CUDA's fused kernels and batched ops against torch.optim's."""
    for name, knobs in VARIANTS:
        for fused in (False, True):
            _check_matches_torch_optim(name, knobs, fused, torch.device("cuda"))


def _check_matches_torch_optim(
    name: str, knobs: list[dict[str, Any]], fused: bool, device: torch.device
) -> None:
    configs = _configs(name, knobs)
    P = len(configs)
    gen = torch.Generator().manual_seed(0)
    stacked = [torch.randn(P, *shape, generator=gen).to(device) for shape in SHAPES]
    singles = [
        [torch.nn.Parameter(t[j].clone()) for t in stacked] for j in range(P)
    ]  # member j's own parameters
    references = [build_optimizer(params, c) for params, c in zip(singles, configs, strict=True)]
    batched = build_batched_optimizer(configs, stacked, fused=fused)
    assert isinstance(batched, BatchedOptimizer)
    # RMSprop without momentum runs Adam's fused kernel (beta1 = 0); with momentum, batched ops.
    momentum = any(k.get("momentum", 0) > 0 for k in knobs)
    assert batched.fused == (fused and not (name == "rmsprop" and momentum))

    for step in range(1, STEPS + 1):
        if step == STEPS // 2:  # a schedule changing each member's lr between epochs
            new_lrs = [lr * 0.5 for lr in LRS[name]]
            batched.set_lr(new_lrs)
            for ref, lr in zip(references, new_lrs, strict=True):
                ref.param_groups[0]["lr"] = lr
        noises = [torch.randn(P, *shape, generator=gen).to(device) for shape in SHAPES]
        batched.step(stacked, [_grad(p, n) for p, n in zip(stacked, noises, strict=True)])
        for j, (params, ref) in enumerate(zip(singles, references, strict=True)):
            for p, n in zip(params, noises, strict=True):
                p.grad = _grad(p.detach(), n[j])
            ref.step()

    for j, params in enumerate(singles):
        for t, p in zip(stacked, params, strict=True):
            diff = (t[j] - p.detach()).abs().max().item()
            assert diff <= TOLERANCE, (name, fused, device, j, diff)
        # Something happened: the members moved, and differently from each other.
    assert not torch.allclose(stacked[0][0], stacked[0][1])


@pytest.mark.parametrize("fused", [False, True], ids=["batched-ops", "fused-kernels"])
@pytest.mark.parametrize("name", ["momentum", "rmsprop", "adam", "adagrad"])
def test_select_keeps_the_state_of_the_remaining_members(name: str, fused: bool) -> None:
    configs = _configs(name, [{}, {}, {}])
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(3, 6, generator=gen)]
    full = [params[0].clone()]
    a = build_batched_optimizer(configs, params, fused=fused)
    b = build_batched_optimizer(configs, full, fused=fused)
    for step in range(20):
        noise = torch.randn(3, 6, generator=gen)
        if step == 10:  # member 1 leaves the first stack
            keep = torch.tensor([0, 2])
            a.select(keep)
            params = [params[0].index_select(0, keep)]
        rows = [0, 2] if step >= 10 else [0, 1, 2]
        a.step(params, [_grad(params[0], noise[rows])])
        b.step(full, [_grad(full[0], noise)])
    assert torch.equal(params[0], full[0][[0, 2]])


def test_mixed_optimizers_are_refused() -> None:
    configs = [TrialConfig(hidden_layers=(4,), optimizer=o) for o in ("adam", "sgd")]
    with pytest.raises(ValueError, match="share one optimizer"):
        build_batched_optimizer(configs, [torch.zeros(2, 3)])


def _mixed_configs() -> list[TrialConfig]:
    """Two members of every optimizer, interleaved the way a sampler would ask them."""
    names = list(LRS)
    return [
        TrialConfig(
            hidden_layers=(4,),
            optimizer=name,
            learning_rate=LRS[name][j],
            weight_decay=WEIGHT_DECAYS[j + 1],
        )
        for j in range(2)
        for name in names
    ]


@pytest.mark.parametrize("fused", [False, True, None], ids=["batched-ops", "fused-kernels", "auto"])
def test_one_stack_of_every_optimizer_matches_torch_optim_and_survives_select(
    fused: bool | None,
) -> None:
    configs = _mixed_configs()
    order = optimizer_order(configs)
    assert [configs[i].optimizer for i in order] == [n for n in LRS for _ in range(2)]
    ordered = [configs[i] for i in order]
    P = len(ordered)
    gen = torch.Generator().manual_seed(2)
    stacked = [torch.randn(P, *shape, generator=gen) for shape in SHAPES]
    singles = [[torch.nn.Parameter(t[j].clone()) for t in stacked] for j in range(P)]
    references = [build_optimizer(ps, c) for ps, c in zip(singles, ordered, strict=True)]
    batched = MixedBatchedOptimizer(ordered, stacked)
    assert len(batched.runs) == len(LRS)

    alive = list(range(P))
    for step in range(1, STEPS + 1):
        if step == 20:  # both sgd members, one adam and the last adamw leave the stack
            gone = {0, 1, 10, 13}
            keep = [pos for pos in range(len(alive)) if alive[pos] not in gone]
            alive = [alive[pos] for pos in keep]
            index = torch.tensor(keep)
            batched.select(index)
            stacked = [t.index_select(0, index) for t in stacked]
        if step == 30:
            batched.set_lr([ordered[j].learning_rate * 0.5 for j in alive])
            for j in alive:
                references[j].param_groups[0]["lr"] = ordered[j].learning_rate * 0.5
        noises = [torch.randn(len(alive), *shape, generator=gen) for shape in SHAPES]
        batched.step(stacked, [_grad(p, n) for p, n in zip(stacked, noises, strict=True)])
        for pos, j in enumerate(alive):
            for p, n in zip(singles[j], noises, strict=True):
                p.grad = _grad(p.detach(), n[pos])
            references[j].step()

    assert len(batched.runs) == len(LRS) - 1  # the sgd run is gone
    for pos, j in enumerate(alive):
        for t, p in zip(stacked, singles[j], strict=True):
            diff = (t[pos] - p.detach()).abs().max().item()
            assert diff <= TOLERANCE, (ordered[j].optimizer, j, diff)


def test_mixed_optimizer_needs_each_optimizer_adjacent_and_ascending_selects() -> None:
    configs = [TrialConfig(hidden_layers=(4,), optimizer=o) for o in ("adam", "sgd", "adam")]
    with pytest.raises(ValueError, match="adjacent"):
        MixedBatchedOptimizer(configs, [torch.zeros(3, 2)])
    ordered = [configs[i] for i in optimizer_order(configs)]
    batched = MixedBatchedOptimizer(ordered, [torch.zeros(3, 2)])
    with pytest.raises(ValueError, match="ascending"):
        batched.select(torch.tensor([2, 0]))
