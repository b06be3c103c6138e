"""The service's data layer: engines for the shared database, the jobs table, its operations."""

from service.db.engine import configure_sqlite, engine_kwargs, is_sqlite, make_engine, reader
from service.db.jobs import JobStore, new_job_id, spec_hash, study_name_for
from service.db.models import Base, Job
from service.db.schema import SCHEMA_VERSION, create_schema

__all__ = [
    "SCHEMA_VERSION",
    "Base",
    "Job",
    "JobStore",
    "configure_sqlite",
    "create_schema",
    "engine_kwargs",
    "is_sqlite",
    "make_engine",
    "new_job_id",
    "reader",
    "spec_hash",
    "study_name_for",
]
