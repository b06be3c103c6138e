"""Fixtures for the deployment tests; the helpers live in ``compose_local``."""

from __future__ import annotations

import pytest

from tests.deploy.compose_local import TOKEN


@pytest.fixture
def compose_env() -> dict[str, str]:
    """The variables an operator sets: only the required token (everything else defaults)."""
    return {"HPO_API_TOKENS": f"ci:{TOKEN}"}
