"""The shipped presets load, validate and say what the lectures say."""

from __future__ import annotations

import pytest

from search_spaces import (
    PRESET_DIR,
    CategoricalParam,
    FixedParam,
    FloatParam,
    GridError,
    PresetNotFoundError,
    SearchSpace,
    grid_size,
    list_presets,
    load_preset,
    load_yaml_file,
)


def test_the_four_presets_are_listed() -> None:
    assert list_presets() == ["default", "grid-small", "lecture", "practical-defaults"]


@pytest.mark.parametrize("name", ["default", "grid-small", "lecture", "practical-defaults"])
def test_each_preset_validates_from_its_file(name: str) -> None:
    s = load_preset(name)
    assert isinstance(s, SearchSpace)
    assert s.description.strip()
    # validating the raw YAML again gives the same space (no hidden defaults in load_preset)
    assert SearchSpace.model_validate(load_yaml_file(PRESET_DIR / f"{name}.yaml")) == s


def test_default_has_the_five_dimensions_and_conditional_momentum() -> None:
    s = load_preset("default")
    p = s.parameters
    assert set(p) == {"optimizer", "learning_rate", "weight_decay", "dropout", "init", "momentum"}
    assert isinstance(p["optimizer"], CategoricalParam)
    assert len(p["optimizer"].choices) == 7
    assert isinstance(p["learning_rate"], FloatParam) and p["learning_rate"].log
    assert isinstance(p["weight_decay"], FloatParam) and p["weight_decay"].log
    assert p["momentum"].when == {"optimizer": ["momentum", "nesterov"]}
    with pytest.raises(GridError):
        grid_size(s)


def test_lecture_ranges() -> None:
    p = load_preset("lecture").parameters
    lr, wd = p["learning_rate"], p["weight_decay"]
    assert isinstance(lr, FloatParam) and isinstance(wd, FloatParam)
    assert (lr.low, lr.high, lr.log) == (1e-6, 1e-2, True)
    assert (wd.low, wd.high, wd.log) == (1e-8, 1e-4, True)
    assert isinstance(p["optimizer"], FixedParam) and p["optimizer"].value == "sgd"


def test_grid_small_has_sixteen_points() -> None:
    assert grid_size(load_preset("grid-small")) == 16


def test_practical_defaults() -> None:
    p = load_preset("practical-defaults").parameters
    fixed = {n: q.value for n, q in p.items() if isinstance(q, FixedParam)}
    assert fixed == {
        "init": "he_normal",
        "activation": "elu",
        "batch_norm": True,
        "optimizer": "nesterov",
        "momentum": 0.9,
    }
    assert {n for n, q in p.items() if not isinstance(q, FixedParam)} == {
        "learning_rate",
        "dropout",
    }


@pytest.mark.parametrize("name", ["nope", "../default", "default.yaml", ""])
def test_unknown_preset_lists_the_available_ones(name: str) -> None:
    with pytest.raises(PresetNotFoundError) as info:
        load_preset(name)
    assert "available: default, grid-small, lecture, practical-defaults" in str(info.value)
    assert isinstance(info.value, KeyError)


def test_yaml_errors_carry_file_and_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.yaml"
    bad.write_text("parameters:\n  dropout: {type: float\n  low: 0\n")
    with pytest.raises(ValueError, match=r"bad\.yaml:\d+:\d+: invalid YAML"):
        load_yaml_file(bad)
