"""Declarative search spaces: the schema, the shipped presets, grid enumeration, Optuna sampling."""

from search_spaces.grid import GridError, enumerate_grid, grid_size, grid_values
from search_spaces.presets import (
    PRESET_DIR,
    PresetNotFoundError,
    list_presets,
    load_preset,
    load_yaml_file,
)
from search_spaces.schema import (
    ACTIVATIONS,
    INITS,
    KNOWN_PARAMETERS,
    LR_SCHEDULES,
    OPTIMIZERS,
    CategoricalParam,
    FixedParam,
    FloatParam,
    IntParam,
    Parameter,
    SearchSpace,
)

__all__ = [
    "ACTIVATIONS",
    "INITS",
    "KNOWN_PARAMETERS",
    "LR_SCHEDULES",
    "OPTIMIZERS",
    "PRESET_DIR",
    "CategoricalParam",
    "FixedParam",
    "FloatParam",
    "GridError",
    "IntParam",
    "Parameter",
    "PresetNotFoundError",
    "SearchSpace",
    "enumerate_grid",
    "grid_size",
    "grid_values",
    "list_presets",
    "load_preset",
    "load_yaml_file",
]
