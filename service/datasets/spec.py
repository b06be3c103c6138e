"""What a job spec says about its data: a pydantic union discriminated on ``name``.

Specs are data only; nothing here touches the file system. Paths are checked when loading
(``service.datasets.paths``), because whether a path is acceptable depends on the caller
(server: inside ``data_dir`` only; local CLI: any existing file).
"""

from __future__ import annotations

import math
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

from service.datasets.dataset import MAX_CLASSES

UPLOAD_ID_PATTERN = r"^[a-f0-9]{16,64}$"


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DigitsSpec(_Spec):
    """scikit-learn's bundled 8x8 digits (1,797 rows, 64 features in [0, 1], 10 classes)."""

    name: Literal["digits"] = "digits"


class _IdxSpec(_Spec):
    split: Literal["auto", "train", "test"] = Field(
        default="auto",
        description="auto: the 60,000 train images if present, else the 10,000 t10k images.",
    )
    limit: int | None = Field(default=None, ge=1, description="Keep only the first N rows.")


class MnistSpec(_IdxSpec):
    """MNIST IDX files under ``data_dir/mnist/`` or directly in ``data_dir``; pixels / 255."""

    name: Literal["mnist"] = "mnist"


class FashionMnistSpec(_IdxSpec):
    """Fashion-MNIST IDX files under ``data_dir/fashion_mnist/``; pixels / 255."""

    name: Literal["fashion_mnist"] = "fashion_mnist"


class SyntheticSpec(_Spec):
    """``sklearn.datasets.make_classification`` with no redundant or repeated features."""

    name: Literal["synthetic"] = "synthetic"
    n_samples: int = Field(default=1000, ge=2)
    n_features: int = Field(default=20, ge=1)
    n_classes: int = Field(default=2, ge=2, le=MAX_CLASSES)
    n_informative: int | None = Field(
        default=None,
        ge=1,
        description="Default: max(n_features // 2, the fewest the clusters need), capped at "
        "n_features.",
    )
    n_clusters_per_class: int = Field(default=2, ge=1, le=64)
    seed: int = Field(default=0, ge=0, le=2**32 - 1)

    @property
    def resolved_n_informative(self) -> int:
        if self.n_informative is not None:
            return self.n_informative
        return min(self.n_features, max(2, self._min_informative, self.n_features // 2))

    @property
    def _min_informative(self) -> int:
        # make_classification puts each cluster on its own hypercube vertex: 2**k vertices.
        return max(1, math.ceil(math.log2(self.n_classes * self.n_clusters_per_class)))

    @model_validator(mode="after")
    def _check_ranges(self) -> SyntheticSpec:
        if self.n_samples < 2 * self.n_classes:
            raise ValueError(
                f"n_samples={self.n_samples} is too small for n_classes={self.n_classes}: "
                f"need at least 2 rows per class ({2 * self.n_classes})"
            )
        k = self.resolved_n_informative
        if k > self.n_features:
            raise ValueError(f"n_informative={k} exceeds n_features={self.n_features}")
        clusters = self.n_classes * self.n_clusters_per_class
        # Compare bit lengths first: 2**k for a k in the billions (a hostile spec) would take
        # minutes and gigabytes to compute, and clusters is small anyway.
        if k < clusters.bit_length() and clusters > 2**k:
            raise ValueError(
                f"n_classes * n_clusters_per_class = {self.n_classes} * "
                f"{self.n_clusters_per_class} = {clusters} clusters do not fit on the "
                f"2**n_informative = 2**{k} = {2**k} hypercube vertices; use "
                f"n_informative >= {self._min_informative} (and n_features at least that), "
                "or fewer classes or clusters per class"
            )
        return self


class CsvSpec(_Spec):
    """A CSV file with a header row, numeric feature columns and one label column."""

    name: Literal["csv"] = "csv"
    path: str = Field(
        min_length=1, max_length=4096, description="Relative to data_dir on the server."
    )
    label_column: str = Field(default="label", min_length=1, max_length=256)


class NpzSpec(_Spec):
    """A ``.npz`` file with arrays ``X`` (rows first; flattened to 2-D) and ``y`` (1-D)."""

    name: Literal["npz"] = "npz"
    path: str = Field(
        min_length=1, max_length=4096, description="Relative to data_dir on the server."
    )


class UploadSpec(_Spec):
    """A dataset stored earlier through the upload endpoint, by its server-side id."""

    name: Literal["upload"] = "upload"
    id: str = Field(pattern=UPLOAD_ID_PATTERN)


DatasetSpecModel = Union[  # noqa: UP007 - the discriminated union reads best spelled out
    DigitsSpec,
    MnistSpec,
    FashionMnistSpec,
    SyntheticSpec,
    CsvSpec,
    NpzSpec,
    UploadSpec,
]
DatasetSpec = Annotated[DatasetSpecModel, Field(discriminator="name")]

DATASET_NAMES: tuple[str, ...] = (
    "digits",
    "mnist",
    "fashion_mnist",
    "synthetic",
    "csv",
    "npz",
    "upload",
)


_ADAPTER: TypeAdapter[DatasetSpecModel] = TypeAdapter(DatasetSpec)


def parse_dataset_spec(data: object) -> DatasetSpecModel:
    """Validate a plain dict (e.g. from YAML/JSON) into one of the spec models.

    Raises pydantic's ``ValidationError``, as any other part of a job spec does.
    """
    return _ADAPTER.validate_python(data)
