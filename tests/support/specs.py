"""Small job specs that train in well under a second per trial on digits with 2 CPU cores."""

from __future__ import annotations

import copy
from typing import Any


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def random_spec(**over: Any) -> dict[str, Any]:
    """A random search over the default preset on digits, small MLP, few epochs."""
    base = {
        "name": "small-random",
        "dataset": {"name": "digits"},
        "model": {"hidden_layers": [32]},
        "search_space": "default",
        "sampler": {"type": "random", "seed": 0},
        "n_trials": 4,
        "training": {"max_epochs": 2, "batch_size": 64},
        "pruner": {"type": "none"},
    }
    return _merge(base, over)


def grid_spec(**over: Any) -> dict[str, Any]:
    """The grid-small preset (16 points) on digits, small MLP, few epochs."""
    base = {
        "name": "small-grid",
        "dataset": {"name": "digits"},
        "model": {"hidden_layers": [32]},
        "search_space": "grid-small",
        "sampler": {"type": "grid"},
        "training": {"max_epochs": 2, "batch_size": 64},
        "pruner": {"type": "none"},
    }
    return _merge(base, over)
