"""Re-check a saved model against the job's own validation split, rebuilt from the spec."""

from __future__ import annotations

from pathlib import Path

from service.spec import JobSpec


def split_accuracy(model_path: Path, spec: JobSpec, data_root: Path) -> dict[str, float]:
    """Load the safetensors file and evaluate it on the job's validation (and test) split,
    rebuilt exactly as a worker does: ``load_dataset`` + ``make_splits`` with the spec's settings."""
    import torch

    from service.datasets import load_dataset, make_splits
    from worker.training import evaluate, load_model

    ds = load_dataset(
        spec.dataset,
        data_dir=data_root / "datasets",
        upload_dir=data_root / "uploads" / "local",
        allow_local_paths=False,
    )
    sp = make_splits(
        ds,
        validation_split=spec.training.validation_split,
        test_split=spec.training.test_split,
        seed=spec.training.split_seed,
    )
    model = load_model(model_path)
    val_loss, val_acc = evaluate(model, torch.tensor(sp.X_val), torch.tensor(sp.y_val))
    out = {"val_accuracy": val_acc, "val_loss": val_loss, "n_val": float(len(sp.y_val))}
    if len(sp.y_test):
        _, out["test_accuracy"] = evaluate(model, torch.tensor(sp.X_test), torch.tensor(sp.y_test))
    return out
