"""Datasets for the service and its workers: specs, loading, splits and uploads.

numpy and scikit-learn only (sklearn imported lazily): the API process imports this package
and must never import torch.
"""

from service.datasets.builtin import BUILTIN_DATASETS, describe_builtin_datasets
from service.datasets.dataset import MAX_CLASSES, Dataset
from service.datasets.idx import OFFLINE_ENV, downloads_enabled, read_idx
from service.datasets.loader import clear_dataset_cache, load_dataset
from service.datasets.spec import (
    DATASET_NAMES,
    CsvSpec,
    DatasetSpec,
    DatasetSpecModel,
    DigitsSpec,
    FashionMnistSpec,
    MnistSpec,
    NpzSpec,
    SyntheticSpec,
    UploadSpec,
    parse_dataset_spec,
)
from service.datasets.splits import Splits, clear_split_cache, make_splits
from service.datasets.uploads import DatasetInfo, get_upload_info, list_uploads, store_upload

__all__ = [
    "BUILTIN_DATASETS",
    "DATASET_NAMES",
    "MAX_CLASSES",
    "OFFLINE_ENV",
    "CsvSpec",
    "Dataset",
    "DatasetInfo",
    "DatasetSpec",
    "DatasetSpecModel",
    "DigitsSpec",
    "FashionMnistSpec",
    "MnistSpec",
    "NpzSpec",
    "Splits",
    "SyntheticSpec",
    "UploadSpec",
    "clear_dataset_cache",
    "clear_split_cache",
    "describe_builtin_datasets",
    "downloads_enabled",
    "get_upload_info",
    "list_uploads",
    "load_dataset",
    "make_splits",
    "parse_dataset_spec",
    "read_idx",
    "store_upload",
]
