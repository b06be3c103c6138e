"""Shared fixtures: offline, no network, fresh caches, and an IDX file writer."""

from __future__ import annotations

import gzip
import struct
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

# The repo root, so `service` imports under plain `pytest` before the project is installed.
_ROOT = Path(__file__).resolve().parents[3]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from service.datasets import clear_dataset_cache, idx  # noqa: E402

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049


@pytest.fixture(autouse=True)
def _offline_fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("HPO_OFFLINE", "1")

    def no_network(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a test tried to reach the network")

    monkeypatch.setattr(idx, "_urlopen", no_network)
    clear_dataset_cache()
    yield
    clear_dataset_cache()


def _idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


WriteIdx = Callable[..., tuple[np.ndarray, np.ndarray]]


@pytest.fixture
def write_idx() -> WriteIdx:
    """write(folder, split="train", n=60, gz=True, seed=0) -> (images, labels) it wrote."""

    def write(
        folder: Path, split: str = "train", n: int = 60, *, gz: bool = True, seed: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
        prefix = "train" if split == "train" else "t10k"
        folder.mkdir(parents=True, exist_ok=True)
        for base, array, magic in (
            (f"{prefix}-images-idx3-ubyte", images, IMAGES_MAGIC),
            (f"{prefix}-labels-idx1-ubyte", labels, LABELS_MAGIC),
        ):
            data = _idx_bytes(array, magic)
            if gz:
                (folder / f"{base}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / base).write_bytes(data)
        return images, labels

    return write


@pytest.fixture
def idx_bytes() -> Callable[[np.ndarray, int], bytes]:
    """idx_bytes(array, magic) -> the IDX encoding of a uint8 array."""
    return _idx_bytes


@pytest.fixture
def tree() -> Callable[[Path], set[str]]:
    """tree(root) -> every path under root, to assert that nothing was created."""

    def list_tree(root: Path) -> set[str]:
        return {str(p.relative_to(root)) for p in root.rglob("*")}

    return list_tree
