from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from worker.training import (
    ARCHITECTURE_KEY,
    TensorSplits,
    TrialConfig,
    architecture_dict,
    load_model,
    model_from_bytes,
    model_to_bytes,
    save_model,
    train_trial,
)

CONFIG = TrialConfig(hidden_layers=(32, 16), batch_norm=True, dropout=0.2, max_epochs=2)


@pytest.fixture(scope="module")
def trained(digits: TensorSplits) -> tuple[torch.nn.Module, dict[str, object]]:
    # Trained, so BatchNorm running statistics are not their defaults and must round-trip.
    model = train_trial(CONFIG, digits).model
    return model, architecture_dict(digits.n_features, digits.n_classes, CONFIG)


def test_file_round_trip_gives_identical_outputs(
    trained: tuple[torch.nn.Module, dict[str, object]], digits: TensorSplits, tmp_path: Path
) -> None:
    model, arch = trained
    path = tmp_path / "model.safetensors"
    save_model(model, arch, path)
    loaded = load_model(path)
    assert not loaded.training
    with torch.inference_mode():
        assert torch.equal(loaded(digits.X_test), model(digits.X_test))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    assert json.loads(metadata[ARCHITECTURE_KEY]) == arch


def test_bytes_round_trip(
    trained: tuple[torch.nn.Module, dict[str, object]], digits: TensorSplits, tmp_path: Path
) -> None:
    model, arch = trained
    blob = model_to_bytes(model, arch)
    assert isinstance(blob, bytes)
    path = tmp_path / "uploaded.safetensors"
    path.write_bytes(blob)  # the bytes are a regular safetensors file
    with torch.inference_mode():
        expected = model(digits.X_val)
        assert torch.equal(load_model(path)(digits.X_val), expected)
        assert torch.equal(model_from_bytes(blob)(digits.X_val), expected)


def test_file_without_architecture_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bare.safetensors"
    save_file({"0.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ValueError, match="architecture"):
        load_model(path)


def test_tensors_must_match_the_architecture(
    trained: tuple[torch.nn.Module, dict[str, object]], tmp_path: Path
) -> None:
    model, arch = trained
    path = tmp_path / "wrong.safetensors"
    save_model(model, {**arch, "hidden_layers": [33, 16]}, path)
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_model(path)
    save_model(model, {**arch, "batch_norm": False}, path)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        load_model(path)


def test_garbage_bytes_are_rejected() -> None:
    with pytest.raises(ValueError, match="checkpoint"):
        model_from_bytes(b"\x00" * 4)
    with pytest.raises(ValueError, match="checkpoint"):
        model_from_bytes((10**9).to_bytes(8, "little") + b"{}")
