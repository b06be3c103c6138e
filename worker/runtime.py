"""Per-process, per-job state a worker keeps: the parsed spec, the study, the resident tensors."""

from __future__ import annotations

import json
import logging
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
import torch

from service.config import Settings
from service.datasets import Splits, load_dataset, make_splits
from service.db import Job
from service.spec import JobSpec
from service.startup import freeze_startup_objects
from service.studies import load_job_study
from worker.training import TensorSplits, resolve_device, to_tensors
from worker.training.matmul_speed import bf16_warning, cpu_bf16_speedup

log = logging.getLogger(__name__)


def warm_up() -> None:
    """Pay the process's one-off costs before the first job, not inside it.

    The first ``torch.optim`` optimizer a process builds imports ``torch._dynamo`` (about 1 s
    here), the first split imports scikit-learn (about 1.3 s) and the first matmul starts the
    intra-op thread pool. A worker is long-lived, so paying these at start keeps them out of
    the first job's trials (measured in the service benchmark, bench/run.py). Then the objects
    alive are frozen out of garbage collection (``freeze_startup_objects``).
    """
    from sklearn.model_selection import train_test_split  # noqa: F401  (make_splits')

    from worker.population import StackedMLP  # noqa: F401  (the population trainer's imports)

    weight = torch.zeros(4, 4, requires_grad=True)
    torch.optim.Adam([weight]).zero_grad()
    torch.mm(weight.detach(), weight.detach())
    freeze_startup_objects()  # last: what the imports above left, out of the collector's way


@dataclass
class JobRuntime:
    job_id: str
    spec: JobSpec
    study: optuna.Study
    data: TensorSplits
    device: torch.device
    n_features: int
    n_classes: int


@dataclass
class RuntimeCache:
    """Datasets are loaded and split once per process per job, not once per trial."""

    settings: Settings
    storage: optuna.storages.BaseStorage
    allow_local_paths: bool = False
    _jobs: dict[str, JobRuntime] = field(default_factory=dict)

    def get(self, job: Job) -> JobRuntime:
        rt = self._jobs.get(job.id)
        if rt is None:
            rt = self._load(job)
            self._jobs[job.id] = rt
        return rt

    def forget(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)

    def _load(self, job: Job) -> JobRuntime:
        spec = JobSpec.model_validate(json.loads(job.spec_json))
        device_name = (
            spec.training.device if spec.training.device != "auto" else self.settings.device
        )
        device = resolve_device(device_name)
        if spec.training.precision == "bf16" and device.type == "cpu":
            warning = bf16_warning(cpu_bf16_speedup())
            if warning is not None:
                log.warning("job %s: %s", job.id, warning)
        ds = load_dataset(
            spec.dataset,
            data_dir=self.settings.resolved_data_dir,
            upload_dir=self.settings.upload_dir_for(job.owner),
            allow_local_paths=self.allow_local_paths,
        )
        sp = make_splits(
            ds,
            validation_split=spec.training.validation_split,
            test_split=spec.training.test_split,
            seed=spec.training.split_seed,
        )
        data = resident_splits(sp, spec.training.train_subset, spec.training.split_seed, device)
        study = load_job_study(self.storage, job.study_name, spec)
        return JobRuntime(job.id, spec, study, data, device, sp.n_features, sp.n_classes)


# Per process: the resident tensors of each cached split (service.datasets.make_splits hands
# out the same Splits object for the same dataset and split parameters), so a job on data an
# earlier job used starts without copying it again, and the tensors derived from it
# (TensorSplits.derived: a population's live-feature inputs) are computed once per process.
# Measured on the bench's MNIST split: 10-40 ms per job for the copy alone, paid by every
# worker process between a job's POST and its first trial. Entries go when their Splits does
# (the dataset cache holds a few datasets; see service.datasets.loader.CACHE_SIZE).
_resident: weakref.WeakKeyDictionary[Splits, dict[tuple[int | None, int, str], TensorSplits]] = (
    weakref.WeakKeyDictionary()
)
_resident_lock = threading.Lock()


def resident_splits(
    sp: Splits, train_subset: int | None, seed: int, device: torch.device
) -> TensorSplits:
    """``sp`` as tensors on ``device`` (training rows subsampled to ``train_subset``), one
    object per process for the same split, subset, seed and device. Shared by every job that
    asks for it, so nobody may write into its tensors (nothing does: trainers only read them)."""
    key = (train_subset, seed, str(device))
    with _resident_lock:
        hit = _resident.get(sp, {}).get(key)
    if hit is not None:
        return hit
    X_train, y_train = sp.X_train, sp.y_train
    if train_subset is not None and train_subset < len(y_train):
        X_train, y_train = subsample(X_train, y_train, train_subset, seed=seed)
    data = to_tensors(
        X_train, y_train, sp.X_val, sp.y_val, sp.X_test, sp.y_test, device, n_classes=sp.n_classes
    )
    with _resident_lock:
        return _resident.setdefault(sp, {}).setdefault(key, data)


def subsample(X: np.ndarray, y: np.ndarray, n: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded, stratified subset of n training rows (every class kept when n allows)."""
    from sklearn.model_selection import train_test_split

    n_classes = len(np.unique(y))
    stratify = y if n >= n_classes else None
    X_sub, _, y_sub, _ = train_test_split(X, y, train_size=n, random_state=seed, stratify=stratify)
    return np.ascontiguousarray(X_sub), np.ascontiguousarray(y_sub)


def describe(rt: JobRuntime) -> dict[str, Any]:
    return {
        "job_id": rt.job_id,
        "train": int(rt.data.X_train.shape[0]),
        "val": int(rt.data.X_val.shape[0]),
        "test": int(rt.data.X_test.shape[0]),
        "features": rt.n_features,
        "classes": rt.n_classes,
        "device": str(rt.device),
    }
