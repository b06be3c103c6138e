from __future__ import annotations

import typing

import pytest
from pydantic import BaseModel, ValidationError

from service.datasets import (
    DATASET_NAMES,
    CsvSpec,
    DatasetSpecModel,
    DigitsSpec,
    FashionMnistSpec,
    MnistSpec,
    NpzSpec,
    SyntheticSpec,
    UploadSpec,
    parse_dataset_spec,
)


@pytest.mark.parametrize(
    ("data", "cls"),
    [
        ({"name": "digits"}, DigitsSpec),
        ({"name": "mnist", "split": "test", "limit": 100}, MnistSpec),
        ({"name": "fashion_mnist"}, FashionMnistSpec),
        ({"name": "synthetic", "n_samples": 200, "n_classes": 3}, SyntheticSpec),
        ({"name": "csv", "path": "a/b.csv", "label_column": "target"}, CsvSpec),
        ({"name": "npz", "path": "x.npz"}, NpzSpec),
        ({"name": "upload", "id": "0123456789abcdef0123456789abcdef"}, UploadSpec),
    ],
)
def test_discriminated_union_parses_each_name(data: dict[str, object], cls: type) -> None:
    spec = parse_dataset_spec(data)
    assert type(spec) is cls
    assert parse_dataset_spec(spec.model_dump()) == spec  # JSON round trip


def test_dataset_names_cover_the_union() -> None:
    members = typing.get_args(DatasetSpecModel)
    names = {m.model_fields["name"].default for m in members if issubclass(m, BaseModel)}
    assert names == set(DATASET_NAMES)


@pytest.mark.parametrize(
    "data",
    [
        {"name": "digits", "extra": 1},
        {"name": "imagenet"},
        {"name": "mnist", "split": "validation"},
        {"name": "mnist", "limit": 0},
        {"name": "csv"},
        {"name": "csv", "path": ""},
        {"name": "upload", "id": "../../etc/passwd"},
        {"name": "upload", "id": "ABCDEF0123456789"},
        {"name": "upload", "id": "abc"},
        {"name": "synthetic", "n_classes": 1},
        {"name": "synthetic", "seed": -1},
    ],
)
def test_invalid_specs_are_rejected(data: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        parse_dataset_spec(data)


def test_synthetic_cluster_constraint_is_a_clear_error() -> None:
    with pytest.raises(ValidationError) as info:
        SyntheticSpec(n_classes=8, n_informative=2)
    message = str(info.value)
    assert "16 clusters" in message and "2**n_informative = 2**2 = 4" in message
    assert "n_informative >= 4" in message


def test_synthetic_too_few_features_names_the_fix() -> None:
    with pytest.raises(ValidationError, match="n_informative >= 5"):
        SyntheticSpec(n_features=3, n_classes=10)


def test_synthetic_too_few_samples() -> None:
    with pytest.raises(ValidationError, match="at least 2 rows per class"):
        SyntheticSpec(n_samples=5, n_classes=3)


def test_synthetic_default_informative_is_sensible() -> None:
    assert SyntheticSpec().resolved_n_informative == 10  # half of 20 features
    assert SyntheticSpec(n_features=4, n_classes=8).resolved_n_informative == 4
    assert SyntheticSpec(n_features=1, n_clusters_per_class=1).resolved_n_informative == 1
    assert SyntheticSpec(n_informative=3).resolved_n_informative == 3
