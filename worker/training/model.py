"""The MLP every trial trains, and a JSON description that rebuilds it.

Layer order per hidden width: Linear -> BatchNorm1d (optional, before the activation, as in
the lectures) -> activation -> Dropout (inverted dropout, only if p > 0), then a final Linear
to ``n_classes`` logits (softmax lives in the loss). Layer indices are part of the
state_dict keys, so ``build_from_architecture`` must produce exactly the same sequence.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from worker.training.config import TrialConfig
from worker.training.init import LEAKY_RELU_SLOPE, apply_init

_ARCHITECTURE_KEYS = (
    "n_features",
    "n_classes",
    "hidden_layers",
    "activation",
    "batch_norm",
    "dropout",
)


def make_activation(name: str) -> nn.Module:
    """A fresh activation module for one of ``config.ACTIVATIONS``."""
    if name == "relu":
        return nn.ReLU()
    if name == "leaky_relu":
        return nn.LeakyReLU(LEAKY_RELU_SLOPE)
    if name == "elu":
        return nn.ELU()
    if name == "selu":
        return nn.SELU()
    if name == "gelu":
        return nn.GELU()
    if name == "tanh":
        return nn.Tanh()
    if name == "sigmoid":
        return nn.Sigmoid()
    raise ValueError(f"activation: unknown {name!r}")


def build_mlp(
    n_features: int,
    n_classes: int,
    config: TrialConfig,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> nn.Sequential:
    """The trial's MLP on ``device`` (default: the current default device), initialised with
    ``config.init``.

    Draws from ``generator``, or the global torch RNG when None (Linear's own reset and then
    ``apply_init``, in layer order), so ``torch.manual_seed(config.seed)`` right before the
    call fixes the weights, and a CPU ``torch.Generator().manual_seed(config.seed)`` gives
    the same ones without touching the global RNG (so several models can be built at once
    on several threads: the population trainer does).
    """
    model = _layers(n_features, n_classes, config, generator=generator, device=device)
    apply_init(model, config.init, config.activation, generator=generator)
    return model


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (BatchNorm running statistics are buffers and do not count)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def architecture_dict(n_features: int, n_classes: int, config: TrialConfig) -> dict[str, Any]:
    """JSON-able description from which ``build_from_architecture`` rebuilds the layers."""
    return {
        "n_features": n_features,
        "n_classes": n_classes,
        "hidden_layers": list(config.hidden_layers),
        "activation": config.activation,
        "batch_norm": config.batch_norm,
        "dropout": config.dropout,
    }


def build_from_architecture(arch: dict[str, Any]) -> nn.Sequential:
    """The layers described by ``arch``, with torch's default init: load weights next.

    ``arch`` may come from a file, so every key is checked (missing or unknown keys and bad
    values raise ValueError) before any layer is built.
    """
    if not isinstance(arch, dict):
        raise ValueError(f"architecture: must be an object, got {type(arch).__name__}")
    missing = [k for k in _ARCHITECTURE_KEYS if k not in arch]
    unknown = sorted(set(arch) - set(_ARCHITECTURE_KEYS))
    if missing or unknown:
        raise ValueError(f"architecture: missing keys {missing}, unknown keys {unknown}")
    # TrialConfig validates the layer fields with the same rules as a trial's config.
    config = TrialConfig(
        hidden_layers=arch["hidden_layers"],  # a JSON list; TrialConfig makes it a tuple
        activation=arch["activation"],
        batch_norm=arch["batch_norm"],
        dropout=arch["dropout"],
    )
    return _layers(arch["n_features"], arch["n_classes"], config)


def _layers(
    n_features: int,
    n_classes: int,
    config: TrialConfig,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> nn.Sequential:
    for name, value, minimum in (("n_features", n_features, 1), ("n_classes", n_classes, 2)):
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"{name}: must be an int >= {minimum}, got {value!r}")
    device = torch.get_default_device() if device is None else torch.device(device)
    layers: list[nn.Module] = []
    width_in = n_features
    for width in config.hidden_layers:
        layers.append(_linear(width_in, width, generator, device))
        if config.batch_norm:
            layers.append(nn.BatchNorm1d(width, device=device))
        layers.append(make_activation(config.activation))
        if config.dropout > 0.0:
            layers.append(nn.Dropout(config.dropout))
        width_in = width
    layers.append(_linear(width_in, n_classes, generator, device))
    return nn.Sequential(*layers)


class _LinearDrawnByCaller(nn.Linear):
    """``nn.Linear`` whose constructor leaves the weights uninitialised (``_linear`` draws them).

    Cheaper than building it on the meta device and moving it (``to_empty``): meta tensors run
    torch's Python reference ops, about 0.1 ms per layer with the GIL held, which serialised
    the threads that build a GPU population's hundreds of members.
    """

    def reset_parameters(self) -> None:
        pass


def _linear(
    n_in: int, n_out: int, generator: torch.Generator | None, device: torch.device
) -> nn.Linear:
    """``nn.Linear(n_in, n_out)`` with torch's own initialisation drawn from ``generator``.

    ``nn.Linear`` draws it from the global RNG (``reset_parameters``: kaiming_uniform_ with
    a = sqrt(5), then the bias from U(-1/sqrt(n_in), 1/sqrt(n_in))); the same draws here, in
    the same order, keep every seed's weights what they were while taking a generator. They
    are overwritten by ``apply_init`` but advance the stream it draws from next.
    """
    layer: nn.Linear = _LinearDrawnByCaller(n_in, n_out, device=device)
    layer.__class__ = nn.Linear  # the same module from here on: only the constructor differed
    with torch.no_grad():
        nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
        bound = 1 / math.sqrt(n_in)
        nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
    return layer


__all__ = [
    "architecture_dict",
    "build_from_architecture",
    "build_mlp",
    "count_parameters",
    "make_activation",
]
