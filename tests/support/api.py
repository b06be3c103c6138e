"""Assertions and shortcuts for API tests (in-process TestClient or a real server's httpx client)."""

from __future__ import annotations

from typing import Any

import httpx

from tests.support.specs import random_spec

PROBLEM = "application/problem+json"


def assert_problem(r: httpx.Response, status: int, field: str | None = None) -> dict[str, Any]:
    """An RFC 9457 problem details answer with this status (and field, when given)."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM), r.headers["content-type"]
    body: dict[str, Any] = r.json()
    assert body["status"] == status
    assert body["title"] and body["detail"] and body["type"] == "about:blank"
    if field is not None:
        assert body.get("field") == field, body
    return body


def submit(
    client: httpx.Client, headers: dict[str, str] | None = None, **over: Any
) -> dict[str, Any]:
    """POST a small random job (spec overrides as keywords); asserts 201."""
    r = client.post("/jobs", json=random_spec(**over), headers=headers or {})
    assert r.status_code == 201, r.text
    return dict(r.json())
