"""Optimizers and learning-rate schedules, named as in the lectures.

=========  ==========================================================================
sgd        SGD, momentum 0
momentum   SGD with heavy-ball momentum (``config.momentum``, default 0.9)
nesterov   SGD with Nesterov momentum (``config.momentum``, default 0.9)
adagrad    Adagrad
rmsprop    RMSprop (alpha 0.99), momentum ``config.momentum`` (default 0)
adam       Adam, betas (beta1, beta2) (default (0.9, 0.999))
adamw      AdamW, same betas
=========  ==========================================================================

Weight decay means two different things here, on purpose:

- every optimizer but adamw uses torch's ``weight_decay``, i.e. **coupled L2**: ``wd * w`` is
  added to the gradient before the update. For an adaptive optimizer (adagrad, rmsprop, adam)
  that decay term is then divided by the same per-parameter sqrt(second moment) as the
  loss gradient, so weights with large gradients are barely decayed;
- adamw uses **decoupled** decay (Loshchilov & Hutter): ``w -= lr * wd * w`` is applied
  directly, outside the adaptive scaling. With wd = 0 adam and adamw are the same update.

``config.weight_decay`` is passed explicitly to every optimizer, so AdamW's torch default of
0.01 never applies by accident.

The schedule is stepped once per epoch, after the epoch's last minibatch: epoch e (1-based)
trains with ``lr * gamma**(e-1)`` (exponential) or
``lr * (1 + cos(pi * (e-1) / max_epochs)) / 2`` (cosine, never reaching 0 within the run).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, ExponentialLR, LRScheduler

from worker.training.config import TrialConfig

DEFAULT_MOMENTUM = 0.9  # the lectures' and most textbooks' default for (Nesterov) momentum
DEFAULT_RMSPROP_MOMENTUM = 0.0  # plain RMSprop, as torch and the lectures define it

ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


# Optimizers with a fused CPU kernel in torch (one vectorised pass per tensor and step); the
# population's batched optimizers use the same kernels for the same names.
FUSED_ON_CPU = frozenset({"sgd", "momentum", "nesterov", "adagrad", "adam", "adamw"})


def build_optimizer(
    params: ParamsT, config: TrialConfig, *, fused: bool | None = None
) -> torch.optim.Optimizer:
    """The optimizer named by ``config.optimizer`` over ``params`` (see the module docstring).

    ``fused``: None (default) uses torch's fused kernel when every parameter is on the CPU and
    torch has one for the optimizer (sgd/momentum/nesterov/adagrad/adam/adamw): the same
    update in one pass per tensor instead of a handful of elementwise ops (about 3x less
    optimizer time on the small MLPs trained here), and the kernel the population trainer
    uses per member, so a trial trains the same way alone and in a population. False gives
    torch's own default (what ``torch.optim.Adam(params, lr=...)`` would pick); True insists
    on the fused kernel.
    """
    params = cast(ParamsT, list(params))  # may be a generator: read twice below
    if fused is None:
        fused = config.optimizer in FUSED_ON_CPU and _all_on_cpu(params)
    elif fused and config.optimizer not in FUSED_ON_CPU:
        raise ValueError(f"optimizer: torch has no fused {config.optimizer}")
    extra: dict[str, Any] = {"fused": True} if fused else {}
    lr, wd = config.learning_rate, config.weight_decay
    name = config.optimizer
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.0, weight_decay=wd, **extra)
    if name in ("momentum", "nesterov"):
        momentum = DEFAULT_MOMENTUM if config.momentum is None else config.momentum
        return torch.optim.SGD(
            params,
            lr=lr,
            momentum=momentum,
            nesterov=name == "nesterov",
            weight_decay=wd,
            **extra,
        )
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, weight_decay=wd, **extra)
    if name == "rmsprop":
        momentum = DEFAULT_RMSPROP_MOMENTUM if config.momentum is None else config.momentum
        return torch.optim.RMSprop(params, lr=lr, momentum=momentum, weight_decay=wd)
    if name in ("adam", "adamw"):
        betas = _betas(config)
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        return cls(params, lr=lr, betas=betas, weight_decay=wd, **extra)
    raise ValueError(f"optimizer: unknown {name!r}")


def _all_on_cpu(params: ParamsT) -> bool:
    tensors: list[torch.Tensor] = []
    for p in params:
        if isinstance(p, dict):  # a parameter group: a tensor or an iterable of them
            group = p["params"]
            tensors.extend([group] if isinstance(group, torch.Tensor) else group)
        else:
            tensors.append(p)
    return bool(tensors) and all(t.device.type == "cpu" for t in tensors)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrialConfig) -> LRScheduler | None:
    """None, ExponentialLR(gamma) or CosineAnnealingLR(T_max=max_epochs); step once per epoch."""
    if config.lr_schedule == "none":
        return None
    if config.lr_schedule == "exponential":
        return ExponentialLR(optimizer, gamma=config.lr_gamma)
    if config.lr_schedule == "cosine":
        return CosineAnnealingLR(optimizer, T_max=config.max_epochs)
    raise ValueError(f"lr_schedule: unknown {config.lr_schedule!r}")


def _betas(config: TrialConfig) -> tuple[float, float]:
    # torch's defaults, the ones the Adam paper recommends.
    beta1 = 0.9 if config.beta1 is None else config.beta1
    beta2 = 0.999 if config.beta2 is None else config.beta2
    return (beta1, beta2)


__all__ = [
    "DEFAULT_MOMENTUM",
    "DEFAULT_RMSPROP_MOMENTUM",
    "FUSED_ON_CPU",
    "build_optimizer",
    "build_scheduler",
]
