from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from worker.training import INITS, LEAKY_RELU_SLOPE, TrialConfig, apply_init, build_mlp

N = 512  # 512 x 512 = 262k weights: the sample std is within ~0.3% of the true one

EXPECTED_STD = {
    "xavier_uniform": math.sqrt(2 / (N + N)),
    "xavier_normal": math.sqrt(2 / (N + N)),
    "he_uniform": math.sqrt(2 / N),
    "he_normal": math.sqrt(2 / N),
    "lecun_normal": math.sqrt(1 / N),
    "normal_0.01": 0.01,
    "orthogonal": 1 / math.sqrt(N),
}


def _layer(scheme: str, activation: str = "relu") -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(N, N)
    apply_init(nn.Sequential(layer), scheme, activation)
    return layer


def test_every_scheme_has_an_expected_std() -> None:
    assert set(EXPECTED_STD) == set(INITS)


@pytest.mark.parametrize("scheme", INITS)
def test_weight_std_matches_formula_and_bias_is_zero(scheme: str) -> None:
    layer = _layer(scheme)
    std = layer.weight.std().item()
    assert std == pytest.approx(EXPECTED_STD[scheme], rel=0.10)
    assert abs(layer.weight.mean().item()) < 0.05 * EXPECTED_STD[scheme]
    assert torch.count_nonzero(layer.bias) == 0


@pytest.mark.parametrize(
    ("scheme", "bound"),
    [("xavier_uniform", math.sqrt(6 / (2 * N))), ("he_uniform", math.sqrt(6 / N))],
)
def test_uniform_schemes_respect_their_bound(scheme: str, bound: float) -> None:
    weight = _layer(scheme).weight
    assert weight.abs().max().item() <= bound
    assert weight.abs().max().item() > 0.99 * bound


def test_he_uses_the_leaky_relu_slope() -> None:
    gain = math.sqrt(2 / (1 + LEAKY_RELU_SLOPE**2))
    std = _layer("he_normal", "leaky_relu").weight.std().item()
    assert std == pytest.approx(gain / math.sqrt(N), rel=0.02)


def test_orthogonal_is_orthogonal() -> None:
    weight = _layer("orthogonal").weight.detach()
    assert torch.allclose(weight @ weight.T, torch.eye(N), atol=1e-4)


def test_batch_norm_scale_one_shift_zero_on_every_layer() -> None:
    config = TrialConfig(hidden_layers=(16, 8), batch_norm=True, init="xavier_normal")
    model = build_mlp(5, 3, config)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm1d, nn.Linear)):
                module.weight.uniform_(2, 3)
                module.bias.uniform_(2, 3)
    apply_init(model, config.init, config.activation)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(norms) == 2 and len(linears) == 3
    for norm in norms:
        assert torch.equal(norm.weight, torch.ones(norm.num_features))
        assert torch.equal(norm.bias, torch.zeros(norm.num_features))
    for linear in linears:  # every Linear, the output layer included
        assert torch.count_nonzero(linear.bias) == 0
        assert linear.weight.abs().max() < 2


def test_generator_makes_init_reproducible() -> None:
    a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    apply_init(a, "he_normal", "relu", generator=torch.Generator().manual_seed(3))
    apply_init(b, "he_normal", "relu", generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.weight, b.weight)


def test_unknown_scheme() -> None:
    with pytest.raises(ValueError, match="init"):
        apply_init(nn.Linear(2, 2), "zeros", "relu")
