"""The job spec: one pydantic model used unchanged by ``hpo run`` files and the REST API body."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from search_spaces import (
    ACTIVATIONS,
    GridError,
    PresetNotFoundError,
    SearchSpace,
    enumerate_grid,
    grid_size,
    load_preset,
)
from service import defaults
from service.datasets.spec import DatasetSpec, DigitsSpec
from service.errors import SpecError

_STRICT = ConfigDict(extra="forbid")


class ModelSpec(BaseModel):
    model_config = _STRICT

    hidden_layers: list[int] = Field(
        default=[128], min_length=1, description="Hidden layer widths."
    )
    activation: Literal[ACTIVATIONS] = "relu"  # type: ignore[valid-type]
    batch_norm: bool = Field(
        default=False, description="BatchNorm1d before each hidden activation."
    )

    @field_validator("hidden_layers")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(w < 1 for w in v):
            raise ValueError("every hidden layer width must be >= 1")
        return v


class SamplerSpec(BaseModel):
    model_config = _STRICT

    type: Literal["random", "grid", "tpe"] = "random"
    seed: int | None = Field(default=0, description="Sampler seed; null for a fresh seed.")
    n_startup_trials: int = Field(
        default=10, ge=0, description="TPE: random trials before modelling."
    )


class PrunerSpec(BaseModel):
    model_config = _STRICT

    type: Literal["none", "median", "percentile", "successive_halving", "hyperband"] = "median"
    n_startup_trials: int = Field(
        default=5, ge=0, description="median/percentile: trials before pruning."
    )
    n_warmup_steps: int = Field(
        default=2, ge=0, description="median/percentile: epochs before pruning."
    )
    percentile: float = Field(
        default=25.0, gt=0, lt=100, description="percentile pruner's percentile."
    )
    min_resource: int = Field(
        default=1, ge=1, description="successive_halving/hyperband: min epochs."
    )
    reduction_factor: int = Field(default=3, ge=2, description="successive_halving/hyperband.")


class EarlyStoppingSpec(BaseModel):
    model_config = _STRICT

    patience: int = Field(
        default=defaults.PATIENCE, ge=1, description="Epochs without improvement."
    )
    min_delta: float = Field(
        default=0.0, ge=0, description="Smallest change that counts as improvement."
    )


class TrainingSpec(BaseModel):
    model_config = _STRICT

    max_epochs: int = Field(default=defaults.MAX_EPOCHS, ge=1)
    batch_size: int = Field(default=defaults.BATCH_SIZE, ge=1)
    validation_split: float = Field(default=defaults.VALIDATION_SPLIT, gt=0, lt=1)
    test_split: float = Field(default=defaults.TEST_SPLIT, ge=0, lt=1)
    early_stopping: EarlyStoppingSpec | None = Field(
        default_factory=EarlyStoppingSpec, description="Per-trial patience; null disables it."
    )
    split_seed: int = Field(default=defaults.SPLIT_SEED, description="Seed of the fixed split.")
    seed: int = Field(default=0, description="Base seed; each trial's seed derives from it.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16", "tf32"] = Field(
        default="fp32",
        description="Matmul precision. fp32: each trial's result equals the trial trained alone. "
        "bf16: matmul inputs in bfloat16, weights, loss and optimizer in fp32 (about 2x the "
        "matmul throughput on CPUs with AVX512-BF16 or AMX, and on GPUs; results differ from "
        "fp32 in the last digits and are not bitwise reproducible across precisions). tf32: "
        "TensorFloat-32 matmuls on CUDA, fp32 elsewhere.",
    )
    train_subset: int | None = Field(
        default=None,
        ge=2,
        description="Keep only this many training samples (seeded, stratified), e.g. the lectures' "
        "overfitting set-up with 300; validation and test splits are unchanged.",
    )
    target_accuracy: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Record per trial the first epoch whose validation accuracy reaches this value.",
    )

    @model_validator(mode="after")
    def _splits_leave_training_data(self) -> TrainingSpec:
        if self.validation_split + self.test_split >= 0.9:
            raise ValueError(
                f"validation_split + test_split = {self.validation_split + self.test_split:g} "
                "leaves less than 10% for training"
            )
        return self


def _space_kind(v: Any) -> str:
    # A string is a preset name, anything else an inline space: only that branch reports errors.
    return "str" if isinstance(v, str) else "SearchSpace"


class JobSpec(BaseModel):
    """A search job. Invariants after validation: the search space resolves (preset or inline),
    a grid job has finite values for every parameter, and a non-grid job has ``n_trials``."""

    model_config = _STRICT

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$", description="Job name.")
    dataset: DatasetSpec = Field(default_factory=DigitsSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    search_space: Annotated[
        Annotated[str, Tag("str")] | Annotated[SearchSpace, Tag("SearchSpace")],
        Discriminator(_space_kind),
    ] = Field(
        default="default", description="A preset name from search_spaces/ or an inline space."
    )
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    n_trials: int | None = Field(
        default=None, ge=1, description="Trial budget; grid: the grid size."
    )
    objective: Literal["val_accuracy", "val_loss"] = "val_accuracy"
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    pruner: PrunerSpec = Field(default_factory=PrunerSpec)

    @field_validator("search_space")
    @classmethod
    def _known_preset(cls, v: str | SearchSpace) -> str | SearchSpace:
        if isinstance(v, str):
            try:
                load_preset(v)
            except PresetNotFoundError as e:
                raise ValueError(str(e)) from None
        return v

    @model_validator(mode="after")
    def _budget(self) -> JobSpec:
        space = self.resolved_space()
        if self.sampler.type == "grid":
            try:
                size = grid_size(space)
            except GridError as e:
                raise ValueError(f"search_space: {e}") from None
            if self.n_trials is not None and self.n_trials != size:
                raise ValueError(
                    f"n_trials: {self.n_trials} must equal the grid size ({size}) or be omitted"
                )
        elif self.n_trials is None:
            raise ValueError(f"n_trials: required for the {self.sampler.type} sampler")
        return self

    # Derived -----------------------------------------------------------------------------------
    def resolved_space(self) -> SearchSpace:
        return (
            load_preset(self.search_space)
            if isinstance(self.search_space, str)
            else self.search_space
        )

    def budget(self) -> int:
        """The number of trials that finish the job (COMPLETE + PRUNED)."""
        if self.sampler.type == "grid":
            return grid_size(self.resolved_space())
        assert self.n_trials is not None
        return self.n_trials

    def grid_points(self, *, limit: int) -> list[dict[str, Any]]:
        return enumerate_grid(self.resolved_space(), limit=limit)

    @property
    def direction(self) -> Literal["maximize", "minimize"]:
        return "maximize" if self.objective == "val_accuracy" else "minimize"


# Parsing with clear errors ----------------------------------------------------------------------


def format_validation_error(
    err: ValidationError,
    *,
    prefix: str = "",
    lines: dict[str, int] | None = None,
    source: str | None = None,
) -> SpecError:
    """One SpecError listing every problem as ``field: message`` (with file:line when known)."""
    problems: list[dict[str, str]] = []
    for e in err.errors():
        msg = e["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field (not part of the job spec)"
        parts, msg = error_location(e["loc"], msg)
        field = ".".join(([prefix] if prefix else []) + parts)
        item = {"field": field or "(root)", "message": msg}
        line = _line_for(lines, parts) if lines else None
        if source:
            item["location"] = f"{source}:{line}" if line else source
        problems.append(item)
    text = "; ".join(
        (f"{p['location']}: " if "location" in p else "") + f"{p['field']}: {p['message']}"
        for p in problems
    )
    return SpecError(text, field=problems[0]["field"] if problems else None, errors=problems)


# "parameters.momentum.when: ..." or "n_trials: ...": a validator that sees several fields at once
# (a search space, the budget) names the one it means at the start of its message.
_PATH_PREFIX = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*): (.+)$", re.DOTALL)


def error_location(loc: tuple[Any, ...] | list[Any], msg: str) -> tuple[list[str], str]:
    """The user-facing path of a pydantic error (union tags dropped, a field named at the start
    of a model-level message moved into the path) and the message without that prefix."""
    parts = [str(p) for p in loc if not _is_union_tag(p)]
    m = _PATH_PREFIX.match(msg)
    if m is not None:
        path = m.group(1).split(".")
        at_space = bool(parts) and parts[-1] == "search_space"
        if (path[0] == "parameters" and (at_space or not parts)) or (
            not parts and path[0] in JobSpec.model_fields
        ):
            return parts + path, m.group(2)
    return parts, msg


_UNION_TAGS = {
    "float",
    "int",
    "categorical",
    "fixed",
    "str",
    "SearchSpace",
    "function-after[_check(), FloatParam]",
}


def _is_union_tag(p: Any) -> bool:
    # pydantic inserts the chosen union member into the location; drop it from user-facing paths
    if not isinstance(p, str):
        return False
    return (
        p in _UNION_TAGS
        or p.startswith(("function-", "tagged-union["))
        or p
        in {
            "digits",
            "mnist",
            "fashion_mnist",
            "synthetic",
            "csv",
            "npz",
            "upload",
        }
        or p.endswith("Param")
        or p == "EarlyStoppingSpec"
    )


def _line_for(lines: dict[str, int], parts: list[str]) -> int | None:
    for n in range(len(parts), -1, -1):
        key = ".".join(parts[:n])
        if key in lines:
            return lines[key]
    return None


def _yaml_lines(text: str) -> dict[str, int]:
    """Map dotted key paths of a YAML document to 1-based line numbers (for error messages)."""
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, path: list[str]) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                p = [*path, str(k.value)]
                lines[".".join(p)] = k.start_mark.line + 1
                walk(v, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                p = [*path, str(i)]
                lines[".".join(p)] = v.start_mark.line + 1
                walk(v, p)

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines
    if root is not None:
        lines[""] = 1
        walk(root, [])
    return lines


def parse_spec_text(text: str, *, source: str = "<spec>") -> JobSpec:
    """Parse YAML or JSON text into a JobSpec; every error names the field, file and line."""
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"{source}:{mark.line + 1}" if mark else source
        raise SpecError(f"{where}: not valid YAML/JSON: {e.problem}", field=None) from None
    except yaml.YAMLError as e:
        raise SpecError(f"{source}: not valid YAML/JSON: {e}") from None
    if not isinstance(data, dict):
        raise SpecError(
            f"{source}: a job spec must be a mapping of fields, got {type(data).__name__}"
        )
    try:
        return JobSpec.model_validate(data)
    except ValidationError as e:
        raise format_validation_error(e, lines=_yaml_lines(text), source=source) from None


def load_spec_file(path: str | Path) -> JobSpec:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{p}: no such file", field="spec") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"{p}: cannot read: {e}", field="spec") from None
    return parse_spec_text(text, source=str(p))


def spec_to_json(spec: JobSpec) -> str:
    # Not sort_keys: the order of search_space.parameters is meaningful (a `when` refers to an
    # earlier parameter, and parameters are sampled in order); model fields dump in a fixed order.
    return json.dumps(spec.model_dump(mode="json"))


__all__ = [
    "EarlyStoppingSpec",
    "JobSpec",
    "ModelSpec",
    "PrunerSpec",
    "SamplerSpec",
    "TrainingSpec",
    "error_location",
    "format_validation_error",
    "load_spec_file",
    "parse_spec_text",
    "spec_to_json",
]
