"""The jobs table (SQLAlchemy 2.0 typed ORM). It lives in the same database as Optuna's tables.

Schema changes: tables are created on start (``create_all``, which never alters existing tables);
a change to an existing column ships as an idempotent ``ALTER`` in ``service.db.schema.MIGRATIONS``
keyed by a version number stored in ``hpo_schema_version``. Persisted enum values are only added.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import DateTime, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "hpo_jobs"
    __table_args__ = (UniqueConstraint("owner", "idempotency_key", name="uq_hpo_jobs_owner_idem"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), index=True)
    owner: Mapped[str] = mapped_column(String(100), index=True, default="local")
    study_name: Mapped[str] = mapped_column(String(200), unique=True)
    spec_json: Mapped[str] = mapped_column(Text)
    spec_hash: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), index=True, default="queued")
    n_trials: Mapped[int] = mapped_column(Integer)
    # Budget slots handed out (a trial asked or about to be asked); released when a trial fails.
    reserved: Mapped[int] = mapped_column(Integer, default=0)
    # COMPLETE + PRUNED trials told so far; the job succeeds when this reaches n_trials.
    finished: Mapped[int] = mapped_column(Integer, default=0)
    # Trials that failed for their own reason (not a worker crash).
    failures: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, index=True
    )
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class SchemaVersion(Base):
    __tablename__ = "hpo_schema_version"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
