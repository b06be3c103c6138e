"""Create the schema on start and apply forward-only migrations."""

from __future__ import annotations

import time

from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import Session

from service.db.models import Base, SchemaVersion

SCHEMA_VERSION = 1
# version -> SQL statements that bring a database from version-1 to version (idempotent).
MIGRATIONS: dict[int, list[str]] = {}


def create_schema(engine: Engine) -> None:
    """Idempotent and safe when several processes start at once (the loser of a race retries)."""
    for attempt in range(3):
        try:
            _create(engine)
            return
        except (IntegrityError, ProgrammingError, OperationalError):
            if attempt == 2:
                raise
            time.sleep(0.2 * (attempt + 1))


def _create(engine: Engine) -> None:
    Base.metadata.create_all(engine)
    with Session(engine) as s, s.begin():
        row = s.scalar(select(SchemaVersion).where(SchemaVersion.id == 1))
        if row is None:
            s.add(SchemaVersion(id=1, version=SCHEMA_VERSION))
            return
        for v in range(row.version + 1, SCHEMA_VERSION + 1):
            for stmt in MIGRATIONS.get(v, []):
                s.connection().exec_driver_sql(stmt)
            row.version = v
