"""Weight initialisation schemes, as the lectures define them.

For a Linear layer with weight shape (fan_out, fan_in) the weights are drawn so that:

- ``xavier_uniform``: U(-a, a), a = sqrt(6 / (fan_in + fan_out)); std = sqrt(2 / (fan_in + fan_out))
- ``xavier_normal``:  N(0, std^2), std = sqrt(2 / (fan_in + fan_out))   (Glorot, gain 1)
- ``he_uniform``:     U(-a, a), a = sqrt(3) * std; std = gain / sqrt(fan_in)
- ``he_normal``:      N(0, std^2), std = gain / sqrt(fan_in)   (Kaiming, fan_in mode)
  where gain = sqrt(2) (ReLU), or sqrt(2 / (1 + slope^2)) for leaky_relu; every other
  activation uses the ReLU gain, as the lectures do for the "He" scheme.
- ``lecun_normal``:   N(0, std^2), std = 1 / sqrt(fan_in)   (the SELU-friendly scheme)
- ``normal_0.01``:    N(0, 0.01^2) whatever the layer size: the lectures' "too small"
  baseline whose activations vanish with depth.
- ``orthogonal``:     a (semi-)orthogonal matrix, gain 1; for a square n x n layer every
  entry has std 1 / sqrt(n).

Biases are zero; BatchNorm scale is 1 and shift 0. The draws use the global torch RNG unless
a ``generator`` is given, in module order, so seeding before the call reproduces the weights.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from worker.training.config import INITS

LEAKY_RELU_SLOPE = 0.01  # torch's nn.LeakyReLU default; the model and the He gain must agree


def apply_init(
    model: nn.Module,
    scheme: str,
    activation: str,
    *,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Initialise every Linear and BatchNorm1d of ``model`` in place; returns ``model``."""
    if scheme not in INITS:
        raise ValueError(f"init: must be one of {INITS}, got {scheme!r}")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                _init_weight(module.weight, scheme, activation, generator)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm1d) and module.affine:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
    return model


def _init_weight(
    weight: torch.Tensor, scheme: str, activation: str, generator: torch.Generator | None
) -> None:
    if scheme == "xavier_uniform":
        nn.init.xavier_uniform_(weight, gain=1.0, generator=generator)
    elif scheme == "xavier_normal":
        nn.init.xavier_normal_(weight, gain=1.0, generator=generator)
    elif scheme in ("he_uniform", "he_normal"):
        # kaiming_* with a=0 and "relu" is the sqrt(2) gain; leaky_relu uses its real slope.
        leaky = activation == "leaky_relu"
        init_fn = nn.init.kaiming_uniform_ if scheme == "he_uniform" else nn.init.kaiming_normal_
        init_fn(
            weight,
            a=LEAKY_RELU_SLOPE if leaky else 0.0,
            mode="fan_in",
            nonlinearity="leaky_relu" if leaky else "relu",
            generator=generator,
        )
    elif scheme == "lecun_normal":
        fan_in = weight.shape[1]
        nn.init.normal_(weight, mean=0.0, std=1.0 / math.sqrt(fan_in), generator=generator)
    elif scheme == "normal_0.01":
        nn.init.normal_(weight, mean=0.0, std=0.01, generator=generator)
    elif scheme == "orthogonal":
        nn.init.orthogonal_(weight, gain=1.0, generator=generator)
    else:  # pragma: no cover - guarded by apply_init
        raise AssertionError(scheme)


__all__ = ["LEAKY_RELU_SLOPE", "apply_init"]
