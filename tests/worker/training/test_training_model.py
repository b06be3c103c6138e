from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from worker.training import (
    ACTIVATIONS,
    INITS,
    TrialConfig,
    apply_init,
    architecture_dict,
    build_from_architecture,
    build_mlp,
    count_parameters,
    make_activation,
)


def test_layer_order_batch_norm_before_activation_dropout_after() -> None:
    config = TrialConfig(hidden_layers=(32, 16), batch_norm=True, dropout=0.3, activation="tanh")
    model = build_mlp(10, 4, config)
    kinds = [type(m) for m in model]
    block = [nn.Linear, nn.BatchNorm1d, nn.Tanh, nn.Dropout]
    assert kinds == block + block + [nn.Linear]
    assert model[3].p == 0.3
    assert (model[-1].in_features, model[-1].out_features) == (16, 4)


def test_plain_mlp_has_no_norm_or_dropout() -> None:
    model = build_mlp(10, 3, TrialConfig(hidden_layers=(32,)))
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]
    assert count_parameters(model) == (10 * 32 + 32) + (32 * 3 + 3)
    with_bn = build_mlp(10, 3, TrialConfig(hidden_layers=(32,), batch_norm=True))
    assert count_parameters(with_bn) == count_parameters(model) + 2 * 32  # running stats excluded


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation_builds_and_gives_logits(activation: str) -> None:
    model = build_mlp(6, 5, TrialConfig(hidden_layers=(8, 8), activation=activation))
    out = model(torch.randn(4, 6))
    assert out.shape == (4, 5) and torch.isfinite(out).all()


def test_architecture_is_json_and_rebuilds_the_same_layers() -> None:
    config = TrialConfig(hidden_layers=(12, 7), batch_norm=True, dropout=0.1, activation="gelu")
    arch = json.loads(json.dumps(architecture_dict(9, 3, config)))
    assert arch == {
        "n_features": 9,
        "n_classes": 3,
        "hidden_layers": [12, 7],
        "activation": "gelu",
        "batch_norm": True,
        "dropout": 0.1,
    }
    original, rebuilt = build_mlp(9, 3, config), build_from_architecture(arch)
    assert [type(m) for m in rebuilt] == [type(m) for m in original]
    shapes = {k: v.shape for k, v in original.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"activation": "swish"}, "activation"),
        ({"n_classes": 1}, "n_classes"),
        ({"n_features": "9"}, "n_features"),
        ({"extra": 1}, "unknown keys"),
        ({"dropout": None}, "dropout"),
    ],
)
def test_bad_architecture_is_rejected(change: dict[str, object], match: str) -> None:
    arch = {**architecture_dict(9, 3, TrialConfig(hidden_layers=(4,))), **change}
    with pytest.raises(ValueError, match=match):
        build_from_architecture(arch)
    partial = architecture_dict(9, 3, TrialConfig(hidden_layers=(4,)))
    del partial["batch_norm"]
    with pytest.raises(ValueError, match="missing keys"):
        build_from_architecture(partial)


def test_inverted_dropout_in_train_mode_and_off_in_eval() -> None:
    p = 0.5
    torch.manual_seed(0)
    model = build_mlp(20, 3, TrialConfig(hidden_layers=(256,), dropout=p))
    x = torch.randn(64, 20)
    before_dropout, with_dropout = model[:2], model[:3]  # Linear, ReLU | + Dropout
    with torch.no_grad():
        reference = before_dropout(x)
        model.train()
        dropped = with_dropout(x)
        alive = reference > 0
        zeroed = (dropped == 0) & alive
        survivors = (dropped != 0) & alive
        fraction = zeroed.sum().item() / alive.sum().item()
        assert 0.45 < fraction < 0.55  # about p of the active units are dropped
        scaled = dropped[survivors] / reference[survivors]
        assert torch.allclose(scaled, torch.full_like(scaled, 1 / (1 - p)))

        model.eval()
        assert torch.equal(with_dropout(x), reference)  # identity at evaluation
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.equal(model(x), model(x))  # fresh masks per call


def test_batch_norm_eval_uses_running_stats() -> None:
    torch.manual_seed(0)
    model = build_mlp(6, 3, TrialConfig(hidden_layers=(16,), batch_norm=True))
    model.train()
    with torch.no_grad():
        for _ in range(20):  # move the running statistics away from (0, 1)
            model(torch.randn(32, 6) * 3 + 1)
    model.eval()
    x = torch.randn(10, 6)
    with torch.no_grad():
        in_batch = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(10)])
        assert torch.allclose(alone, in_batch, atol=1e-6)
        model.train()
        assert not torch.allclose(model(x), in_batch, atol=1e-3)  # batch stats differ


def _torch_linears_then_init(n_features: int, n_classes: int, config: TrialConfig) -> nn.Sequential:
    """The MLP as plain nn.Linear layers (torch's own reset on the global RNG), then our init:
    what build_mlp built before it took a generator."""
    layers: list[nn.Module] = []
    width_in = n_features
    for width in config.hidden_layers:
        layers.append(nn.Linear(width_in, width))
        if config.batch_norm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(make_activation(config.activation))
        if config.dropout > 0:
            layers.append(nn.Dropout(config.dropout))
        width_in = width
    layers.append(nn.Linear(width_in, n_classes))
    return apply_init(nn.Sequential(*layers), config.init, config.activation)  # type: ignore[return-value]


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("init", INITS)
def test_a_generator_gives_the_seeds_weights_without_touching_the_global_rng(
    init: str, batch_norm: bool
) -> None:
    config = TrialConfig(hidden_layers=(24, 12), init=init, batch_norm=batch_norm, dropout=0.2)
    torch.manual_seed(config.seed)
    reference = _torch_linears_then_init(20, 4, config).state_dict()
    torch.manual_seed(config.seed)
    global_rng = build_mlp(20, 4, config).state_dict()
    torch.manual_seed(99)
    before = torch.get_rng_state()
    mine = build_mlp(
        20, 4, config, generator=torch.Generator().manual_seed(config.seed), device="cpu"
    ).state_dict()
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG was not drawn from
    assert reference.keys() == global_rng.keys() == mine.keys()
    for key, value in reference.items():
        assert torch.equal(global_rng[key], value), key
        assert torch.equal(mine[key], value), key
