"""``load_dataset``: one entry point from a spec to a validated, cached ``Dataset``.

The cache holds a few datasets per process, so a worker reads a dataset once per job, not once
per trial. An entry is keyed on the spec's JSON plus the resolved file path; it is reused only
while the file's mtime, size and inode are unchanged, so an edited file is read again.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path

from service import defaults
from service.datasets.builtin import load_digits, load_synthetic
from service.datasets.csv_format import parse_csv
from service.datasets.dataset import Dataset, check_limits
from service.datasets.idx import IDX_SOURCES, load_idx, locate_files
from service.datasets.npz_format import parse_npz
from service.datasets.paths import file_stamp, read_file, resolve_dataset_path
from service.datasets.spec import (
    CsvSpec,
    DatasetSpecModel,
    DigitsSpec,
    FashionMnistSpec,
    MnistSpec,
    NpzSpec,
    SyntheticSpec,
    UploadSpec,
)
from service.datasets.splits import clear_split_cache
from service.datasets.uploads import load_upload, upload_data_path

CACHE_SIZE = 4  # a worker runs one job at a time; a few entries cover alternating jobs

_cache: OrderedDict[Hashable, tuple[Hashable, Dataset]] = OrderedDict()
_lock = threading.Lock()


def clear_dataset_cache() -> None:
    """Forget every cached dataset (and, with them, their cached splits)."""
    with _lock:
        _cache.clear()
    clear_split_cache()


def load_dataset(
    spec: DatasetSpecModel,
    *,
    data_dir: Path,
    upload_dir: Path,
    allow_local_paths: bool,
    max_rows: int = defaults.MAX_DATASET_ROWS,
    max_features: int = defaults.MAX_DATASET_FEATURES,
    download: bool | None = None,
) -> Dataset:
    """Load, validate and cache the dataset a spec names.

    Every data problem raises ``DatasetError`` whose ``field`` says where ("dataset.path",
    "data.csv:line 17", ...); a dataset over ``max_rows`` / ``max_features`` raises
    ``LimitExceededError``. ``download`` applies to MNIST / Fashion-MNIST: None means "if
    HPO_OFFLINE is unset". Paths in csv/npz specs are relative to ``data_dir`` and confined to
    it unless ``allow_local_paths`` (the local CLI), where any existing file is accepted.
    """
    key, stamp, load = _plan(
        spec, data_dir, upload_dir, allow_local_paths, download, max_rows, max_features
    )
    with _lock:
        hit = _cache.get(key)
        if hit is not None and hit[0] == stamp:
            _cache.move_to_end(key)
            dataset = hit[1]
        else:
            dataset = None
    if dataset is None:
        dataset = load()
        with _lock:
            _cache[key] = (stamp, dataset)
            _cache.move_to_end(key)
            while len(_cache) > CACHE_SIZE:
                _cache.popitem(last=False)
    # A cached dataset may have been loaded under larger limits.
    check_limits(
        dataset.n_samples,
        dataset.n_features,
        max_rows=max_rows,
        max_features=max_features,
        field="dataset",
    )
    return dataset


_Plan = tuple[Hashable, Hashable, Callable[[], Dataset]]


def _plan(
    spec: DatasetSpecModel,
    data_dir: Path,
    upload_dir: Path,
    allow_local_paths: bool,
    download: bool | None,
    max_rows: int,
    max_features: int,
) -> _Plan:
    """(cache key, freshness stamp, loader) for a spec; resolves paths, reads nothing big."""
    spec_json = spec.model_dump_json()
    if isinstance(spec, DigitsSpec):
        return (spec_json,), None, lambda: load_digits(max_rows=max_rows, max_features=max_features)
    if isinstance(spec, SyntheticSpec):
        return (
            (spec_json,),
            None,
            lambda: load_synthetic(spec, max_rows=max_rows, max_features=max_features),
        )
    if isinstance(spec, MnistSpec | FashionMnistSpec):
        source = IDX_SOURCES[spec.name]
        split, images, labels = locate_files(source, data_dir, spec.split, download=download)
        key = (spec_json, str(images.resolve()), str(labels.resolve()))
        stamp = (file_stamp(images), file_stamp(labels))
        return (
            key,
            stamp,
            lambda: load_idx(
                source,
                images,
                labels,
                split=split,
                data_dir=data_dir,
                limit=spec.limit,
                max_rows=max_rows,
                max_features=max_features,
            ),
        )
    if isinstance(spec, CsvSpec | NpzSpec):
        path = resolve_dataset_path(
            spec.path, data_dir=data_dir, allow_local_paths=allow_local_paths
        )
        follow = allow_local_paths

        def load_file() -> Dataset:
            content = read_file(path, follow_symlinks=follow)
            if isinstance(spec, CsvSpec):
                return parse_csv(
                    content,
                    name=f"csv:{spec.path}",
                    source=spec.path,
                    label_column=spec.label_column,
                    label_field="dataset.label_column",
                    max_rows=max_rows,
                    max_features=max_features,
                )
            return parse_npz(
                content,
                name=f"npz:{spec.path}",
                source=spec.path,
                max_rows=max_rows,
                max_features=max_features,
            )

        return (spec_json, str(path)), file_stamp(path), load_file
    if isinstance(spec, UploadSpec):
        path = upload_data_path(spec.id, upload_dir)
        return (
            (spec_json, str(path)),
            file_stamp(path),
            lambda: load_upload(spec.id, upload_dir, max_rows=max_rows, max_features=max_features),
        )
    raise TypeError(f"not a dataset spec: {spec!r}")  # pragma: no cover - the union is closed
