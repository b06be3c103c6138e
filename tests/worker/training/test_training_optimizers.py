from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, ExponentialLR

from worker.training import TrialConfig, build_mlp, build_optimizer, build_scheduler


def _config(optimizer: str, **overrides: Any) -> TrialConfig:
    return TrialConfig(hidden_layers=(4,), optimizer=optimizer, learning_rate=0.01, **overrides)


@pytest.mark.parametrize(
    ("optimizer", "overrides", "cls", "expected"),
    [
        ("sgd", {}, torch.optim.SGD, {"momentum": 0.0, "nesterov": False}),
        ("momentum", {}, torch.optim.SGD, {"momentum": 0.9, "nesterov": False}),
        ("momentum", {"momentum": 0.5}, torch.optim.SGD, {"momentum": 0.5, "nesterov": False}),
        ("nesterov", {}, torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
        ("nesterov", {"momentum": 0.8}, torch.optim.SGD, {"momentum": 0.8, "nesterov": True}),
        ("adagrad", {}, torch.optim.Adagrad, {}),
        ("rmsprop", {}, torch.optim.RMSprop, {"momentum": 0.0}),
        ("rmsprop", {"momentum": 0.3}, torch.optim.RMSprop, {"momentum": 0.3}),
        ("adam", {}, torch.optim.Adam, {"betas": (0.9, 0.999)}),
        ("adam", {"beta1": 0.8, "beta2": 0.99}, torch.optim.Adam, {"betas": (0.8, 0.99)}),
        ("adamw", {}, torch.optim.AdamW, {"betas": (0.9, 0.999)}),
        ("adamw", {"beta2": 0.95}, torch.optim.AdamW, {"betas": (0.9, 0.95)}),
    ],
)
@pytest.mark.parametrize("weight_decay", [0.0, 1e-3])
def test_optimizer_wiring(
    optimizer: str,
    overrides: dict[str, Any],
    cls: type[torch.optim.Optimizer],
    expected: dict[str, Any],
    weight_decay: float,
) -> None:
    config = _config(optimizer, weight_decay=weight_decay, **overrides)
    opt = build_optimizer(nn.Linear(3, 2).parameters(), config)
    assert type(opt) is cls
    group = opt.param_groups[0]
    assert group["lr"] == 0.01
    # AdamW's torch default decay is 0.01; ours is always the config's value.
    assert group["weight_decay"] == weight_decay
    for key, value in expected.items():
        assert group[key] == value, key


def _train_steps(optimizer: str, weight_decay: float, steps: int = 5) -> torch.Tensor:
    torch.manual_seed(0)
    config = _config(optimizer, weight_decay=weight_decay)
    model = build_mlp(5, 3, config)
    opt = build_optimizer(model.parameters(), config)
    data = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 5, generator=data), torch.randint(0, 3, (32,), generator=data)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_adam_l2_and_adamw_decoupled_decay_differ() -> None:
    assert torch.equal(_train_steps("adam", 0.0), _train_steps("adamw", 0.0))
    adam, adamw = _train_steps("adam", 0.1), _train_steps("adamw", 0.1)
    assert not torch.allclose(adam, adamw, atol=1e-6)


def test_decay_semantics_with_a_zero_loss_gradient() -> None:
    """With no loss gradient, the decay is the whole update: the lectures' contrast."""
    lr, wd = 0.01, 0.1
    w0 = torch.tensor([2.0, -0.5, 0.1])
    results = {}
    for name in ("sgd", "adam", "adamw"):
        w = nn.Parameter(w0.clone())
        opt = build_optimizer([w], _config(name, weight_decay=wd))
        w.grad = torch.zeros_like(w)
        opt.step()
        results[name] = w.detach()
    # sgd, coupled L2: w - lr * wd * w
    assert torch.allclose(results["sgd"], w0 * (1 - lr * wd))
    # adamw, decoupled: the same shrink by lr * wd, outside the adaptive scaling
    assert torch.allclose(results["adamw"], w0 * (1 - lr * wd))
    # adam, coupled: wd * w is normalised like a gradient, so every weight moves ~lr
    assert torch.allclose(results["adam"], w0 - lr * torch.sign(w0), atol=1e-6)


def test_schedulers() -> None:
    model = nn.Linear(2, 2)
    config = _config("sgd")
    assert build_scheduler(build_optimizer(model.parameters(), config), config) is None

    config = _config("sgd", lr_schedule="exponential", lr_gamma=0.5)
    scheduler = build_scheduler(build_optimizer(model.parameters(), config), config)
    assert isinstance(scheduler, ExponentialLR) and scheduler.gamma == 0.5

    config = _config("sgd", lr_schedule="cosine", max_epochs=7)
    scheduler = build_scheduler(build_optimizer(model.parameters(), config), config)
    assert isinstance(scheduler, CosineAnnealingLR) and scheduler.T_max == 7


FUSED_NAMES = ["sgd", "momentum", "nesterov", "adagrad", "adam", "adamw"]


@pytest.mark.parametrize("name", [*FUSED_NAMES, "rmsprop"])
def test_fused_kernel_on_cpu_by_default_and_the_same_updates_as_torchs_default(name: str) -> None:
    config = TrialConfig(hidden_layers=(8,), optimizer=name, learning_rate=0.01, weight_decay=1e-3)
    torch.manual_seed(0)
    a = build_mlp(6, 3, config)
    b = build_mlp(6, 3, config)
    b.load_state_dict(a.state_dict())
    fast = build_optimizer(a.parameters(), config)
    default = build_optimizer(b.parameters(), config, fused=False)
    assert bool(fast.param_groups[0].get("fused")) == (name in FUSED_NAMES)
    assert not default.param_groups[0].get("fused")  # what torch.optim.X(params, lr) picks
    initial = a[0].weight.detach().clone()
    gen = torch.Generator().manual_seed(1)
    for _ in range(50):
        X, y = torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        for model, opt in ((a, fast), (b, default)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X), y).backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert (p - q).abs().max().item() <= 1e-5, name
    assert (a[0].weight - initial).abs().max().item() > 1e-3  # it did train


def test_fused_is_refused_where_torch_has_no_kernel() -> None:
    config = TrialConfig(hidden_layers=(8,), optimizer="rmsprop")
    with pytest.raises(ValueError, match="no fused rmsprop"):
        build_optimizer(build_mlp(4, 2, config).parameters(), config, fused=True)
