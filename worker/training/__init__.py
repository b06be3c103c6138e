"""Training one trial: config, MLP, init schemes, optimizers, the training loop, checkpoints.

Independent of Optuna: the worker's Optuna glue resolves a trial's parameters into a
``TrialConfig`` and calls ``train_trial`` with an ``on_epoch`` callback that reports, prunes
and checks for cancellation.
"""

from worker.training.checkpoint import (
    ARCHITECTURE_KEY,
    load_model,
    model_from_bytes,
    model_to_bytes,
    save_model,
)
from worker.training.config import (
    ACTIVATIONS,
    INITS,
    LR_SCHEDULES,
    OBJECTIVES,
    OPTIMIZERS,
    TrialConfig,
)
from worker.training.data import TensorSplits, configure_cpu_threads, resolve_device, to_tensors
from worker.training.init import LEAKY_RELU_SLOPE, apply_init
from worker.training.loop import EVAL_BATCH_SIZE, EpochMetrics, TrialResult, evaluate, train_trial
from worker.training.model import (
    architecture_dict,
    build_from_architecture,
    build_mlp,
    count_parameters,
    make_activation,
)
from worker.training.optimizers import (
    DEFAULT_MOMENTUM,
    DEFAULT_RMSPROP_MOMENTUM,
    FUSED_ON_CPU,
    build_optimizer,
    build_scheduler,
)

__all__ = [
    "ACTIVATIONS",
    "ARCHITECTURE_KEY",
    "DEFAULT_MOMENTUM",
    "DEFAULT_RMSPROP_MOMENTUM",
    "EVAL_BATCH_SIZE",
    "FUSED_ON_CPU",
    "INITS",
    "LEAKY_RELU_SLOPE",
    "LR_SCHEDULES",
    "OBJECTIVES",
    "OPTIMIZERS",
    "EpochMetrics",
    "TensorSplits",
    "TrialConfig",
    "TrialResult",
    "apply_init",
    "architecture_dict",
    "build_from_architecture",
    "build_mlp",
    "build_optimizer",
    "build_scheduler",
    "configure_cpu_threads",
    "count_parameters",
    "evaluate",
    "load_model",
    "make_activation",
    "model_from_bytes",
    "model_to_bytes",
    "resolve_device",
    "save_model",
    "to_tensors",
    "train_trial",
]
