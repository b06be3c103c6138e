"""Models saved as safetensors: weights plus the architecture JSON in the file's metadata.

No pickle anywhere (``torch.load`` can execute code from a file). Loading builds the layers
on the meta device first and then assigns the file's tensors, so a file whose metadata
claims a huge architecture allocates nothing beyond what the file itself contains, and
every missing, unexpected or mis-shaped tensor is an error (strict load).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from safetensors.torch import save_file
from torch import nn

from worker.training.model import build_from_architecture

ARCHITECTURE_KEY = "architecture"  # safetensors metadata key holding the architecture JSON
_HEADER_LEN_BYTES = 8  # safetensors: little-endian u64 header length, then the JSON header


def save_model(
    model: nn.Module, architecture: dict[str, Any], path: str | os.PathLike[str]
) -> None:
    """Write ``model``'s state_dict (CPU, contiguous) and ``architecture`` to ``path``."""
    save_file(_cpu_tensors(model), os.fspath(path), metadata=_metadata(architecture))


def model_to_bytes(model: nn.Module, architecture: dict[str, Any]) -> bytes:
    """The same content as ``save_model`` writes, in memory (for artifact upload)."""
    return st_save(_cpu_tensors(model), metadata=_metadata(architecture))


def load_model(path: str | os.PathLike[str]) -> nn.Module:
    """Rebuild the model saved by ``save_model``; on CPU, in eval mode."""
    with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    return _rebuild(metadata, tensors)


def model_from_bytes(data: bytes) -> nn.Module:
    """Rebuild a model from ``model_to_bytes`` output; on CPU, in eval mode."""
    return _rebuild(_metadata_from_bytes(data), st_load(data))


def _rebuild(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> nn.Module:
    if ARCHITECTURE_KEY not in metadata:
        raise ValueError(f"checkpoint: no {ARCHITECTURE_KEY!r} in the safetensors metadata")
    try:
        architecture = json.loads(metadata[ARCHITECTURE_KEY])
    except json.JSONDecodeError as exc:
        raise ValueError(f"checkpoint: architecture is not valid JSON ({exc})") from None
    with torch.device("meta"):  # no real allocation until the file's tensors are assigned
        model = build_from_architecture(architecture)
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval()


def _cpu_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors writes raw buffers: each tensor must be contiguous and on the CPU.
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def _metadata(architecture: dict[str, Any]) -> dict[str, str]:
    return {ARCHITECTURE_KEY: json.dumps(architecture, sort_keys=True)}


def _metadata_from_bytes(data: bytes) -> dict[str, str]:
    # safetensors.torch.load() drops the metadata, so read it from the header directly.
    if len(data) < _HEADER_LEN_BYTES:
        raise ValueError("checkpoint: too short to be a safetensors file")
    (header_len,) = struct.unpack("<Q", data[:_HEADER_LEN_BYTES])
    if header_len > len(data) - _HEADER_LEN_BYTES:
        raise ValueError("checkpoint: header length exceeds the data")
    header = json.loads(data[_HEADER_LEN_BYTES : _HEADER_LEN_BYTES + header_len])
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise ValueError("checkpoint: malformed safetensors metadata")
    return metadata


__all__ = ["ARCHITECTURE_KEY", "load_model", "model_from_bytes", "model_to_bytes", "save_model"]
