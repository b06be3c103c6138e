"""A job's data splits as tensors resident on the training device, plus device/thread setup.

The split itself (seeded, fixed per job) is made elsewhere from numpy arrays; this module
only moves it to the device once per worker process so every trial reuses the same tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from service.errors import DatasetError
from worker.cpus import available_cpus

_SPLITS = ("train", "val", "test")
_T = TypeVar("_T")


@dataclass
class TensorSplits:
    """X_* float32 (n, n_features), y_* int64 (n,), all on one device.

    ``n_classes`` = 0 means "infer": max label over all splits + 1. Shapes, dtypes, the device
    and the label range are checked on construction (one host sync, once per dataset).
    """

    X_train: torch.Tensor
    y_train: torch.Tensor
    X_val: torch.Tensor
    y_val: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int = 0
    # Tensors derived from the splits (see ``derived``), kept as long as the splits are.
    _derived: dict[Hashable, Any] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        device = self.X_train.device
        n_features = self.X_train.shape[1] if self.X_train.dim() == 2 else -1
        for split in _SPLITS:
            X, y = getattr(self, f"X_{split}"), getattr(self, f"y_{split}")
            if X.dim() != 2 or X.shape[1] != n_features or X.dtype != torch.float32:
                raise DatasetError(
                    f"must be float32 of shape (n, {n_features}), got {X.dtype} {tuple(X.shape)}",
                    field=f"X_{split}",
                )
            if y.dim() != 1 or y.shape[0] != X.shape[0] or y.dtype != torch.int64:
                raise DatasetError(
                    f"must be int64 of shape ({X.shape[0]},), got {y.dtype} {tuple(y.shape)}",
                    field=f"y_{split}",
                )
            for name, t in ((f"X_{split}", X), (f"y_{split}", y)):
                if t.device != device:
                    raise DatasetError(
                        f"all splits must be on one device: X_train is on {device}, "
                        f"this is on {t.device}",
                        field=name,
                    )
        for split in ("train", "val"):  # the test split may be empty; these two may not
            if getattr(self, f"y_{split}").shape[0] == 0:
                raise DatasetError("must not be empty", field=f"X_{split}")
        labels = torch.cat([self.y_train, self.y_val, self.y_test])
        lo, hi = int(labels.min()), int(labels.max())
        if self.n_classes == 0:
            self.n_classes = hi + 1
        if lo < 0 or hi >= self.n_classes:
            raise DatasetError(
                f"labels must lie in [0, {self.n_classes}), got [{lo}, {hi}]", field="y"
            )
        if self.n_classes < 2:
            raise DatasetError(f"need at least 2 classes, got {self.n_classes}", field="y")

    @property
    def n_features(self) -> int:
        return int(self.X_train.shape[1])

    @property
    def device(self) -> torch.device:
        return self.X_train.device

    def derived(self, key: Hashable, make: Callable[[], _T]) -> _T:
        """``make()``, computed once per splits object and ``key`` and then reused.

        For tensors derived from the (immutable) splits that every trial of a worker process
        would otherwise recompute: e.g. a population's training inputs (``worker.population``).
        """
        if key not in self._derived:
            self._derived[key] = make()
        return self._derived[key]  # type: ignore[no-any-return]

    def to(self, device: torch.device | str) -> TensorSplits:
        """The same splits on ``device`` (self if already there)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            # Tensors report cuda:N, and torch.device("cuda") != torch.device("cuda:0"): without
            # this every call would build new splits (and lose what ``derived`` cached).
            device = torch.device("cuda", torch.cuda.current_device())
        if self.device == device:
            return self
        return TensorSplits(
            X_train=self.X_train.to(device),
            y_train=self.y_train.to(device),
            X_val=self.X_val.to(device),
            y_val=self.y_val.to(device),
            X_test=self.X_test.to(device),
            y_test=self.y_test.to(device),
            n_classes=self.n_classes,
        )


def to_tensors(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_val: np.ndarray,
    y_val: np.ndarray,
    X_test: np.ndarray,
    y_test: np.ndarray,
    device: torch.device | str = "cpu",
    *,
    n_classes: int = 0,
) -> TensorSplits:
    """Copy numpy splits to ``device`` as float32 features / int64 labels.

    Non-finite features or non-integer labels raise DatasetError: either would surface much
    later as a "diverged" trial and blame the hyperparameters for a data problem.
    """
    arrays = {"train": (X_train, y_train), "val": (X_val, y_val), "test": (X_test, y_test)}
    tensors: dict[str, torch.Tensor] = {}
    for split, (X, y) in arrays.items():
        X, y = np.asarray(X), np.asarray(y)
        if X.dtype.kind not in "biuf":
            raise DatasetError(f"features must be numeric, got {X.dtype}", field=f"X_{split}")
        if y.dtype.kind not in "iu":
            raise DatasetError(f"labels must be integers, got {y.dtype}", field=f"y_{split}")
        X32 = np.ascontiguousarray(X, dtype=np.float32)
        if not np.isfinite(X32).all():
            raise DatasetError("features contain NaN or inf", field=f"X_{split}")
        # torch.tensor copies: the dataset cache hands out read-only arrays shared by all trials.
        tensors[f"X_{split}"] = torch.tensor(X32, device=device)
        tensors[f"y_{split}"] = torch.tensor(np.ascontiguousarray(y, dtype=np.int64), device=device)
    return TensorSplits(**tensors, n_classes=n_classes)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> cuda if available else cpu; an explicit cuda without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"device: {name!r} is not a torch device ({exc})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device: {name!r} requested but this torch has no usable CUDA "
                f"(torch {torch.__version__}); use 'cpu' or 'auto'"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device: {name!r} requested but only {torch.cuda.device_count()} GPU(s) visible"
            )
    elif device.type != "cpu":
        raise ValueError(f"device: must be 'auto', 'cpu' or 'cuda[:i]', got {name!r}")
    return device


def configure_cpu_threads(n_processes: int) -> int:
    """Give each of ``n_processes`` workers on this machine an equal share of the cores.

    torch defaults to one intra-op thread per core in *every* process; n workers would then
    run n x cores threads and thrash. Returns the thread count set.
    """
    if n_processes < 1:
        raise ValueError(f"n_processes: must be >= 1, got {n_processes}")
    threads = max(1, available_cpus() // n_processes)
    torch.set_num_threads(threads)
    return threads


__all__ = ["TensorSplits", "configure_cpu_threads", "resolve_device", "to_tensors"]
