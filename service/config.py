"""Typed settings, read once at the edge (CLI / app factory) and passed inward explicitly."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service import defaults


class Settings(BaseSettings):
    """Every knob of the service; environment variables use the ``HPO_`` prefix."""

    model_config = SettingsConfigDict(env_prefix="HPO_", extra="ignore")

    data_root: Path = Field(
        default=Path(defaults.DATA_ROOT), description="Database, uploads, artifacts."
    )
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default: SQLite file under data_root."
    )
    data_dir: Path | None = Field(
        default=None,
        description="Where MNIST / Fashion-MNIST IDX files live (default data_root/datasets).",
    )
    artifact_dir: Path | None = Field(
        default=None, description="Model weights (default data_root/artifacts)."
    )
    upload_dir: Path | None = Field(
        default=None, description="Uploaded datasets (default data_root/uploads)."
    )

    # API
    host: str = "127.0.0.1"
    port: int = 8000
    keep_alive_s: int = Field(
        default=defaults.KEEP_ALIVE_S,
        ge=1,
        description="How long the API keeps an idle HTTP connection open. Longer than a "
        "client's own idle expiry (httpx: 5 s), so a client never sends on a connection the "
        "server is closing at the same moment.",
    )
    api_tokens: str = Field(
        default="",
        description="Comma-separated 'owner:token' pairs (or bare tokens); empty disables auth (loopback only).",
    )

    # Worker
    heartbeat_interval_s: int = defaults.HEARTBEAT_INTERVAL_S
    heartbeat_grace_s: int = defaults.HEARTBEAT_GRACE_S
    max_trial_retries: int = defaults.MAX_TRIAL_RETRIES
    max_trial_failures: int = defaults.MAX_TRIAL_FAILURES
    poll_interval_s: float = defaults.POLL_INTERVAL_S
    stop_grace_s: float = defaults.STOP_GRACE_S
    storage_retry_s: float = Field(
        default=defaults.STORAGE_RETRY_S,
        description="How long a running trial rides out an unreachable database before it is "
        "abandoned to the stale-trial reaper (which fails and re-queues it).",
    )
    epoch_report_interval_s: float = Field(
        default=defaults.EPOCH_REPORT_INTERVAL_S,
        ge=0,
        description="A worker writes its running trials' epoch values (intermediate values) "
        "at most this often, and each trial's with its result: live curves lag by about this. "
        "0 writes every epoch.",
    )
    device: str = Field(default="auto", description="auto | cpu | cuda")
    torch_threads: int | None = Field(
        default=None,
        description="torch intra-op threads per worker; with N workers on one machine use cores/N.",
    )
    population: int | None = Field(
        default=None, description="Trials trained together; None = automatic."
    )
    flush_denormals: bool = Field(
        default=True,
        description="Flush denormal floats (below 1.2e-38) to zero while training on CPU: "
        "x86 computes with them through a slow assist (measured: the benchmark's population "
        "run took 20% less time). false keeps IEEE denormals.",
    )
    worker_processes: str = Field(
        default="1",
        description="Worker processes per `hpo worker`, each with its share of the cores: a "
        "number, or 'auto' (one per CPU on CPU, one with CUDA).",
    )
    worker_siblings: int = Field(
        default=1,
        ge=1,
        description="Worker processes started together by one supervisor (set for its "
        "children): they share a job's pruner start-up trials instead of each taking them all, "
        "and each takes at most its share of a job's unfinished trials.",
    )

    # Limits
    max_n_trials: int = defaults.MAX_N_TRIALS
    max_epochs: int = defaults.MAX_EPOCHS_LIMIT
    max_hidden_width: int = defaults.MAX_HIDDEN_WIDTH
    max_hidden_layers: int = defaults.MAX_HIDDEN_LAYERS
    max_parameters: int = defaults.MAX_PARAMETERS
    max_grid_size: int = defaults.MAX_GRID_SIZE
    max_upload_bytes: int = defaults.MAX_UPLOAD_BYTES
    max_dataset_rows: int = defaults.MAX_DATASET_ROWS
    max_dataset_features: int = defaults.MAX_DATASET_FEATURES
    max_active_jobs_per_owner: int = defaults.MAX_ACTIVE_JOBS_PER_OWNER
    max_request_bytes: int = defaults.MAX_REQUEST_BYTES

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        if v not in {"auto", "cpu", "cuda"}:
            raise ValueError("must be one of auto, cpu, cuda")
        return v

    @field_validator("worker_processes")
    @classmethod
    def _check_worker_processes(cls, v: str) -> str:
        v = v.strip().lower()
        if v != "auto" and not (v.isdigit() and int(v) >= 1):
            raise ValueError("must be 'auto' or a number >= 1")
        return v

    # Derived paths --------------------------------------------------------------------------
    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_root / defaults.DATABASE_FILE).resolve()}"

    @property
    def resolved_data_dir(self) -> Path:
        return self.data_dir or self.data_root / "datasets"

    @property
    def resolved_artifact_dir(self) -> Path:
        return self.artifact_dir or self.data_root / "artifacts"

    @property
    def resolved_upload_dir(self) -> Path:
        return self.upload_dir or self.data_root / "uploads"

    def upload_dir_for(self, owner: str) -> Path:
        """Each owner's uploads live in their own folder (another owner's ids are not found)."""
        slug = re.sub(r"[^A-Za-z0-9_.-]", "_", owner)[:100].lstrip(".") or "_"
        return self.resolved_upload_dir / slug

    def token_owners(self) -> dict[str, str]:
        """Map token -> owner. 'alice:s3cret' gives owner alice; a bare token is its own owner."""
        owners: dict[str, str] = {}
        for item in (p.strip() for p in self.api_tokens.split(",")):
            if not item:
                continue
            owner, sep, token = item.partition(":")
            owners[token if sep else owner] = owner if sep else f"token-{len(owners) + 1}"
        return owners
