"""CommitWatch: an idle worker learns of another connection's commit without querying."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text

from service.db import create_schema, make_engine
from service.db.watch import CommitWatch


def test_a_commit_by_another_process_is_seen_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    engine = make_engine(url)
    create_schema(engine)
    watch = CommitWatch(engine)
    try:
        assert not watch.changed()  # nothing written since it started
        code = (
            "import sqlite3, sys\n"
            "c = sqlite3.connect(sys.argv[1])\n"
            "c.execute('CREATE TABLE IF NOT EXISTS t (x INTEGER)')\n"
            "c.execute('INSERT INTO t VALUES (1)')\n"
            "c.commit()\n"
        )
        subprocess.run([sys.executable, "-c", code, str(tmp_path / "hpo.db")], check=True)
        assert watch.changed()  # the other process's commit
        assert not watch.changed()  # reported once
        with engine.begin() as conn:  # another connection of this process counts too
            conn.execute(text("INSERT INTO t VALUES (2)"))
        assert watch.changed()
        with engine.connect() as conn:  # a read is no change
            conn.execute(text("SELECT count(*) FROM t")).scalar()
        assert not watch.changed()
    finally:
        watch.close()


def test_a_watch_that_cannot_read_raises_instead_of_reporting_changes(tmp_path: Path) -> None:
    """The worker's loop then drops it, backs off like any database error, and builds a new
    one; a watch answering "changed" on every failed read would have it query 100 times a
    second."""
    engine = make_engine(f"sqlite:///{tmp_path / 'hpo.db'}")
    create_schema(engine)
    watch = CommitWatch(engine)
    watch.close()
    with pytest.raises(Exception):  # noqa: B017  (whatever the driver raises for a closed one)
        watch.changed()
    watch.close()  # closing twice is harmless
