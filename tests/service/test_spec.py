"""The job spec: one model for files and API bodies; every error names the field, YAML errors and
field errors in files give file:line."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.datasets import DigitsSpec
from service.errors import SpecError
from service.spec import JobSpec, load_spec_file, parse_spec_text, spec_to_json

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def spec_error(text: str, source: str = "job.yaml") -> SpecError:
    with pytest.raises(SpecError) as info:
        parse_spec_text(text, source=source)
    return info.value


def test_minimal_spec_gets_documented_defaults() -> None:
    spec = parse_spec_text("name: tiny\nn_trials: 3\n")
    assert isinstance(spec.dataset, DigitsSpec)  # a validated model, not a raw dict
    assert spec.search_space == "default"
    assert spec.sampler.type == "random" and spec.sampler.seed == 0
    assert spec.pruner.type == "median"
    assert spec.objective == "val_accuracy" and spec.direction == "maximize"
    assert spec.budget() == 3
    assert spec.training.validation_split == 0.2 and spec.training.test_split == 0.1
    assert spec.training.precision == "fp32"  # results equal each trial trained alone
    assert '"dataset": {"name": "digits"}' in spec_to_json(spec)


def test_json_text_is_accepted() -> None:
    spec = parse_spec_text('{"name": "j", "n_trials": 2, "objective": "val_loss"}')
    assert spec.direction == "minimize"


@pytest.mark.parametrize(
    ("text", "field", "line", "fragment"),
    [
        ("name: a\nn_trials: 2\nfoo: 1\n", "foo", 3, "unknown field"),
        ("name: a\nn_trials: 0\n", "n_trials", 2, "greater than or equal to 1"),
        ("name: 'a b'\nn_trials: 2\n", "name", 1, "pattern"),
        ("name: a\n", "n_trials", None, "required for the random sampler"),
        (
            "name: a\nn_trials: 2\nsampler: {type: tpe}\nobjective: accuracy\n",
            "objective",
            4,
            "val_accuracy",
        ),
        (
            "name: a\nn_trials: 2\ntraining:\n  max_epochs: 0\n",
            "training.max_epochs",
            4,
            "greater than or equal to 1",
        ),
        (
            "name: a\nn_trials: 2\ntraining:\n  validation_split: 0.5\n  test_split: 0.45\n",
            "training",
            3,
            "less than 10%",
        ),
        (
            "name: a\nn_trials: 2\nmodel:\n  hidden_layers: [64, 0]\n",
            "model.hidden_layers",
            4,
            ">= 1",
        ),
        ("name: a\nn_trials: 2\nmodel:\n  activation: swish\n", "model.activation", 4, "relu"),
        ("name: a\nn_trials: 2\ntraining:\n  precision: fp16\n", "training.precision", 4, "bf16"),
        ("name: a\nn_trials: 2\ndataset:\n  name: imagenet\n", "dataset", 3, "imagenet"),
        (
            "name: a\nn_trials: 2\ndataset:\n  name: synthetic\n  n_samples: 1\n",
            "dataset.n_samples",
            5,
            "greater than or equal to 2",
        ),
        ("name: a\nn_trials: 2\nsearch_space: nope\n", "search_space", 3, "available: default"),
        (
            "name: a\nn_trials: 2\npruner:\n  type: median\n  n_warmup_steps: -1\n",
            "pruner.n_warmup_steps",
            5,
            "greater than or equal to 0",
        ),
        (
            "name: a\nn_trials: 2\nsearch_space:\n  parameters:\n    learning_rate:\n      type: float\n      low: 0\n      high: 1\n",
            "search_space.parameters.learning_rate",
            5,
            "(0.0, 100.0]",
        ),
        (
            "name: a\nn_trials: 2\nsearch_space:\n  parameters:\n    optimizer: {type: categorical, choices: [sgd, lbfgs]}\n",
            "search_space.parameters.optimizer",
            5,
            "unknown optimizer 'lbfgs'",
        ),
        (
            "name: a\nn_trials: 2\nsearch_space:\n  parameters:\n    optimizer: {type: categorical, choices: [sgd, momentum]}\n"
            "    momentum:\n      type: float\n      low: 0.5\n      high: 0.9\n      when: {optimizer: [nesterov]}\n",
            "search_space.parameters.momentum.when.optimizer",
            10,
            "['nesterov']",
        ),
        (
            "name: a\nn_trials: 3\nsearch_space: grid-small\nsampler: {type: grid}\n",
            "n_trials",
            2,
            "grid size (16)",
        ),
        (
            "name: a\nsearch_space: default\nsampler:\n  type: grid\n",
            "search_space",
            2,
            "parameters.learning_rate",
        ),
    ],
)
def test_errors_name_field_and_line(text: str, field: str, line: int | None, fragment: str) -> None:
    err = spec_error(text)
    assert err.field == field, err.errors
    first = err.errors[0]
    assert first["field"] == field
    assert fragment in first["message"], first
    if line is not None:
        assert first["location"] == f"job.yaml:{line}"
    assert str(err).startswith(first.get("location", "job.yaml"))
    assert f"{field}: " in str(err)
    assert str(err).count(f"{field}: ") == 1, f"field repeated in {err}"


def test_inline_space_errors_are_not_masked_by_the_preset_branch() -> None:
    err = spec_error(
        "name: a\nn_trials: 2\nsearch_space:\n  parameters:\n    foo: {type: fixed, value: 1}\n"
    )
    assert "valid string" not in str(err)
    assert len(err.errors) == 1


def test_every_problem_is_listed() -> None:
    err = spec_error("name: a\nn_trials: 0\ntraining:\n  max_epochs: 0\n  batch_size: 0\n")
    fields = {e["field"] for e in err.errors}
    assert fields == {"n_trials", "training.max_epochs", "training.batch_size"}


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("name: a\nn_trials: [2\n", 3),
        ("name: a\n  n_trials: 2\n", 2),
        ("name: a\nsearch_space:\n  parameters:\n\tdropout: 1\n", 4),
    ],
)
def test_yaml_syntax_errors_give_file_and_line(text: str, line: int) -> None:
    err = spec_error(text, source="spec.yaml")
    assert str(err).startswith(f"spec.yaml:{line}: not valid YAML/JSON"), str(err)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n", ""])
def test_non_mapping_is_refused(text: str) -> None:
    assert "must be a mapping" in str(spec_error(text))


def test_load_spec_file_reports_the_path(tmp_path: Path) -> None:
    f = tmp_path / "job.yaml"
    f.write_text("name: a\nn_trials: 2\ntraining:\n  batch_size: -1\n")
    with pytest.raises(SpecError) as info:
        load_spec_file(f)
    assert str(info.value).startswith(f"{f}:4: training.batch_size:")
    with pytest.raises(SpecError, match="no such file"):
        load_spec_file(tmp_path / "missing.yaml")
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00name")
    with pytest.raises(SpecError, match="cannot read"):
        load_spec_file(tmp_path / "bin.yaml")


def test_grid_budget_is_the_grid_size() -> None:
    spec = parse_spec_text("name: g\nsearch_space: grid-small\nsampler: {type: grid}\n")
    assert spec.n_trials is None
    assert spec.budget() == 16
    assert len(spec.grid_points(limit=16)) == 16
    assert (
        parse_spec_text(
            "name: g\nn_trials: 16\nsearch_space: grid-small\nsampler: {type: grid}\n"
        ).budget()
        == 16
    )


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_examples_validate(path: Path) -> None:
    spec = load_spec_file(path)
    assert spec.budget() >= 1
    assert spec.name


def test_spec_json_is_canonical() -> None:
    a = JobSpec.model_validate({"name": "x", "n_trials": 2, "training": {"max_epochs": 3}})
    b = JobSpec.model_validate({"training": {"max_epochs": 3}, "n_trials": 2, "name": "x"})
    assert spec_to_json(a) == spec_to_json(b)
    assert JobSpec.model_validate_json(spec_to_json(a)) == a


def test_stored_spec_keeps_parameter_order() -> None:
    # `when` refers to an earlier parameter: a stored spec sorted by key ("momentum" before
    # "optimizer") would no longer validate when a worker or the API reads it back.
    spec = parse_spec_text(
        "name: a\nn_trials: 2\nsearch_space:\n  parameters:\n"
        "    optimizer: {type: categorical, choices: [sgd, momentum]}\n"
        "    momentum: {type: float, low: 0.5, high: 0.9, when: {optimizer: [momentum]}}\n"
        "    learning_rate: {type: float, low: 1.0e-3, high: 1.0e-1, log: true}\n"
    )
    again = JobSpec.model_validate_json(spec_to_json(spec))
    assert again == spec
    assert list(again.resolved_space().parameters) == ["optimizer", "momentum", "learning_rate"]
