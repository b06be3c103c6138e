"""The MLP every trial trains, and a JSON description that rebuilds it.

Layer order per hidden width: Linear -> BatchNorm1d (optional, before the activation, as in
the lectures) -> activation -> Dropout (inverted dropout, only if p > 0), then a final Linear
to ``n_classes`` logits (softmax lives in the loss). Layer indices are part of the
state_dict keys, so ``build_from_architecture`` must produce exactly the same sequence.
"""

from __future__ import annotations

from typing import Any

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


def build_mlp(n_features: int, n_classes: int, config: TrialConfig) -> nn.Sequential:
    """The trial's MLP on the current default device, initialised with ``config.init``.

    Draws from the global torch RNG (Linear's own reset and then ``apply_init``), so
    ``torch.manual_seed(config.seed)`` right before the call fixes the weights.
    """
    model = _layers(n_features, n_classes, config)
    apply_init(model, config.init, config.activation)
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


def _layers(n_features: int, n_classes: int, config: TrialConfig) -> nn.Sequential:
    for name, value, minimum in (("n_features", n_features, 1), ("n_classes", n_classes, 2)):
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"{name}: must be an int >= {minimum}, got {value!r}")
    layers: list[nn.Module] = []
    width_in = n_features
    for width in config.hidden_layers:
        layers.append(nn.Linear(width_in, width))
        if config.batch_norm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(make_activation(config.activation))
        if config.dropout > 0.0:
            layers.append(nn.Dropout(config.dropout))
        width_in = width
    layers.append(nn.Linear(width_in, n_classes))
    return nn.Sequential(*layers)


__all__ = [
    "architecture_dict",
    "build_from_architecture",
    "build_mlp",
    "count_parameters",
    "make_activation",
]
