"""Preset search spaces shipped as YAML files next to this module."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from search_spaces.schema import SearchSpace

PRESET_DIR = Path(__file__).parent / "presets"


class PresetNotFoundError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_yaml_file(path: Path) -> Any:
    """Safe-load YAML; errors carry the file and line."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ValueError(f"{where}: invalid YAML: {e.problem}") from None


@cache
def load_preset(name: str) -> SearchSpace:
    """A preset by name; raises PresetNotFoundError listing the available ones."""
    path = PRESET_DIR / f"{name}.yaml"
    if not name.replace("-", "").replace("_", "").isalnum() or not path.is_file():
        raise PresetNotFoundError(
            f"unknown search-space preset {name!r}; available: {', '.join(list_presets())}"
        )
    try:
        return SearchSpace.model_validate(load_yaml_file(path))
    except ValidationError as e:  # a broken preset is a bug in this repo; say which file
        raise ValueError(f"{path}: {e}") from e
