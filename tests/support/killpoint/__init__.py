"""A real SIGKILL at an exact point of an ``hpo`` process (see sitecustomize.py here)."""

from __future__ import annotations

import os
from pathlib import Path

HERE = Path(__file__).resolve().parent


def env(target: str) -> dict[str, str]:
    """Environment entries that make an ``hpo`` process SIGKILL itself when it first calls
    ``target`` (``module:function`` or ``module:Class.method``)."""
    path = os.environ.get("PYTHONPATH")
    return {
        "PYTHONPATH": f"{HERE}{os.pathsep}{path}" if path else str(HERE),
        "HPO_TEST_SIGKILL_AT": target,
    }
