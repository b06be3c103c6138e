"""Population training: trials of one architecture trained together as one stacked model.

Each member keeps its own hyperparameters, data order, early stopping and pruning, and its
result equals the same trial trained alone by ``worker.training.train_trial`` (within float
tolerance; in distribution with dropout). See ``trainer`` for the rules, ``stacked`` for the
batched model, ``optimizers`` for the batched torch.optim equivalents and ``fused_update``
for the one-kernel update of a whole stack on CUDA.
"""

from worker.population.fused_update import FusedStackOptimizer, stack_optimizer
from worker.population.optimizers import (
    BatchedAdagrad,
    BatchedAdam,
    BatchedOptimizer,
    BatchedRMSprop,
    BatchedSGD,
    MixedBatchedOptimizer,
    build_batched_optimizer,
    optimizer_order,
)
from worker.population.sizing import auto_population_size
from worker.population.stacked import StackedMLP
from worker.population.trainer import (
    AUTOCAST_MODES,
    POPULATION_KEY_FIELDS,
    group_configs,
    population_key,
    train_population,
)

__all__ = [
    "AUTOCAST_MODES",
    "POPULATION_KEY_FIELDS",
    "BatchedAdagrad",
    "BatchedAdam",
    "BatchedOptimizer",
    "BatchedRMSprop",
    "BatchedSGD",
    "FusedStackOptimizer",
    "MixedBatchedOptimizer",
    "StackedMLP",
    "auto_population_size",
    "build_batched_optimizer",
    "group_configs",
    "optimizer_order",
    "population_key",
    "stack_optimizer",
    "train_population",
]
