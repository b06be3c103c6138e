"""From a spec and sampled parameters to the resolved TrialConfig; per-trial seeds."""

from __future__ import annotations

from service.spec import JobSpec
from tests.support.specs import random_spec
from worker.trial_config import architecture_key, resolve_config, trial_seed


def spec(**over: object) -> JobSpec:
    return JobSpec.model_validate(random_spec(**over))


def test_spec_and_params_map_onto_the_config() -> None:
    s = spec(
        model={"hidden_layers": [64, 32], "activation": "tanh", "batch_norm": True},
        training={
            "max_epochs": 7,
            "batch_size": 50,
            "early_stopping": {"patience": 2, "min_delta": 0.01},
        },
    )
    cfg = resolve_config(
        s,
        {
            "optimizer": "nesterov",
            "learning_rate": 0.05,
            "momentum": 0.8,
            "dropout": 0.2,
            "init": "orthogonal",
        },
        seed=11,
    )
    assert cfg.hidden_layers == (64, 32) and cfg.activation == "tanh" and cfg.batch_norm is True
    assert (cfg.max_epochs, cfg.batch_size, cfg.patience, cfg.min_delta) == (7, 50, 2, 0.01)
    assert (cfg.optimizer, cfg.learning_rate, cfg.momentum, cfg.dropout, cfg.init) == (
        "nesterov",
        0.05,
        0.8,
        0.2,
        "orthogonal",
    )
    assert cfg.seed == 11 and cfg.objective == "val_accuracy"


def test_architecture_parameters() -> None:
    s = spec(model={"hidden_layers": [64, 32]})
    assert resolve_config(s, {"n_hidden_layers": 3}, seed=0).hidden_layers == (64, 64, 64)
    assert resolve_config(s, {"hidden_width": 16}, seed=0).hidden_layers == (16, 16)
    assert resolve_config(s, {"hidden_width": 16, "n_hidden_layers": 3}, seed=0).hidden_layers == (
        16,
        16,
        16,
    )
    assert resolve_config(s, {"batch_size": 32.0}, seed=0).batch_size == 32


def test_no_early_stopping() -> None:
    cfg = resolve_config(spec(training={"early_stopping": None}), {}, seed=0)
    assert cfg.patience is None


def test_trial_seeds_are_stable_and_distinct() -> None:
    s0, s1 = spec(training={"seed": 0}), spec(training={"seed": 1})
    seeds = [trial_seed(s0, n) for n in range(1000)]
    assert len(set(seeds)) == 1000
    assert all(0 <= x < 2**31 - 1 for x in seeds)
    assert seeds == [trial_seed(s0, n) for n in range(1000)]
    assert trial_seed(s1, 5) != trial_seed(s0, 5)


def test_architecture_key_groups_equal_architectures() -> None:
    s = spec()
    a = resolve_config(s, {"optimizer": "adam", "learning_rate": 0.01}, seed=1)
    b = resolve_config(s, {"optimizer": "sgd", "learning_rate": 0.1}, seed=2)
    c = resolve_config(s, {"hidden_width": 8}, seed=1)
    assert architecture_key(a) == architecture_key(b) != architecture_key(c)
